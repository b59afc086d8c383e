// pyquant._C entry points of the q8 kernels' activation quantizers, for
// tests: the codes and scales every integer-dot kernel multiplies with.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "q8_kernels.h"

namespace py = pybind11;

namespace pyquant {

void register_q8_cpu(py::module_& m) {
  m.def(
      "q8_quantize",
      [](int kind, uintptr_t x, int x_dtype, int64_t m_rows, int64_t k, uintptr_t qs, uintptr_t d, uintptr_t s,
         uintptr_t isum, uintptr_t bsums, uintptr_t qs2, uintptr_t isum1, int span) {
        if (span < 1 || (span > 1 && kind != int(q8::ActKind::kQ8x2_32)))
          throw std::invalid_argument("q8_quantize: span must be >= 1, and 1 unless kind is 4 (Q8x2_32); got span " +
                                      std::to_string(span) + " with kind " + std::to_string(kind));
        q8::quantize_activations(q8::ActKind(kind), reinterpret_cast<const void*>(x), x_dtype, m_rows, k,
                                 reinterpret_cast<int8_t*>(qs), reinterpret_cast<float*>(d),
                                 reinterpret_cast<float*>(s), reinterpret_cast<int32_t*>(isum),
                                 reinterpret_cast<int16_t*>(bsums), reinterpret_cast<int8_t*>(qs2),
                                 reinterpret_cast<int32_t*>(isum1), span);
      },
      py::arg("kind"), py::arg("x"), py::arg("x_dtype"), py::arg("m"), py::arg("k"), py::arg("qs"), py::arg("d"),
      py::arg("s"), py::arg("isum"), py::arg("bsums"), py::arg("qs2") = 0, py::arg("isum1") = 0, py::arg("span") = 1,
      py::call_guard<py::gil_scoped_release>(),
      "x (m, k) quantized as the q8 kernels do at the current SIMD level: kind 0 Q8_0, 1 Q8_1, 2 Q8_K, 3 Q8_32 "
      "(fp32 d), 4 Q8x2_32 (two planes; isum: of 256 q + q2, isum1: of q). qs/qs2 int8 (m, kp), d/s fp32 and isum/isum1 int32 (m, kp / block), "
      "bsums int16 (m, kp / 16); kp = k rounded up to the block (32, or 256 for Q8_K); all but qs, d may be 0. "
      "span: Q8x2_32's 32-blocks sharing one d (q8_int_act_span).");
  m.def("q8_int_act_span", &q8::int_act_span, py::arg("group_size"),
        "32-blocks of x sharing one scale in the Int int8-activation kernels (1: every block its own).");
}

}  // namespace pyquant
