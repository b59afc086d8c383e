"""The GPU benchmark's logic on the CPU: rotation counts, graph batch sizes, the
statistics of replays (a fake device stands in for CUDA), eager host latency,
the suite's rows, report and plot, and the GPU facts a results file records."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.benchmarks import load_benchmark
from tests.deps import require

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _timing as T  # noqa: E402


_load = load_benchmark


def test_stats_percentiles():
    st = T.Stats.of([float(v) for v in range(1, 102)])  # 1..101
    assert (st.median, st.p10, st.p90, st.n) == (51.0, 11.0, 91.0, 101)
    assert T.Stats.of([2.0]).p90 == 2.0
    assert T.Stats.of([1.0, 2.0]).median == 1.5
    assert st.scaled(1e3).median == 51e3
    with pytest.raises(ValueError):
        T.Stats.of([])


def test_rotation_copies_exceed_four_l2():
    l2 = 50 * 2**20  # H100
    for nbytes in (9 * 2**20, 32 * 2**20, 125 * 2**20, 470 * 2**20, 1):
        c = T.rotation_copies(nbytes, l2)
        assert c * nbytes > 4 * l2 or c == 2 and nbytes > 4 * l2
        assert c >= 2
    assert T.rotation_copies(9 * 2**20, l2) == 23  # 4096x4096 int4 g128: 23 copies, 207 MB
    assert T.rotation_copies(470 * 2**20, l2) == 2


def test_batch_repeats_fill_a_replay():
    assert T.batch_repeats(23, 0.003) == 29  # 23 calls of 3 us -> 29 rotations ~ 2 ms
    assert T.batch_repeats(2, 5.0) == 1  # long calls: one rotation
    assert T.batch_repeats(1000, 1e-6) == 2  # capped at 2048 calls
    assert T.batch_repeats(4096, 1e-6) == 1


class FakeGpu:
    """Graph capture and replay of Python calls; each call 'takes' a fixed time, a
    replay costs a fixed overhead, every 10th replay is slow (a noisy neighbour)."""

    def __init__(self, call_ms=0.01, overhead_ms=0.002, l2=50 * 2**20):
        self.call_ms, self.overhead_ms, self.l2 = call_ms, overhead_ms, l2
        self.captured, self.replays, self.eager_calls = [], 0, 0
        self.busy_left = 0

    def l2_bytes(self):
        return self.l2

    def run(self, fns):
        for f in fns:
            f()
        self.eager_calls += len(fns)
        return len(fns) * self.call_ms * 3  # eager: with host gaps

    def capture(self, fns):
        self.captured.append(len(fns))
        return list(fns)

    def replay_ms(self, graph):
        self.replays += 1
        slow = 2.0 if self.replays % 10 == 0 else 1.0
        return len(graph) * self.call_ms * slow + self.overhead_ms

    def busy(self, ms):
        self.busy_left = ms
        return "event"

    def still_busy(self, event):
        return self.busy_left > 0

    def synchronize(self):
        self.busy_left = 0


def test_graph_timer_statistics_per_call():
    gpu = FakeGpu(call_ms=0.01)
    timer = T.GraphTimer(gpu, replays=60, warmup=3)
    seen = []
    calls = [lambda i=i: seen.append(i) for i in range(5)]
    st = timer.time_calls(calls)
    assert seen[:10] == [0, 1, 2, 3, 4] * 2  # two eager passes before the capture
    (body,) = gpu.captured
    assert body % 5 == 0 and body == 5 * T.batch_repeats(5, 0.03)  # whole rotations
    assert gpu.replays == 63 and st.n == 60
    assert st.median == pytest.approx(0.01 + 0.002 / body)  # the replay overhead spread over the batch
    assert st.p90 > st.median  # the slow replays show in the tail, not the median
    with pytest.raises(ValueError):
        T.GraphTimer(gpu, replays=10)


def test_eager_host_latency_needs_a_busy_gpu():
    gpu = FakeGpu()
    calls = []
    us, busy = T.eager_host_us(gpu, lambda: calls.append(1), calls=20)
    assert busy and len(calls) == 21 and us > 0

    class Idle(FakeGpu):
        def still_busy(self, event):
            return False

    assert T.eager_host_us(Idle(), lambda: None)[1] is False


def test_nvidia_smi_parsing():
    def fake_run(cmd, **kw):
        assert cmd[0] == "nvidia-smi" and "--format=csv,noheader" in cmd
        return SimpleNamespace(returncode=0, stdout="1980 MHz, 2619 MHz, 1980 MHz, 2619 MHz, 700.00 W, 550.54, 34\n")

    info = T.nvidia_smi(0, run=fake_run)
    assert info["clocks.sm"] == "1980 MHz" and info["driver_version"] == "550.54"

    def missing(cmd, **kw):
        raise FileNotFoundError("nvidia-smi")

    assert T.nvidia_smi(0, run=missing) == {}
    assert T.nvidia_smi(0, run=lambda cmd, **kw: SimpleNamespace(returncode=9, stdout="")) == {}


class CountingTimer:
    """The suite's timer interface on the CPU: every call of a candidate runs once
    (so a broken call shows), copies as a GPU would need them."""

    def __init__(self):
        self.candidates = []

    def copies(self, nbytes):
        return 3

    def kernel(self, calls):
        for c in calls:
            c()
        self.candidates.append(len(calls))
        ms = 0.004 if len(self.candidates) % 2 else 0.002  # dense / pyquant alternate
        return T.Stats(ms, ms * 0.9, ms * 1.2, 50)

    def eager_us(self, fn):
        fn()
        return 6.5


def test_suite_rows_report_and_plot(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no interpreted Triton rows: slow and beside the point
    suite = _load("suite")
    args = SimpleNamespace(device="cpu", quick=False, shapes="64x256", m="1,4", formats="int4_g128_asym",
                           with_reference=False, replays=50, repeat_check=True)
    timer = CountingTimer()
    result = suite.run(args, timer=timer)
    assert set(timer.candidates) == {3}  # every candidate rotates over its 3 copies
    rows = [r for r in result["matmul"] if "error" not in r]
    assert {(r["m"], r["backend"]) for r in rows} == {(1, "cpu"), (4, "cpu"), (1, "reference"), (4, "reference")}
    r = rows[0]
    assert r["us"] == pytest.approx(r["dense_us"] / r["speedup"]) and r["eager_us"] == 6.5
    assert r["p10_us"] < r["us"] < r["p90_us"]
    assert result["repeat_check"]["dense"]["rel_diff"] >= 0
    md = suite.markdown(result)
    assert "| 64x256 | 1 | int4_g128_asym | cpu | cpu_int_qmatmul |" in md and "p10-p90 us" in md
    assert "two runs of 64x256 M=1" in md
    require("matplotlib")
    png = tmp_path / "suite.png"
    assert suite.plot(result, png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
