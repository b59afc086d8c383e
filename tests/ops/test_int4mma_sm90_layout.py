"""The Hopper int4 kernel's view of an IntMMA weight, checked on the CPU.

``csrc/cuda/int4mma_cute.cuh`` gives CUTLASS the format's byte layout as a
CuTe layout; a host program built with nvcc from that same header prints the
nibble offset of every (n, k), and each must hold the code the format's packer
(``pyquant.formats.int_mma.pack_mma_codes``) put there. Skips without nvcc or
the CUTLASS headers.
"""
import subprocess
from pathlib import Path

import pytest
import torch

from pyquant.formats.int_mma import pack_mma_codes, padded_shape
from pyquant.triton_kernels.tools import cuda_build

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include "int4mma_cute.cuh"
int main(int argc, char** argv) {
  const int np = std::atoi(argv[1]), kp = std::atoi(argv[2]);
  const auto layout = pyquant::int4mma_layout(np, kp);
  for (int n = 0; n < np; ++n)
    for (int k = 0; k < kp; ++k) std::printf("%lld\n", (long long)layout(cute::make_coord(n, k, 0)));
  std::printf("size %lld cosize %lld\n", (long long)cute::size(layout), (long long)cute::cosize(layout));
  return 0;
}
"""


@pytest.fixture(scope="module")
def layout_program(tmp_path_factory):
    try:
        nvcc = cuda_build.nvcc()
    except cuda_build.ToolMissing as exc:
        pytest.skip(str(exc))
    inc = cuda_build.cutlass_include()
    if inc is None:
        pytest.skip("CUTLASS headers not installed (pip install nvidia-cutlass)")
    d = tmp_path_factory.mktemp("int4mma_layout")
    (d / "layout.cu").write_text(PROGRAM)
    exe = d / "layout"
    r = subprocess.run([nvcc, "-std=c++17", f"-I{ROOT / 'csrc' / 'cuda'}", f"-I{inc}", str(d / "layout.cu"), "-o",
                        str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return exe


def _offsets(exe, np_, kp):
    lines = subprocess.run([str(exe), str(np_), str(kp)], capture_output=True, text=True, check=True).stdout.split("\n")
    size, cosize = (int(v) for v in lines[np_ * kp].split()[1::2])
    return torch.tensor([int(v) for v in lines[: np_ * kp]]).view(np_, kp), size, cosize


@pytest.mark.parametrize("n, k", [(16, 64), (48, 192), (40, 1000)], ids=lambda v: str(v))
def test_cute_layout_finds_every_code_where_the_packer_put_it(layout_program, n, k):
    np_, kp = padded_shape(n, k)
    off, size, cosize = _offsets(layout_program, np_, kp)
    assert size == cosize == np_ * kp  # a bijection onto the tensor's nibbles
    g = torch.Generator().manual_seed(n + k)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed = pack_mma_codes(codes).reshape(-1).to(torch.int64)
    nibbles = (packed[off // 2] >> (4 * (off % 2))) & 15
    assert torch.equal(nibbles[:n, :k].to(torch.uint8), codes)
    assert not bool(nibbles[n:, :].any()) and not bool(nibbles[:, k:].any())  # padding codes are 0
