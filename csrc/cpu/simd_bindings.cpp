// pyquant._C entry points of the SIMD dispatcher (csrc/cpu/simd.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "half_output.h"
#include "simd.h"

namespace py = pybind11;

namespace pyquant {

void register_simd_cpu(py::module_& m) {
  m.def("simd_level", [] { return simd_name(simd_level()); },
        "SIMD level the CPU kernels use now: scalar, avx2, avxvnni or avx512 (ValueError when PYQUANT_SIMD "
        "names a level this CPU lacks)");
  m.def("set_simd_level", &set_simd_level, py::arg("level"),
        "Use `level` (scalar, avx2, avxvnni, avx512) from now on, or 'best' for the default (PYQUANT_SIMD, else "
        "the best the CPU has). ValueError for an unknown level or one this CPU lacks. Returns True.");
  m.def("simd_avx512_bf16", &simd_has_avx512_bf16,
        "True when the avx512 level runs and the CPU has AVX512-BF16 (vdpbf16ps), not hidden by "
        "PYQUANT_SIMD_HIDE=avx512bf16: the Int4 kernel for bf16 x at small M runs then");
  m.def("simd_emulated", &simd_emulated,
        "True for a build whose avxvnni and avx512 levels run SIMDe's AVX2 versions of their instructions "
        "(CMake PYQUANT_SIMDE_INCLUDE): for testing those kernels on an AVX2 CPU; its timings mean nothing");
  m.def(
      "store_fp32_as",
      [](int dtype, uintptr_t src, uintptr_t dst, int64_t count, int nthreads) {
        if (dtype != kF16 && dtype != kBF16)
          throw std::invalid_argument("store_fp32_as: dtype must be 1 (fp16) or 2 (bf16), got " +
                                      std::to_string(dtype));
        store_fp32_as(dtype, reinterpret_cast<const float*>(src), reinterpret_cast<void*>(dst), count, nthreads);
      },
      py::arg("dtype"), py::arg("src"), py::arg("dst"), py::arg("count"), py::arg("nthreads"),
      py::call_guard<py::gil_scoped_release>(),
      "count fp32 values -> fp16 (1) / bf16 (2), rounded to nearest even at the current SIMD level: how the "
      "qmatmul entry points write y for half-precision x (csrc/cpu/half_output.h); for tests");
  m.def("simd_levels", &simd_supported_names, "The SIMD levels this CPU and OS support, lowest first");
  m.def("simd_all_levels", [] {
    std::vector<std::string> out;
    for (int l = 0; l < kSimdLevels; ++l) out.push_back(simd_name(Simd(l)));
    return out;
  }, "Every SIMD level the kernels know, lowest first");
}

}  // namespace pyquant
