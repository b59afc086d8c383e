"""Build pyquant and its extension pyquant._C with CMake.

Environment:
  PYQUANT_CUDA=auto|0|1   build the CUDA kernels (auto: when nvcc is found)
  PYQUANT_CUDA_ARCHS      CMake CUDA architectures, default "80;90a"
  PYQUANT_CUTLASS_DIR     CUTLASS include folder (holding cutlass/cutlass.h) for the
                          sm_90a kernels; default: the nvidia-cutlass package's, if installed
  PYQUANT_BUILD_JOBS      parallel compile jobs (default: CPU count)
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _want_cuda() -> bool:
    mode = os.environ.get("PYQUANT_CUDA", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return False
    found = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()
    if mode in ("1", "on", "true", "yes"):
        if not found:
            raise RuntimeError("PYQUANT_CUDA=1 but nvcc was not found")
        return True
    return found


def cutlass_include() -> str:
    """The CUTLASS headers' folder, or "" (then the *_sm90.cu kernels are not built):
    the offline SASS tool's answer (triton_kernels/tools/cuda_build.py, loaded
    by path: the package is not importable before it is built)."""
    spec = importlib.util.spec_from_file_location("_cuda_build", ROOT / "triton_kernels" / "tools" / "cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cutlass_include() or ""


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = _want_cuda()
        args = [
            f"-DPYQUANT_OUTPUT_DIR={out.parent}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPYQUANT_CUDA={'ON' if cuda else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
            # Always given, so a build directory once used for the emulated
            # test build (CMakeLists.txt) goes back to a normal one.
            f"-DPYQUANT_SIMDE_INCLUDE={os.environ.get('PYQUANT_SIMDE_INCLUDE', '')}",
        ]
        if cuda:
            args.append(f"-DPYQUANT_CUDA_ARCHS={os.environ.get('PYQUANT_CUDA_ARCHS', '80;90a')}")
            nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            args.append(f"-DPYQUANT_CUTLASS_INCLUDE={cutlass_include()}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("PYQUANT_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel", jobs])
        suffix_name = out.name
        built = next(out.parent.glob("_C*.so"), None)
        if built is None:
            raise RuntimeError(f"CMake did not produce the extension in {out.parent}")
        if built.name != suffix_name:
            built.replace(out)


setup(
    packages=find_packages(include=["pyquant", "pyquant.*"])
    + ["pyquant.triton_kernels"]
    + [f"pyquant.triton_kernels.{p}" for p in find_packages("triton_kernels")],
    package_dir={"pyquant.triton_kernels": "triton_kernels"},
    package_data={"pyquant.ops": ["verified_kernels.json"]},
    ext_modules=[CMakeExtension("pyquant._C")],
    cmdclass={"build_ext": CMakeBuild},
)
