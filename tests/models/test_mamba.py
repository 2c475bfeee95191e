"""Mamba-1 and Mamba-2 families: config rules, counts against the built module, causality, and the
recurrent step path against the parallel forward."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from harness.flops import count
from harness.models import build_model, mamba
from harness.models.mamba import Mamba2Config, MambaConfig
from harness.ops import native, scan
from tests.helpers import measured_flops, tiny
from tests.ops import fake_kernels

# Several shapes per version; T (the forward length) on and off the SSD chunk grid.
SHAPES = [
    ("v1-default", MambaConfig, dict(d_model=32, n_layers=2, seq_len=24), 24),
    ("v1-odd", MambaConfig, dict(d_model=40, n_layers=1, d_state=5, d_conv=3, expand=3, seq_len=20), 17),
    (
        "v1-bias-ln",
        MambaConfig,
        dict(d_model=24, n_layers=2, bias=True, norm="layer", tie_embeddings=False),
        16,
    ),
    ("v2-on-grid", Mamba2Config, dict(d_model=32, n_layers=2, d_state=8, chunk_size=8, seq_len=32), 32),
    ("v2-off-grid", Mamba2Config, dict(d_model=32, n_layers=2, d_state=8, chunk_size=8, seq_len=32), 27),
    ("v2-heads", Mamba2Config, dict(d_model=48, n_layers=1, n_heads=4, d_state=6, chunk_size=5), 12),
    ("v2-bias-ln", Mamba2Config, dict(d_model=32, n_layers=1, bias=True, norm="layer", conv_bias=False), 9),
]
IDS = [s[0] for s in SHAPES]


def _model(cls, fields, dtype=torch.float32):
    torch.manual_seed(0)
    return build_model(cls(backend="torch", **fields)).to(dtype)


@pytest.mark.parametrize("name,cls,fields,T", SHAPES, ids=IDS)
def test_param_count_matches_module(name, cls, fields, T):
    cfg = cls(**fields)
    model = build_model(cfg)
    assert sum(mamba.param_count(cfg).values()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,cls,fields,T", SHAPES, ids=IDS)
def test_flops_match_flop_counter(name, cls, fields, T):
    cfg = cls(backend="torch", **fields)
    model = build_model(cfg)
    parts = mamba.flops_per_token(cfg, T)
    counted = sum(v for k, v in parts.items() if not k.startswith("ew_"))
    fwd = measured_flops(model, 2, T, cfg.vocab_size) / (2 * T)
    train = _train_flops_grouped_conv_fixed(model, 2, T, cfg.vocab_size) / (2 * T)
    assert fwd == pytest.approx(counted, rel=0.01)
    assert train == pytest.approx(3 * counted, rel=0.01)
    assert count(cfg, T).forward == sum(parts.values())


def _train_flops_grouped_conv_fixed(model, batch: int, T: int, vocab: int) -> int:
    """Forward + backward FLOPs as FlopCounterMode sees them, except for the depthwise conv's
    backward: torch's counter ignores `groups` when it counts the weight gradient (it charges a
    dense C x C conv, C times too much). Its true cost, like grad_input's, equals the forward's."""
    idx = torch.randint(0, vocab, (batch, T))
    with FlopCounterMode(display=False) as fc:
        model(idx).logits.sum().backward()
    by_op = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    conv_fwd = by_op.get("aten.convolution", 0)
    assert conv_fwd > 0 and by_op.get("aten.convolution_backward", 0) > 2 * conv_fwd  # the miscount
    return fc.get_total_flops() - by_op["aten.convolution_backward"] + 2 * conv_fwd


@pytest.mark.parametrize("name,cls,fields,T", SHAPES, ids=IDS)
def test_causal(name, cls, fields, T):
    model = _model(cls, fields, torch.float64)
    idx = torch.randint(0, 256, (2, T))
    t = T // 2
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 256
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t], b[:, t])


@pytest.mark.parametrize("name,cls,fields,T", SHAPES, ids=IDS)
def test_step_equals_parallel_forward(name, cls, fields, T):
    model = _model(cls, fields, torch.float64)
    idx = torch.randint(0, 256, (2, T))
    with torch.no_grad():
        parallel = model(idx).logits
    states = mamba.init_state(model, 2, dtype=torch.float64)
    stepped = []
    for t in range(T):
        logits, states = mamba.step(model, idx[:, t], states)
        stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, 1), parallel, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cls", [MambaConfig, Mamba2Config], ids=["mamba1", "mamba2"])
def test_model_gradients_match_reference_scan(cls, monkeypatch):
    """The whole model through the fast scan and through the sequential reference: same loss and
    parameter gradients (fp64, a length off the chunk grid)."""
    fields = dict(d_model=16, n_layers=2, d_state=4, chunk_size=4, seq_len=16)
    model = _model(cls, fields, torch.float64)
    idx = torch.randint(0, 256, (2, 11))

    def loss_and_grads():
        model.zero_grad()
        loss = model(idx).logits.logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    fast = loss_and_grads()
    v = 1 if cls is MambaConfig else 2
    ref = scan.selective_scan_ref if v == 1 else scan.ssd_scan_ref
    monkeypatch.setitem(mamba._SCANS[v], "torch", ref)
    slow = loss_and_grads()
    torch.testing.assert_close(fast[0], slow[0])
    for g, g_ref in zip(fast[1], slow[1], strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-9)


def test_widths_derive_from_d_model():
    v1 = MambaConfig(d_model=256, n_layers=4)
    assert (v1.d_inner, v1.d_state, v1.dt_rank, v1.d_conv) == (512, 16, 16, 4)
    v2 = Mamba2Config(d_model=256, n_layers=4)
    assert (v2.d_inner, v2.d_state, v2.head_dim, v2.n_heads) == (512, 64, 64, 8)
    small = Mamba2Config(d_model=64, n_layers=2)
    assert (small.head_dim, small.n_heads) == (16, 8)
    assert Mamba2Config(d_model=64, n_heads=4).head_dim == 32


@pytest.mark.parametrize(
    "cls,fields,match",
    [
        (MambaConfig, dict(version=2), "does not match family"),
        (Mamba2Config, dict(version=1), "does not match family"),
        (MambaConfig, dict(expand=0), "expand"),
        (MambaConfig, dict(d_state=-1), "d_state"),
        (MambaConfig, dict(chunk_size=0), "chunk_size"),
        (MambaConfig, dict(backend="triton"), "backend"),
        (MambaConfig, dict(dt_min=0.2, dt_max=0.1), "dt_min"),
        (Mamba2Config, dict(d_model=64, n_heads=3), "n_heads \\* head_dim"),
    ],
    ids=[
        "v2-under-mamba",
        "v1-under-mamba2",
        "expand",
        "d_state",
        "chunk",
        "backend",
        "dt-range",
        "heads",
    ],
)
def test_config_rejects_impossible_values(cls, fields, match):
    with pytest.raises(ValueError, match=match):
        cls(**fields)


@pytest.mark.parametrize("preset", ["mamba_tiny", "mamba", "mamba2_tiny", "mamba2"])
def test_presets_compose_and_run(preset):
    cfg = tiny(preset)
    assert cfg.family in ("mamba", "mamba2")
    if preset.endswith("tiny"):
        out = build_model(cfg)(torch.randint(0, cfg.vocab_size, (1, cfg.seq_len)))
        assert out.logits.shape == (1, cfg.seq_len, cfg.vocab_size)


def test_dt_bias_survives_backbone_init():
    """The backbone zeroes Linear biases; Delta's bias must keep its softplus^-1 init."""
    model = build_model(MambaConfig(d_model=32, n_layers=1))
    dt = torch.nn.functional.softplus(model.blocks[0].seq_mixer.dt_proj.bias)
    assert 0.0009 < dt.min() and dt.max() < 0.11


