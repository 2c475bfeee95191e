"""Every family trains under bf16 autocast (the CUDA training setting), exercised here on the CPU."""

import pytest
import torch

from harness.config import CONF_DIR
from harness.models import build_model
from tests.helpers import tiny

TINY = sorted(p.stem for p in (CONF_DIR / "model").glob("*_tiny.yaml"))


@pytest.mark.parametrize("preset", TINY)
def test_forward_and_backward_under_bf16_autocast(preset):
    torch.manual_seed(0)
    cfg = tiny(preset)
    model = build_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx)
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), idx.flatten())
        loss = loss + sum(out.aux_losses.values()) if out.aux_losses else loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
