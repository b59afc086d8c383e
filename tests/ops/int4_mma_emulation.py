"""Host emulation of csrc/cuda/int4_mma.cu, lane by lane and register by
register (not a test module: tests/ops/test_int4_mma_tensor_core.py uses it).

Every constant the emulation needs (tile sizes, masks, shifts, magic numbers,
the decoded value of code 1, the fold's offsets and row scales) is read from
the .cu source, so a wrong constant in the kernel fails the tests here. The
fragment layouts of ldmatrix and mma.m16n8k16 are the PTX ISA's, written once
below; everything else (copy offsets, zero-fill bounds, the swizzle, which word
a lane decodes, which scale pair it folds, the split-K partials and their
reduction, the epilogue's output index) follows the kernel's code.
"""
from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "int4_mma.cu"


def _src() -> str:
    return SOURCE.read_text()


def const(name: str) -> int:
    """``constexpr int name = <int expression of earlier constants>;`` from the source."""
    m = re.search(rf"constexpr int {name} = ([^;]+);", _src())
    if not m:
        raise KeyError(f"{name} not found in {SOURCE.name}")
    expr = m.group(1)
    for dep in re.findall(r"\bk[A-Z]\w*", expr):
        expr = re.sub(rf"\b{dep}\b", str(const(dep)), expr)
    return int(eval(expr, {}))  # integer arithmetic of literals only


def eval_c(expr: str):
    """Evaluates a C integer expression with comparisons, parentheses and
    right-associative ternaries (what Cfg's TW rule uses)."""
    expr = expr.strip()
    while "(" in expr:
        expr = re.sub(r"\(([^()]*)\)", lambda mm: str(eval_c(mm.group(1))), expr)
    if "?" in expr:
        cond, rest = expr.split("?", 1)
        a, b = rest.split(":", 1)
        return eval_c(a) if eval_c(cond) else eval_c(b)
    return int(eval(expr, {}))


def tiles_per_warp(mt: int, fp: int) -> int:
    """Cfg::TW, evaluated from the source's expression."""
    expr = re.search(r"static constexpr int TW = ([^;]+);", _src()).group(1)
    return eval_c(re.sub(r"\bMT\b", str(mt), re.sub(r"\bFP\b", str(fp), expr)))


@functools.lru_cache(maxsize=None)
def decode_struct(dtype: str) -> dict:
    """The Decode<T> specialisation of the source: its run() statements
    (compiled to Python) and constants."""
    tag = "__half" if dtype == "fp16" else "__nv_bfloat16"
    body = re.search(rf"struct Decode<{tag}> \{{(.*?)\n\}};", _src(), re.S).group(1)
    out = {}
    for name in ("kOneLo", "kOneHi"):
        out[name] = int(re.search(rf"{name} = (0x[0-9a-f]+)u", body).group(1), 16)
    out["kOffset"] = float(re.search(r"kOffset = ([0-9.]+)f", body).group(1))
    lo, hi = re.search(r"kUnscaleLo = ([0-9.]+)f, kUnscaleHi = ([0-9.]+)f", body).groups()
    out["kUnscaleLo"], out["kUnscaleHi"] = float(lo), float(hi)
    run = re.search(r"void run\(uint32_t w, uint32_t \(&a\)\[4\]\) \{(.*?)\n  \}", body, re.S).group(1)
    stmts = []
    for lhs, rhs in re.findall(r"^\s*(?:const uint32_t )?(\w+(?:\[\d\])?) = ([^;]+);", run, re.M):
        rhs = re.sub(r"cuda::and_or<(0x[0-9a-f]+)u, (0x[0-9a-f]+)u>\(([^)]+)\)", r"((\3) & \1) | \2", rhs)
        rhs = re.sub(r"(0x[0-9a-f]+)u", r"\1", rhs)
        stmts.append((lhs, compile(rhs, "<Decode::run>", "eval")))
    assert len(stmts) >= 4, "Decode::run not parsed"
    out["run"] = stmts
    return out


def decode_word(w, dtype: str):
    """The four A registers run() makes of word(s) ``w`` (an int or a uint32
    array), by executing the source's statements."""
    env = {"w": w}
    regs = [None] * 4
    for lhs, code in decode_struct(dtype)["run"]:
        val = eval(code, {}, env) & 0xFFFFFFFF
        if lhs.startswith("a["):
            regs[int(lhs[2])] = val
        else:
            env[lhs] = val
    return regs


