// Python bindings of the CUDA launchers (compiled only with PYQUANT_CUDA=ON):
// one m.def per launcher of launchers.h, each releasing the GIL while it
// enqueues work.
#include <pybind11/pybind11.h>

#include "launchers.h"
#include "launchers_sm90.h"

namespace py = pybind11;

namespace pyquant {

void register_cuda(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("int4_gemv_cuda", &int4_gemv_cuda, nogil, py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("zeros"), py::arg("bias"), py::arg("out"), py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("group"), py::arg("scale_dtype"), py::arg("bias_dtype"), py::arg("x_dtype"), py::arg("stream"));

  m.def("int4_mma_cuda", &int4_mma_cuda, nogil, py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("zeros"), py::arg("bias"), py::arg("out"), py::arg("ws"), py::arg("tickets"), py::arg("m"),
        py::arg("n"), py::arg("k"), py::arg("group"), py::arg("splits"), py::arg("scale_dtype"),
        py::arg("bias_dtype"), py::arg("x_dtype"), py::arg("stream"));

  m.def("int4_mma_dequant_cuda", &int4_mma_dequant_cuda, nogil, py::arg("qweight"), py::arg("scales"),
        py::arg("zeros"), py::arg("perm"), py::arg("out"), py::arg("n"), py::arg("k"), py::arg("group"),
        py::arg("scale_dtype"), py::arg("out_dtype"), py::arg("stream"));

  m.def("quantize_rows_int8_cuda", &quantize_rows_int8_cuda, nogil, py::arg("x"), py::arg("q"), py::arg("scale"),
        py::arg("m"), py::arg("k"), py::arg("kp"), py::arg("x_dtype"), py::arg("stream"));

  m.def("w8a8_gemm_cuda", &w8a8_gemm_cuda, nogil, py::arg("qa"), py::arg("sa"), py::arg("w"), py::arg("sw"),
        py::arg("bias"), py::arg("out"), py::arg("m"), py::arg("n"), py::arg("kp"), py::arg("scale_dtype"),
        py::arg("bias_dtype"), py::arg("out_dtype"), py::arg("stream"));

  m.def("quantize_rows_w8a8_cuda", &quantize_rows_w8a8_cuda, nogil, py::arg("x"), py::arg("q"), py::arg("scale"),
        py::arg("corr"), py::arg("m"), py::arg("k"), py::arg("kp"), py::arg("x_dtype"), py::arg("stream"));

#ifdef PYQUANT_WITH_SM90  // built with the CUTLASS headers and sm_90a (CMakeLists.txt)
  m.def("w8a8_sm90_gemm_cuda", &w8a8_sm90_gemm_cuda, nogil, py::arg("qa"), py::arg("sa"), py::arg("corr"),
        py::arg("w"), py::arg("sw"), py::arg("bias"), py::arg("out"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("m"), py::arg("n"), py::arg("kp"), py::arg("out_dtype"),
        py::arg("stream"));
  m.def("w8a8_sm90_workspace_bytes", &w8a8_sm90_workspace_bytes, py::arg("m"), py::arg("n"), py::arg("kp"),
        py::arg("out_dtype"));
  m.def("int4mma_sm90_gemm_cuda", &int4mma_sm90_gemm_cuda, nogil, py::arg("x"), py::arg("qweight"),
        py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("out"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("group"), py::arg("dtype"),
        py::arg("stream"));
  m.def("int4mma_sm90_workspace_bytes", &int4mma_sm90_workspace_bytes, py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("group"), py::arg("dtype"));
#endif

  m.def("nf4_dequant_cuda", &nf4_dequant_cuda, nogil, py::arg("qweight"), py::arg("absmax"), py::arg("absmax_q"),
        py::arg("absmax_scale"), py::arg("absmax_offset"), py::arg("dyn_map"), py::arg("out"), py::arg("numel"),
        py::arg("block_size"), py::arg("out_dtype"), py::arg("stream"));

  m.def("gguf_dequant_cuda", &gguf_dequant_cuda, nogil, py::arg("blocks"), py::arg("out"), py::arg("nblocks"),
        py::arg("type"), py::arg("out_dtype"), py::arg("stream"));

  m.def("int_dequant_cuda", &int_dequant_cuda, nogil, py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
        py::arg("out"), py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("group"), py::arg("scale_dtype"),
        py::arg("out_dtype"), py::arg("stream"));

  m.def("gptq_block_update_cuda", &gptq_block_update_cuda, nogil, py::arg("w"), py::arg("ldw"), py::arg("n"),
        py::arg("b"), py::arg("hinv"), py::arg("ldh"), py::arg("scale"), py::arg("zero"), py::arg("ldsz"),
        py::arg("start"), py::arg("stop"), py::arg("group_len"), py::arg("maxq"), py::arg("codes"), py::arg("ldc"),
        py::arg("err"), py::arg("lde"), py::arg("stream"));

  m.def("hqq_solve_cuda", &hqq_solve_cuda, nogil, py::arg("w"), py::arg("codes"), py::arg("scales"),
        py::arg("zeros"), py::arg("err"), py::arg("steps"), py::arg("n"), py::arg("k"), py::arg("group"),
        py::arg("bits"), py::arg("scale_dtype"), py::arg("iters"), py::arg("schedule"), py::arg("lp_norm"),
        py::arg("thr_last"), py::arg("kappa_one"), py::arg("early_stop"), py::arg("stream"),
        "HQQ solver on the GPU (experimental): same contract as hqq_solve_cpu, device pointers, a stream.");
}

}  // namespace pyquant
