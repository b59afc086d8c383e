"""Offline sm_90a builds of the CUDA C++ kernels (``csrc/cuda/*.cu``), no GPU needed.

Each ``.cu`` file is compiled alone with ``nvcc -cubin`` and the flags of the
extension's CMake build (Release ``-O3``, C++17, ``--expt-relaxed-constexpr``);
the cubin holds every template instance the file's launchers instantiate, and
``cuobjdump`` (the toolkit's, else the copy Triton bundles: a CUDA install may
ship nvcc without it) lists their SASS and resource usage. Cubins are cached by
a hash of the file, the headers beside it and in ``csrc/include``, and the
compiler's version, so a second report costs only the disassembly.

Files named ``*_sm90.cu`` are Hopper-only CUTLASS kernels: they build for
``sm_90a`` alone, with the CUTLASS headers of :func:`cutlass_include`.

Needs a source checkout (``csrc/`` is not installed) and nvcc.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
ARCH = "sm_90a"
FLAGS = ("-O3", "-DNDEBUG", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo")


class ToolMissing(RuntimeError):
    """nvcc, cuobjdump or the CUDA sources are not on this machine."""


def nvcc() -> str:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    raise ToolMissing("nvcc not found (PATH, /usr/local/cuda/bin)")


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        raise ToolMissing("cuobjdump not found (PATH) and triton, which bundles one, is not installed") from None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise ToolMissing(f"cuobjdump not found (PATH, {path})")
    return path


def cutlass_include() -> Optional[str]:
    """CUTLASS's include folder (holding ``cutlass/cutlass.h``): ``$PYQUANT_CUTLASS_DIR``,
    else the nvidia-cutlass package's; None when neither is there. setup.py
    builds the ``*_sm90.cu`` kernels with the same answer."""
    given = os.environ.get("PYQUANT_CUTLASS_DIR")
    if given:
        if not (Path(given) / "cutlass" / "cutlass.h").is_file():
            raise RuntimeError(f"PYQUANT_CUTLASS_DIR={given} has no cutlass/cutlass.h")
        return str(Path(given).resolve())
    spec = importlib.util.find_spec("cutlass_library")  # found, not imported: headers are all we need
    for root in (spec.submodule_search_locations or []) if spec else []:
        inc = Path(root) / "source" / "include"
        if (inc / "cutlass" / "cutlass.h").is_file():
            return str(inc)
    return None


def is_sm90_only(path: Path) -> bool:
    return path.name.endswith("_sm90.cu")


def _cutlass_for(path: Path, arch: str) -> Optional[Path]:
    """The CUTLASS include folder a ``*_sm90.cu`` file builds with (None for the others)."""
    if not is_sm90_only(path):
        return None
    if arch != "sm_90a":
        raise ToolMissing(f"{path.name} is sm_90a code; asked for {arch}")
    inc = cutlass_include()
    if inc is None:
        raise ToolMissing(f"{path.name} needs the CUTLASS headers: pip install nvidia-cutlass (or set "
                          "PYQUANT_CUTLASS_DIR)")
    return Path(inc)


def sources() -> Dict[str, Path]:
    """{file stem: path} of every CUDA kernel file."""
    if not (CSRC / "cuda").is_dir():
        raise ToolMissing(f"no CUDA sources at {CSRC / 'cuda'} (the report needs a source checkout)")
    return {p.stem: p for p in sorted((CSRC / "cuda").glob("*.cu"))}


def _cache_dir() -> Path:
    root = os.environ.get("PYQUANT_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "pyquant"
    return base / "sass"


def _compiler_version(exe: str) -> str:
    return subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout


def cubin(path: Path, arch: str = ARCH, defines: Tuple[str, ...] = ()) -> Path:
    """The cached cubin of one ``.cu`` file for ``arch`` (compiled on a miss), with
    ``-D`` ``defines`` (a test builds one path of a kernel alone this way)."""
    exe = nvcc()
    h = hashlib.sha256()
    # the file and every header it could include (a change to any rebuilds: a cheap rule)
    headers = sorted(q for d in (path.parent, CSRC / "include") for q in d.rglob("*") if q.suffix in (".h", ".cuh"))
    for p in [path, *headers]:
        h.update(str(p).encode())
        h.update(p.read_bytes())
    h.update(_compiler_version(exe).encode())
    flags = (*FLAGS, *(f"-D{d}" for d in defines))
    cutlass = _cutlass_for(path, arch)
    if cutlass is not None:
        flags += ("-isystem", str(cutlass), "-isystem", str(cutlass.parent / "tools" / "util" / "include"))
        h.update((cutlass / "cutlass" / "version.h").read_bytes())  # its release: the path may outlive an upgrade
    h.update(" ".join((arch, *flags)).encode())
    out = _cache_dir() / f"{path.stem}-{arch}-{h.hexdigest()[:16]}.cubin"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [exe, "-cubin", f"-arch={arch}", *flags, f"-I{CSRC / 'include'}", f"-I{path.parent}", str(path),
               "-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"nvcc failed on {path.name}:\n{r.stderr[-3000:]}")
        os.replace(tmp, out)
    return out


def disassemble(cubin_path: Path) -> str:
    return subprocess.run([cuobjdump(), "-sass", str(cubin_path)], capture_output=True, text=True,
                          check=True).stdout


def res_usage(cubin_path: Path) -> str:
    return subprocess.run([cuobjdump(), "-res-usage", str(cubin_path)], capture_output=True, text=True,
                          check=True).stdout


def demangle(names) -> Dict[str, str]:
    """{mangled: readable} (c++filt where installed, else the names unchanged)."""
    names = list(names)
    exe = shutil.which("c++filt")
    if not exe or not names:
        return {n: n for n in names}
    r = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True)
    plain = r.stdout.splitlines()
    if r.returncode or len(plain) != len(names):
        return {n: n for n in names}
    return dict(zip(names, plain))


def find_function(demangled: Dict[str, str], pattern: str) -> Optional[str]:
    """The mangled name whose readable form matches ``pattern`` (a regex)."""
    rx = re.compile(pattern)
    hits = [m for m, d in demangled.items() if rx.search(d)]
    return hits[0] if hits else None
