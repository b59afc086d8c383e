// pybind11 entry point of the GPTQ CPU kernel. Pointers arrive as integers
// and every size was validated in Python (pyquant/algorithms/gptq.py).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>

#include "gptq_kernels.h"

namespace py = pybind11;

namespace pyquant {

void register_gptq_cpu(py::module_& m) {
  m.def(
      "gptq_block_update_f32",
      [](uintptr_t w, int64_t ldw, int64_t n, int64_t b, uintptr_t hinv, int64_t ldh, uintptr_t scale,
         uintptr_t zero, int64_t ldsz, int64_t start, int64_t stop, int64_t group_len, int64_t maxq,
         uintptr_t codes, int64_t ldc, uintptr_t err, int64_t lde, int nthreads) {
        const GptqBlockArgs a{reinterpret_cast<float*>(w), ldw, n, b, reinterpret_cast<const float*>(hinv), ldh,
                              reinterpret_cast<const float*>(scale), reinterpret_cast<const float*>(zero), ldsz,
                              start, stop, group_len, static_cast<float>(maxq), reinterpret_cast<uint8_t*>(codes),
                              ldc, reinterpret_cast<float*>(err), lde};
        gptq_block_update(a, std::max(1, nthreads));
      },
      py::arg("w"), py::arg("ldw"), py::arg("n"), py::arg("b"), py::arg("hinv"), py::arg("ldh"),
      py::arg("scale"), py::arg("zero"), py::arg("ldsz"), py::arg("start"), py::arg("stop"),
      py::arg("group_len"), py::arg("maxq"), py::arg("codes"), py::arg("ldc"), py::arg("err"),
      py::arg("lde"), py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
      "GPTQ in-block column update (fp32, row-major; see pyquant.algorithms.gptq)");
}

}  // namespace pyquant
