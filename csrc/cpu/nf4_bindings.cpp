// pyquant._C entry points of the NF4 CPU kernels. Pointers arrive as integers
// and were validated in Python (pyquant/ops/cpu_nf4.py).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "half_output.h"
#include "nf4_kernels.h"
#include "q8_kernels.h"

namespace py = pybind11;

namespace pyquant {
namespace {

// absmax != 0: plain fp32 absmax. Otherwise double quantization: absmax_q,
// absmax_scale, absmax_offset (one fp32) and the 256-entry dynamic map.
nf4cpu::Weight make_weight(uintptr_t qweight, uintptr_t absmax, uintptr_t absmax_q, uintptr_t absmax_scale,
                           uintptr_t absmax_offset, uintptr_t dyn_map, int64_t n, int64_t k, int64_t block_size) {
  nf4cpu::Weight w;
  w.qweight = reinterpret_cast<const uint8_t*>(qweight);
  w.n = n;
  w.k = k;
  w.block_size = block_size;
  w.scales.absmax = reinterpret_cast<const float*>(absmax);
  w.scales.absmax_q = reinterpret_cast<const uint8_t*>(absmax_q);
  w.scales.absmax_scale = reinterpret_cast<const float*>(absmax_scale);
  w.scales.dyn_map = reinterpret_cast<const float*>(dyn_map);
  w.scales.offset = absmax ? 0.0f : *reinterpret_cast<const float*>(absmax_offset);
  return w;
}

}  // namespace

void register_nf4_cpu(py::module_& m) {
  m.def(
      "nf4_dequantize",
      [](uintptr_t qweight, uintptr_t absmax, uintptr_t absmax_q, uintptr_t absmax_scale, uintptr_t absmax_offset,
         uintptr_t dyn_map, int64_t n, int64_t k, int64_t block_size, uintptr_t out, int nthreads, int64_t row_begin,
         int64_t row_end) {
        const nf4cpu::Weight w =
            make_weight(qweight, absmax, absmax_q, absmax_scale, absmax_offset, dyn_map, n, k, block_size);
        nf4cpu::dequantize(w, reinterpret_cast<float*>(out), nthreads, row_begin, row_end < 0 ? n : row_end);
      },
      py::arg("qweight"), py::arg("absmax"), py::arg("absmax_q"), py::arg("absmax_scale"), py::arg("absmax_offset"),
      py::arg("dyn_map"), py::arg("n"), py::arg("k"), py::arg("block_size"), py::arg("out"), py::arg("nthreads"),
      py::arg("row_begin") = 0, py::arg("row_end") = -1, py::call_guard<py::gil_scoped_release>(),
      "Rows [row_begin, row_end) (-1: N) of an NF4 weight (N, K) -> fp32 out, bit-exact with the reference");
  m.def(
      "nf4_qmatmul",
      [](uintptr_t x, int64_t m_rows, uintptr_t qweight, uintptr_t absmax, uintptr_t absmax_q, uintptr_t absmax_scale,
         uintptr_t absmax_offset, uintptr_t dyn_map, int64_t n, int64_t k, int64_t block_size, uintptr_t bias,
         uintptr_t y, int nthreads, int path, uintptr_t lora_xa, uintptr_t lora_b, int64_t lora_rank, float lora_scale,
         bool int8, int x_dtype, int y_dtype) {
        const nf4cpu::Weight w =
            make_weight(qweight, absmax, absmax_q, absmax_scale, absmax_offset, dyn_map, n, k, block_size);
        const LoraEpilogue lora{reinterpret_cast<const float*>(lora_xa), reinterpret_cast<const float*>(lora_b),
                                lora_rank, lora_scale};
        into_output(y_dtype, y, m_rows * n, nthreads, [&](float* y32) {
          if (int8) {
            q8::nf4_qmatmul(reinterpret_cast<const void*>(x), x_dtype, m_rows, w,
                            reinterpret_cast<const float*>(bias), lora, y32, nthreads);
          } else {
            nf4cpu::qmatmul(w, reinterpret_cast<const float*>(x), m_rows, reinterpret_cast<const float*>(bias), lora,
                            y32, nthreads, path);
          }
        });
      },
      py::arg("x"), py::arg("m"), py::arg("qweight"), py::arg("absmax"), py::arg("absmax_q"), py::arg("absmax_scale"),
      py::arg("absmax_offset"), py::arg("dyn_map"), py::arg("n"), py::arg("k"), py::arg("block_size"),
      py::arg("bias"), py::arg("y"), py::arg("nthreads"), py::arg("path") = -1, py::arg("lora_xa") = 0,
      py::arg("lora_b") = 0, py::arg("lora_rank") = 0, py::arg("lora_scale") = 0.0f,
      py::arg("int8_activations") = false, py::arg("x_dtype") = 0, py::arg("y_dtype") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "y (M, N) in y_dtype (0 fp32, 1 fp16, 2 bf16: the fp32 result rounded to nearest even) = x (M, K) @ W^T + "
      "bias (fp32 (N,) or 0 for none) (+ lora_scale * lora_xa (M, r) @ lora_b "
      "(N, r).T, fp32, 0 = none). Exact path: x fp32, path -1 auto, 0 fused, 1 tiled. int8_activations: x "
      "(x_dtype) quantized per 32-block, needs K % 32 == 0 (nf4_q8_supported)");
  m.def("nf4_q8_supported", &q8::nf4_supported, py::arg("k"), "Whether the int8-activation NF4 kernel takes K");
  m.def(
      "nf4_qmatmul_t",
      [](uintptr_t g, int64_t m_rows, uintptr_t qweight, uintptr_t absmax, uintptr_t absmax_q, uintptr_t absmax_scale,
         uintptr_t absmax_offset, uintptr_t dyn_map, int64_t n, int64_t k, int64_t block_size, uintptr_t out,
         int nthreads) {
        const nf4cpu::Weight w =
            make_weight(qweight, absmax, absmax_q, absmax_scale, absmax_offset, dyn_map, n, k, block_size);
        nf4cpu::qmatmul_t(w, reinterpret_cast<const float*>(g), m_rows, reinterpret_cast<float*>(out), nthreads);
      },
      py::arg("g"), py::arg("m"), py::arg("qweight"), py::arg("absmax"), py::arg("absmax_q"), py::arg("absmax_scale"),
      py::arg("absmax_offset"), py::arg("dyn_map"), py::arg("n"), py::arg("k"), py::arg("block_size"), py::arg("out"),
      py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
      "out (M, K) fp32 = g (M, N) fp32 @ W, without materialising W");
  m.def(
      "nf4_decode_panel",
      [](uintptr_t qweight, uintptr_t absmax, uintptr_t absmax_q, uintptr_t absmax_scale, uintptr_t absmax_offset,
         uintptr_t dyn_map, int64_t n, int64_t k, int64_t block_size, int64_t k0, int64_t k1, uintptr_t out,
         int nthreads) {
        const nf4cpu::Weight w =
            make_weight(qweight, absmax, absmax_q, absmax_scale, absmax_offset, dyn_map, n, k, block_size);
        nf4cpu::decode_panel(w, k0, k1, reinterpret_cast<float*>(out), nthreads);
      },
      py::arg("qweight"), py::arg("absmax"), py::arg("absmax_q"), py::arg("absmax_scale"), py::arg("absmax_offset"),
      py::arg("dyn_map"), py::arg("n"), py::arg("k"), py::arg("block_size"), py::arg("k0"), py::arg("k1"),
      py::arg("out"), py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
      "out (N, k1 - k0) fp32 = columns [k0, k1) of every row of an NF4 weight, bit-exact with the reference");
}

}  // namespace pyquant
