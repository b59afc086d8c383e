#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace pyquant {

void register_gguf_cpu(py::module_& m) {}

}  // namespace pyquant
