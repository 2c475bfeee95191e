import dataclasses
import logging

import pytest
import torch

from harness.config import compose
from harness.flops import count
from harness.models import build_model, moe
from harness.models.moe import MoEConfig, MoEMLP
from harness.ops import dispatch, kernels
from tests.helpers import measured_flops, tiny, use_reference_paths
from tests.models.host_sync import HostSyncs

PRESETS = ["moe_tiny", "mixtral", "switch", "noisy_topk", "deepseek", "loss_free", "deepseek_v3"]

ROUTERS = {
    "mixtral": dict(router="topk_softmax", top_k=2),
    "softmax_topk-renorm": dict(router="softmax_topk", top_k=2, router_renorm=True),
    "switch-capacity": dict(router="switch", top_k=1, capacity_factor=1.0),
    "noisy_topk": dict(router="noisy_topk", top_k=2, cv_loss_weight=0.1),
    "expert_choice": dict(router="expert_choice", top_k=2, capacity_factor=1.0),
    "loss-free-bias": dict(router="softmax_topk", top_k=2, balance_bias_rate=0.05),
    "sigmoid-loss-free": dict(router="sigmoid_topk", top_k=2, balance_bias_rate=0.05),
    "deepseek-shared": dict(
        router="softmax_topk", top_k=3, n_experts=6, n_shared_experts=1, expert_granularity=2
    ),
}


def cfg(**kw) -> MoEConfig:
    base = dict(d_model=32, n_layers=2, n_heads=2, seq_len=16, n_experts=4, top_k=2, vocab_size=64)
    return MoEConfig(**{**base, **kw})


def _fast_and_loop_agree(c: MoEConfig, dtype, rtol, atol):
    """Logits and every parameter gradient of one model, with the fast dispatch and with the loop."""
    torch.manual_seed(0)
    model = build_model(c).to(dtype)
    if c.balance_bias_rate:  # a bias that changes the routing
        for m in model.modules():
            if isinstance(m, MoEMLP):
                m.expert_bias.uniform_(-0.3, 0.3)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    idx = torch.randint(0, c.vocab_size, (2, 16))
    results = []
    for ref in (False, True):
        for m in model.modules():
            if isinstance(m, MoEMLP):
                m.reference = ref
        model.load_state_dict(buffers, strict=False)  # both paths route with the same bias
        model.zero_grad()
        torch.manual_seed(1)  # same router noise for both paths
        out = model(idx)
        (out.logits.square().mean() + sum(out.aux_losses.values())).backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=rtol, atol=atol)
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=10 * rtol, atol=atol, msg=n)


