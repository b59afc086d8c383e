// pybind11 entry points of the Int CPU kernels. Pointers arrive as integers
// and every size was validated in Python (pyquant/ops/cpu_int.py).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "half_output.h"
#include "int_kernels.h"
#include "thread_scratch.h"
#include "q8_kernels.h"

namespace py = pybind11;

namespace pyquant {
namespace {

template <typename T>
T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

IntWeight make_weight(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t n, int64_t k, int bits,
                      int64_t group_size, int scale_dtype) {
  return IntWeight::make(as_ptr<const uint8_t>(qweight), as_ptr<const void>(scales), as_ptr<const void>(zeros), n, k,
                         bits, group_size, scale_dtype);
}

// act_order: packed column j of the weight multiplies logical column perm[j]
// of x, so x's columns are gathered into packed order (into `buf`) before the
// kernels read it. Here rather than torch's index_select in Python, which
// cost ~1.3 us a call: a tenth of a 192 x 576 product at M = 1.
template <typename Bits>
void gather_rows(const Bits* x, int64_t m, int64_t k, const int32_t* perm, Bits* out) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) out[i * k + j] = x[i * k + perm[j]];
}

const void* gathered_columns(const void* x, int x_dtype, int64_t m, int64_t k, const int32_t* perm,
                             const CallScratch& buf) {
  // Checked here too: a launch plan checks perm once, and a perm changed in
  // place afterwards must not send this loop outside x.
  for (int64_t j = 0; j < k; ++j)
    if (perm[j] < 0 || perm[j] >= k)
      throw std::invalid_argument("act_order perm[" + std::to_string(j) + "] = " + std::to_string(perm[j]) +
                                  " is outside [0, " + std::to_string(k - 1) + "]");
  // buf: m * k floats, for fp32 x's bits or fp16 / bf16 x's in its first half
  if (x_dtype == kF32) {
    gather_rows(static_cast<const uint32_t*>(x), m, k, perm, reinterpret_cast<uint32_t*>(buf.get()));
  } else {
    gather_rows(static_cast<const uint16_t*>(x), m, k, perm, reinterpret_cast<uint16_t*>(buf.get()));
  }
  return buf.get();
}

}  // namespace

