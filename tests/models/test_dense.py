import pytest
import torch

from harness import flops
from harness.models import build_model
from harness.ops.attention import causal_attention, causal_attention_ref
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