@pytest.mark.parametrize("name", ROUTERS)
def test_fast_model_matches_loop_reference(name):
    _fast_and_loop_agree(cfg(**ROUTERS[name], z_loss_weight=1e-3), torch.float64, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("routing", ["dropless", "capacity"])
@pytest.mark.parametrize("backend", ["grouped", "padded", "grouped_mm"])
def test_every_dispatch_backend_matches_loop_in_fp32(backend, routing, monkeypatch):
    """model.backend picks the dispatch layout; each trains the same fp32 model as the loop. Under a
    capacity the layout gets the static bound B C on any expert's load (the padded slab height)."""
    seen, real = [], moe.dispatch.expert_mlp
    monkeypatch.setattr(
        moe.dispatch,
        "expert_mlp",
        lambda *a, layout, max_load: (
            seen.append((layout, max_load)) or real(*a, layout=layout, max_load=max_load)
        ),
    )
    kw = dict(capacity_factor=0.75) if routing == "capacity" else {}
    c = cfg(router="softmax_topk", top_k=2, n_shared_experts=1, backend=backend, **kw)
    _fast_and_loop_agree(c, torch.float32, rtol=1e-4, atol=1e-5)
    bound = 2 * dispatch.capacity(16, c.n_experts, 2, 0.75) if kw else None  # batch 2 of 16 tokens
    assert seen == [(backend, bound)] * c.n_moe_layers


SHAPES = {
    "mixtral": dict(),
    "switch-every2": dict(router="switch", top_k=1, moe_every=2, n_layers=4),
    "noisy": dict(router="noisy_topk", cv_loss_weight=0.1),
    "deepseek": dict(router="softmax_topk", n_experts=7, top_k=3, n_shared_experts=1, expert_granularity=4),
    "expert_choice": dict(router="expert_choice", n_experts=8),
    "d_expert": dict(d_model=48, n_heads=3, d_expert=40, n_experts=3, top_k=1),
}


@pytest.mark.parametrize("name", SHAPES)
def test_params_and_flops_match_the_model(name):
    c = cfg(**SHAPES[name])
    model = use_reference_paths(build_model(c))
    assert sum(p.numel() for p in model.parameters()) == sum(moe.param_count(c).values())
    want = sum(moe.flops_per_token(c, c.seq_len).values()) * 2 * c.seq_len
    fwd = measured_flops(model, 2, c.seq_len, c.vocab_size)
    both = measured_flops(model, 2, c.seq_len, c.vocab_size, backward=True)
    assert fwd == pytest.approx(want, rel=0.01)
    assert both == pytest.approx(3 * want, rel=0.01)


def test_inactive_params_are_the_unrouted_experts():
    c = cfg(n_experts=4, top_k=1, moe_every=2, n_layers=4)
    counts = count(c)
    expert = 3 * c.d_model * c.d_expert
    assert counts.params_total - counts.params_active == 2 * 3 * expert


def test_executed_flops_count_capacity_padding():
    drop = cfg(router="switch", top_k=1, capacity_factor=1.25)
    ex, act = moe.executed_flops_per_token(drop, 16), moe.flops_per_token(drop, 16)
    assert ex["moe_experts"] == pytest.approx(act["moe_experts"] * 4 * 5 / 16)  # 4 experts x C=5 slots
    dropless = cfg()
    assert moe.executed_flops_per_token(dropless, 16) == moe.flops_per_token(dropless, 16)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(router="switch", top_k=1, capacity_factor=0.75),
        dict(router="noisy_topk"),
        SHAPES["deepseek"],
        dict(router="softmax_topk", balance_bias_rate=0.05),
        dict(router="sigmoid_topk", balance_bias_rate=0.05, capacity_factor=1.0),
    ],
    ids=["mixtral", "switch-dropping", "noisy-eval", "deepseek", "loss-free-bias", "sigmoid-bias-capacity"],
)
def test_token_choice_is_causal(kw):
    c = cfg(**kw)
    torch.manual_seed(0)
    model = build_model(c)
    if c.balance_bias_rate:  # give the bias values to route by: one step's load moves it
        model(torch.randint(0, c.vocab_size, (2, 16)))
        model.after_optimizer_step()
        assert any(m.expert_bias.abs().sum() > 0 for m in model.modules() if isinstance(m, MoEMLP))
    model.eval()
    idx = torch.randint(0, c.vocab_size, (2, 16))
    idx2 = idx.clone()
    idx2[:, 9:] = torch.randint(0, c.vocab_size, (2, 7))
    with torch.no_grad():
        a, b = model(idx).logits, model(idx2).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_expert_choice_is_refused_unless_allowed():
    c = cfg(router="expert_choice")
    assert c.causal is False
    assert cfg(router="expert_choice", causal=True).causal is False  # derived, not settable
    with pytest.raises(ValueError, match="not causal"):
        compose(["model=expert_choice"])
    assert compose(["model=expert_choice", "allow_noncausal=true"]).model.causal is False


def test_expert_choice_sees_the_future():
    c = cfg(router="expert_choice", n_layers=1)
    torch.manual_seed(0)
    model = build_model(c).eval()
    idx = torch.randint(0, c.vocab_size, (4, 16))
    idx2 = idx.clone()
    idx2[:, 8:] = torch.randint(0, c.vocab_size, (4, 8))
    with torch.no_grad():
        a, b = model(idx).logits, model(idx2).logits
    assert not torch.allclose(a[:, :8], b[:, :8])


def test_metrics_and_aux_losses():
    c = cfg(n_layers=4, moe_every=2, z_loss_weight=1e-3, cv_loss_weight=0.1, capacity_factor=0.5)
    out = build_model(c)(torch.randint(0, c.vocab_size, (2, 16)))
    assert set(out.aux_losses) == {"load_balance", "z_loss", "cv_loss"}
    load = out.metrics["expert_load"]
    assert load.shape == (2, 4)
    torch.testing.assert_close(load.sum(-1), torch.full((2,), 2.0))
    assert out.metrics["dropped_frac"].shape == (2,) and float(out.metrics["dropped_frac"].min()) > 0
    assert torch.all(out.metrics["router_entropy"] <= torch.log(torch.tensor(4.0)) + 1e-6)
    assert torch.all((out.metrics["slab_fill"] > 0) & (out.metrics["slab_fill"] <= 1))