void register_int_cpu(py::module_& m) {
  m.def(
      "int_unpack",
      [](uintptr_t qweight, int64_t n, int64_t k, int bits, uintptr_t out, int nthreads) {
        int_unpack(as_ptr<const uint8_t>(qweight), n, k, bits, as_ptr<uint8_t>(out), nthreads);
      },
      py::arg("qweight"), py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("out"), py::arg("nthreads"),
      py::call_guard<py::gil_scoped_release>(), "Int codes (N, K) uint8 from packed qweight");
  m.def(
      "int_dequantize",
      [](uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t perm, int64_t n, int64_t k, int bits,
         int64_t group_size, int scale_dtype, uintptr_t out, int nthreads) {
        int_dequantize(make_weight(qweight, scales, zeros, n, k, bits, group_size, scale_dtype),
                       as_ptr<const int32_t>(perm), as_ptr<float>(out), nthreads);
      },
      py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("perm"), py::arg("n"), py::arg("k"),
      py::arg("bits"), py::arg("group_size"), py::arg("scale_dtype"), py::arg("out"), py::arg("nthreads"),
      py::call_guard<py::gil_scoped_release>(),
      "fp32 (N, K) = (q - z) * s; zeros=0 means symmetric, perm=0 no act_order");
  m.def(
      "int_qmatmul",
      [](uintptr_t x, int x_dtype, int64_t m_rows, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
         uintptr_t bias, int64_t n, int64_t k, int bits, int64_t group_size, int scale_dtype, uintptr_t y,
         int nthreads, uintptr_t lora_xa, uintptr_t lora_b, int64_t lora_rank, float lora_scale, bool int8,
         uintptr_t perm, int y_dtype) {
        const IntWeight w = make_weight(qweight, scales, zeros, n, k, bits, group_size, scale_dtype);
        const LoraEpilogue lora{as_ptr<const float>(lora_xa), as_ptr<const float>(lora_b), lora_rank, lora_scale};
        const CallScratch gathered(perm ? m_rows * k : 0, Scratch::kXGathered);
        const void* xp = perm ? gathered_columns(as_ptr<const void>(x), x_dtype, m_rows, k,
                                                 as_ptr<const int32_t>(perm), gathered)
                              : as_ptr<const void>(x);
        into_output(y_dtype, y, m_rows * n, nthreads, [&](float* y32) {
          if (int8) {
            q8::int_qmatmul(xp, x_dtype, m_rows, w, as_ptr<const float>(bias), lora, y32, nthreads);
          } else {
            int_qmatmul(xp, x_dtype, m_rows, w, as_ptr<const float>(bias), lora, y32, nthreads);
          }
        });
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("m"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
      py::arg("bias"), py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("group_size"), py::arg("scale_dtype"),
      py::arg("y"), py::arg("nthreads"), py::arg("lora_xa") = 0, py::arg("lora_b") = 0, py::arg("lora_rank") = 0,
      py::arg("lora_scale") = 0.0f, py::arg("int8_activations") = false, py::arg("perm") = 0,
      py::arg("y_dtype") = 0, py::call_guard<py::gil_scoped_release>(),
      "y (M, N) in y_dtype (0 fp32, 1 fp16, 2 bf16: the fp32 result rounded to nearest even) = x (M, K) in "
      "x_dtype @ W_hat.T (+ bias fp32 (N,), 0 = none) (+ lora_scale * lora_xa (M, r) "
      "@ lora_b (N, r).T, fp32, 0 = none); int8_activations: x quantized per 32-block (q8 kernels); perm: act_order "
      "int32 (K,) (packed column j takes x's column perm[j]; an entry outside [0, K) raises), 0 = none");
  m.def(
      "int_bf16_kernel",
      [](int x_dtype, int64_t m_rows, int bits) {
        IntWeight w{};
        w.bits = bits;
        return int4_bf16_route(x_dtype, m_rows, w);
      },
      py::arg("x_dtype"), py::arg("m"), py::arg("bits"),
      "Whether int_qmatmul (exact) takes the AVX512-BF16 kernel for x of this dtype and row count and this "
      "bit width (csrc/cpu/int4_bf16.cpp)");
  m.def(
      "int_qmatmul_t",
      [](uintptr_t g, int64_t m_rows, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t n, int64_t k,
         int bits, int64_t group_size, int scale_dtype, uintptr_t out, int nthreads) {
        int_qmatmul_t(as_ptr<const float>(g), m_rows, make_weight(qweight, scales, zeros, n, k, bits, group_size,
                                                                  scale_dtype),
                      as_ptr<float>(out), nthreads);
      },
      py::arg("g"), py::arg("m"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("n"),
      py::arg("k"), py::arg("bits"), py::arg("group_size"), py::arg("scale_dtype"), py::arg("out"),
      py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
      "out (M, K) fp32 = g (M, N) fp32 @ W_hat, stored column order, without materialising W_hat");
  m.def(
      "int_decode_panel",
      [](uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t n, int64_t k, int bits, int64_t group_size,
         int scale_dtype, int64_t k0, int64_t k1, uintptr_t out, int nthreads) {
        int_decode_panel(make_weight(qweight, scales, zeros, n, k, bits, group_size, scale_dtype), k0, k1,
                         as_ptr<float>(out), nthreads);
      },
      py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("n"), py::arg("k"), py::arg("bits"),
      py::arg("group_size"), py::arg("scale_dtype"), py::arg("k0"), py::arg("k1"), py::arg("out"),
      py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
      "out (N, k1 - k0) fp32 = stored columns [k0, k1) of W_hat (k0 a multiple of 32)");
}

}  // namespace pyquant
