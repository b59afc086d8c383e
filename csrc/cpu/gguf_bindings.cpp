// pybind11 entry points of the GGUF CPU kernels. Pointers arrive as integers
// from pyquant/ops/cpu_gguf.py, which has already validated shapes, dtypes
// and contiguity; the GIL is released while the kernels run.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "gguf_kernels.h"
#include "half_output.h"
#include "q8_kernels.h"

namespace py = pybind11;

namespace pyquant {

void register_gguf_cpu(py::module_& m) {
  m.def(
      "gguf_dequantize",
      [](int type, uintptr_t blocks, uintptr_t out, int64_t nblocks, int nthreads) {
        gguf::dequantize(type, reinterpret_cast<const uint8_t*>(blocks), reinterpret_cast<float*>(out), nblocks,
                         nthreads);
      },
      py::arg("type"), py::arg("blocks"), py::arg("out"), py::arg("nblocks"), py::arg("nthreads"),
      py::call_guard<py::gil_scoped_release>(),
      "Decode `nblocks` contiguous GGUF blocks of ggml type `type` into fp32 `out`.");
  m.def(
      "gguf_qmatmul",
      [](int type, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t y, int64_t m, int64_t n, int64_t k,
         int nthreads, bool int8, int x_dtype, int y_dtype) {
        into_output(y_dtype, y, m * n, nthreads, [&](float* y32) {
          if (int8) {
            q8::gguf_qmatmul(type, reinterpret_cast<const void*>(x), x_dtype, m, reinterpret_cast<const uint8_t*>(w),
                             n, k, reinterpret_cast<const float*>(bias), y32, nthreads);
          } else {
            gguf::qmatmul(type, reinterpret_cast<const float*>(x), reinterpret_cast<const uint8_t*>(w),
                          reinterpret_cast<const float*>(bias), y32, m, n, k, nthreads);
          }
        });
      },
      py::arg("type"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"), py::arg("m"), py::arg("n"),
      py::arg("k"), py::arg("nthreads"), py::arg("int8_activations") = false, py::arg("x_dtype") = 0,
      py::arg("y_dtype") = 0, py::call_guard<py::gil_scoped_release>(),
      "y (m, n) = x (m, k) @ dequant(w).T (+ bias fp32 or 0), w as raw GGUF rows; y in y_dtype (0 fp32, 1 fp16, "
      "2 bf16: the fp32 result rounded to nearest even). Exact: x fp32, fp32 arithmetic. int8_activations: "
      "llama.cpp's scheme (x as Q8_0 / Q8_1 / Q8_K blocks, integer dot products), x in x_dtype.");
  m.def("gguf_fused_gemv_types", [] { return py::make_tuple(int(gguf::kQ4_K), int(gguf::kQ6_K), int(gguf::kQ8_0)); },
        "ggml types with a dedicated M=1 kernel (others use the tiled kernel).");
}

}  // namespace pyquant