@pytest.mark.parametrize("preset", [*PRESETS, "expert_choice"])
def test_presets_compose_and_count(preset):
    run = compose([f"model={preset}", "allow_noncausal=true"])
    c = run.model
    assert c.family == "moe" and c.name == ("moe" if preset == "moe_tiny" else preset)
    assert c.d_expert > 0
    counts = count(c)
    assert counts.params_active < counts.params_total


def test_tiny_preset_overrides():
    c = tiny("moe_tiny", n_experts=3, top_k=1)
    assert (c.n_experts, c.top_k) == (3, 1)


@pytest.mark.parametrize(
    "bad",
    [
        dict(router="nope"),
        dict(top_k=5),
        dict(router="switch", top_k=2),
        dict(capacity_factor=-1.0),
        dict(moe_every=3),
        dict(mlp="gelu"),
        dict(backend="cuda"),
        dict(backend="grouped_mm", d_model=36, n_heads=3),
        dict(load_balance_weight=-0.1),
        dict(balance_bias_rate=-1e-3),
        dict(router="expert_choice", balance_bias_rate=1e-3),
        dict(router="noisy_topk", balance_bias_rate=1e-3),
    ],
    ids=[
        "router",
        "top_k",
        "switch_k",
        "capacity",
        "moe_every",
        "mlp",
        "backend",
        "grouped_mm_rows",
        "weight",
        "bias_rate",
        "bias_expert_choice",
        "bias_noisy",
    ],
)
def test_config_rejects_impossible_values(bad):
    with pytest.raises(ValueError):
        cfg(**bad)


def _train(c: MoEConfig, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(c)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, c.vocab_size, (8, c.seq_len + 1), generator=g)
    losses, out = [], None
    for _ in range(steps):
        out = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        (loss + sum(out.aux_losses.values())).backward()
        opt.step()
        model.after_optimizer_step()
        losses.append(loss.item())
    return losses, out


def test_tiny_moe_learns():
    c = dataclasses.replace(tiny("moe_tiny"), seq_len=32, n_layers=1)
    losses, _ = _train(c, 40)
    assert losses[-1] < 0.5 * losses[0]


def test_load_balancing_loss_evens_out_the_load():
    # Measured (seeds 0-3): load CV 0.15-0.29 without the loss, 0.05-0.08 with weight 0.5.
    def load_cv(weight):
        c = cfg(n_layers=1, n_experts=8, top_k=2, load_balance_weight=weight, seq_len=32)
        _, out = _train(c, 30)
        load = out.metrics["expert_load"][0]
        return float(load.std() / load.mean())

    without, with_lb = load_cv(0.0), load_cv(0.5)
    assert with_lb < 0.5 * without


def _bias_of(model) -> torch.Tensor:
    return torch.stack([m.expert_bias for m in model.modules() if isinstance(m, MoEMLP)])


def test_loss_free_bias_moves_by_the_sign_rule_in_training_only():
    """Wang et al. 2024: b_i += u sign(mean load - load_i) after each optimizer step, from the
    step's training forwards; eval routes with the bias but leaves it alone. The bias is a buffer,
    so checkpoints carry it."""
    c = cfg(n_layers=1, router="softmax_topk", balance_bias_rate=0.01)
    torch.manual_seed(0)
    model = build_model(c)
    assert "blocks.0.channel_mixer.expert_bias" in model.state_dict()
    idx = torch.randint(0, c.vocab_size, (2, 16))
    b0 = _bias_of(model).clone()
    out = model(idx)
    load = out.metrics["expert_load"][0] * idx.numel()  # choices per expert in this batch
    expected = b0[0] + 0.01 * torch.sign(load.mean() - load)
    model.after_optimizer_step()
    torch.testing.assert_close(_bias_of(model)[0], expected)
    model.eval()
    with torch.no_grad():
        model(idx)
    model.after_optimizer_step()
    torch.testing.assert_close(_bias_of(model)[0], expected)


