"""Attention ops: the fused causal attention and the rotary q/k/v split against their `_ref` twins."""

from __future__ import annotations

import pytest
import torch

from harness.layers import rope_tables
from harness.ops.attention import (
    causal_attention,
    causal_attention_ref,
    rotary_qkv_,
    rotary_qkv_ref,
    split_heads,
)

B, H, D = 2, 3, 8


def outputs_and_grads(fn, qkv, *args):
    outs = fn(qkv.clone(), *args)  # the fast path overwrites its input, a projection's fresh output
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    (grad,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, ws, strict=True)), qkv)
    return [o.detach() for o in outs] + [grad]


def qkv_input(T: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(T)
    return torch.randn(B, T, 3 * H * D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


@pytest.mark.parametrize("T", [16, 17, 1], ids=["T16", "T17", "T1"])
def test_rotary_qkv_matches_reference(T):
    cos, sin = rope_tables(32, D)  # tables longer than T, as a model's seq_len is
    qkv = qkv_input(T)
    fast = outputs_and_grads(rotary_qkv_, qkv, cos, sin, H)
    ref = outputs_and_grads(rotary_qkv_ref, qkv, cos, sin, H)
    assert [t.shape for t in fast[:3]] == [(B, H, T, D)] * 3
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_rotary_qkv_compiled_form_matches_reference(monkeypatch):
    """Under torch.compile the fast path is the plain formula; checked here without compiling."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    cos, sin = rope_tables(32, D)
    qkv = qkv_input(17)
    fast = outputs_and_grads(rotary_qkv_, qkv, cos, sin, H)
    ref = outputs_and_grads(rotary_qkv_ref, qkv, cos, sin, H)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_rotary_qkv_in_fp32_is_within_rounding():
    cos, sin = rope_tables(32, D)
    qkv = qkv_input(17, torch.float32)
    fast = outputs_and_grads(rotary_qkv_, qkv, cos, sin, H)
    ref = outputs_and_grads(rotary_qkv_ref, qkv, cos, sin, H)
    for a, b in zip(fast, ref, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_rotation_keeps_norms_and_position_zero():
    cos, sin = rope_tables(32, D)
    qkv = qkv_input(17).detach()
    q0, k0, v0 = (t.clone() for t in split_heads(qkv, H))
    q, k, v = rotary_qkv_(qkv, cos, sin, H)
    torch.testing.assert_close(q.norm(dim=-1), q0.norm(dim=-1))
    torch.testing.assert_close(q[:, :, 0], q0[:, :, 0])  # angle 0 at t = 0
    torch.testing.assert_close(k[:, :, 0], k0[:, :, 0])
    assert torch.equal(v, v0)
    assert q.data_ptr() == qkv.data_ptr(), "rotated in place"


def test_split_heads_is_a_view_in_the_head_layout():
    qkv = qkv_input(17).detach()
    q, k, v = split_heads(qkv, H)
    assert all(t.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr() for t in (q, k, v))
    C = H * D
    torch.testing.assert_close(k, qkv[..., C : 2 * C].reshape(B, 17, H, D).transpose(1, 2))


def test_fused_attention_matches_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fast = causal_attention(q, k, v)
    ref = causal_attention_ref(q, k, v)
    torch.testing.assert_close(fast, ref)
    g_fast = torch.autograd.grad(fast.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b)
