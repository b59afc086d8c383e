"""Launch configurations: shipped defaults and candidates (``configs``), the
per-GPU JSON cache of tuned ones (``cache``), and the timing loop (``autotune``).
No triton import at module level (the cache logic is tested without a GPU), and
nothing here imports the kernels: the launcher passes ``autotune`` a launch
callable.
"""
