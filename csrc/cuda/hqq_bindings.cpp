// Python binding of the CUDA HQQ solver (csrc/cuda/hqq.cu).
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

namespace pyquant {

void hqq_solve_cuda(uintptr_t w, uintptr_t codes, uintptr_t scales, uintptr_t zeros, uintptr_t err, uintptr_t steps,
                    int64_t n, int64_t k, int64_t group, int bits, int scale_dtype, int iters, uintptr_t schedule,
                    double lp_norm, double thr_last, bool kappa_one, bool early_stop, uintptr_t stream);

void register_hqq_cuda(py::module_& m) {
  m.def("hqq_solve_cuda", &hqq_solve_cuda, py::call_guard<py::gil_scoped_release>(), py::arg("w"), py::arg("codes"),
        py::arg("scales"), py::arg("zeros"), py::arg("err"), py::arg("steps"), py::arg("n"), py::arg("k"),
        py::arg("group"), py::arg("bits"), py::arg("scale_dtype"), py::arg("iters"), py::arg("schedule"),
        py::arg("lp_norm"), py::arg("thr_last"), py::arg("kappa_one"), py::arg("early_stop"), py::arg("stream"),
        "HQQ solver on the GPU (experimental): same contract as hqq_solve_cpu, device pointers, a stream.");
}

}  // namespace pyquant
