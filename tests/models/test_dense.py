import copy

import pytest
import torch

from harness import flops
from harness.layers import RMSNorm
from harness.models import build_model
from tests.helpers import measured_flops, tiny, use_reference_paths

DENSE = ["gpt2_tiny", "llama_tiny"]


@pytest.mark.parametrize("preset", DENSE)
def test_future_tokens_never_change_past_logits(preset):
    torch.manual_seed(0)
    cfg = tiny(preset)
    model = build_model(cfg).double().eval()
    idx = torch.randint(0, 256, (2, cfg.seq_len))
    base = model(idx).logits
    for t in (0, 10, cfg.seq_len - 2):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(0, 256, changed[:, t + 1 :].shape)
        out = model(changed).logits
        assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-10), (
            f"position <= {t} saw the future"
        )
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :]), "perturbation had no effect at all"


@pytest.mark.parametrize(
    "preset, fields",
    [("gpt2_tiny", {}), ("llama_tiny", {}), ("llama_tiny", {"bias": True})],
    ids=["gpt2", "llama", "llama_bias"],  # with biases the projection's output is a view, rotated in place
)
def test_fast_paths_match_reference_paths(preset, fields):
    """Logits and every gradient of the model as it trains (fused attention, rotary q/k/v split,
    RMSNorm with its own backward) against the explicit reference paths."""
    torch.manual_seed(0)
    cfg = tiny(preset, d_model=48, n_layers=2, n_heads=3, **fields)
    fast = build_model(cfg).double()
    ref = use_reference_paths(copy.deepcopy(fast))
    for m in ref.modules():
        if isinstance(m, RMSNorm):
            m.__class__ = torch.nn.RMSNorm
    idx = torch.randint(0, 256, (2, cfg.seq_len - 3))
    outs = []
    for model in (fast, ref):
        logits = model(idx).logits
        grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()))
        outs.append([logits.detach(), *grads])
    for (name, _), a, b in zip([("logits", None), *fast.named_parameters()], *outs, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"]
)
def test_rms_norm_matches_torch(dtype):
    """The CPU RMSNorm with the hand-written backward: same state dict, outputs and gradients as
    `nn.RMSNorm` (bf16 takes PyTorch's own path)."""
    torch.manual_seed(0)
    ours, theirs = RMSNorm(24, eps=1e-6, dtype=dtype), torch.nn.RMSNorm(24, eps=1e-6, dtype=dtype)
    with torch.no_grad():
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 24, dtype=dtype)
    a, b = ours(x), theirs(x)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5)}.get(dtype, {})
    torch.testing.assert_close(a, b, **tol)
    ga, gb = torch.autograd.grad(a, (x, ours.weight), g), torch.autograd.grad(b, (x, theirs.weight), g)
    for p, q in zip(ga, gb, strict=True):
        torch.testing.assert_close(p, q, **tol)


@pytest.mark.parametrize("preset", DENSE)
@pytest.mark.parametrize("shape", [dict(d_model=64, n_layers=2, n_heads=4), dict(d_model=96, n_layers=3, n_heads=3)],
                         ids=["d64L2", "d96L3"])  # fmt: skip
def test_counts_match_the_built_model(preset, shape):
    cfg = tiny(preset, **shape)
    model = use_reference_paths(build_model(cfg))
    c = flops.count(cfg)
    assert c.params_total == sum(p.numel() for p in model.parameters())
    B, T = 2, cfg.seq_len
    assert measured_flops(model, B, T, cfg.vocab_size) == pytest.approx(c.forward * B * T, rel=0.01)
    assert measured_flops(model, B, T, cfg.vocab_size, backward=True) == pytest.approx(
        c.train * B * T, rel=0.01
    )


@pytest.mark.parametrize("preset", DENSE)
def test_tiny_model_overfits_a_short_text(preset):
    torch.manual_seed(0)
    cfg = tiny(preset, d_model=64, n_layers=2, seq_len=32)
    model = build_model(cfg)
    text = torch.tensor(list(b"To be, or not to be, that is the question:"), dtype=torch.long)[None]
    x, y = text[:, :32], text[:, 1:33]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x).logits[0], y[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0  # ~ln(256) at init
    assert losses[-1] < 0.1, f"did not memorise 32 tokens: final loss {losses[-1]:.3f}"