def halves(regs, dtype: str):
    """32-bit register(s) -> (low, high) 16-bit halves as float64 arrays."""
    regs = np.asarray(regs, dtype=np.uint64).astype(np.uint32)
    lo, hi = (regs & 0xFFFF).astype(np.uint16), (regs >> 16).astype(np.uint16)
    if dtype == "fp16":
        return lo.view(np.float16).astype(np.float64), hi.view(np.float16).astype(np.float64)
    f = lambda h: (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    return f(lo), f(hi)


# --- PTX ISA fragment layouts (mma.m16n8k16, ldmatrix .x4 .b16) --------------------
def a_tile(lane_regs, dtype: str) -> np.ndarray:
    """32 lanes x 4 registers -> the 16x16 A operand (rows = output rows n, cols = k)."""
    regs = np.asarray(lane_regs, dtype=np.uint64).reshape(32, 4)
    lo, hi = halves(regs, dtype)
    a = np.full((16, 16), np.nan)
    lane = np.arange(32)
    g, t = lane >> 2, lane & 3
    for r, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
        a[row, col], a[row, col + 1] = lo[:, r], hi[:, r]
    return a


def b_tile(lane_b) -> np.ndarray:
    """32 lanes x 2 registers of (low, high) values -> the 16x8 B operand (k x activation row)."""
    b = np.full((16, 8), np.nan)
    for lane, (b0, b1) in enumerate(lane_b):
        g, t = lane >> 2, lane & 3
        b[2 * t, g], b[2 * t + 1, g] = b0
        b[2 * t + 8, g], b[2 * t + 9, g] = b1
    return b


def c_regs(d: np.ndarray):
    """The 16x8 accumulator -> 32 lanes x 4 registers."""
    return [[d[(l >> 2) + 8 * (r >> 1), 2 * (l & 3) + (r & 1)] for r in range(4)] for l in range(32)]


def ldmatrix_x4(xs: np.ndarray, addrs) -> list:
    """``xs``: the stage's x tile as float64 (rows, row_bytes // 2); ``addrs``:
    32 lane byte addresses (relative to the tile). -> 32 lanes x 4 registers of
    (low, high) values: register i of lane l = matrix i (rows from lanes
    8i..8i+7), row l // 4, columns 2 (l % 4), +1."""
    row_elems = xs.shape[1]
    out = [[None] * 4 for _ in range(32)]
    for i in range(4):
        rows = []
        for r in range(8):
            a = addrs[8 * i + r]
            assert a % 16 == 0, "ldmatrix row addresses are 16-byte aligned"
            e = a // 2
            rows.append(xs[e // row_elems, e % row_elems: e % row_elems + 8])
        for lane in range(32):
            row, c = lane >> 2, 2 * (lane & 3)
            out[lane][i] = (rows[row][c], rows[row][c + 1])
    return out


# --- the kernel ---------------------------------------------------------------------
def emulate(x: np.ndarray, qweight: np.ndarray, scales: np.ndarray, zeros, n: int, group: int, dtype: str,
            splits: int, bias=None) -> np.ndarray:
    """y (M, N) float64 as int4_mma_kernel computes it, from the stored IntMMA
    tensors (numpy: qweight uint8, scales/zeros float64 (G, Np)) and the
    kernel's x (M, K) float64 (already permuted and padded to K % 8 == 0)."""
    kwarps, kthreads = const("kWarps"), const("kThreads")
    stage_k, block_k, xrow_bytes = const("kStageK"), const("kLayoutBlockK"), const("kXRowBytes")
    steps = stage_k // 16
    m, k = x.shape
    assert k % 8 == 0 and m <= 64
    mt_n = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    fp = 2 if group == 32 else 4 if group == 64 else 8
    tw = tiles_per_warp(mt_n, fp)
    bn = kwarps * tw * 16
    periods = steps // fp
    per_period = bn * 2 // 16
    schunks = periods * per_period
    np_ = math.ceil(n / 16) * 16
    tiles16, blocks64 = np_ // 16, math.ceil(k / block_k)
    ngroups = 1 if group == -1 else math.ceil(k / group)
    gshift = 31 if group == -1 else int(math.log2(group))
    stages = math.ceil(k / stage_k)
    per_split = math.ceil(stages / splits)
    assert math.ceil(stages / per_split) == splits
    dec = decode_struct(dtype)
    ones = [dec["kOneLo"], dec["kOneHi"], dec["kOneLo"], dec["kOneHi"]]
    qflat = qweight.reshape(-1)
    sflat = scales.reshape(-1)
    zflat = None if zeros is None else zeros.reshape(-1)
    xflat = x.reshape(-1)
    out = np.zeros((m, n))
    ws = np.zeros((splits, m, n))
    for bx in range(math.ceil(n / bn)):
        for split in range(splits):
            st0 = split * per_split
            nst = min(per_split, stages - st0)
            y = np.zeros((kwarps, tw, mt_n, 32, 4))
            for i in range(nst):
                st = st0 + i
                # --- Copier.load: weights, x, scales/zeros ----------------------------
                w_smem = np.zeros(bn * stage_k // 2, np.uint8)
                for tid in range(kthreads):
                    block = (tid >> 5) & 1
                    for wi in range(bn * stage_k // 2 // 16 // kthreads):
                        c = tid + wi * kthreads
                        tile = bx * (bn // 16) + (c >> 6)
                        row0 = tile * blocks64 * 32
                        off = row0 + (st * (stage_k // block_k) + block) * 32 + (c & 31)
                        end = row0 + blocks64 * 32 if tile < tiles16 else 0
                        if off < end:
                            w_smem[c * 16: c * 16 + 16] = qflat[off * 16: off * 16 + 16]
                xs = np.zeros((mt_n * 8, xrow_bytes // 2))
                for tid in range(kthreads):
                    for xi in range(mt_n * 8 * (xrow_bytes // 16) // kthreads):
                        c = tid + xi * kthreads
                        r, cc = c // (xrow_bytes // 16), c % (xrow_bytes // 16)
                        off = r * k + st * stage_k + cc * 8
                        end = (r + 1) * k if r < m else 0
                        dst = (r * xrow_bytes + ((cc ^ (r & 7)) * 16)) // 2
                        if off < end:
                            xs.reshape(-1)[dst: dst + 8] = xflat[off: off + 8]
                sbuf = np.zeros((2 * schunks, 8))
                for tid in range(2 * schunks):
                    cs = tid % schunks
                    active = tid < schunks or zflat is not None
                    col = bx * bn + (cs % per_period) * 8
                    s_col = col if active and col < np_ else np_
                    s_k = st * stage_k + (cs // per_period) * fp * 16
                    gi = s_k >> gshift
                    src = sflat if tid < schunks else zflat
                    if s_col < np_ and gi < ngroups:
                        sbuf[tid] = src[gi * np_ + s_col: gi * np_ + s_col + 8]
                # --- compute ----------------------------------------------------------------
                for warp in range(kwarps):
                    acc = np.zeros((tw, mt_n, 32, 4))
                    xsum = np.zeros((mt_n, 32, 4))
                    wq = [[[int.from_bytes(w_smem[a: a + 4].tobytes(), "little") for a in range(b, b + 16, 4)]
                           for b in [((warp * tw * 2) * 32 + lane) * 16 + (j * 2 + q) * 512 for lane in range(32)]]
                          for j in range(tw) for q in range(2)]
                    for s2 in range(0, steps, 2):
                        b = []
                        for mt in range(mt_n):
                            addrs = [((lane & 7) * xrow_bytes + (((lane >> 3) ^ (lane & 7)) * 16)) ^ (s2 * 32)
                                     for lane in range(32)]
                            b.append(ldmatrix_x4(xs, [a + mt * 8 * xrow_bytes for a in addrs]))
                        for h in range(2):
                            s = s2 + h
                            fresh = s % fp == 0
                            for j in range(tw):
                                words = np.array([wq[j * 2 + s // 4][lane][s % 4] for lane in range(32)], np.uint64)
                                a = a_tile(np.stack(decode_word(words, dtype), axis=1), dtype)
                                for mt in range(mt_n):
                                    bt = b_tile([(b[mt][lane][2 * h], b[mt][lane][2 * h + 1]) for lane in range(32)])
                                    d = a @ bt
                                    acc[j, mt] = np.array(c_regs(d)) + (0 if fresh else acc[j, mt])
                            a1 = a_tile([ones] * 32, dtype)
                            for mt in range(mt_n):
                                bt = b_tile([(b[mt][lane][2 * h], b[mt][lane][2 * h + 1]) for lane in range(32)])
                                xsum[mt] = np.array(c_regs(a1 @ bt)) + (0 if fresh else xsum[mt])
                            if s % fp == fp - 1:
                                f = s // fp
                                for j in range(tw):
                                    for lane in range(32):
                                        pair = (f * bn * 2 + ((warp * tw) * 8 + lane // 4) * 4 + j * 32) // 4
                                        sv = sbuf.reshape(-1)[2 * pair: 2 * pair + 2]
                                        if zflat is not None:
                                            zv = sbuf.reshape(-1)[schunks * 8 + 2 * pair: schunks * 8 + 2 * pair + 2]
                                        else:
                                            zv = np.array([8.0, 8.0])
                                        zv = zv + dec["kOffset"]
                                        for mt in range(mt_n):
                                            for r in range(4):
                                                sc, zc = sv[r >> 1], zv[r >> 1]
                                                y[warp, j, mt, lane, r] += sc * acc[j, mt, lane, r] - sc * zc * \
                                                    xsum[mt, lane, r]
            # --- epilogue -----------------------------------------------------------------
            for warp in range(kwarps):
                for j in range(tw):
                    for mt in range(mt_n):
                        for lane in range(32):
                            g, t = lane >> 2, lane & 3
                            for r in range(4):
                                row = bx * bn + (warp * tw + j) * 16 + g + (r >> 1) * 8
                                mm = mt * 8 + 2 * t + (r & 1)
                                if row >= n or mm >= m:
                                    continue
                                v = y[warp, j, mt, lane, r] * (dec["kUnscaleHi"] if r >> 1 else dec["kUnscaleLo"])
                                if splits > 1:
                                    ws[split, mm, row] = v
                                else:
                                    out[mm, row] = v + (0.0 if bias is None else bias[row])
        if splits > 1:  # the last CTA of the block: splits in order
            rows = min(bn, n - bx * bn)
            for e in range(rows * m):
                mm, row = e // rows, bx * bn + e % rows
                v = 0.0
                for sp in range(splits):
                    v += ws[sp, mm, row]
                out[mm, row] = v + (0.0 if bias is None else bias[row])
    return out


# --- the dequantizer (csrc/cuda/int4_mma_dequant.cu) ---------------------------------
def emulate_dequant(qweight: np.ndarray, scales: np.ndarray, zeros, perm, n: int, k: int, group: int) -> np.ndarray:
    """out (N, K) float64 as int4_mma_dequant_kernel writes it (before the cast):
    slot (tile, layout block, lane) -> rows g and g+8, columns 2t, 2t+1, 2t+8, 2t+9
    of each of its four k16 steps."""
    np_ = math.ceil(n / 16) * 16
    tiles16, blocks64 = np_ // 16, math.ceil(k / 64)
    ngroups = 1 if group == -1 else math.ceil(k / group)
    gshift = 31 if group == -1 else int(math.log2(group))
    q16 = qweight.reshape(-1, 16)
    s = scales.reshape(-1)
    z = None if zeros is None else zeros.reshape(-1)
    out = np.full((n, k), np.nan)
    for tile in range(tiles16):
        for slot in range(blocks64 * 32):
            kb, lane = slot >> 5, slot & 31
            g, t = lane >> 2, lane & 3
            chunk = q16[(tile * blocks64 + kb) * 32 + lane]
            words = [int.from_bytes(chunk[4 * j:4 * j + 4].tobytes(), "little") for j in range(4)]
            rows = (tile * 16 + g, tile * 16 + g + 8)
            for j in range(4):
                k0 = kb * 64 + 16 * j
                if k0 >= k:
                    break
                gi = min(k0 >> gshift, ngroups - 1)
                sp = s[gi * np_ + tile * 16 + 2 * g: gi * np_ + tile * 16 + 2 * g + 2]
                zp = (8.0, 8.0) if z is None else z[gi * np_ + tile * 16 + 2 * g: gi * np_ + tile * 16 + 2 * g + 2]
                v = [(((words[j] >> (4 * i)) & 0xF) - zp[i & 1]) * sp[i & 1] for i in range(8)]
                for h in range(2):
                    if rows[h] >= n:
                        continue
                    for c in range(2):
                        col = k0 + 8 * c + 2 * t
                        for e, val in enumerate((v[h + 2 * c], v[h + 2 * c + 4])):
                            if col + e < k:
                                out[rows[h], perm[col + e] if perm is not None else col + e] = val
    return out