@pytest.mark.parametrize(
    "cls,kernel,fields",
    [
        (MambaConfig, "selective_scan", dict(d_model=40, n_layers=2, d_state=5, seq_len=20, chunk_size=8)),
        # head_dim 24: one full and one partial channel block per head in the C kernel.
        (
            Mamba2Config,
            "ssd_scan",
            dict(d_model=48, n_layers=2, head_dim=24, d_state=6, seq_len=20, chunk_size=8),
        ),
    ],
    ids=["mamba1", "mamba2"],
)
def test_native_backend_equals_torch_backend(cls, kernel, fields):
    """A model gives the same logits and parameter gradients on either CPU backend."""
    if native.load(kernel, torch.float64) is None:
        pytest.skip("the native CPU kernel did not build here")
    idx = torch.randint(0, 256, (2, 19))
    grads = []
    for backend in ("torch", "native"):
        torch.manual_seed(0)
        model = build_model(cls(backend=backend, **fields)).double()
        out = model(idx).logits
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("preset,kernel", [("mamba_tiny", "selective_scan"), ("mamba2_tiny", "ssd_scan")])
def test_kernel_path_under_bf16_autocast(preset, kernel, monkeypatch, caplog):
    """The model under bf16 autocast through the mamba-ssm call, faked on CPU as if the tensors were
    on a GPU: the kernel gets its activations in one dtype, the parameter gradients agree with the
    PyTorch scan's, and each family logs its kernel once."""
    calls = fake_kernels.install(monkeypatch)
    # CUDA autocast runs softplus in fp32 (CPU autocast keeps bf16): Mamba-1's delta as on a GPU.
    softplus = F.softplus
    monkeypatch.setattr(F, "softplus", lambda x, *a, **k: softplus(x.float(), *a, **k))
    idx = torch.randint(0, 256, (2, 24))
    grads = []
    with caplog.at_level(logging.INFO, logger="harness.kernels"):
        for fake_gpu in (False, True):
            if fake_gpu:
                monkeypatch.setattr(scan, "pick_backend", lambda backend, x, native_kernel=None: "cuda")
            torch.manual_seed(0)
            model = build_model(tiny(preset, backend="torch" if not fake_gpu else "auto"))
            with torch.autocast("cpu", torch.bfloat16):
                model(idx).logits.float().logsumexp(-1).mean().backward()
            grads.append([p.grad for p in model.parameters()])
    assert len(calls) == model.cfg.n_layers and all(c["kernel"] == kernel for c in calls)
    assert all(set(c["dtypes"]) == {torch.bfloat16} for c in calls)
    for g_torch, g_kernel in zip(*grads, strict=True):  # Mamba-1's kernel gets delta in bf16
        assert (g_kernel - g_torch).norm() <= 2e-2 * g_torch.norm()
    family = model.cfg.family
    assert [r.getMessage() for r in caplog.records] == [
        f"{family} {kernel}: torch",
        f"{family} {kernel}: mamba-ssm",
    ]
