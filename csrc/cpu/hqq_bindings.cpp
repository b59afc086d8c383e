// pybind11 entry points of the HQQ CPU solvers. Pointers arrive as integers
// and every size was validated in Python (pyquant/algorithms/hqq.py,
// pyquant/algorithms/hqq_integer_zero.py).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "hqq_kernels.h"

namespace py = pybind11;

namespace pyquant {
namespace {

HqqOutputs make_outputs(uintptr_t codes, uintptr_t scales, uintptr_t zeros, uintptr_t err, uintptr_t steps) {
  return HqqOutputs{reinterpret_cast<uint8_t*>(codes), reinterpret_cast<float*>(scales),
                    reinterpret_cast<float*>(zeros), reinterpret_cast<float*>(err),
                    reinterpret_cast<int32_t*>(steps)};
}

}  // namespace

void register_hqq_cpu(py::module_& m) {
  m.def(
      "hqq_solve_cpu",
      [](uintptr_t w, uintptr_t codes, uintptr_t scales, uintptr_t zeros, uintptr_t err, uintptr_t steps, int64_t n,
         int64_t k, int64_t group, int bits, int scale_dtype, int iters, uintptr_t schedule, double lp_norm,
         bool kappa_one, bool early_stop, int nthreads) {
        const HqqParams P(bits, scale_dtype, iters, reinterpret_cast<const float*>(schedule), lp_norm, kappa_one,
                          early_stop);
        hqq_solve(reinterpret_cast<const float*>(w), make_outputs(codes, scales, zeros, err, steps), n, k, group, P,
                  nthreads);
      },
      py::call_guard<py::gil_scoped_release>(), py::arg("w"), py::arg("codes"), py::arg("scales"), py::arg("zeros"),
      py::arg("err"), py::arg("steps"), py::arg("n"), py::arg("k"), py::arg("group"), py::arg("bits"),
      py::arg("scale_dtype"), py::arg("iters"), py::arg("schedule"), py::arg("lp_norm"), py::arg("kappa_one"),
      py::arg("early_stop"), py::arg("nthreads"),
      "HQQ solver over fp32 w (n, k) grouped along k; writes codes, stored scales/zeros (fp32), "
      "per-group squared error and step count.");
  m.def(
      "hqq_solve_integer_zero_cpu",
      [](uintptr_t w, uintptr_t codes, uintptr_t scales, uintptr_t zeros, uintptr_t err, uintptr_t steps, int64_t n,
         int64_t k, int64_t group, int bits, int scale_dtype, int iters, uintptr_t schedule, double lp_norm,
         bool kappa_one, bool early_stop, double zero_slack, int nthreads) {
        const HqqParams P(bits, scale_dtype, iters, reinterpret_cast<const float*>(schedule), lp_norm, kappa_one,
                          early_stop);
        hqq_solve_integer_zero(reinterpret_cast<const float*>(w), make_outputs(codes, scales, zeros, err, steps), n,
                               k, group, P, static_cast<float>(zero_slack), nthreads);
      },
      py::call_guard<py::gil_scoped_release>(), py::arg("w"), py::arg("codes"), py::arg("scales"), py::arg("zeros"),
      py::arg("err"), py::arg("steps"), py::arg("n"), py::arg("k"), py::arg("group"), py::arg("bits"),
      py::arg("scale_dtype"), py::arg("iters"), py::arg("schedule"), py::arg("lp_norm"), py::arg("kappa_one"),
      py::arg("early_stop"), py::arg("zero_slack"), py::arg("nthreads"),
      "HQQ around integer zero points (scale solved without clipping, then the zero within zero_slack) over fp32 w "
      "(n, k) grouped along k; writes codes, stored scales, zeros, per-group squared error and step count.");
}

}  // namespace pyquant
