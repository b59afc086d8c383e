"""Quantized matmul ``y = x @ W_hat.T (+ bias)`` and dequantize, for every format.

Paths, chosen by M (``tuning/configs.path_for_m``) or forced with ``path=``:

* GEMV (M <= 4): CUDA cores. A ``[BN, BK]`` weight tile is decoded once and
  multiplied with every activation row. Memory bound, so the grid also splits K
  (SPLIT) when N alone gives too few programs to fill the GPU.
* split-K (M <= 64): ``tl.dot`` tiles with BM = 16..64, K cut into SPLIT
  ranges: few M rows mean few output tiles, and splitting K restores
  parallelism.
* GEMM (larger M): the same tensor-core kernel with SPLIT = 1 and a grouped
  tile order (GROUP_M) so tiles sharing weight columns run together and hit L2.

Each path has two kernels: a generic one that decodes every format element by
element (``gemv.py``, ``mm.py``, through ``decode.w_tile``: the format is a set
of constexprs that prunes the decoder at compile time) and a word-wise one for
Int4 / Int8 (and NF4 on the GEMV) that reads 16-byte words and unpacks them in
registers (``gemv_packed.py``, ``mm_packed.py``). Split partial sums go to an
fp32 workspace ``[SPLIT, M, N]`` that ``epilogue.reduce_kernel`` adds in a
fixed order: no atomics, so results are deterministic run to run, and the
workspace size depends only on shapes and the config (CUDA-graph friendly).

``launch.py`` is the host side (format arguments in ``args.py``, configs from
``tuning``); ``tune.py`` autotunes one weight. Nothing here is imported by
``import pyquant.triton_kernels``.
"""
