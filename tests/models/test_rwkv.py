"""RWKV-6 and RWKV-7 models: configs, counts against the built module, paths against each other."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from omegaconf import OmegaConf

from harness.config import CONF_DIR
from harness.models import build_model, make_config, rwkv
from harness.models.rwkv import RWKV7Config, RWKVConfig, flops_per_token, param_count
from harness.ops import wkv
from tests.helpers import measured_flops, tiny, use_reference_paths
from tests.ops import fake_kernels

PRESETS = ["rwkv6_tiny", "rwkv7_tiny"]
# (preset, overrides): several heads, one layer, three layers, no norm biases, explicit ranks.
SHAPES = [
    ("rwkv6_tiny", {}),
    ("rwkv6_tiny", {"head_dim": 16, "n_layers": 3}),
    ("rwkv6_tiny", {"d_model": 48, "n_layers": 1, "bias": False, "d_ff": 100, "mix_rank": 8}),
    ("rwkv7_tiny", {}),
    ("rwkv7_tiny", {"head_dim": 16, "n_layers": 3}),
    ("rwkv7_tiny", {"d_model": 48, "n_layers": 1, "bias": False, "gate_rank": 8, "value_rank": 4}),
]
SHAPE_IDS = [f"{p}-{'-'.join(f'{k}{v}' for k, v in o.items()) or 'preset'}" for p, o in SHAPES]


def config(preset: str, **fields) -> RWKVConfig:
    """A preset with fields changed before the derived widths are filled in (a Hydra override
    of a field the preset does not name would need `+model.<field>=`)."""
    base = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml"))
    return make_config({**base, **fields})


def model_from(preset: str, dtype=torch.float32, **fields):
    torch.manual_seed(0)
    return build_model(config(preset, **fields)).to(dtype)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_and_derive_widths(preset):
    cfg = tiny(preset)
    assert cfg.n_heads * cfg.head_dim == cfg.d_model and cfg.d_ff > 0
    version = int(preset[4])
    assert cfg.version == version
    # A sizer sets only d_model and n_layers; every other width follows.
    cls = RWKVConfig if version == 6 else RWKV7Config
    for d in (96, 100, 768):
        c = cls(d_model=d, n_layers=2)
        assert c.head_dim <= 64 and c.n_heads * c.head_dim == d
    big = cls(d_model=768, n_layers=12)
    assert big.head_dim == 64 and big.d_ff == (2688 if version == 6 else 3072)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"family": "rwkv6", "version": 7}, "does not match"),
        ({"family": "rwkv6", "d_model": 64, "n_heads": 3}, "n_heads"),
        ({"family": "rwkv7", "version": 7, "backend": "triton"}, "backend"),
        ({"family": "rwkv6", "chunk_size": 0}, "chunk_size"),
        ({"family": "rwkv7", "version": 7, "decay_rank": -1}, "decay_rank"),
    ],
    ids=["version-mismatch", "heads-not-dividing", "bad-backend", "zero-chunk", "negative-rank"],
)
def test_impossible_configs_raise(fields, match):
    with pytest.raises(ValueError, match=match):
        RWKVConfig(**fields)


@pytest.mark.parametrize("preset,fields", SHAPES, ids=SHAPE_IDS)
def test_param_count_matches_module(preset, fields):
    cfg = config(preset, **fields)
    model = build_model(cfg)
    assert sum(param_count(cfg).values()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset,fields", SHAPES, ids=SHAPE_IDS)
def test_matmul_flops_match_flop_counter(preset, fields):
    """Non-`ew_` parts equal FlopCounterMode on the model with the WKV on its reference loop
    (which has no matmuls), forward and forward+backward (3x)."""
    cfg = config(preset, **fields)
    model = use_reference_paths(build_model(cfg))
    B, T = 2, 20
    parts = flops_per_token(cfg, T)
    matmul = sum(v for k, v in parts.items() if not k.startswith("ew_")) * B * T
    assert measured_flops(model, B, T, cfg.vocab_size) == pytest.approx(matmul, rel=0.01)
    assert measured_flops(model, B, T, cfg.vocab_size, backward=True) == pytest.approx(3 * matmul, rel=0.01)
    assert parts["ew_wkv"] > 0


def _logits_and_grads(model, idx):
    model.zero_grad()
    out = model(idx).logits
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("T", [32, 45], ids=["T32-on-grid", "T45-off-grid"])
def test_fast_path_equals_reference_path(preset, T):
    """The chunked WKV (chunk 16) against the sequential loop, whole model, fp64: logits and the
    gradient of every parameter."""
    fast = model_from(preset, torch.float64, head_dim=16, chunk_size=16)
    ref = use_reference_paths(copy.deepcopy(fast))
    idx = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(T))
    (lf, gf), (lr, gr) = _logits_and_grads(fast, idx), _logits_and_grads(ref, idx)
    torch.testing.assert_close(lf, lr, rtol=1e-9, atol=1e-9)
    assert gf.keys() == gr.keys() and len(gf) == sum(1 for _ in fast.parameters())
    for name in gf:
        torch.testing.assert_close(gf[name], gr[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("preset", PRESETS)
def test_step_by_step_equals_parallel(preset):
    model = model_from(preset, torch.float64, head_dim=16, chunk_size=8)
    idx = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(idx).logits
    state = model.init_state(2)
    got = []
    for t in range(idx.shape[1]):
        logits, state = model.step(idx[:, t], state)
        got.append(logits)
    torch.testing.assert_close(torch.stack(got, 1), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("preset", PRESETS)
def test_causal(preset):
    """Changing token t changes no logits before t (fast path, T off the chunk grid)."""
    model = model_from(preset, torch.float64, head_dim=16, chunk_size=8)
    idx = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(5))
    changed = idx.clone()
    changed[0, 13] = (idx[0, 13] + 1) % 256
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :13], b[:, :13], rtol=0, atol=0)
    assert not torch.allclose(a[:, 13:], b[:, 13:])


def test_value_residual_is_not_kept_between_calls():
    """RWKV-7 hands layer 0's v to later layers through a holder; it must not keep a graph alive."""
    model = model_from("rwkv7_tiny", n_layers=3)
    model(torch.randint(0, 256, (1, 8))).logits.sum().backward()
    assert model.blocks[1].seq_mixer.residual.v is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", PRESETS)
