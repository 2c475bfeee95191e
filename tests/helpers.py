"""Shared test utilities (imported by test modules; not a test module itself)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.config import compose


def tiny(preset: str, **fields) -> object:
    """A model config from a conf/model preset, with field overrides."""
    return compose([f"model={preset}", *[f"++model.{k}={v}" for k, v in fields.items()]]).model


def measured_flops(
    model: torch.nn.Module, batch: int, seq_len: int, vocab: int, backward: bool = False
) -> int:
    """Total FLOPs FlopCounterMode sees for one forward (and backward) on random tokens."""
    idx = torch.randint(0, vocab, (batch, seq_len))
    with FlopCounterMode(display=False) as fc:
        out = model(idx)
        if backward:
            out.logits.float().sum().backward()
    return fc.get_total_flops()


def use_reference_paths(model: torch.nn.Module) -> torch.nn.Module:
    """Switches fused kernels to their explicit twins: on CPU, FlopCounterMode does not see inside
    the fused attention kernel, but it does see the explicit path's matmuls."""
    for m in model.modules():
        if hasattr(m, "reference"):
            m.reference = True
    return model
