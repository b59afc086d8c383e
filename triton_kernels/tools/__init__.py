"""Developer tools, run as ``python -m pyquant.triton_kernels.tools.<name>``:
``sass`` (offline sm_90 builds and what their machine code says) and ``bench``
(GPU timing against dense fp16). Never imported by the kernels.
"""
