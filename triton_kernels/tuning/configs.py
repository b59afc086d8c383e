"""Launch configurations: M buckets, shipped defaults, tuning candidates.

No triton import here (the cache logic is tested without a GPU).

A config is a small dict; ``SPLIT = 0`` means "choose from the shape": enough
(N-tile, K-split) programs to cover the GPU about twice (see ``auto_split``).
Shipped defaults make a fresh machine usable without tuning; ``tune()`` and
``PYQUANT_AUTOTUNE=1`` replace them per GPU, (N, K) and M bucket.
"""
from __future__ import annotations

import dataclasses
from typing import List, Tuple

PATHS = ("gemv", "splitk", "gemm")
GEMV_MAX_M = 4
SPLITK_MAX_M = 64
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class Config:
    BN: int
    BK: int
    BM: int = 0  # 0: derived from M (GEMV)
    SPLIT: int = 0  # 0: auto from the shape; 1: no split
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Raises ValueError / TypeError on a malformed entry."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        for key, v in d.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"config field {key} must be a non-negative int, got {v!r}")
        cfg = cls(**d)
        for key in ("BN", "BK"):
            v = getattr(cfg, key)
            if v < 1 or v & (v - 1):
                raise ValueError(f"config {key} must be a power of two, got {v}")
        if cfg.BM & (cfg.BM - 1) or cfg.num_warps < 1 or cfg.num_warps & (cfg.num_warps - 1):
            raise ValueError(f"config BM and num_warps must be powers of two, got {cfg.BM}, {cfg.num_warps}")
        return cfg


