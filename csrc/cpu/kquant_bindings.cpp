// pybind11 entry point of the k-quant quantizer. Pointers arrive as integers
// and every size was validated in Python (pyquant/algorithms/kquant.py).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "kquant_kernels.h"

namespace py = pybind11;

namespace pyquant {

void register_kquant_cpu(py::module_& m) {
  m.def(
      "kquant_quantize",
      [](int ggml_type, uintptr_t x, uintptr_t qw, int64_t nrows, int64_t k, uintptr_t out, int nthreads) {
        kquant_quantize(ggml_type, reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(qw), nrows, k,
                        reinterpret_cast<uint8_t*>(out), nthreads);
      },
      py::arg("ggml_type"), py::arg("x"), py::arg("qw"), py::arg("nrows"), py::arg("k"), py::arg("out"),
      py::arg("nthreads"), py::call_guard<py::gil_scoped_release>(),
      "llama.cpp k-quant quantization of fp32 rows (qw = importance pointer or 0) into GGUF block bytes");
}

}  // namespace pyquant
