"""Building and loading the C kernels: the cache, the fallbacks, and the task split."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch

from harness.ops import native, scan


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_KERNEL_CACHE", str(tmp_path))
    native.load.cache_clear()
    yield tmp_path
    native.load.cache_clear()


def test_builds_once_into_the_cache(fresh):
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    lib = native.load("selective_scan", torch.float32)
    assert lib is not None and lib.scan_width() > 0
    (so,) = fresh.glob("selective_scan-fp32-*.so")
    stamp = so.stat().st_mtime_ns
    native.load.cache_clear()
    assert native.load("selective_scan", torch.float32) is not None
    assert so.stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt
    assert not [p for p in fresh.iterdir() if p != so]  # no temporary files left behind


def test_failed_build_falls_back_to_torch(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="harness.ops.native"):
        assert native.load("selective_scan", torch.float64) is None
    assert "using the PyTorch path" in caplog.text
    assert not list(fresh.iterdir())
    g = torch.Generator().manual_seed(0)
    u, dt = torch.randn(1, 9, 3, generator=g), torch.rand(1, 9, 3, generator=g)
    A, Bm, Cm, D = -torch.rand(3, 2, generator=g), torch.randn(1, 9, 2), torch.randn(1, 9, 2), torch.ones(3)
    y, h = scan.selective_scan_native(u, dt, A, Bm, Cm, D)
    y_t, h_t = scan.selective_scan(u, dt, A, Bm, Cm, D)
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(h, h_t)


def test_disabled_by_environment(fresh, monkeypatch):
    monkeypatch.setenv("HARNESS_NATIVE", "0")
    assert native.load("selective_scan", torch.float32) is None


def test_rejects_other_dtypes(fresh):
    with pytest.raises(ValueError, match="float32 or float64"):
        native.load("selective_scan", torch.bfloat16)


@pytest.mark.parametrize("threads,n", [(1, 5), (2, 5), (2, 1), (3, 8)])
def test_run_tasks_covers_every_task_once(threads, n):
    seen: list[int] = []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native.run_tasks(lambda lo, hi, part: seen.extend(range(lo, hi)) or 0, n)
        assert sorted(seen) == list(range(n))
        with pytest.raises(MemoryError):
            native.run_tasks(lambda lo, hi, part: -1, n)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_thread_pool_works_in_a_forked_child():
    torch.set_num_threads(2)
    native.run_tasks(lambda lo, hi, part: 0, 4)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # child: must not wait forever on the parent's (absent) threads
        torch.set_num_threads(2)  # torch drops to 1 thread in a forked child
        seen: list[int] = []
        native.run_tasks(lambda lo, hi, part: seen.extend(range(lo, hi)) or 0, 4)
        os._exit(0 if sorted(seen) == [0, 1, 2, 3] else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("run_tasks hung in a forked child")
