"""Fused solver kernels of the quantization algorithms (experimental until a GPU
run verifies them): ``hqq.hqq_solve`` and ``gptq.gptq_block_update``.

They take and return plain tensors: the algorithms in ``pyquant.algorithms``
build the inputs (HQQ's step schedule, the GPTQ block and its scales) and wrap
the outputs, so this package never imports them.
"""
