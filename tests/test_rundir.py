"""Run-file schemas: what a well-formed summary.json and metrics.jsonl hold, and what is final."""

import json

import pytest

from harness import dist
from harness.rundir import (
    RunFileError,
    is_final,
    load_checkpoint,
    load_summary,
    parse_metrics,
    read_metrics,
    read_summary,
    save_checkpoint,
)


@pytest.mark.parametrize(
    "text,why",
    [
        ('{"status": "completed", "hardware": "cpu"}', "hardware: Input should be a valid dictionary"),
        ('{"status": "done"}', "status: Input should be 'running', 'completed' or 'failed'"),
        ('{"status": "completed", "tokens": 1.5}', "tokens: Input should be a valid integer"),
        ("[1, 2]", "expected a JSON object, found list"),
        ('{"status": "completed"', "not valid JSON"),
        ('{"status": "completed", "steps": ' + "9" * 5000 + "}", "not valid JSON"),
    ],
    ids=["hardware-a-string", "unknown-status", "fractional-tokens", "a-list", "torn", "huge-integer"],
)
def test_malformed_summary_is_named_with_what_is_wrong(tmp_path, text, why):
    (tmp_path / "summary.json").write_text(text)
    with pytest.raises(RunFileError, match="summary.json: ") as e:
        load_summary(tmp_path)
    assert why in str(e.value)
    assert read_summary(tmp_path) is None  # train and the sweeper treat it as not done


def test_well_formed_summary_keeps_its_extra_fields(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "running", "data_decode": "strict"}))
    assert load_summary(tmp_path).status == "running"
    assert read_summary(tmp_path) == {"status": "running", "data_decode": "strict"}
    assert load_summary(tmp_path / "absent") is None


def test_metrics_lines_that_do_not_parse_are_listed_with_their_line_number():
    text = "\n".join(
        ['{"step": 1, "train_loss": 5.5, "aux/balance": 0.1}', "{garbage", '{"train_loss": 3}', "[1]",
         "", '{"step": 4, "val_loss": null}', "[" * 100_000]
    )  # fmt: skip
    recs, bad = parse_metrics(text)
    assert [r["step"] for r in recs] == [1, 4] and recs[0]["aux/balance"] == 0.1
    assert [n for n, _ in bad] == [2, 3, 4, 7]
    assert bad[0][1].startswith("not valid JSON") and bad[1][1].startswith("step: Field required")


def test_resume_keeps_metrics_up_to_the_checkpoint_and_stops_at_a_torn_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    assert read_metrics(tmp_path, 2) == ['{"step": 1}', '{"step": 2}']
    assert read_metrics(tmp_path, 10) == ['{"step": 1}', '{"step": 2}', '{"step": 3}']


@pytest.mark.parametrize(
    "summary,final",
    [
        ({"status": "completed"}, True),
        ({"status": "failed", "reason": "diverged: non-finite loss at step 3"}, True),
        ({"status": "failed", "reason": "OutOfMemoryError: CUDA out of memory"}, False),
        ({"status": "running"}, False),
        (None, False),
    ],
    ids=["completed", "diverged", "crashed", "running", "absent"],
)
def test_completed_and_diverged_runs_are_final_crashed_ones_are_retried(summary, final):
    assert is_final(summary) is final


def test_each_rank_resumes_its_own_random_stream(tmp_path):
    """A checkpoint keeps rank 0's RNG state at the top and the other ranks' in rank_rng; a rank it
    has no state for (written at a smaller world size) keeps the seed it started with."""
    import torch

    from harness.config import compose
    from harness.models import build_model
    from harness.parallel import full_state, rank_seed, rng_states, tied_aliases
    from harness.train import make_optimizer

    run = compose(["model=llama_tiny"])
    model = build_model(run.model)
    opt = make_optimizer(model, run.optim)
    streams = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        streams.append(torch.get_rng_state())
    aliases = tied_aliases(model)
    assert aliases == {"tok_emb.weight": "head.weight"}  # the tied head, stored once
    weights, optim = full_state("none", model, opt, aliases, dist.Dist())
    save_checkpoint(tmp_path, weights, {"optimizer": optim, "step": 3, **rng_states(dist.Dist()),
                                        "rank_rng": [{"torch_rng": streams[1]}]})  # fmt: skip
    ckpt = tmp_path / "ckpt" / "step_00000003"
    expected = {0: rng_states(dist.Dist())["torch_rng"], 1: streams[1]}
    for rank in (0, 1, 2):
        resumed = build_model(run.model)
        torch.manual_seed(rank_seed(0, rank))
        fresh = torch.get_rng_state()
        load_checkpoint(ckpt, resumed, make_optimizer(resumed, run.optim), rank)
        assert torch.equal(torch.get_rng_state(), expected.get(rank, fresh))
        assert (
            torch.equal(resumed.head.weight, model.head.weight)
            and resumed.head.weight is resumed.tok_emb.weight
        )
    assert len({rank_seed(0, r) for r in range(8)}) == 8
