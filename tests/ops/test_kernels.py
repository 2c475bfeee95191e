"""The kernel log and the optional-kernel probe."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from harness.ops import kernels
from tests.ops.fake_kernels import fake_module


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(kernels, "_noted", {})
    monkeypatch.setattr(kernels, "_found", {})


def test_note_logs_each_triple_once(caplog):
    with caplog.at_level(logging.INFO, logger="harness.kernels"):
        for _ in range(3):
            kernels.note("mamba", "selective_scan", "mamba-ssm")
        kernels.note("mamba", "selective_scan", "torch")
    assert [r.getMessage() for r in caplog.records] == [
        "mamba selective_scan: mamba-ssm",
        "mamba selective_scan: torch",
    ]


def test_noted_kernel_traces_without_a_graph_break():
    def f(x):
        kernels.note("rwkv7", "wkv7", "torch")
        return x.sin() * 2

    f(torch.zeros(2))
    torch._dynamo.reset()
    x = torch.randn(4)
    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(x), x.sin() * 2)


def test_find_is_silent_when_the_package_is_absent(caplog):
    with caplog.at_level(logging.WARNING, logger="harness.kernels"):
        assert kernels.find("no_such_kernel_pkg.ops", "no_such_kernel_pkg", "hint") is None
    assert caplog.records == []


def test_find_warns_once_when_an_installed_package_does_not_load(monkeypatch, caplog):
    # An installed package whose compiled extension is missing: the import fails, find_spec finds it.
    monkeypatch.setitem(sys.modules, "fake_pkg", fake_module("fake_pkg"))
    monkeypatch.setitem(sys.modules, "fake_pkg_ext", None)
    with caplog.at_level(logging.WARNING, logger="harness.kernels"):
        for _ in range(2):
            assert kernels.find("fake_pkg_ext", "fake_pkg", "rebuild it") is None
    [record] = caplog.records
    assert "fake_pkg is installed but fake_pkg_ext does not load" in record.getMessage()
    assert record.getMessage().endswith("rebuild it")


def test_find_returns_the_module():
    assert kernels.find("json", "json", "") is sys.modules["json"]
