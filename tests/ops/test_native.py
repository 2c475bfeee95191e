"""Building and loading the C kernels: the cache, the fallbacks, and the task split."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

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
    assert lib is not None and hasattr(lib, "scan_fwd") and hasattr(lib, "scan_bwd")
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


@pytest.mark.skipif(native.load("selective_scan", torch.float64) is None, reason="no native kernel here")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count_gives_the_reference(threads):
    """Channel blocks are shared out over OpenMP threads and dB, dC summed over per-thread parts:
    every split (including more threads than blocks) gives the reference's gradients."""
    g = torch.Generator().manual_seed(3)
    B, T, D, N = 2, 21, 40, 16  # 3 channel blocks per sequence, the last one partial
    inputs = [
        torch.randn(B, T, D, generator=g, dtype=torch.float64),
        torch.rand(B, T, D, generator=g, dtype=torch.float64),
        -torch.rand(D, N, generator=g, dtype=torch.float64) - 0.1,
        torch.randn(B, T, N, generator=g, dtype=torch.float64),
        torch.randn(B, T, N, generator=g, dtype=torch.float64),
        torch.randn(D, generator=g, dtype=torch.float64),
    ]
    gy = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    _assert_same_on_threads(scan.selective_scan_ref, scan.selective_scan_native, inputs, gy, None, threads)


@pytest.mark.skipif(native.load("ssd_scan", torch.float64) is None, reason="no native kernel here")
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_ssd_any_thread_count_gives_the_reference(threads):
    """(sequence, head, channel block) tasks are shared out over OpenMP threads and dB, dC summed
    over per-thread parts: every split (including more threads than tasks) gives the reference."""
    g = torch.Generator().manual_seed(4)
    B, T, H, P, N = 2, 21, 2, 20, 17  # 2 channel blocks per head, the last one partial: 8 tasks
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    inputs = [
        r(B, T, H, P),
        torch.rand(B, T, H, generator=g, dtype=torch.float64),
        -torch.rand(H, generator=g, dtype=torch.float64) - 0.1,
    ]
    inputs += [r(B, T, N), r(B, T, N), r(H), r(B, H, P, N)]
    gy, gh = r(B, T, H, P), r(B, H, P, N)
    _assert_same_on_threads(scan.ssd_scan_ref, scan.ssd_scan_native, inputs, gy, gh, threads)


def _assert_same_on_threads(ref, fast, inputs, gy, gh, threads: int) -> None:
    """The reference (default threads) and the native kernel on `threads` threads give the same
    output, final state and input gradients for the cotangents gy (and gh on the final state)."""
    before = torch.get_num_threads()
    results = []
    try:
        for fn, n in ((ref, before), (fast, threads)):
            torch.set_num_threads(n)
            leaves = [t.clone().requires_grad_() for t in inputs]
            y, h = fn(*leaves, chunk_size=8)
            loss = (y * gy).sum() + (0 if gh is None else (h * gh).sum())
            loss.backward()
            results.append([y, h, *(t.grad for t in leaves)])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
@pytest.mark.skipif(native.load("selective_scan", torch.float32) is None, reason="no native kernel here")
def test_shares_torchs_openmp_runtime():
    """One OpenMP runtime in the process: with a second one, its idle threads spin on the cores the
    other needs (two threads were no faster than one before the kernels shared torch's)."""
    native.load("selective_scan", torch.float32)
    runtimes = {
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if any(name in line for name in ("libgomp", "libiomp", "libomp"))
    }
    assert len(runtimes) == 1, runtimes


def test_builds_without_openmp_when_the_compiler_lacks_it(fresh, monkeypatch, tmp_path):
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    wrapper = tmp_path / "cc-no-openmp"
    wrapper.write_text(
        f'#!/bin/sh\ncase " $* " in *" -fopenmp "*) exit 1;; esac\nexec {shlex.join(cc)} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    lib = native.load("selective_scan", torch.float64)
    assert lib is not None
    g = torch.Generator().manual_seed(0)
    u, dt = torch.randn(2, 9, 20, generator=g, dtype=torch.float64), torch.rand(2, 9, 20, dtype=torch.float64)
    A = -torch.rand(20, 3, dtype=torch.float64)
    Bm, Cm, D = (
        torch.randn(2, 9, 3, dtype=torch.float64),
        torch.randn(2, 9, 3, dtype=torch.float64),
        torch.ones(20),
    )
    y, h = scan.selective_scan_native(u, dt, A, Bm, Cm, D.double())
    y_ref, h_ref = scan.selective_scan_ref(u, dt, A, Bm, Cm, D.double())
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only CI requires the kernels to build")
def test_kernels_build_in_ci():
    """Elsewhere a missing compiler only costs speed; in CI it would leave the native tests skipped."""
    for name in ("selective_scan", "ssd_scan"):
        for dtype in (torch.float32, torch.float64):
            assert native.load(name, dtype) is not None, f"{name} {dtype} did not build"


def test_unwritable_cache_falls_back(fresh, monkeypatch, caplog):
    monkeypatch.setenv("HARNESS_KERNEL_CACHE", "/dev/null/kernels")  # cannot be created
    with caplog.at_level(logging.WARNING, logger="harness.ops.native"):
        assert native.load("selective_scan", torch.float32) is None
        assert scan.pick_backend("auto", torch.zeros(1), native_kernel="selective_scan") == "torch"
    assert "could not build or load" in caplog.text


def test_cache_dir_rules(monkeypatch, tmp_path):
    monkeypatch.delenv("HARNESS_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(Path, "home", lambda: (_ for _ in ()).throw(RuntimeError("no home")))
    assert native.cache_dir() == tmp_path / "harness" / "kernels"  # no home directory needed
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty counts as unset
    monkeypatch.setattr(Path, "home", lambda: tmp_path / "home")
    assert native.cache_dir() == tmp_path / "home" / ".cache" / "harness" / "kernels"


def test_cached_library_is_readable_by_others(fresh):
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    old = os.umask(0o022)
    try:
        assert native.load("ssd_scan", torch.float32) is not None
    finally:
        os.umask(old)
    (so,) = fresh.glob("ssd_scan-fp32-*.so")
    assert so.stat().st_mode & 0o555 == 0o555
