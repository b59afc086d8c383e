"""CPU emulation of the index arithmetic of two CUDA kernels, so that their layouts
are checked on machines without a GPU:

* csrc/cuda/int4_gemv.cu: which packed nibble and which staged x value each
  lane multiplies (x staging with its padded chunk stride, both staging
  paths, the nibble order of a 128-bit chunk, tiles, rows out of range, the
  butterfly reduction's output mapping);
* csrc/cuda/w8a8.cu: shared-memory tile addresses and the mma.m16n8k32 s8
  fragment registers, fed through an emulated mma that uses the PTX ISA's
  documented fragment layouts, then the epilogue's output mapping.

The constants and index expressions are read from the ``.cu`` files themselves
(``CudaSource``: the tile sizes, the padded chunk stride, the nibble shift and
word choice, the x offsets, the group index, the staging addresses, the output
lane), translated to Python and evaluated, so a change of the kernel's indexing
changes what is emulated: a wrong shift in int4_gemv.cu fails here
(``test_int4_gemv_emulation_reads_the_source`` proves it on an altered copy).
The loop structure (tiles, lanes, quarters) is mirrored by hand; the GPU tests
(tests/gpu) remain the real check.
"""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import pyquant
from pyquant.formats import Int

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"


class CudaSource:
    """Constants and index expressions of a ``.cu`` file as Python."""

    def __init__(self, text: str):
        self.text = text
        self.consts = {}
        for decl in re.findall(r"^constexpr int ([^;]+);", text, re.M):  # file scope
            for part in decl.split(","):
                name, expr = (p.strip() for p in part.split("=", 1))
                self.consts[name] = self.eval(expr, **self.consts)

    @classmethod
    def read(cls, name: str) -> "CudaSource":
        return cls((CUDA_DIR / name).read_text())

    @staticmethod
    def python(expr: str) -> str:
        """C integer expression -> Python: unsigned suffixes, struct members, integer
        division, the ternary, uint4 components."""
        expr = re.sub(r"\b(0x[0-9A-Fa-f]+|\d+)[uU]\b", r"\1", expr)
        expr = expr.replace("p.", "").replace("int(sizeof(T))", "elem").replace("sizeof(T)", "elem")
        expr = re.sub(r"\bw\[r\]\.([xyzw])", lambda mm: f"w[{'xyzw'.index(mm.group(1))}]", expr)
        expr = re.sub(r"(?<![/])/(?![/])", "//", expr)
        t = re.match(r"^\s*(\(.*?\))\s*\?\s*(.+?)\s*:\s*(.+?)\s*$", expr)
        if t:
            expr = f"(({t.group(2)}) if {t.group(1)} else ({t.group(3)}))"
        return expr

    def eval(self, expr: str, **names):
        return eval(self.python(expr), {"__builtins__": {}}, {**self.consts, **names})

    def find(self, pattern: str) -> str:
        m = re.search(pattern, self.text)
        assert m, f"pattern {pattern!r} not in the source: the kernel changed, update the emulation"
        return m.group(1)

    def expr(self, pattern: str):
        """A function of keyword names evaluating the C expression ``pattern`` captures."""
        code = compile(self.python(self.find(pattern)), pattern, "eval")
        consts = self.consts
        return lambda **names: eval(code, {"__builtins__": {}}, {**consts, **names})


class Int4Gemv:
    """What int4_gemv.cu says, as callables (see the patterns for where each comes from)."""

    def __init__(self, src: CudaSource):
        c = src.consts
        self.warps, self.rows, self.tile_chunks = c["kWarps"], c["kRows"], c["kTileChunks"]
        self.rows_per_block, self.tile_k = c["kRowsPerBlock"], c["kTileK"]
        self.stride = src.expr(r"static constexpr int value = ([^;]+);")
        self.row_bytes = src.expr(r"p\.row_bytes = ([^;]+);")
        self.row0 = src.expr(r"const int64_t row0 = int64_t\(blockIdx\.x\) \* kRowsPerBlock \+ ([^;]+);")
        self.group = src.expr(r"const int64_t gi = row \* p\.ngroups \+ ([^;]+);")
        self.sym_zero = float(src.find(r"load_float\(p\.zeros, gi, p\.scale_dtype\) : ([\d.]+)f"))
        self.chunk = src.expr(r"const int64_t chunk = ([^;]+);")
        self.vec = src.expr(r"constexpr int V = ([^;]+);")
        self.stage_vec = src.expr(r"reinterpret_cast<uint4\*>\(xs \+ (.+?)\) = val;")
        self.stage_scalar = src.expr(r"xsr\[(.+?)\] = ")
        self.x_lane = src.expr(r"const T\* xl = xs \+ ([^;]+);")
        self.x_quarter = src.expr(r"load8_as_float\(xl \+ ([^,]+), xv\)")
        self.shift = src.expr(r"const int sh = ([^;]+);")
        self.word_a = src.expr(r"const uint32_t wa = ([^;]+);")
        self.word_b = src.expr(r"const uint32_t wb = ([^;]+);")
        codes = re.findall(r"wf\[r\]\[([^\]]+)\] = fmaf\(code_to_float\((.+?)\), s\[r\], nzs\[r\]\);", src.text)
        assert len(codes) == 2, codes
        self.codes = [(compile(src.python(i), "slot", "eval"), compile(src.python(e), "code", "eval"))
                      for i, e in codes]
        self.out_lane = src.expr(r"if \(lane == ([^)]+)\) mine = v;")

    def code_slots(self, wa: int, wb: int, sh: int):
        """{slot in wf[r][...]: code} for the 8 codes of one quarter."""
        out = {}
        for e in range(4):
            for slot, code in self.codes:
                out[eval(slot, {}, {"e": e})] = eval(code, {}, {"wa": wa, "wb": wb, "e": e, "sh": sh})
        return out


