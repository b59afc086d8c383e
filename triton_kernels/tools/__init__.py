"""Developer tools, run as ``python -m pyquant.triton_kernels.tools.<name>``:
``report`` (every CUDA C++ and Triton kernel built offline for sm_90a: registers,
spills, load widths, instructions per weight, occupancy, waves and predicted times
on the benchmark shapes), ``sass`` (the SASS parser and Triton's sm_90 builds,
with a table of the Triton variants), ``bench`` (GPU timing against dense fp16).
``cuda_build`` compiles ``csrc/cuda`` files with nvcc, ``gpu_model`` holds the
H100 figures. Never imported by the kernels.
"""
