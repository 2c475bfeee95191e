import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.config import OptimConfig, compose
from harness.owner import OwnershipLost
from harness.rundir import CheckpointError
from harness.train import lr_at, train

FAST = ["model=llama_tiny", "train.batch_size=4", "train.eval_batches=2", "train.eval_every=5",
        "train.log_every=1", "train.progress=false"]  # fmt: skip


def run_cfg(results_dir, *extra):
    return compose([*FAST, f"results_dir={results_dir}", *extra])


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_config_metrics_and_summary(results_dir):
    run = run_cfg(results_dir, "train.tokens=5120")
    summary = train(run)
    assert summary["status"] == "completed"
    d = run.run_dir
    assert {p.name for p in d.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "ckpt"}
    recs = read_metrics(d)
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert {"step", "tokens", "flops_train", "train_loss", "val_loss", "lr", "wall_s", "tokens_per_s"} <= set(
        recs[0]
    )
    s = json.loads((d / "summary.json").read_text())
    assert s["flops_train"] == s["flops_per_token"] * s["tokens"] == recs[-1]["flops_train"]
    assert s["final_val_loss"] == recs[-1]["val_loss"]
    assert s["params_total"] > s["params_nonembed"] > 0
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]


@pytest.mark.parametrize(
    "model",
    [
        [],
        [
            "model=loss_free",
            "model.d_model=32",
            "model.n_layers=2",
            "model.seq_len=64",
            "model.balance_bias_rate=0.01",
        ],
    ],
    ids=["llama_tiny", "moe-loss-free-bias"],  # the second carries routing state (a buffer) across the stop
)
def test_resumed_run_has_the_same_loss_sequence_as_a_straight_run(tmp_path, model):
    straight = run_cfg(tmp_path / "a", "train.tokens=7680", "train.ckpt_every=0", *model)
    train(straight)
    interrupted = run_cfg(
        tmp_path / "b", "train.tokens=7680", "train.ckpt_every=0", "train.stop_after_steps=13", *model
    )
    first = train(interrupted)
    assert first["status"] == "running" and first["steps_done"] == 13
    resumed = run_cfg(tmp_path / "b", "train.tokens=7680", "train.ckpt_every=0", *model)
    assert resumed.run_dir == interrupted.run_dir
    assert train(resumed)["status"] == "completed"
    a, b = read_metrics(straight.run_dir), read_metrics(resumed.run_dir)
    assert [r["step"] for r in b] == list(range(1, 31))
    for key in ("train_loss", "val_loss", "lr", "flops_train"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_completed_run_is_skipped(results_dir):
    run = run_cfg(results_dir, "train.tokens=2560")
    first = train(run)
    mtime = (run.run_dir / "metrics.jsonl").stat().st_mtime_ns
    assert train(run) == first
    assert (run.run_dir / "metrics.jsonl").stat().st_mtime_ns == mtime


def test_diverged_run_is_marked_failed(results_dir):
    summary = train(run_cfg(results_dir, "train.tokens=5120", "optim.lr=1e9", "optim.grad_clip=0"))
    assert summary["status"] == "failed" and "diverged" in summary["reason"]


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model family 'gtp2'.*gpt2.*llama.*Did you mean 'gpt2'"):
        compose(["model=gpt2_tiny", "model.family=gtp2"])


def test_missing_corpus_file_is_reported():
    with pytest.raises(ValueError, match="corpus file not found"):
        compose(["data=text_file", "data.path=/nonexistent/corpus.txt"])


def test_budget_smaller_than_one_batch_is_reported():
    with pytest.raises(ValueError, match=r"smaller than one batch.*4 x model.seq_len=64 = 256"):
        compose(["model=llama_tiny", "train.batch_size=4", "train.tokens=100"])


def test_unknown_model_field_is_reported():
    with pytest.raises(ValueError, match="has no field"):
        compose(["model=llama_tiny", "+model.d_modle=3"])


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules_warm_up_then_end_where_configured(schedule):
    o = OptimConfig(lr=1.0, min_lr_ratio=0.1, schedule=schedule, warmup_frac=0.1, decay_frac=0.2)
    lrs = [lr_at(s, 100, o) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(1.0 if schedule == "constant" else 0.1)
    if schedule == "wsd":
        assert lrs[79] == pytest.approx(1.0) and lrs[80] < 1.0


def test_run_dir_with_a_different_config_is_refused(results_dir):
    run = run_cfg(results_dir, "train.tokens=2560", "run_name=fixed", "train.stop_after_steps=2")
    train(run)
    again = run_cfg(results_dir, "train.tokens=2560", "run_name=fixed", "optim.lr=1e-4")
    with pytest.raises(ValueError, match="different config"):
        train(again)
    # how an attempt executes may change between attempts
    assert (
        train(run_cfg(results_dir, "train.tokens=2560", "run_name=fixed", "train.threads=1"))["status"]
        == "completed"
    )


def test_kernel_backend_may_change_between_attempts(results_dir):
    """A run started on one backend resumes on another (say, a CUDA job requeued on a CPU node)."""
    base = ("model=mamba_tiny", "train.tokens=2560", "run_name=m")
    train(run_cfg(results_dir, *base, "++model.backend=torch", "train.stop_after_steps=2"))
    assert train(run_cfg(results_dir, *base, "++model.backend=auto"))["status"] == "completed"


def test_tokenizer_vocab_mismatch_fails_before_writing_anything(tmp_path):
    from harness.data import train_bpe_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    tok = train_bpe_tokenizer(text, 300, tmp_path / "tok.json")
    run = run_cfg(tmp_path / "r", "data=text_file", f"data.path={text}", f"data.tokenizer={tok}",
                  "train.tokens=2560", f"data.cache_dir={tmp_path / 'c'}")  # fmt: skip
    with pytest.raises(ValueError, match=r"add \+model.vocab_size="):
        train(run)
    assert not run.run_dir.exists()


def test_failure_while_resuming_is_recorded_not_left_running(results_dir):
    run = run_cfg(results_dir, "train.tokens=5120", "train.stop_after_steps=3")
    train(run)
    (next((run.run_dir / "ckpt").glob("step_*")) / "state.pt").write_bytes(b"truncated")
    with pytest.raises(Exception):  # noqa: B017 (any load error will do: the summary is what we check)
        train(run_cfg(results_dir, "train.tokens=5120"))
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"]


# ---------------------------------------------------------------- one owner, divergence, broken checkpoints

LAUNCH = ["model=llama_tiny", "sweep=p6", "run_name=c6", "train.batch_size=4", "train.eval_every=5",
          "train.eval_batches=2", "train.log_every=1", "train.progress=false", "train.threads=1"]  # fmt: skip


def _launch(results, *extra, log=None):
    cmd = [
        sys.executable,
        "-c",
        "from harness.train import main; main()",
        *LAUNCH,
        f"results_dir={results}",
        *extra,
    ]
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, proc, what, timeout=120):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"exited before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_concurrent_launches_of_one_run_leave_one_complete_run(tmp_path):
    """The owner is frozen (SIGSTOP) while two more launches try, so no timing decides the outcome."""
    results = tmp_path / "results"
    run_dir = results / "p6" / "c6"
    budget = ["train.tokens=20480", "train.ckpt_every=1"]  # 80 steps, a checkpoint at each
    first = _launch(results, *budget)
    others = []
    try:
        _wait_for(lambda: list(run_dir.glob("ckpt/step_*")), first, "the first checkpoint")
        os.kill(first.pid, signal.SIGSTOP)
        refused = _launch(results, *budget)
        waiter = _launch(results, *budget, "train.if_busy=wait", log=tmp_path / "waiter.log")
        others = [refused, waiter]
        out = refused.communicate(timeout=120)[0]
        assert refused.returncode != 0 and f"is being trained by pid {first.pid}" in out, out[-2000:]
        _wait_for(lambda: "waiting for it" in (tmp_path / "waiter.log").read_text(), waiter, "the waiter")
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0
        assert waiter.wait(timeout=120) == 0
        assert "while this process waited: completed" in (tmp_path / "waiter.log").read_text()
    finally:
        for p in (first, *others):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 80
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 81))  # every step once
    assert not (run_dir / "owner.json").exists()


