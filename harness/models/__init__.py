"""The model registry.

`FAMILIES` maps a registry name to its `Family`; `build_model(cfg)` dispatches on `cfg.family`.
YAML names a family by this registry name (never by a class path), so renaming a class cannot
orphan old results.

Adding a family (checklist):
1. `harness/models/<family>.py`: docstring naming the paper(s) and deviations, a
   `@dataclass(kw_only=True)` config subclassing `harness.layers.LMConfig`, the modules, and
   `build(cfg)`, `param_count(cfg) -> dict`, `flops_per_token(cfg, seq_len) -> dict` (forward
   matmul FLOPs by named part, pure functions of the config).
2. An entry in `FAMILIES` below.
3. `conf/model/<preset>.yaml` presets, including a `tiny` one (`conf/model/<family>_tiny.yaml`).
4. Tests in `tests/models/test_<family>.py`: causality, FLOPs vs FlopCounterMode, params vs numel.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from harness.layers import LMConfig
from harness.models import dense, mamba, moe, rwkv, soft_moe


@dataclass(frozen=True)
class Family:
    name: str
    config: type[LMConfig]
    build: Callable[[Any], nn.Module]
    param_count: Callable[[Any], dict[str, int]]
    flops_per_token: Callable[..., dict[str, int]]
    # Parameters a token does not touch (unrouted experts); None means every parameter is active.
    inactive_params: Callable[[Any], int] | None = None
    # Why train.compile leaves this family eager ("" when its blocks compile).
    no_compile: str = ""


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", dense.GPT2Config, dense.build, dense.param_count, dense.flops_per_token),
    "llama": Family("llama", dense.DenseConfig, dense.build, dense.param_count, dense.flops_per_token),
    "mamba": Family("mamba", mamba.MambaConfig, mamba.build, mamba.param_count, mamba.flops_per_token),
    "mamba2": Family("mamba2", mamba.Mamba2Config, mamba.build, mamba.param_count, mamba.flops_per_token),
    "moe": Family("moe", moe.MoEConfig, moe.build, moe.param_count, moe.flops_per_token, moe.inactive_params),
    "soft_moe": Family(
        "soft_moe",
        soft_moe.SoftMoEConfig,
        soft_moe.build,
        soft_moe.param_count,
        soft_moe.flops_per_token,
        soft_moe.inactive_params,
    ),
    "rwkv6": Family("rwkv6", rwkv.RWKVConfig, rwkv.build, rwkv.param_count, rwkv.flops_per_token),
    "rwkv7": Family("rwkv7", rwkv.RWKV7Config, rwkv.build, rwkv.param_count, rwkv.flops_per_token),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        close = difflib.get_close_matches(name, FAMILIES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown model family {name!r}; known families: {', '.join(sorted(FAMILIES))}.{hint}"
        )
    return FAMILIES[name]


def make_config(fields: dict[str, Any]) -> LMConfig:
    """Builds a family's typed config from a plain mapping, rejecting unknown keys by name."""
    if "family" not in fields:
        raise ValueError(f"model config needs a 'family' (one of {', '.join(sorted(FAMILIES))})")
    fam = get_family(fields["family"])
    known = {f.name for f in dataclasses.fields(fam.config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"model family {fam.name!r} has no field(s) {unknown}; known: {sorted(known)}")
    return fam.config(**fields)


def build_model(cfg: LMConfig | dict[str, Any]) -> nn.Module:
    if not isinstance(cfg, LMConfig):
        cfg = make_config(dict(cfg))
    return get_family(cfg.family).build(cfg)
