"""Soft MoE family: causality, batch independence, naive vs vectorised, the paper by hand, FLOPs, learning."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from harness import flops
from harness.config import compose
from harness.models import build_model, make_config
from harness.models.soft_moe import SoftMoE, SoftMoEConfig
from tests.helpers import measured_flops, tiny, use_reference_paths
from tests.models.host_sync import HostSyncs

SMALL = dict(d_model=32, n_layers=2, n_heads=2, seq_len=32)

# Every causal configuration family: window = n (p = 1), windows shorter than and equal to the
# sequence, one expert, GELU experts, and MoE only in some layers.
CAUSAL = [
    pytest.param(dict(n_experts=4, chunk_size=16), id="n4-L16-swiglu"),
    pytest.param(dict(n_experts=4, chunk_size=4, mlp="gelu"), id="n4-L4-p1-gelu"),
    pytest.param(dict(n_experts=2, chunk_size=32), id="n2-L32-window-is-seq"),
    pytest.param(dict(n_experts=1, chunk_size=8), id="n1-L8"),
    pytest.param(dict(n_experts=8, chunk_size=8, moe_every=2, n_layers=3), id="n8-L8-every2"),
]


def _model(fields: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(SoftMoEConfig(**{**SMALL, **fields})).double()
    for m in model.modules():
        if isinstance(m, SoftMoE):
            # sharper routing than the init's |logit| <= 1, so a leak would not hide in a near-uniform softmax
            m.scale.data.fill_(4.0)
    return model.eval()


@pytest.mark.parametrize("fields", CAUSAL)
def test_future_tokens_do_not_change_the_past(fields):
    model = _model(fields)
    T = SMALL["seq_len"]
    idx = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(idx).logits
        for t in (0, 3, 7, 15, 16, T - 2):
            other = idx.clone()
            other[:, t + 1 :] = torch.randint(
                0, 256, (2, T - t - 1), generator=torch.Generator().manual_seed(t)
            )
            out = model(other).logits
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize("fields", CAUSAL)
def test_other_sequences_change_nothing(fields):
    model = _model(fields)
    idx = torch.randint(0, 256, (3, SMALL["seq_len"]), generator=torch.Generator().manual_seed(2))
    other = idx.clone()
    other[1:] = torch.randint(0, 256, other[1:].shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(other).logits[0], model(idx).logits[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(idx[:1]).logits[0], model(idx).logits[0], rtol=0, atol=1e-6)


def test_original_is_flagged_and_leaks_the_future():
    cfg = SoftMoEConfig(**SMALL, variant="original", n_experts=4)
    assert cfg.causal is False and cfg.slots_per_expert == 8
    with pytest.raises(ValueError, match="causal is derived"):
        SoftMoEConfig(**SMALL, variant="original", causal=True)
    with pytest.raises(ValueError, match="not causal"):
        compose(["model=soft_moe_original"])
    assert compose(["model=soft_moe_original", "allow_noncausal=true"]).model.causal is False
    assert compose(["model=soft_moe_tiny"]).model.causal is True
    model = _model(dict(variant="original", n_experts=4))
    idx = torch.randint(0, 256, (1, SMALL["seq_len"]))
    other = idx.clone()
    other[0, -1] = (idx[0, -1] + 1) % 256
    with torch.no_grad():
        assert not torch.allclose(model(other).logits[:, 0], model(idx).logits[:, 0])


@pytest.mark.parametrize(
    "fields",
    [
        dict(seq_len=48, n_experts=4, chunk_size=32),
        dict(n_experts=3, chunk_size=16),
        dict(variant="original", chunk_size=8),
        dict(variant="diagonal"),
        dict(bias=True),
    ],
    ids=[
        "seq-not-multiple-of-window",
        "window-not-multiple-of-n",
        "original-with-window",
        "bad-variant",
        "bias",
    ],
)
def test_impossible_configs_raise(fields):
    with pytest.raises(ValueError):
        SoftMoEConfig(**{**SMALL, **fields})


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(dict(n_experts=4, chunk_size=8), id="sliding-T13-off-grid"),
        pytest.param(dict(n_experts=2, chunk_size=4, mlp="gelu"), id="sliding-gelu"),
        pytest.param(dict(variant="original", n_experts=2, slots_per_expert=3), id="original"),
    ],
)
def test_naive_loops_match_vectorised(fields):
    torch.manual_seed(0)
    cfg = SoftMoEConfig(**{**SMALL, "d_model": 8, **fields})
    layer = SoftMoE(cfg, 0).double()
    layer.scale.data.fill_(3.0)
    x = torch.randn(2, 13, 8, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for naive in (False, True):
        layer.naive = naive
        out = layer(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out.pow(2).sum(), [x, *layer.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for g_fast, g_naive in zip(*grads, strict=True):
        torch.testing.assert_close(g_fast, g_naive, rtol=1e-10, atol=1e-10)


def test_original_matches_the_paper_by_hand():
    # Two tokens, two experts with one slot each. Tokens x = [[2, 0], [0, 3]] and slot parameters
    # phi = [[5, 0], [0, 7]] normalise to the identity; scale = ln 3 makes the logits
    # [[ln 3, 0], [0, ln 3]], so dispatch (softmax over tokens) and combine (softmax over slots)
    # are both [[3/4, 1/4], [1/4, 3/4]]. Slots are mixes of the raw tokens: [[1.5, 0.75], [0.5, 2.25]].
    cfg = SoftMoEConfig(d_model=2, n_heads=1, seq_len=2, variant="original", n_experts=2, d_ff=3)
    layer = SoftMoE(cfg, 0).double()
    layer.phi.data = torch.tensor([[5.0, 0.0], [0.0, 7.0]], dtype=torch.float64)
    layer.scale.data.fill_(math.log(3))
    x = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]], dtype=torch.float64)
    slots = torch.tensor([[1.5, 0.75], [0.5, 2.25]], dtype=torch.float64)
    e = layer.experts
    ys = torch.stack(
        [(F.silu(slots[i] @ e.w_gate[i]) * (slots[i] @ e.w_in[i])) @ e.w_out[i] for i in range(2)]
    )
    combine = torch.tensor([[0.75, 0.25], [0.25, 0.75]], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], combine @ ys, rtol=1e-6, atol=1e-9)


FLOP_SHAPES = [
    pytest.param(None, id="tiny-preset"),
    pytest.param(dict(n_experts=2, chunk_size=8, mlp="gelu", moe_every=2, n_layers=3), id="gelu-every2"),
    pytest.param(dict(n_experts=8, chunk_size=64, d_model=48, n_heads=3), id="n8-L64"),
    pytest.param(dict(variant="original", n_experts=4, slots_per_expert=5), id="original-S20"),
    pytest.param(dict(variant="original", n_experts=2, mlp="gelu", moe_every=2), id="original-gelu-S64"),
]


@pytest.mark.parametrize("fields", FLOP_SHAPES)
def test_counts_match_the_built_model(fields):
    cfg = (
        tiny("soft_moe_tiny")
        if fields is None
        else SoftMoEConfig(**{"d_model": 64, "n_layers": 2, "seq_len": 64, **fields})
    )
    model = use_reference_paths(build_model(cfg))
    assert flops.param_counts(cfg)["params_total"] == sum(p.numel() for p in model.parameters())
    fwd = flops.count(cfg).forward
    B, T = 2, cfg.seq_len
    assert measured_flops(model, B, T, cfg.vocab_size) == pytest.approx(B * T * fwd, rel=0.01)
    assert measured_flops(model, B, T, cfg.vocab_size, backward=True) == pytest.approx(
        3 * B * T * fwd, rel=0.01
    )


def test_compute_per_token_does_not_grow_with_experts():
    counts = [flops.count(SoftMoEConfig(**SMALL, n_experts=n, chunk_size=16)) for n in (1, 2, 4, 8, 16)]
    assert len({c.forward for c in counts}) == 1
    assert all(a.params_total < b.params_total for a, b in zip(counts, counts[1:], strict=False))
    half = flops.count(SoftMoEConfig(**SMALL, n_experts=4, chunk_size=16), causal_half=True).forward
    assert half < counts[0].forward


def test_widths_derive_from_d_model():
    cfg = SoftMoEConfig(d_model=96, n_layers=3, seq_len=128)
    assert (cfg.head_dim, cfg.d_ff, cfg.chunk_size, cfg.slots_per_expert) == (24, 256, 32, 4)


@pytest.mark.parametrize("variant", ["sliding", "original"])
def test_recorded_config_reloads(variant):
    # config.yaml records the derived fields (causal included); reading it back must give the same config
    cfg = SoftMoEConfig(**SMALL, variant=variant)
    assert make_config(dataclasses.asdict(cfg)) == cfg


def test_tiny_causal_model_learns():
    torch.manual_seed(0)
    cfg = tiny("soft_moe_tiny", d_model=32, seq_len=32, n_heads=2)
    model = build_model(cfg)
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog; " * 40))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        starts = torch.randint(0, len(text) - cfg.seq_len - 1, (8,), generator=gen)
        batch = torch.stack([text[s : s + cfg.seq_len + 1] for s in starts])
        logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0 and sum(losses[-5:]) / 5 < 2.0, losses[::10]


def test_a_model_without_any_soft_moe_layer_is_refused():
    with pytest.raises(ValueError, match="no Soft MoE layer"):
        SoftMoEConfig(d_model=32, n_layers=1, moe_every=2)


NO_SYNC = [
    pytest.param(dict(n_experts=4, chunk_size=8), id="sliding"),
    pytest.param(dict(variant="original", n_experts=4), id="original"),
]


@pytest.mark.parametrize("fields", NO_SYNC)
def test_training_step_has_no_host_sync(fields):
    """Structural proof on CPU that a forward+backward calls no op that waits for a CUDA device
    (tests/models/host_sync.py): dispatch and combine are dense masked matmuls of static shape."""
    torch.manual_seed(0)
    model = build_model(SoftMoEConfig(**{**SMALL, **fields})).train()
    idx = torch.randint(0, 256, (2, SMALL["seq_len"]))
    with HostSyncs() as syncs:
        model(idx).logits.square().mean().backward()
    assert syncs.found == []
    assert "aten::bmm" in syncs.ops and all(p.grad is not None for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("fields", NO_SYNC)
def test_training_step_on_cuda_has_no_host_sync(fields):
    """On a GPU under bf16 autocast, with torch's sync debug mode set to raise on any host sync."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    model = build_model(SoftMoEConfig(**{**SMALL, **fields})).cuda().train()
    idx = torch.randint(0, 256, (2, SMALL["seq_len"]), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(idx)
        out.logits.float().square().mean().backward()
        return out

    step()  # first calls initialise libraries, which may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.logits).all()
