import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e '.[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from harness.config import compose  # noqa: E402
from harness.evaluate import HarnessLM, load_run, main  # noqa: E402
from harness.train import train  # noqa: E402

SEQ_LEN = 64  # llama_tiny
TEXT = (
    "But, soft! what light through yonder window breaks? It is the east, and Juliet is the sun. "
    "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief, that "
    "thou her maid art far more fair than she."
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("results")
    run = compose(
        [
            "model=llama_tiny",
            f"results_dir={tmp}",
            "train.tokens=20480",
            "train.batch_size=4",
            "train.eval_batches=2",
            "train.progress=false",
        ]  # fmt: skip
    )
    assert train(run)["status"] == "completed"
    return run.run_dir


@pytest.fixture(scope="module")
def lm(run_dir):
    return HarnessLM(run_dir=str(run_dir), device="cpu", batch_size=3)


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def log_probs(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, from one plain forward (ids fit seq_len + 1)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    return F.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def greedy_bytes(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids[-SEQ_LEN:]])).logits[0, -1].argmax()))
    return ids[-n:]


def test_load_run_restores_the_trained_weights(run_dir):
    model, tok, cfg = load_run(run_dir)
    assert cfg["model"]["family"] == "llama" and tok.vocab_size == 256 and not model.training
    weights = sorted((run_dir / "ckpt").glob("step_*"))[-1] / "model.safetensors"
    from safetensors.torch import load_file

    saved = load_file(str(weights))  # tied embedding and head are saved once
    state = model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())


@pytest.mark.parametrize(
    "context,continuation",
    [("But, soft! what light", " through yonder window"), ("", "Juliet"), (TEXT, " Romeo")],
    ids=["short", "empty-context", "context-longer-than-seq_len"],
)
def test_loglikelihood_is_the_sum_of_continuation_log_probs(lm, context, continuation):
    ctx = list(context.encode()) or [ord("\n")]
    cont = list(continuation.encode())
    ids = (ctx + cont)[-(SEQ_LEN + 1) :]
    expected = log_probs(lm.model, ids)[-len(cont) :].sum().item()
    # Batched with requests of other lengths, so padding and reordering are exercised too.
    others = [req("loglikelihood", "It is the east", ", and"), req("loglikelihood", "A", " b")]
    (lp, _), *_ = lm.loglikelihood([req("loglikelihood", context, continuation), *others])
    assert lp == pytest.approx(expected, abs=1e-4)


def test_is_greedy_and_generate_until_follow_the_argmax(lm):
    context = "ROMEO:\nBut, soft! what light through yonder"
    greedy = greedy_bytes(lm.model, context.encode(), 6)
    assert all(b < 128 for b in greedy), "greedy bytes should be ASCII for a Shakespeare model"
    greedy_text = bytes(greedy).decode()
    with torch.no_grad():
        logits = lm.model(torch.tensor([list(context.encode()) + greedy[:-1]])).logits[0, -1]
    worse = greedy[:-1] + [int(logits[:128].argmin())]  # ASCII, so it round-trips as one byte
    (lp_g, is_g), (lp_w, is_w) = lm.loglikelihood(
        [req("loglikelihood", context, greedy_text), req("loglikelihood", context, bytes(worse).decode())]
    )
    assert is_g and not is_w and lp_g > lp_w

    full, stopped = lm.generate_until(
        [
            req("generate_until", context, {"until": ["\x00"], "max_gen_toks": 6}),
            req("generate_until", context, {"until": [greedy_text[3]], "max_gen_toks": 6}),
        ]
    )
    assert full == greedy_text
    assert stopped == greedy_text[: greedy_text.index(greedy_text[3])]


def test_loglikelihood_rolling_sums_disjoint_windows(lm):
    ids = list(TEXT.encode())
    assert len(ids) > 3 * SEQ_LEN
    expected = 0.0
    for start in range(0, len(ids), SEQ_LEN):
        prev = ord("\n") if start == 0 else ids[start - 1]  # the window's one token of context
        expected += log_probs(lm.model, [prev, *ids[start : start + SEQ_LEN]]).sum().item()
    (got,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", TEXT)])
    assert got == pytest.approx(expected, abs=1e-3)


MC_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""

PPL_YAML = """\
task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


def test_lm_eval_end_to_end_on_local_tasks(lm, run_dir, tmp_path, monkeypatch):
    for var, value in [
        ("HF_HOME", str(tmp_path / "hf")),
        ("HF_DATASETS_OFFLINE", "1"),
        ("HF_HUB_OFFLINE", "1"),
    ]:
        monkeypatch.setenv(var, value)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mc = [
        {"question": "To be, or not to be, that is the", "choices": [" question", " xqzv"], "answer": 0},
        {"question": "O Romeo, Romeo, wherefore art thou", "choices": [" Romeo?", " zzzzz"], "answer": 0},
        {"question": "Now is the winter of our", "choices": [" qqq", " discontent"], "answer": 1},
    ]
    texts = [{"text": TEXT}, {"text": "All the world's a stage, and all the men and women merely players."}]
    for name, rows, yaml_text in [("mc", mc, MC_YAML), ("ppl", texts, PPL_YAML)]:
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(yaml_text.format(data=data.resolve()))

    main(
        [str(run_dir), "--tasks", "tiny_mc,tiny_ppl", "--include-path", str(tasks), "--bootstrap-iters", "0"]
    )

    out = run_dir / "eval" / "tiny_mc+tiny_ppl.json"
    res = json.loads(out.read_text())["results"]
    assert 0.0 <= res["tiny_mc"]["acc,none"] <= 1.0
    assert (
        math.isfinite(res["tiny_ppl"]["word_perplexity,none"]) and res["tiny_ppl"]["word_perplexity,none"] > 1
    )
    lls = lm.loglikelihood_rolling([req("loglikelihood_rolling", t["text"]) for t in texts])
    n_bytes = sum(len(t["text"].encode()) for t in texts)
    assert res["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(-sum(lls) / n_bytes / math.log(2), rel=1e-5)


def test_load_run_without_checkpoint_or_with_corrupt_config_fails_clearly(run_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "config.yaml", bare / "config.yaml")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_run(bare)
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load_run(tmp_path / "missing")
    (bare / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="corrupt run config"):
        load_run(bare)
    (bare / "config.yaml").write_text("model:\n  family: nope\n")
    with pytest.raises(ValueError, match="corrupt run config.*unknown model family"):
        load_run(bare)
