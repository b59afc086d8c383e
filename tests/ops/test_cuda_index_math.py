"""CPU emulation of the index arithmetic of two CUDA kernels, line by line, so
that their layouts are checked on machines without a GPU:

* csrc/cuda/int4_gemv.cu: which packed nibble and which staged x value each
  lane multiplies (x staging with its padded chunk stride, both staging
  paths, the nibble order of a 128-bit chunk, tiles, rows out of range, the
  butterfly reduction's output mapping);
* csrc/cuda/w8a8.cu: shared-memory tile addresses and the mma.m16n8k32 s8
  fragment registers, fed through an emulated mma that uses the PTX ISA's
  documented fragment layouts, then the epilogue's output mapping.

If the kernel code changes its indexing, change the mirror here in the same
commit. The GPU tests (tests/gpu) remain the real check.
"""
import math

import numpy as np
import pytest
import torch

import pyquant
from pyquant.formats import Int


# --- int4_gemv.cu --------------------------------------------------------------
def _emulate_int4_gemv(x, qweight, scales, zeros, group, k, elem_bytes, x_vec16):
    """x float64 (M, K); qweight uint8 (N, Kp/2); scales/zeros float64 (N, G)."""
    m_rows, n = x.shape[0], qweight.shape[0]
    k_rows_warp, warps, tile_chunks = 4, 4, 32
    tile_k = tile_chunks * 32
    stride = 32 + 16 // elem_bytes  # ChunkStride<T>::value
    row_bytes = (k + 31) // 32 * 16
    ngroups = (k + group - 1) // group
    gshift = 31 if ngroups == 1 else int(math.log2(group))
    nchunks = row_bytes // 16
    ntiles = (nchunks + tile_chunks - 1) // tile_chunks
    assert not x_vec16 or (k * elem_bytes) % 16 == 0  # the host's condition for the vector path
    xflat = x.reshape(-1)
    words = qweight.view(np.uint32) if isinstance(qweight, np.ndarray) else None
    out = np.zeros((m_rows, n))
    for block in range((n + 15) // 16):
        for warp in range(warps):
            row0 = block * 16 + warp * k_rows_warp
            acc = np.zeros((32, k_rows_warp, m_rows))  # per lane
            for t in range(ntiles):
                # stage_x (both paths write the same cells; emulate the one the kernel takes)
                xs = np.full(m_rows * tile_chunks * stride, np.nan)  # NaN: never-written cells must not be read
                k0 = t * tile_k
                if x_vec16:
                    v_per = 16 // elem_bytes
                    vec_per_row = tile_k // v_per
                    for v in range(m_rows * vec_per_row):
                        m = v // vec_per_row
                        kk = (v % vec_per_row) * v_per
                        base = (m * tile_chunks + kk // 32) * stride + kk % 32
                        for e in range(v_per):
                            xs[base + e] = xflat[m * k + k0 + kk + e] if k0 + kk < k else 0.0
                else:
                    for i in range(m_rows * tile_k):
                        m, kk = divmod(i, tile_k)
                        xs[(m * tile_chunks + kk // 32) * stride + kk % 32] = (
                            xflat[m * k + k0 + kk] if k0 + kk < k else 0.0)
                for lane in range(32):
                    chunk = t * tile_chunks + lane
                    if chunk >= nchunks:
                        continue
                    w, s, nzs = [], [], []
                    for r in range(k_rows_warp):
                        row = row0 + r
                        if row < n:
                            w.append(words[row, chunk * 4: chunk * 4 + 4])
                            gi = (chunk * 32) >> gshift
                            sv = scales[row, gi]
                            z = zeros[row, gi] if zeros is not None else 8.0
                            s.append(sv)
                            nzs.append(-z * sv)
                        else:
                            w.append(np.zeros(4, np.uint32))
                            s.append(0.0)
                            nzs.append(0.0)
                    xl = lane * stride
                    for qq in range(4):
                        sh = (qq >> 1) * 4
                        wf = np.zeros((k_rows_warp, 8))
                        for r in range(k_rows_warp):
                            wa = int(w[r][2] if qq & 1 else w[r][0])
                            wb = int(w[r][3] if qq & 1 else w[r][1])
                            for e in range(4):
                                wf[r, e] = ((wa >> (8 * e + sh)) & 0xF) * s[r] + nzs[r]
                                wf[r, 4 + e] = ((wb >> (8 * e + sh)) & 0xF) * s[r] + nzs[r]
                        for m in range(m_rows):
                            xv = xs[xl + m * tile_chunks * stride + 8 * qq: xl + m * tile_chunks * stride + 8 * qq + 8]
                            assert not np.isnan(xv).any(), "read a shared cell that staging never wrote"
                            for r in range(k_rows_warp):
                                acc[lane, r, m] += float(wf[r] @ xv)
            total = acc.sum(axis=0)  # the butterfly: every lane ends with the warp sum
            for lane in range(k_rows_warp * m_rows):
                r, m = divmod(lane, m_rows)
                if row0 + r < n:
                    out[m, row0 + r] = total[r, m]
    return out


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
    torch.manual_seed(0)
    qw = pyquant.quantize_weight(torch.randn(n, k), Int(4, group, sym, torch.float32))
    x = torch.randn(m, k, dtype=torch.float64)
    g = qw.format.group_size_for(k)
    zeros = None if sym else qw.tensors["zeros"].double().numpy()
    got = _emulate_int4_gemv(x.numpy(), qw.tensors["qweight"].numpy(), qw.tensors["scales"].double().numpy(), zeros,
                             g, k, elem, vec)
    codes, sc, zz = qw.format.unpack(qw)  # the same math in float64, from the packed tensors' spec
    w64 = (codes.double() - zz.double().repeat_interleave(g, 1)[:, :k]) * sc.double().repeat_interleave(g, 1)[:, :k]
    want = (x @ w64.T).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


# --- w8a8.cu -------------------------------------------------------------------
BM, BN, BK, PITCH = 64, 128, 64, 80
WARP_M, WARP_N = 32, 64


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
