"""Tuning cache and config logic of the Triton backend (no GPU needed)."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from pyquant.formats import Int  # noqa: E402
from pyquant.ops.backends import triton as triton_backend  # noqa: E402,F401  (makes pyquant.triton_kernels importable)
from pyquant.triton_kernels.tuning import cache as tcache  # noqa: E402
from pyquant.triton_kernels.tuning.configs import (  # noqa: E402
    Config,
    auto_split,
    cache_key,
    candidates,
    default_config,
    m_bucket,
    path_for_m,
    resolve_split,
)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PYQUANT_CACHE_DIR", str(tmp_path))
    tcache.clear_memory()
    yield tmp_path / "triton"
    tcache.clear_memory()


def test_buckets_and_paths():
    assert [m_bucket(m) for m in (1, 2, 3, 4, 5, 64, 65, 2048, 3000, 10**6)] == [1, 2, 4, 4, 8, 64, 128, 2048, 4096, 4096]
    assert [path_for_m(m) for m in (1, 4, 5, 64, 65)] == ["gemv", "gemv", "splitk", "splitk", "gemm"]
    assert cache_key("gemv", "int4_g128_asym_fp16", "fp16", 4096, 14336, 3) == "gemv|int4_g128_asym_fp16|fp16|4096x14336|m4"


def test_defaults_and_candidates_are_valid():
    for path, ms in (("gemv", (1, 2, 3, 4)), ("splitk", (5, 16, 33, 64)), ("gemm", (65, 512, 4096)), ("dequant", (0,))):
        for m in ms:
            d = default_config(path, m)
            cands = candidates(path, m)
            assert cands[0] == d and len(set(cands)) == len(cands) and len(cands) <= 16
            for c in cands:
                assert Config.from_dict(c.to_dict()) == c
                if path in ("splitk", "gemm"):
                    assert c.BM >= 16 and c.BN >= 16 and c.BK >= 16  # tl.dot minimum
                if path == "gemv":
                    assert max(1, m) * c.BN * c.BK <= 16384  # register budget of the broadcast product
    # word-wise Int4/Int8 kernels
    for path, ms in (("gemv", (1, 2, 3, 4)), ("splitk", (5, 16, 33, 64)), ("gemm", (65, 512, 4096))):
        for m in ms:
            d = default_config(path, m, packed=True)
            cands = candidates(path, m, packed=True)
            assert cands[0] == d and len(set(cands)) == len(cands) and len(cands) <= 16
            for c in cands:
                assert Config.from_dict(c.to_dict()) == c
                if path == "gemv":
                    # whole chunks; every thread owns at least one (row, chunk): no replicated work
                    assert c.BK % 32 == 0 and c.BN * (c.BK // 32) >= 32 * c.num_warps
                else:
                    assert c.BM >= 16 and c.BN >= 16 and c.BK >= 32


def test_split_resolution():
    assert auto_split(tiles=64, k=4096, bk=128, sm_count=132) == 5
    assert auto_split(tiles=1000, k=4096, bk=128, sm_count=132) == 1
    assert auto_split(tiles=1, k=100, bk=64, sm_count=132) == 2  # never more splits than K tiles
    # explicit split: K range per split is a multiple of BK and no split is empty
    split, per = resolve_split(Config(BN=16, BK=64, SPLIT=3), tiles=1, k=200, sm_count=4)
    assert (split, per) == (2, 128)
    split, per = resolve_split(Config(BN=16, BK=32, SPLIT=3), tiles=1, k=200, sm_count=4)
    assert (split, per) == (3, 96) and split * per >= 200 and (split - 1) * per < 200


@pytest.mark.parametrize(
    "bad",
    [{"BN": 48, "BK": 64}, {"BN": 64}, {"BN": 64, "BK": 64, "nope": 1}, {"BN": 64, "BK": -64},
     {"BN": 64, "BK": 64, "BM": 24}, {"BN": "64", "BK": 64}, {"BN": 64, "BK": 64, "num_warps": 3}, [64, 64]],
)
def test_config_from_dict_rejects(bad):
    with pytest.raises((TypeError, ValueError)):
        Config.from_dict(bad)


def test_cache_path_env_override(cache_dir):
    assert tcache.cache_path("NVIDIA H100 80GB HBM3") == cache_dir / "NVIDIA_H100_80GB_HBM3.json"
    assert "/" not in tcache.safe_name("a/../b") and tcache.safe_name(" ") == "unknown"


def test_cache_default_location(monkeypatch):
    monkeypatch.delenv("PYQUANT_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home")
    assert str(tcache.cache_path("A100")).endswith(".cache/pyquant/triton/A100.json")


def test_lazy_load_save_roundtrip(cache_dir):
    c = tcache.get_cache("GPU X")
    assert not c.loaded and not cache_dir.exists()  # nothing read or created yet
    cfg = Config(BM=16, BN=64, BK=64, SPLIT=4)
    assert c.get("k1") is None and c.loaded
    c.put("k1", cfg)
    path = c.save()
    data = json.loads(path.read_text())
    assert data["version"] == tcache.VERSION and data["device"] == "GPU X"
    assert data["entries"]["k1"] == cfg.to_dict()
    tcache.clear_memory()
    assert tcache.get_cache("GPU X").get("k1") == cfg


def test_save_merges_with_other_processes(cache_dir):
    a = tcache.TuningCache("G")
    b = tcache.TuningCache("G")  # another process, same file
    a.get("x")
    b.get("x")
    a.put("shared", Config(BN=16, BK=64))
    a.put("only_a", Config(BN=32, BK=64))
    a.save()
    b.put("shared", Config(BN=64, BK=128))
    b.put("only_b", Config(BN=128, BK=64))
    b.save()
    entries = tcache.TuningCache("G").entries()
    assert set(entries) == {"shared", "only_a", "only_b"}
    assert entries["shared"] == Config(BN=64, BK=128)  # the saving process wins its own keys


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", json.dumps({"version": 99, "entries": {}}), json.dumps({"version": 1, "entries": []}), ""],
)
def test_corrupt_file_is_ignored_with_warning(cache_dir, content):
    cache_dir.mkdir(parents=True)
    (cache_dir / "G.json").write_text(content)
    c = tcache.TuningCache("G")
    with pytest.warns(UserWarning, match="corrupt Triton tuning cache"):
        assert c.get("anything") is None
    c.put("k", Config(BN=16, BK=32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c.save()  # replaces the corrupt file with a valid one
    assert json.loads((cache_dir / "G.json").read_text())["entries"]["k"]["BN"] == 16


def test_malformed_entries_dropped_others_kept(cache_dir):
    cache_dir.mkdir(parents=True)
    good = Config(BM=32, BN=64, BK=64).to_dict()
    (cache_dir / "G.json").write_text(json.dumps({"version": 1, "entries": {"good": good, "bad": {"BN": "x"}}}))
    c = tcache.TuningCache("G")
    with pytest.warns(UserWarning, match="malformed entries"):
        assert c.get("good") == Config(BM=32, BN=64, BK=64)
    assert c.get("bad") is None


def test_get_config_cpu_uses_defaults_without_reading_cache(cache_dir):
    from pyquant.triton_kernels.matmul import launch as _launch

    cache_dir.mkdir(parents=True)
    (cache_dir / "cpu.json").write_text("{corrupt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = _launch.get_config("gemv", Int(4, 128), torch.float16, 64, 128, 1, torch.device("cpu"))
    assert cfg == default_config("gemv", 1, packed=True)  # Int4: the word-wise kernel's defaults


def test_get_config_gpu_lookup(cache_dir, monkeypatch):
    """The CUDA lookup path with the GPU queries faked: cached entry wins,
    unusable entries and misses fall back to the default, no tuning unless asked."""
    from pyquant.triton_kernels.matmul import launch as _launch

    monkeypatch.setattr(_launch, "gpu_name", lambda device: "Fake GPU")
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.delenv("PYQUANT_AUTOTUNE", raising=False)
    fmt = Int(4, 128)
    cuda = torch.device("cuda")
    tuned = Config(BM=32, BN=128, BK=64, SPLIT=2)
    c = tcache.get_cache("Fake GPU")
    c.put(cache_key("splitk", fmt.spec(), "fp16", 64, 256, 20), tuned)
    c.put(cache_key("gemm", fmt.spec(), "fp16", 64, 256, 100), Config(BM=8, BN=64, BK=64))  # BM < 16: unusable
    c.save()
    tcache.clear_memory()
    assert _launch.get_config("splitk", fmt, torch.float16, 64, 256, 17, cuda) == tuned  # same bucket (32)
    assert _launch.get_config("splitk", fmt, torch.float16, 64, 256, 40, cuda) == default_config("splitk", 40, True)
    assert _launch.get_config("gemm", fmt, torch.float16, 64, 256, 100, cuda) == default_config("gemm", 100, True)
    assert _launch.get_config("splitk", fmt, torch.bfloat16, 64, 256, 17, cuda) == default_config("splitk", 17, True)
    # formats without word-wise kernels keep the generic defaults
    assert _launch.get_config("splitk", Int(3, 128), torch.float16, 64, 256, 40, cuda) == default_config("splitk", 40)


def test_autotune_env_tunes_once_and_persists(cache_dir, monkeypatch):
    """PYQUANT_AUTOTUNE=1 with the GPU faked: the first lookup of a key times
    every candidate (a failing one is skipped), keeps the fastest, saves it;
    the next lookup of the same bucket reads it back without timing."""
    import pyquant
    from pyquant.triton_kernels.matmul import launch as _launch
    from pyquant.triton_kernels.tuning import autotune

    monkeypatch.setattr(_launch, "gpu_name", lambda device: "Fake GPU")
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    launched = []

    def fake_qmatmul(x, qdata, fmt, shape, bias, path=None, config=None):
        if config.BN == 16 and config.BK == 128:
            raise RuntimeError("out of resources")  # a config that does not fit
        launched.append(config)

    monkeypatch.setattr(_launch, "qmatmul", fake_qmatmul)
    monkeypatch.setattr(autotune, "_time", lambda fn: (fn(), 1.0 / (launched[-1].BN * launched[-1].BK + launched[-1].SPLIT))[1])
    monkeypatch.setenv("PYQUANT_AUTOTUNE", "1")
    qw = pyquant.quantize_weight(torch.randn(32, 256), Int(4, 128))
    fmt, cuda = qw.format, torch.device("cuda")
    cfg = _launch.get_config("gemv", fmt, torch.float16, 32, 256, 1, cuda, qw.tensor_list())
    cands = candidates("gemv", 1, packed=True)  # Int4: the word-wise kernel's candidates
    expected = max((c for c in cands if (c.BN, c.BK) != (16, 128)), key=lambda c: (c.BN * c.BK, c.SPLIT))
    assert cfg == expected
    n_timed = len(launched)
    assert n_timed >= len(cands) - 2
    data = json.loads((cache_dir / "Fake_GPU.json").read_text())
    assert data["entries"][cache_key("gemv", fmt.spec(), "fp16", 32, 256, 1)] == expected.to_dict()
    tcache.clear_memory()
    assert _launch.get_config("gemv", fmt, torch.float16, 32, 256, 1, cuda, qw.tensor_list()) == expected
    assert len(launched) == n_timed  # read from the file, not re-tuned


def test_autotune_refused_without_gpu():
    import pyquant
    from pyquant.errors import DeviceError
    from pyquant.triton_kernels import tune

    qw = pyquant.quantize_weight(torch.randn(8, 64), Int(4, 32))
    with pytest.raises(DeviceError, match="CUDA"):
        tune(qw, m_values=[1])


def test_imports_stay_lazy():
    code = textwrap.dedent(
        """
        import sys, pyquant
        assert "triton" not in sys.modules
        import pyquant.triton_kernels as tk
        from pyquant.triton_kernels.tuning import cache, configs
        assert "triton" not in sys.modules, "package import pulled triton"
        print(tk.__name__, tk.__file__.endswith("triton_kernels/__init__.py"))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["pyquant.triton_kernels", "True"]