def test_killed_run_is_taken_over_and_resumes_bit_identically(tmp_path):
    budget = ["train.tokens=15360", "train.ckpt_every=7"]  # 60 steps
    straight = train(compose([*LAUNCH, f"results_dir={tmp_path / 'a'}", *budget]))
    assert straight["status"] == "completed"
    results = tmp_path / "b"
    run_dir = results / "p6" / "c6"
    victim = _launch(results, *budget)

    def logged() -> int:
        p = run_dir / "metrics.jsonl"
        return len(p.read_text().splitlines()) if p.exists() else 0

    try:
        _wait_for(lambda: logged() >= 24, victim, "24 logged steps")  # past the checkpoint at step 21
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert logged() < 60, "the run finished before it was killed"
    assert json.loads((run_dir / "owner.json").read_text())["pid"] == victim.pid  # left behind by kill -9
    heir = _launch(results, *budget)
    out = heir.communicate(timeout=300)[0]
    assert heir.returncode == 0, out[-2000:]
    assert f"process {victim.pid} on" in out and "is gone" in out
    resumed = [int(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "resuming" in line]
    assert resumed and resumed[0] >= 21
    a, b = read_metrics(tmp_path / "a" / "p6" / "c6"), read_metrics(run_dir)
    assert [r["step"] for r in b] == list(range(1, 61))
    for key in ("train_loss", "val_loss", "lr", "flops_train"):
        assert [r[key] for r in a] == [r[key] for r in b], key


@pytest.mark.parametrize(
    "rule,extra",
    [("spike", ["train.fail_above_uniform=false"]), ("uniform", ["train.spike_factor=0"])],
    ids=["train-loss-spike", "val-worse-than-uniform"],
)
def test_finite_blow_up_ends_failed_and_is_excluded(results_dir, rule, extra):
    from harness.fit import split_usable
    from harness.results import collect

    summary = train(run_cfg(results_dir, "train.tokens=25600", "optim.lr=10", *extra))
    assert summary["status"] == "failed" and summary["reason"].startswith("diverged:")
    assert (
        "moving average of the train loss" if rule == "spike" else "the loss of guessing uniformly"
    ) in summary["reason"]
    kept, excluded = split_usable(collect(results_dir))
    assert kept.empty and "diverged" in excluded["why"].iloc[0]


def _break_newest_checkpoint(run_dir):
    newest = sorted((run_dir / "ckpt").glob("step_*"))[-1]
    (newest / "model.safetensors").write_bytes(b"not a safetensors file")
    return newest


@pytest.mark.parametrize("keep", [1, 2], ids=["no-earlier-checkpoint", "earlier-checkpoint"])
def test_broken_checkpoint_is_named_and_skipped_on_request(results_dir, tmp_path, keep):
    base = ["train.tokens=7680", "train.ckpt_every=5", f"train.keep_checkpoints={keep}"]  # 30 steps
    train(run_cfg(tmp_path / "straight", *base))
    run = run_cfg(results_dir, *base, "train.stop_after_steps=13")
    train(run)
    broken = _break_newest_checkpoint(run.run_dir)
    with pytest.raises(
        CheckpointError, match=rf"{broken.name} cannot be loaded.*Remove it to resume from"
    ) as e:
        train(run_cfg(results_dir, *base))
    assert ("step_00000010" if keep == 2 else "scratch") in str(
        e.value
    ) and "train.resume=skip-broken" in str(e.value)
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and broken.name in summary["reason"]
    assert train(run_cfg(results_dir, *base, "train.resume=skip-broken"))["status"] == "completed"
    assert (run.run_dir / "ckpt" / f"broken_{broken.name}").is_dir()  # set aside, not deleted
    a, b = read_metrics(tmp_path / "straight" / run.sweep / run.run_name), read_metrics(run.run_dir)
    assert [r["step"] for r in b] == list(range(1, 31))
    for key in ("train_loss", "val_loss"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_divergence_rules_spare_a_slow_start_and_an_easy_batch():
    from harness.train import Divergence

    run = compose([*FAST, "train.tokens=25600"])  # 100 steps, warmup 5; ln 256 = 5.545
    d = Divergence(run)
    assert d.val_loss(5.6, step=50) == ""  # just above uniform mid-run: slow, not blown up
    assert "twice the loss of guessing uniformly" in d.val_loss(11.2, step=50)
    assert "final validation loss 5.6" in d.val_loss(5.6, step=100)
    assert d.val_loss(20.0, step=3) == ""  # still warming up
    losses = [5.5] * 20 + [2.0] * 60 + [0.2] + [2.0] * 20 + [9.0] * 3 + [2.0] * 20  # an easy and a hard patch
    assert all(d.train_loss(x, i) == "" for i, x in enumerate(losses, 1))
    plateau = [d.train_loss(4.4, 200 + i) for i in range(60)]  # back to the unigram plateau, 2.2 x 2.0
    first = next(r for r in plateau if r)
    assert first.startswith("diverged: the moving average of the train loss") and "for 10 steps" in first


def test_diverged_run_is_final_and_not_trained_again(results_dir):
    cfg = ("train.tokens=25600", "optim.lr=10", "train.fail_above_uniform=false")
    first = train(run_cfg(results_dir, *cfg))
    assert first["status"] == "failed" and first["reason"].startswith("diverged")
    mtime = (run_cfg(results_dir, *cfg).run_dir / "metrics.jsonl").stat().st_mtime_ns
    assert train(run_cfg(results_dir, *cfg)) == first
    assert (run_cfg(results_dir, *cfg).run_dir / "metrics.jsonl").stat().st_mtime_ns == mtime


def test_run_started_before_a_config_field_existed_still_resumes(results_dir):
    import yaml

    run = run_cfg(results_dir, "train.tokens=2560", "run_name=old", "train.stop_after_steps=2")
    train(run)
    stored = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    del stored["data"]["decode"]  # written by a version without the field
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(stored))
    with pytest.raises(ValueError, match=r"different config \(data.decode: 'strict' -> 'replace'\)"):
        train(run_cfg(results_dir, "train.tokens=2560", "run_name=old", "data.decode=replace"))
    assert train(run_cfg(results_dir, "train.tokens=2560", "run_name=old"))["status"] == "completed"


def test_an_io_error_while_loading_is_not_mistaken_for_a_broken_checkpoint(results_dir, monkeypatch):
    import harness.rundir

    base = ["train.tokens=7680", "train.ckpt_every=5"]
    run = run_cfg(results_dir, *base, "train.stop_after_steps=13")
    train(run)

    def flaky(*a, **k):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(harness.rundir, "load_model", flaky)
    with pytest.raises(OSError, match="Input/output error"):
        train(run_cfg(results_dir, *base, "train.resume=skip-broken"))
    assert [p.name for p in (run.run_dir / "ckpt").iterdir()] == ["step_00000013"]  # not set aside


def test_run_killed_after_its_final_checkpoint_completes_with_its_real_losses(results_dir):
    run = run_cfg(results_dir, "train.tokens=2560")
    done = train(run)
    s = json.loads((run.run_dir / "summary.json").read_text())
    s.update(status="running")  # as if killed between the final checkpoint and the final summary
    for k in ("final_val_loss", "final_train_loss"):
        s.pop(k)
    (run.run_dir / "summary.json").write_text(json.dumps(s))
    again = train(run_cfg(results_dir, "train.tokens=2560"))
    assert again["status"] == "completed"
    assert (
        again["final_val_loss"] == done["final_val_loss"]
        and again["final_train_loss"] == done["final_train_loss"]
    )


def test_owner_whose_metrics_file_was_replaced_stops_before_its_checkpoint(results_dir, monkeypatch):
    """A process that lost the run while stalled must not publish a checkpoint over the new owner's."""
    import harness.train as T

    run = run_cfg(results_dir, "train.tokens=7680", "train.ckpt_every=5")
    real = T.save_checkpoint

    def replaced_then_save(run_dir, *a, **k):
        (run_dir / "metrics.jsonl").rename(run_dir / "old.jsonl")  # a new owner's rewrite
        (run_dir / "metrics.jsonl").write_text("")
        return real(run_dir, *a, **k)

    monkeypatch.setattr(T, "save_checkpoint", replaced_then_save)
    with pytest.raises(OwnershipLost, match="metrics.jsonl was replaced"):
        train(run)
    assert not list((run.run_dir / "ckpt").glob("step_*"))
    assert json.loads((run.run_dir / "summary.json").read_text())["status"] == "running"  # not overwritten


# What reads a tensor's value back to the host: on CUDA, each waits for every queued kernel.
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
TINY = ["gpt2_tiny", "llama_tiny", "moe_tiny", "soft_moe_tiny", "mamba_tiny", "mamba2_tiny", "rwkv6_tiny",
        "rwkv7_tiny"]  # fmt: skip
# Reads a family's PyTorch path still makes, and why. RWKV-6's decay has no lower bound, so its
# chunked WKV checks each call whether a chunk's decay can be factored; on CUDA the default is
# flash-linear-attention's kernel, which reads nothing.
KNOWN_READS = {"rwkv6_tiny": {("__bool__", "wkv.py")}}
# The MoE layout CUDA picks (the CPU's own reads the expert counts, which costs nothing there)
LAYOUT = {"moe_tiny": ["++model.backend=grouped_mm"]}


@pytest.mark.parametrize("model", TINY)
def test_the_step_loop_reads_the_device_only_at_sync_points(results_dir, monkeypatch, model):
    """The project's code reads no tensor between log steps (4, 8), eval steps (8) and the last
    step (12): a queued step never waits for the host. Torch's own reads are the GPU-marked test's
    business (on the CPU, AdamW reads its step counters)."""
    from pathlib import Path

    import torch

    import harness.train as T

    step, reads, ours = [0], [], str(Path(T.__file__).parent)
    real_update = T._update

    def counted(*a, **k):
        out = real_update(*a, **k)
        step[0] += 1
        return out

    monkeypatch.setattr(T, "_update", counted)

    def spy(name: str):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(ours):
                reads.append((step[0], name, f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"))
            return real(self, *a, **k)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    run = run_cfg(results_dir, f"model={model}", "train.tokens=768", "train.batch_size=1", "train.log_every=4",
                  "train.eval_every=8", "train.ckpt_every=0", "train.prefetch=0", *LAYOUT.get(model, []))  # fmt: skip
    assert train(run)["status"] == "completed"
    assert run.steps == 12 and {4, 8, 12} <= {s for s, *_ in reads}  # the spy sees the loop's reads
    known = KNOWN_READS.get(model, set())
    stray = sorted({r for r in reads if r[0] not in (0, 4, 8, 12) and (r[1], r[2].split(":")[0]) not in known})
    assert not stray, stray