# --- int4_gemv.cu --------------------------------------------------------------
def _emulate_int4_gemv(x, qweight, scales, zeros, group, k, elem_bytes, x_vec16, K=None):
    """x float64 (M, K); qweight uint8 (N, Kp/2); scales/zeros float64 (N, G)."""
    K = K or Int4Gemv(CudaSource.read("int4_gemv.cu"))
    m_rows, n = x.shape[0], qweight.shape[0]
    tile_chunks, tile_k, k_rows_warp = K.tile_chunks, K.tile_k, K.rows
    stride = K.stride(elem=elem_bytes)
    row_bytes = K.row_bytes(k=k)
    assert row_bytes == qweight.shape[1]
    ngroups = (k + group - 1) // group
    gshift = 31 if ngroups == 1 else int(math.log2(group))
    nchunks = row_bytes // 16
    ntiles = (nchunks + tile_chunks - 1) // tile_chunks
    assert not x_vec16 or (k * elem_bytes) % 16 == 0  # the host's condition for the vector path
    xflat = x.reshape(-1)
    words = qweight.view(np.uint32)
    out = np.full((m_rows, n), np.nan)
    for block in range((n + K.rows_per_block - 1) // K.rows_per_block):
        for warp in range(K.warps):
            row0 = block * K.rows_per_block + K.row0(warp=warp)
            acc = np.zeros((32, k_rows_warp, m_rows))  # per lane
            for t in range(ntiles):
                # stage_x (both paths write the same cells; emulate the one the kernel takes)
                xs = np.full(m_rows * tile_chunks * stride, np.nan)  # NaN: never-written cells must not be read
                k0 = t * tile_k
                if x_vec16:
                    v_per = K.vec(elem=elem_bytes)
                    vec_per_row = tile_k // v_per
                    for v in range(m_rows * vec_per_row):
                        m = v // vec_per_row
                        kk = (v % vec_per_row) * v_per
                        base = K.stage_vec(m=m, kk=kk, S=stride)
                        for e in range(v_per):
                            xs[base + e] = xflat[m * k + k0 + kk + e] if k0 + kk < k else 0.0
                else:
                    for i in range(m_rows * tile_k):
                        m, kk = divmod(i, tile_k)
                        xs[K.stage_scalar(m=m, kk=kk, S=stride)] = xflat[m * k + k0 + kk] if k0 + kk < k else 0.0
                for lane in range(32):
                    chunk = K.chunk(t=t, lane=lane)
                    if chunk >= nchunks:
                        continue
                    w, s, nzs = [], [], []
                    for r in range(k_rows_warp):
                        row = row0 + r
                        if row < n:
                            w.append(words[row, chunk * 4: chunk * 4 + 4])
                            gi = K.group(chunk=chunk, gshift=gshift)
                            sv = scales[row, gi]
                            z = zeros[row, gi] if zeros is not None else K.sym_zero
                            s.append(sv)
                            nzs.append(-z * sv)
                        else:
                            w.append(np.zeros(4, np.uint32))
                            s.append(0.0)
                            nzs.append(0.0)
                    xl = K.x_lane(lane=lane, S=stride)
                    for qq in range(4):
                        sh = K.shift(qq=qq)
                        wf = np.zeros((k_rows_warp, 8))
                        for r in range(k_rows_warp):
                            wr = [int(v) for v in w[r]]
                            slots = K.code_slots(K.word_a(qq=qq, w=wr), K.word_b(qq=qq, w=wr), sh)
                            for slot, code in slots.items():
                                wf[r, slot] = code * s[r] + nzs[r]
                        for m in range(m_rows):
                            off = xl + K.x_quarter(m=m, qq=qq, S=stride)
                            xv = xs[off: off + 8]
                            assert not np.isnan(xv).any(), "read a shared cell that staging never wrote"
                            for r in range(k_rows_warp):
                                acc[lane, r, m] += float(wf[r] @ xv)
            total = acc.sum(axis=0)  # the butterfly: every lane ends with the warp sum
            for r in range(k_rows_warp):
                for m in range(m_rows):
                    lane = K.out_lane(r=r, m=m, M=m_rows)
                    assert 0 <= lane < 32
                    if row0 + r < n:
                        out[m, row0 + r] = total[r, m]
    return out


def _int4_case(n, k, group, sym, m, elem, vec, K=None):
    torch.manual_seed(0)
    qw = pyquant.quantize_weight(torch.randn(n, k), Int(4, group, sym, torch.float32))
    x = torch.randn(m, k, dtype=torch.float64)
    g = qw.format.group_size_for(k)
    zeros = None if sym else qw.tensors["zeros"].double().numpy()
    got = _emulate_int4_gemv(x.numpy(), qw.tensors["qweight"].numpy(), qw.tensors["scales"].double().numpy(), zeros,
                             g, k, elem, vec, K)
    codes, sc, zz = qw.format.unpack(qw)  # the same math in float64, from the packed tensors' spec
    w64 = (codes.double() - zz.double().repeat_interleave(g, 1)[:, :k]) * sc.double().repeat_interleave(g, 1)[:, :k]
    return got, (x @ w64.T).numpy()


@pytest.mark.parametrize(
    "n,k,group,sym,m,elem,vec",
    [
        (20, 300, 32, False, 3, 2, False),   # ragged K, ragged N, scalar staging
        (18, 1104, 64, True, 2, 2, True),    # two tiles (partial second), vector staging
        (5, 64, -1, False, 8, 4, True),      # per-channel, fp32 x, M = 8
        (17, 2080, 128, False, 1, 2, True),  # three tiles, ragged last group
    ],
)
def test_int4_gemv_index_math(n, k, group, sym, m, elem, vec):
    got, want = _int4_case(n, k, group, sym, m, elem, vec)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("old,new", [
    ("const int sh = (qq >> 1) * 4;", "const int sh = (qq >> 1) * 2;"),  # a wrong nibble shift
    ("(wa >> (8 * e + sh)) & 0xFu", "(wa >> (4 * e + sh)) & 0xFu"),  # codes read from the wrong bytes
    ("const uint32_t wa = (qq & 1) ? w[r].z : w[r].x;", "const uint32_t wa = (qq & 1) ? w[r].y : w[r].x;"),
    ("load8_as_float(xl + m * kTileChunks * S + 8 * qq, xv)", "load8_as_float(xl + m * kTileChunks * S + 4 * qq, xv)"),
])
def test_int4_gemv_emulation_reads_the_source(old, new):
    text = (CUDA_DIR / "int4_gemv.cu").read_text()
    assert old in text, "the kernel changed: update this test's alterations"
    broken = Int4Gemv(CudaSource(text.replace(old, new)))
    try:
        got, want = _int4_case(18, 1104, 64, False, 2, 2, True, broken)
    except AssertionError:
        return  # a read of a cell staging never wrote: caught as well
    assert not np.allclose(got, want, rtol=1e-9, atol=1e-9), "an altered kernel still passes the emulation"


# --- w8a8.cu -------------------------------------------------------------------
_W8A8 = CudaSource.read("w8a8.cu").consts
BM, BN, BK, PITCH = _W8A8["kBM"], _W8A8["kBN"], _W8A8["kBK"], _W8A8["kRowPitch"]
WARP_M, WARP_N = _W8A8["kWarpM"], _W8A8["kWarpN"]


def _mma_m16n8k32(a_regs, b_regs):
    """PTX ISA fragment layouts for mma.m16n8k32.row.col.s32.s8.s8.s32:
    lane = 4 g + t; A regs (a0..a3) = (row g, k 4t..4t+3), (g+8, 4t..), (g, 16+4t..),
    (g+8, 16+4t..); B regs (b0, b1) = (n g, k 4t..), (n g, k 16+4t..); C regs
    (c0..c3) = (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1). Regs are 4 int8 bytes,
    the lowest k first."""
    A = np.zeros((16, 32), np.int64)
    B = np.zeros((8, 32), np.int64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for reg, (r, k0) in enumerate([(g, 4 * t), (g + 8, 4 * t), (g, 16 + 4 * t), (g + 8, 16 + 4 * t)]):
            A[r, k0:k0 + 4] = a_regs[lane][reg]
        for reg, k0 in enumerate([4 * t, 16 + 4 * t]):
            B[g, k0:k0 + 4] = b_regs[lane][reg]
    C = A @ B.T
    out = []
    for lane in range(32):
        g, t = divmod(lane, 4)
        out.append([C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]])
    return np.array(out)


def _emulate_w8a8_gemm(qa, w_codes, m, n, kp):
    """qa int8 (M, kp); w_codes uint8 (N, kp) -> int64 acc (M, N) as the kernel computes it."""
    acc_out = np.full((m, n), np.iinfo(np.int64).min)
    ktiles = (kp + BK - 1) // BK
    for by in range((m + BM - 1) // BM):
        for bx in range((n + BN - 1) // BN):
            bm0, bn0 = by * BM, bx * BN
            accs = {}
            for kt in range(ktiles):
                k0 = kt * BK
                As = np.zeros(BM * PITCH, np.int64)
                Bs = np.zeros(BN * PITCH, np.uint8)
                for c in range(BM * 4):  # load_tile, A
                    r, col = c // 4, (c % 4) * 16
                    if bm0 + r < m and k0 + col < kp:
                        As[r * PITCH + col: r * PITCH + col + 16] = qa[bm0 + r, k0 + col: k0 + col + 16]
                for c in range(BN * 4):  # load_tile, B
                    r, col = c // 4, (c % 4) * 16
                    if bn0 + r < n and k0 + col < kp:
                        Bs[r * PITCH + col: r * PITCH + col + 16] = w_codes[bn0 + r, k0 + col: k0 + col + 16]
                for warp in range(4):
                    wm0, wn0 = (warp // 2) * WARP_M, (warp % 2) * WARP_N
                    for ks in range(BK // 32):
                        a = {}
                        b = {}
                        for lane in range(32):
                            g, t = divmod(lane, 4)
                            for i in range(WARP_M // 16):
                                base = (wm0 + i * 16 + g) * PITCH + ks * 32 + 4 * t
                                a.setdefault(i, [None] * 32)[lane] = [
                                    As[base: base + 4], As[base + 8 * PITCH: base + 8 * PITCH + 4],
                                    As[base + 16: base + 20], As[base + 8 * PITCH + 16: base + 8 * PITCH + 20]]
                            for j in range(WARP_N // 8):
                                base = (wn0 + j * 8 + g) * PITCH + ks * 32 + 4 * t
                                # XOR 0x80 per byte: unsigned code -> signed code - 128
                                b.setdefault(j, [None] * 32)[lane] = [
                                    (Bs[base: base + 4] ^ 0x80).astype(np.int8).astype(np.int64),
                                    (Bs[base + 16: base + 20] ^ 0x80).astype(np.int8).astype(np.int64)]
                        for i in a:
                            for j in b:
                                key = (warp, i, j)
                                accs[key] = accs.get(key, 0) + _mma_m16n8k32(a[i], b[j])
            for (warp, i, j), c in accs.items():  # epilogue
                wm0, wn0 = (warp // 2) * WARP_M, (warp % 2) * WARP_N
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    for h in range(2):
                        row = bm0 + wm0 + i * 16 + g + 8 * h
                        if row >= m:
                            continue
                        for e in range(2):
                            col = bn0 + wn0 + j * 8 + 2 * t + e
                            if col < n:
                                acc_out[row, col] = c[lane][2 * h + e]
    return acc_out


@pytest.mark.parametrize("m,n,k", [(5, 40, 70), (70, 130, 160)])
def test_w8a8_gemm_index_math(m, n, k):
    from pyquant.ops.reference import quantize_rows_int8

    torch.manual_seed(0)
    qw = pyquant.quantize_weight(torch.randn(n, k), Int(8, -1, True))
    x = torch.randn(m, k)
    q, _ = quantize_rows_int8(x)
    kp = qw.format.packed_row_bytes(k)
    qa = np.zeros((m, kp), np.int64)
    qa[:, :k] = q.numpy()  # the quantizer zero-fills columns K..kp-1
    got = _emulate_w8a8_gemm(qa, qw.tensors["qweight"].numpy(), m, n, kp)
    codes = pyquant.unpack(qw).to(torch.int64) - 128
    want = (q.to(torch.int64) @ codes.T).numpy()
    np.testing.assert_array_equal(got, want)
