// Python bindings of the CUDA launchers (compiled only with PYQUANT_CUDA=ON).
#include <pybind11/pybind11.h>

#include "int_dequant.h"

namespace py = pybind11;

namespace pyquant {

void register_hqq_cuda(py::module_& m);

void register_cuda(py::module_& m) {
  m.def("int_dequant_cuda", &int_dequant_cuda, py::call_guard<py::gil_scoped_release>(), py::arg("qweight"),
        py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("n"), py::arg("k"), py::arg("bits"),
        py::arg("group"), py::arg("scale_dtype"), py::arg("out_dtype"), py::arg("stream"));
  register_hqq_cuda(m);
}

}  // namespace pyquant