def test_cuda_backend_equals_torch_backend(preset):
    pytest.importorskip("fla", reason="needs flash-linear-attention (extra `cuda`)")
    fast = model_from(preset, backend="cuda").cuda()
    torch_path = copy.deepcopy(fast)
    for m in torch_path.modules():
        if hasattr(m, "backend"):
            m.backend = "torch"
    idx = torch.randint(0, 256, (2, 64), device="cuda")
    (lf, gf), (lt, gt) = _logits_and_grads(fast, idx), _logits_and_grads(torch_path, idx)
    torch.testing.assert_close(lf, lt, rtol=2e-3, atol=2e-3)
    for name in gf:
        torch.testing.assert_close(gf[name], gt[name], rtol=5e-3, atol=5e-3, msg=name)


@pytest.mark.parametrize("preset", PRESETS)
def test_fla_path_under_bf16_autocast(preset, monkeypatch, caplog):
    """The model under bf16 autocast through the flash-linear-attention call, faked on CPU as if the
    tensors were on a GPU: fla gets one dtype, the parameter gradients agree with the chunked
    PyTorch path's, and the family logs its kernel once."""
    calls = fake_kernels.install(monkeypatch)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    with caplog.at_level(logging.INFO, logger="harness.kernels"):
        for fake_gpu in (False, True):
            if fake_gpu:
                for module in (rwkv, wkv):
                    monkeypatch.setattr(module, "pick_backend", lambda backend, x, version: "cuda")
            model = model_from(preset)
            with torch.autocast("cpu", torch.bfloat16):
                model(idx).logits.float().logsumexp(-1).mean().backward()
            grads.append([p.grad for p in model.parameters()])
    assert len(calls) == model.cfg.n_layers and all(set(c["dtypes"]) == {torch.bfloat16} for c in calls)
    for g_torch, g_fla in zip(*grads, strict=True):  # fla gets the decays in bf16
        assert (g_fla - g_torch).norm() <= 5e-2 * g_torch.norm()
    v = model.cfg.version
    assert [r.getMessage() for r in caplog.records] == [
        f"rwkv{v} wkv{v}: torch (chunked)",
        f"rwkv{v} wkv{v}: flash-linear-attention",
    ]
