"""train.compile: compiled blocks train like eager ones, for every family that compiles."""

import json
import logging
import os

import pytest

from harness.config import compose
from harness.models import get_family
from harness.train import train

TINY = ["gpt2_tiny", "llama_tiny", "moe_tiny", "soft_moe_tiny", "mamba_tiny", "mamba2_tiny", "rwkv6_tiny",
        "rwkv7_tiny"]  # fmt: skip
# A family's first compile takes about 35 s on 2 CPU cores: one runs in `make test`, the rest with
# HARNESS_SLOW=1 (measured for every family: see the README).
EVERY_RUN = {"gpt2_tiny"}
SLOW = pytest.mark.skipif(not os.environ.get("HARNESS_SLOW"), reason="a compile each; set HARNESS_SLOW=1")


def losses(results_dir, model: str, *extra: str) -> list[float]:
    run = compose([f"model={model}", "train.batch_size=4", "train.tokens=1536", "train.eval_batches=2",
                   "train.eval_every=3", "train.log_every=1", "train.progress=false", f"results_dir={results_dir}",
                   *extra])  # fmt: skip
    assert train(run)["status"] == "completed"
    recs = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[k] for r in recs for k in ("train_loss", "val_loss") if r[k] is not None]


@pytest.mark.parametrize("model", [m if m in EVERY_RUN else pytest.param(m, marks=SLOW) for m in TINY])
def test_compiled_blocks_train_like_eager_ones(tmp_path, model, caplog):
    import torch._dynamo

    eager = losses(tmp_path / "eager", model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # a fresh count of what dynamo captures
    with caplog.at_level(logging.WARNING, logger="harness.train"):
        compiled = losses(tmp_path / "compiled", model, "train.compile=true")
    captured = torch._dynamo.utils.counters["stats"]["calls_captured"]
    assert len(compiled) == len(eager) == 8  # 6 steps, evaluated at 3 and 6
    worst = max(abs(a - b) / abs(a) for a, b in zip(eager, compiled, strict=True))
    family = get_family(compose([f"model={model}"]).model.family)
    if family.no_compile:  # falls back to eager, saying why
        assert f"the {family.name} family runs eagerly" in caplog.text and worst == 0
    else:
        assert captured > 0 and worst < 1e-3, (captured, worst)
        print(f"{model}: {captured} calls captured, worst relative loss difference {worst:.2e}")
