"""Stand-ins for the last step of each GPU launch, so the host path runs on the CPU.

Used by ``host_overhead.py`` and the host-path tests (not a benchmark itself). Every
line of pyquant's Python runs as on a GPU machine; only what needs a device is
replaced:

* ``StubExtension``: ``pyquant._C`` whose entry points record their arguments and
  return (the CUDA and C++ launches); ``cuda_compiled()`` is True.
* ``cuda_backend_on_cpu()``: the CUDA backend takes CPU tensors (its device check,
  current stream and device guard are the only device calls of its host path).
* ``hopper_backend_on_cpu()``: that, on a device of a given compute capability, with
  a stub extension that has (or, built without CUTLASS, lacks) the sm_90a kernels.
* ``StubTritonDriver``: a Triton driver (``triton.runtime.driver.set_active``) whose
  target is sm_90 (kernels really compile, with the bundled ptxas) and whose
  launcher records its arguments instead of calling ``cuLaunchKernel``; the JIT's
  binder, specialisation and cache lookup all run. Needs the kernels defined for a
  GPU, i.e. no TRITON_INTERPRET.
"""
from __future__ import annotations

import contextlib
from typing import List


class StubExtension:
    """``pyquant._C`` with every entry point a recorder."""

    def __init__(self, real=None):
        self.real = real
        self.calls: List[tuple] = []
        self.record = False

    def cuda_compiled(self) -> bool:
        return True

    def cuda_arches(self):
        return ["90a"]

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def entry(*args):
            if self.record:
                self.calls.append((name, args))

        entry.__name__ = name
        setattr(self, name, entry)  # later lookups skip __getattr__, as a module attribute would
        return entry


@contextlib.contextmanager
def stub_extension(real_fallback: bool = False):
    """Install a StubExtension as what ``pyquant._ext.load()`` returns."""
    from pyquant import _ext

    stub = StubExtension()
    saved = _ext.load
    _ext.load = lambda: stub
    try:
        yield stub
    finally:
        _ext.load = saved


@contextlib.contextmanager
def cuda_backend_on_cpu():
    """The CUDA backend's device seam (readiness, stream, device guard) on CPU tensors."""
    from pyquant.ops.backends import cuda

    saved = cuda.RUNTIME
    cuda.RUNTIME = cuda.CudaRuntime(ready=lambda device: device.type == "cpu", stream=lambda index: 0,
                                    current_device=lambda: 0, set_device=lambda index: None)
    try:
        yield
    finally:
        cuda.RUNTIME = saved


class Sm90StubExtension(StubExtension):
    """A StubExtension with the sm_90a CUTLASS kernels: their workspace queries answer 0."""

    def __getattr__(self, name):
        if name.endswith("_workspace_bytes"):
            return lambda *args: 0
        return super().__getattr__(name)


class NoSm90StubExtension(StubExtension):
    """An extension built without the CUTLASS headers: no sm_90a entry points."""

    def __getattr__(self, name):
        if "sm90" in name:
            raise AttributeError(name)
        return super().__getattr__(name)


@contextlib.contextmanager
def hopper_backend_on_cpu(capability=(9, 0), sm90: bool = True):
    """``cuda_backend_on_cpu()`` on a device of compute capability ``capability``, with a
    recording stub extension that has the sm_90a kernels (``sm90``) or not; yields it."""
    from pyquant import _ext
    from pyquant.ops.backends import cuda

    stub = Sm90StubExtension() if sm90 else NoSm90StubExtension()
    saved = _ext.load
    _ext.load = lambda: stub
    try:
        with cuda_backend_on_cpu():
            cuda.RUNTIME.capability = lambda index: capability
            cuda.capability.cache_clear()
            stub.record = True
            yield stub
    finally:
        cuda.capability.cache_clear()
        _ext.load = saved


def make_triton_driver():
    """A Triton driver for sm_90 whose launches record and return."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class _Utils:
        def load_binary(self, name, kernel, shared, device):
            return None, None, 0, 0, 1024

        def unload_module(self, module):
            pass

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                    "warpSize": 32, "sm_clock_rate": 1755000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    class StubTritonDriver(DriverBase):
        def __init__(self):
            self.utils = _Utils()
            self.launches: List[tuple] = []
            self.record = False
            driver = self

            class Launcher:
                def __init__(self, src, metadata):
                    self.name = getattr(src, "name", "?")

                def __call__(self, *args):
                    if driver.record:
                        driver.launches.append((self.name, args))

            self.launcher_cls = Launcher

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device):
            return 0

        def get_device_capability(self, device=0):
            return (9, 0)

        def get_benchmarker(self):
            raise RuntimeError("no benchmarking on the stand-in driver")

        def get_device_interface(self):
            import torch

            return torch.cuda

    return StubTritonDriver()


@contextlib.contextmanager
def triton_on_cpu():
    """Triton kernels launched through a recording stand-in driver, on CPU tensors."""
    from triton.runtime import driver as triton_driver

    from pyquant.ops.backends import triton as bt

    drv = make_triton_driver()
    saved_usable = bt.usable
    saved_active = triton_driver._active  # None until a driver was needed (no GPU: none can be made)
    triton_driver.set_active(drv)
    bt.usable = lambda device: True
    try:
        yield drv
    finally:
        bt.usable = saved_usable
        triton_driver._active = saved_active