def test_selection_bias_picks_experts_but_not_gates():
    """A bias that lifts expert 3 over the others puts every token's top-1 there, while the gate stays
    the unbiased probability (softmax_topk) or the softmax over the chosen logits (topk_softmax)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 1.0, -2.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0])
    probs = logits.softmax(-1)
    r = dispatch.route(logits, "softmax_topk", 1, 1, select_bias_E=bias)
    assert r["exp_A"].tolist() == [3, 3]
    torch.testing.assert_close(r["gate_A"], probs[:, 3])
    r = dispatch.route(logits, "topk_softmax", 2, 1, select_bias_E=bias)
    assert r["exp_A"].tolist() == [3, 0, 3, 1]  # top-2 of probs + bias, per token, best first
    torch.testing.assert_close(r["gate_A"][:2], logits[0, [3, 0]].softmax(-1))
    r = dispatch.route(logits, "sigmoid_topk", 2, 1, select_bias_E=bias)  # bias on the sigmoid scores
    s = logits.sigmoid()
    assert r["exp_A"].tolist() == [3, 0, 3, 1]  # token 1: s = .5 .95 .73 .12, +1 on expert 3
    torch.testing.assert_close(r["gate_A"][:2], s[0, [3, 0]] / s[0, [3, 0]].sum())
    torch.testing.assert_close(r["probs_NE"], s / s.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="selection bias"):
        dispatch.route(logits, "expert_choice", 2, 1, select_bias_E=bias)


@pytest.mark.parametrize("router", ["topk_softmax", "sigmoid_topk"])
def test_loss_free_balancing_evens_out_the_load(router):
    # Measured, load CV with no balancing -> with the bias at rate 0.01, no aux loss: topk_softmax
    # 0.15-0.29 -> 0.05-0.09 (seeds 0-3), sigmoid_topk 0.21-0.36 -> 0.07-0.11 (seeds 0-2).
    def load_cv(rate):
        c = cfg(
            n_layers=1,
            n_experts=8,
            top_k=2,
            router=router,
            load_balance_weight=0.0,
            balance_bias_rate=rate,
            seq_len=32,
        )
        _, out = _train(c, 30)
        load = out.metrics["expert_load"][0]
        return float(load.std() / load.mean())

    without, with_bias = load_cv(0.0), load_cv(0.01)
    assert with_bias < 0.6 * without  # measured ratios 0.20-0.52


def test_balance_bias_moves_once_per_optimizer_step_by_the_whole_batch():
    """Two micro batches then one update move the bias as one forward of their union does."""
    c = cfg(router="softmax_topk", balance_bias_rate=0.05)
    torch.manual_seed(0)
    split, whole = build_model(c), build_model(c)
    whole.load_state_dict(split.state_dict())
    idx = torch.randint(0, c.vocab_size, (4, 16))
    split(idx[:2]), split(idx[2:])
    whole(idx)
    for model in (split, whole):
        for m in model.modules():
            if isinstance(m, MoEMLP):
                assert m.expert_bias.abs().sum() == 0  # nothing moves before the step
                m.after_optimizer_step()
    for a, b in zip(split.modules(), whole.modules(), strict=True):
        if isinstance(a, MoEMLP):
            assert a.expert_bias.abs().sum() > 0
            torch.testing.assert_close(a.expert_bias, b.expert_bias, rtol=0, atol=0)


# One training step per router, with every aux loss and the loss-free bias: nothing in it may read
# device data on the host. grouped_mm is the layout CUDA picks by default (see
# tests/ops/test_dispatch.py::test_default_layout); padded is sync-free under a capacity.
SYNC_FREE = {
    "topk_softmax-zloss": dict(router="topk_softmax", top_k=2, z_loss_weight=1e-3),
    "switch-capacity": dict(router="switch", top_k=1, capacity_factor=1.0),
    "expert_choice": dict(router="expert_choice", top_k=2),
    "noisy_topk-cv": dict(router="noisy_topk", top_k=2, cv_loss_weight=0.1),
    "sigmoid_topk-loss-free-shared": dict(
        router="sigmoid_topk", top_k=2, balance_bias_rate=0.05, n_shared_experts=1
    ),
}
SYNC_FREE_CASES = [(n, "grouped_mm") for n in SYNC_FREE] + [
    ("switch-capacity", "padded"),
    ("expert_choice", "padded"),
]


def _train_step(model, idx):
    out = model.train()(idx)
    (out.logits.square().mean() + sum(out.aux_losses.values())).backward()
    model.after_optimizer_step()
    return out


@pytest.mark.parametrize("name,backend", SYNC_FREE_CASES, ids=[f"{n}-{b}" for n, b in SYNC_FREE_CASES])
def test_training_step_has_no_host_sync(name, backend):
    """Structural proof on CPU: forward, backward, aux losses, metrics and the bias update call no
    op that waits for a CUDA device (tests/models/host_sync.py), and the layout did run."""
    c = cfg(**SYNC_FREE[name], backend=backend)
    torch.manual_seed(0)
    model = build_model(c)
    idx = torch.randint(0, c.vocab_size, (2, 16))
    with HostSyncs() as syncs:
        out = _train_step(model, idx)
    assert syncs.found == []
    assert ("aten::_grouped_mm" if backend == "grouped_mm" else "aten::bmm") in syncs.ops
    assert set(out.metrics) >= {"expert_load", "dropped_frac", "router_entropy", "slab_fill"}
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("backend,capacity_factor", [("grouped", 0.0), ("padded", 0.0), ("grouped", 1.0)])
def test_host_sync_check_catches_the_layouts_that_sync(backend, capacity_factor):
    """The check can fail: "grouped" reads the expert counts, dropless "padded" the slab height."""
    c = cfg(router="switch", top_k=1, capacity_factor=capacity_factor, backend=backend)
    model = build_model(c)
    with HostSyncs() as syncs:
        _train_step(model, torch.randint(0, c.vocab_size, (2, 16)))
    want = {"aten::bincount", "Tensor.tolist" if backend == "grouped" else "aten::_local_scalar_dense"}
    assert want <= set(syncs.found)
    with HostSyncs() as syncs:
        x = torch.randn(5)
        x[x > 0].sum()
    assert syncs.found == ["aten::index with a boolean mask"]


def test_metrics_match_a_plain_count():
    """The static-shape statistics equal bincount and boolean selection (the old, syncing way)."""
    c = cfg(router="topk_softmax", top_k=2, capacity_factor=0.5, n_layers=1)
    torch.manual_seed(0)
    model = build_model(c)
    seen = {}
    route = dispatch.route
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, "route", lambda *a, **k: seen.setdefault("r", route(*a, **k)))
        out = model(torch.randint(0, c.vocab_size, (2, 16)))
    exp = seen["r"]["exp_A"]
    kept = exp[exp < c.n_experts]
    counts = torch.bincount(kept, minlength=c.n_experts)
    assert kept.numel() < exp.numel()
    assert float(out.metrics["slab_fill"][0]) == pytest.approx(
        kept.numel() / (c.n_experts * int(counts.max()))
    )
    assert float(out.metrics["dropped_frac"][0]) == pytest.approx(1 - kept.numel() / exp.numel())


def test_grouped_mm_backend_needs_the_function(monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "grouped_mm")
    with pytest.raises(ValueError, match="grouped_mm"):
        cfg(backend="grouped_mm")
    assert cfg(backend="auto").backend == "auto"


@pytest.mark.gpu
@pytest.mark.parametrize("name", SYNC_FREE)
def test_training_step_on_cuda_has_no_host_sync(name):
    """On a GPU, the default layout under bf16 autocast as harness-train runs: a training step with
    torch's sync debug mode set to raise on any host sync."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    c = cfg(**SYNC_FREE[name])
    dev = torch.device("cuda")
    layout = dispatch.default_layout(dev, torch.bfloat16, c.d_model, c.d_expert)
    bound = dispatch.load_bound(c.router, 16, 2, c.n_experts, c.top_k, c.capacity_factor)
    if layout == "padded" and bound is None:
        pytest.skip(f"dropless routing on this GPU ({torch.cuda.get_device_name()}) runs padded, which syncs")
    torch.manual_seed(0)
    model = build_model(c).to(dev)
    idx = torch.randint(0, c.vocab_size, (2, 16), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _train_step(model, idx)

    step()  # first calls initialise libraries (cuBLAS handles, kernels), which may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_layout_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(kernels, "_noted", {})
    idx = torch.randint(0, 64, (2, 16))
    with caplog.at_level(logging.INFO, logger="harness.kernels"):
        for kw in (dict(), dict(router="switch", top_k=1, capacity_factor=1.0, backend="padded")):
            model = build_model(cfg(**kw))
            model(idx)
            model(idx)
    assert [r.getMessage() for r in caplog.records] == [
        "moe expert_mlp: grouped",  # "auto" on CPU
        "moe expert_mlp: padded (slab of B C rows: capacity)",
    ]
