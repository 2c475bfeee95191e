"""Soft MoE dispatch/combine: the fast paths against their *_ref loops, and the published formulas by hand."""

import math

import pytest
import torch

from harness.ops.soft_dispatch import (
    sliding_combine,
    sliding_combine_ref,
    sliding_dispatch,
    sliding_dispatch_ref,
    soft_combine,
    soft_combine_ref,
    soft_dispatch,
    soft_dispatch_ref,
)

SLIDING = [
    pytest.param(2, 12, 4, id="B2-T12-L4-on-grid"),
    pytest.param(2, 11, 4, id="B2-T11-L4-off-grid"),
    pytest.param(1, 3, 8, id="B1-T3-L8-shorter-than-window"),
    pytest.param(1, 7, 1, id="B1-T7-L1"),
]


def _inputs(B, T, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
    return mk(B, T, D), mk(B, T, S) * 2


def _grads(out, *leaves):
    return torch.autograd.grad(out, leaves, torch.ones_like(out))


@pytest.mark.parametrize("B,T,L", SLIDING)
@pytest.mark.parametrize("step", ["dispatch", "combine"])
def test_sliding_matches_ref(B, T, L, step):
    x, logits = _inputs(B, T, L, 5)
    fast, ref = (
        (sliding_dispatch, sliding_dispatch_ref)
        if step == "dispatch"
        else (sliding_combine, sliding_combine_ref)
    )
    out, out_ref = fast(x, logits), ref(x, logits)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(_grads(out, x, logits), _grads(out_ref, x, logits), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("step", ["dispatch", "combine"])
def test_sliding_is_causal(step):
    fast = sliding_dispatch if step == "dispatch" else sliding_combine
    x, logits = _inputs(1, 13, 4, 3)
    x2, logits2 = x.detach().clone(), logits.detach().clone()
    x2[:, 6:] += 5.0
    logits2[:, 6:] -= 3.0
    torch.testing.assert_close(fast(x, logits)[:, :6], fast(x2, logits2)[:, :6], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "B,T,S", [pytest.param(2, 5, 3, id="B2-T5-S3"), pytest.param(1, 4, 8, id="B1-T4-S8")]
)
def test_global_matches_ref(B, T, S):
    x, logits = _inputs(B, T, S, 4)
    ys = torch.randn(B, S, 4, dtype=torch.float64, requires_grad=True)
    for out, out_ref, leaves in [
        (soft_dispatch(x, logits), soft_dispatch_ref(x, logits), (x, logits)),
        (soft_combine(ys, logits), soft_combine_ref(ys, logits), (ys, logits)),
    ]:
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
        for g, g_ref in zip(_grads(out, *leaves), _grads(out_ref, *leaves), strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_global_by_hand():
    # logits [[ln 3, 0], [0, ln 3]]: dispatch (softmax over tokens, per slot) and combine (softmax
    # over slots, per token) are both [[3/4, 1/4], [1/4, 3/4]].
    logits = torch.tensor([[[math.log(3), 0.0], [0.0, math.log(3)]]], dtype=torch.float64)
    x = torch.tensor([[[2.0, 0.0], [0.0, 4.0]]], dtype=torch.float64)
    slots = soft_dispatch(x, logits)
    torch.testing.assert_close(slots, torch.tensor([[[1.5, 1.0], [0.5, 3.0]]], dtype=torch.float64))
    ys = torch.tensor([[[8.0, 0.0], [0.0, 8.0]]], dtype=torch.float64)
    torch.testing.assert_close(
        soft_combine(ys, logits), torch.tensor([[[6.0, 2.0], [2.0, 6.0]]], dtype=torch.float64)
    )


def test_sliding_by_hand():
    # L = 2, T = 3. Slot 0 (param 0) sees x0 only; slot 1 (param 1) sees x0, x1 with
    # softmax(logits[0,1], logits[1,1]); slot 2 (param 0) sees x1, x2 with softmax(logits[1,0], logits[2,0]).
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0], [0.0, 5.0]]], dtype=torch.float64)
    x = torch.tensor([[[4.0], [8.0], [12.0]]], dtype=torch.float64)
    expected = torch.tensor([[[4.0], [0.75 * 4 + 0.25 * 8], [0.75 * 8 + 0.25 * 12]]], dtype=torch.float64)
    torch.testing.assert_close(sliding_dispatch(x, logits), expected)
    # Token 2 reads anchors 1 (param 1) and 2 (param 0): softmax(logits[2,1], logits[2,0]) = softmax(5, 0).
    ys = torch.tensor([[[1.0], [10.0], [100.0]]], dtype=torch.float64)
    w = torch.tensor([5.0, 0.0], dtype=torch.float64).softmax(0)
    t1 = 0.75 * 1 + 0.25 * 10  # token 1: anchors 0 (param 0, logit ln 3) and 1 (param 1, logit 0)
    expected = torch.tensor([[[1.0], [t1], [w[0] * 10 + w[1] * 100]]], dtype=torch.float64)
    torch.testing.assert_close(sliding_combine(ys, logits), expected)