def m_bucket(m: int) -> int:
    """The power-of-two bucket of M that configs are keyed by (capped)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def path_for_m(m: int) -> str:
    if m <= GEMV_MAX_M:
        return "gemv"
    if m <= SPLITK_MAX_M:
        return "splitk"
    return "gemm"


def _pow2_at_least(m: int, lo: int) -> int:
    b = lo
    while b < m:
        b *= 2
    return b


def gemv_bm(m: int) -> int:
    return _pow2_at_least(max(m, 1), 1)


# --- shipped defaults ---------------------------------------------------------
# Chosen from register counts of the sm_90 builds (ptxas -v, no GPU run yet):
# decoding gathers keep ~8 registers per weight element in flight, so tiles
# hold about 16 decoded weights per thread (no spills, >= 3 blocks per SM).
# GEMV: the [BM, BN, BK] product is reduced over K at once, so BN*BK shrinks
# as BM grows.
_GEMV = {
    1: Config(BN=32, BK=64, num_warps=4),
    2: Config(BN=16, BK=64, num_warps=4),
    4: Config(BN=16, BK=64, num_warps=4),
}
_SPLITK = {
    8: Config(BM=16, BN=64, BK=64, num_warps=8, num_stages=3),
    16: Config(BM=16, BN=64, BK=64, num_warps=8, num_stages=3),
    32: Config(BM=32, BN=64, BK=64, num_warps=8, num_stages=3),
    64: Config(BM=64, BN=64, BK=64, num_warps=8, num_stages=3),
}
# Word-wise Int4/Int8 GEMV (``gemv_packed_kernel``): a thread owns one 32-code chunk
# (16 B at 4 bits) of BN / num_warps rows per K tile, so BK = 32 * 32 codes puts a
# warp on 1 KB-4 KB of contiguous row bytes per load, and the next tile is loaded
# while the current one is multiplied (2 tiles in flight). BN = 16 on 2 warps:
# 8 rows per thread amortise the per-chunk x loads and sums (~3.8 instructions
# per weight at M = 1 in the sm_90 build) and give N / 16 programs (256 for
# N = 4096: about two per SM of an H100 without splitting K).
_GEMV_PACKED = {
    1: Config(BN=16, BK=1024, num_warps=2, num_stages=1),
    2: Config(BN=8, BK=1024, num_warps=2, num_stages=1),
    4: Config(BN=8, BK=1024, num_warps=2, num_stages=1),
}
# Word-wise Int4/Int8 tensor-core kernel (``mm_int_kernel``). A K tile lies in one
# scale group (the launcher caps BK at the group size). With BM = 16 the tile is a
# dot with the exact integer codes, scaled per output afterwards (3 BM / BK
# multiply-adds per weight); with more rows (or BK < 64) the decoded tile is
# scaled instead (one fp16 multiply-add per weight), see ``matmul/args.scale_weights``.
# BN = 128 halves the per-row sums of x (asymmetric formats) per weight; 3 stages
# keep two tiles of weights in flight through cp.async. From the sm_90 builds:
# 4.6 (M = 16), 5.9 (M = 32), 5.7 (M = 64) loop instructions per weight.
_SPLITK_PACKED = {
    8: Config(BM=16, BN=128, BK=128, num_warps=4, num_stages=3),
    16: Config(BM=16, BN=128, BK=128, num_warps=4, num_stages=3),
    32: Config(BM=32, BN=128, BK=128, num_warps=8, num_stages=3),
    64: Config(BM=64, BN=128, BK=64, num_warps=4, num_stages=3),
}
_GEMM_PACKED_SMALL = Config(BM=64, BN=128, BK=64, SPLIT=1, num_warps=4, num_stages=3)
_GEMM_PACKED_LARGE = Config(BM=128, BN=128, BK=64, SPLIT=1, num_warps=8, num_stages=3)
_GEMM_SMALL = Config(BM=64, BN=128, BK=32, SPLIT=1, num_warps=8, num_stages=3)
_GEMM_LARGE = Config(BM=128, BN=128, BK=32, SPLIT=1, num_warps=8, num_stages=3)
DEQUANT_DEFAULT = Config(BN=16, BK=128, SPLIT=1, num_warps=4)


def default_config(path: str, m: int, packed: bool = False) -> Config:
    """Shipped config of ``path`` for M = ``m``; ``packed``: the word-wise Int4/Int8 kernels."""
    b = m_bucket(m)
    if path == "gemv" and packed:
        return _GEMV_PACKED.get(gemv_bm(m), _GEMV_PACKED[4])
    if path == "gemv":
        bm = gemv_bm(m)
        if bm in _GEMV:
            return _GEMV[bm]
        # GEMV forced for a larger M (tests, experiments): keep BM*BN*BK bounded
        return Config(BN=16, BK=max(16, min(128, 8192 // (bm * 16))))
    if path == "splitk":
        table = _SPLITK_PACKED if packed else _SPLITK
        return table.get(b, table[64] if b > 64 else table[16])
    if path == "gemm" and packed:
        return _GEMM_PACKED_SMALL if b <= 256 else _GEMM_PACKED_LARGE
    if path == "gemm":
        return _GEMM_SMALL if b <= 256 else _GEMM_LARGE
    if path == "dequant":
        return DEQUANT_DEFAULT
    raise ValueError(f"unknown path {path!r}")


def candidates(path: str, m: int, packed: bool = False) -> List[Config]:
    """The small set ``tune()`` times for one path and M bucket (default first)."""
    d = default_config(path, m, packed)
    out: List[Config] = [d]
    if path == "gemv" and packed:
        for bn, bk, w in ((8, 1024, 2), (16, 1024, 2), (32, 1024, 4), (4, 1024, 1), (8, 1024, 1), (16, 512, 2),
                          (32, 512, 4), (8, 512, 2)):
            for split in (0, 1):
                out.append(Config(BN=bn, BK=bk, SPLIT=split, num_warps=w, num_stages=1))
    elif path == "gemv":
        bm = gemv_bm(m)
        for bn, bk, w in ((16, 64, 4), (32, 64, 4), (16, 128, 4), (32, 128, 8), (64, 64, 8), (64, 128, 8)):
            if bm * bn * bk > 16384:
                continue
            for split in (0, 1):
                out.append(Config(BN=bn, BK=bk, SPLIT=split, num_warps=w))
    elif path == "splitk" and packed:
        bm = max(16, min(64, _pow2_at_least(m, 16)))
        for bn, bk, w in ((128, 128, 4), (64, 128, 4), (128, 128, 8), (128, 64, 4), (64, 64, 4), (256, 64, 8)):
            for split in (0, 1):
                out.append(Config(BM=bm, BN=bn, BK=bk, SPLIT=split, num_warps=w, num_stages=3))
    elif path == "gemm" and packed:
        for bm, bn, bk, w, s in ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 64, 64, 4, 3),
                                 (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)):
            if bm <= 2 * _pow2_at_least(m, 16):
                out.append(Config(BM=bm, BN=bn, BK=bk, SPLIT=1, num_warps=w, num_stages=s))
    elif path == "splitk":
        bm = max(16, min(64, _pow2_at_least(m, 16)))
        for bn, bk, w in ((64, 64, 8), (32, 64, 4), (64, 32, 4), (128, 64, 8), (64, 128, 8)):
            for split in (0, 1):
                out.append(Config(BM=bm, BN=bn, BK=bk, SPLIT=split, num_warps=w, num_stages=3))
    elif path == "gemm":
        for bm, bn, bk, w, s in (
            (64, 128, 32, 8, 3), (128, 128, 32, 8, 3), (64, 64, 32, 4, 3), (128, 64, 32, 8, 3),
            (64, 128, 64, 8, 3), (128, 256, 32, 8, 3), (256, 128, 32, 8, 3),
        ):
            if bm <= 2 * _pow2_at_least(m, 16):
                out.append(Config(BM=bm, BN=bn, BK=bk, SPLIT=1, num_warps=w, num_stages=s))
    elif path == "dequant":
        for bn, bk, w in ((16, 128, 4), (32, 64, 4), (16, 64, 4), (32, 128, 8), (16, 256, 8), (64, 64, 8)):
            out.append(Config(BN=bn, BK=bk, SPLIT=1, num_warps=w))
    else:
        raise ValueError(f"unknown path {path!r}")
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def auto_split(tiles: int, k: int, bk: int, sm_count: int, cap: int = 32, waves: int = 2) -> int:
    """K splits so that ``tiles * split`` programs cover the GPU about ``waves`` times."""
    k_tiles = max(1, -(-k // bk))
    want = max(1, -(-waves * sm_count // max(tiles, 1)))
    return max(1, min(want, k_tiles, cap))


def resolve_split(cfg: Config, tiles: int, k: int, sm_count: int, waves: int = 2) -> Tuple[int, int]:
    """The SPLIT a launch uses, and the K range per split (multiple of BK).

    ``waves=1`` (the word-wise GEMV): split only when the N tiles alone leave SMs
    idle; each split costs a workspace round trip and the reduce launch."""
    split = cfg.SPLIT or auto_split(tiles, k, cfg.BK, sm_count, waves=waves)
    k_tiles = max(1, -(-k // cfg.BK))
    per = -(-k_tiles // split)  # K tiles per split
    split = -(-k_tiles // per)  # drop splits that would be empty
    return split, per * cfg.BK


def cache_key(path: str, fmt_spec: str, x_dtype: str, n: int, k: int, m: int) -> str:
    return f"{path}|{fmt_spec}|{x_dtype}|{n}x{k}|m{m_bucket(m) if path != 'dequant' else 0}"


__all__ = [
    "Config", "PATHS", "M_BUCKETS", "m_bucket", "path_for_m", "default_config", "candidates",
    "auto_split", "resolve_split", "cache_key", "gemv_bm",
]
