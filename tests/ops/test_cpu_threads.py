"""The M = 1 kernels' threads (csrc/cpu/work_share.h).

Each thread streams its own range of row blocks and then steals from the
others' ranges, so every block must run exactly once whichever threads turn
up and when: the output is bit for bit the one-thread output at every thread
count, also with more threads than cores and with callers racing from
several Python threads.
"""
import threading
import time

import pytest
import torch

import pyquant
from pyquant import _ext
from pyquant.formats import GGUF, Int
from pyquant.ops.backends.cpu_activations import cpu_activations

pytestmark = pytest.mark.skipif(_ext.load() is None, reason="needs the C++ extension")

# Large enough that the kernels wake every thread they are given (each takes
# ~2^17 multiply-adds at least), small enough to run many times.
N, K = 512, 1024


def _cases():
    """(name, fn) where fn() runs one M = 1 product on the threaded kernels."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    x = torch.randn(1, K, generator=g)
    q4_0 = pyquant.quantize_weight(w, GGUF("Q4_0"))
    int4 = pyquant.quantize_weight(w, Int(bits=4, group_size=128))

    def int4_exact():
        with cpu_activations("fp32"):  # the fp32 GEMV (int_gemv.cpp)
            return pyquant.qmatmul(x, int4, kernel="cpu")

    def int4_int8():
        with cpu_activations("int8"):  # the int8-plane kernel (q8_driver.cpp)
            return pyquant.qmatmul(x, int4, kernel="cpu")

    return [("q4_0", lambda: pyquant.qmatmul(x, q4_0, kernel="cpu")), ("int4_exact", int4_exact),
            ("int4_int8", int4_int8)]


@pytest.fixture
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _expected(cases):
    torch.set_num_threads(1)
    return {name: fn() for name, fn in cases}


def test_every_thread_count_gives_the_one_thread_result(restore_threads):
    cases = _cases()
    expected = _expected(cases)
    for threads in (2, 3, 5, 8):  # up to four times this machine's cores
        torch.set_num_threads(threads)
        for name, fn in cases:
            for call in range(20):
                y = fn()
                assert torch.equal(y, expected[name]), f"{name}: {threads} threads, call {call} differs"


def test_callers_racing_from_python_threads(restore_threads):
    """Each call has its own shares; concurrent calls never mix blocks."""
    cases = _cases()
    expected = _expected(cases)
    torch.set_num_threads(2)
    errors, deadline = [], time.monotonic() + 1.5

    def caller():
        try:
            while time.monotonic() < deadline:
                for name, fn in cases:
                    if not torch.equal(fn(), expected[name]):
                        errors.append(name)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, errors[:5]
