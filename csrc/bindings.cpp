// pyquant._C: thin pybind11 bindings. Every kernel entry point takes raw
// pointers (as integers), sizes, dtype codes and a thread count (CPU) or a
// stream (CUDA); validation happened in Python (DESIGN.md rule 4). Each CPU
// family registers its functions in cpu/<family>_bindings.cpp, the CUDA
// launchers all in cuda/cuda_bindings.cpp, so kernel files never see pybind11.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace pyquant {
void register_simd_cpu(py::module_& m);
void register_q8_cpu(py::module_& m);
void register_int_cpu(py::module_& m);
void register_nf4_cpu(py::module_& m);
void register_gguf_cpu(py::module_& m);
void register_kquant_cpu(py::module_& m);
void register_hqq_cpu(py::module_& m);
void register_gptq_cpu(py::module_& m);
#ifdef PYQUANT_WITH_CUDA
void register_cuda(py::module_& m);
#endif
}  // namespace pyquant

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyquant compiled kernels (CPU C++ and, when built, CUDA)";
  pyquant::register_simd_cpu(m);
  pyquant::register_q8_cpu(m);
#ifdef PYQUANT_WITH_CUDA
  m.def("cuda_compiled", [] { return true; });
  m.def("cuda_arches", [] {
    std::vector<std::string> out;
    std::string s = PYQUANT_CUDA_ARCHS, cur;
    for (char c : s) {
      if (c == ',') { out.push_back(cur); cur.clear(); } else { cur += c; }
    }
    if (!cur.empty()) out.push_back(cur);
    return out;
  });
  pyquant::register_cuda(m);
#else
  m.def("cuda_compiled", [] { return false; });
  m.def("cuda_arches", [] { return std::vector<std::string>{}; });
#endif
  pyquant::register_int_cpu(m);
  pyquant::register_nf4_cpu(m);
  pyquant::register_gguf_cpu(m);
  pyquant::register_kquant_cpu(m);
  pyquant::register_hqq_cpu(m);
  pyquant::register_gptq_cpu(m);
}
