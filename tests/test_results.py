import json
import warnings

import pytest
import yaml

from harness.config import compose
from harness.results import collect, curves, exclusion_lines, exclusions, save_table
from harness.train import train


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("res")
    for preset in ("gpt2_tiny", "llama_tiny"):
        run = compose([f"model={preset}", f"results_dir={root}", "sweep=s", "train.tokens=2560", "train.batch_size=4",
                       "train.eval_every=5", "train.eval_batches=2", "train.progress=false"])  # fmt: skip
        train(run)
    return root / "s"


def test_collect_gives_one_row_per_run(sweep):
    df = collect(sweep)
    assert len(df) == 2 and set(df.status) == {"completed"}, df.reason.tolist()
    assert set(df.arch) == {"gpt2", "transformer++"}
    assert (df.flops_train > 0).all() and (df.final_val_loss > 0).all()
    # what train writes passes every check: tokens, flops_train and the FLOP accountant agree
    assert (df.file == "").all() and (df.metrics_skipped == 0).all() and (df.metrics_reason == "").all()
    assert exclusions(df).empty
    c = curves(sweep)
    assert set(c.run) == set(df.run) and c.groupby("run").step.max().eq(10).all()


def test_corrupt_and_half_written_runs_become_rows_with_reasons(sweep, tmp_path):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(sweep, root)
    good, other = sorted(p for p in root.iterdir() if p.is_dir())
    (other / "summary.json").write_text('{"status": "compl')  # torn write
    half = root / "half"
    half.mkdir()
    (half / "config.yaml").write_text("model: {family: gpt2}\n")  # started, nothing else yet
    junk = root / "junk"
    junk.mkdir()
    (junk / "summary.json").write_text(json.dumps({"status": "weird"}))
    (junk / "config.yaml").write_text(": : [")
    with (good / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "train_lo')  # torn last line of a completed run: not expected
    with pytest.warns(UserWarning) as caught:
        df = collect(root).set_index("run")
    said = " | ".join(str(w.message) for w in caught)
    assert "metrics.jsonl: 1 malformed line skipped" in said and "junk: corrupt: summary.json" in said
    assert df.loc[good.name, "status"] == "completed"
    assert df.loc[good.name, "metrics_skipped"] == 1
    assert df.loc[good.name, "metrics_reason"].startswith("1 malformed line skipped (line 3: not valid JSON")
    assert df.loc[other.name, "status"] == "corrupt"
    assert df.loc[other.name, "reason"].startswith("summary.json: not valid JSON")
    assert df.loc[other.name, "file"] == "summary.json"
    assert df.loc["half", "status"] == "corrupt" and df.loc["half", "reason"] == "summary.json: missing"
    assert df.loc["junk", "status"] == "corrupt" and df.loc["junk", "file"] == "summary.json, config.yaml"
    assert "summary.json: status: Input should be" in df.loc["junk", "reason"]
    assert "config.yaml: not valid YAML" in df.loc["junk", "reason"]
    c = curves(root, df.reset_index())
    assert c[c.run == good.name].step.max() == 10


def _copy_run(src, dst):
    dst.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _edit_summary(**changes):
    def edit(run):
        s = json.loads((run / "summary.json").read_text())
        s.update({k: v(s) if callable(v) else v for k, v in changes.items()})
        (run / "summary.json").write_text(json.dumps(s))

    return edit


def _edit_config(change):
    def edit(run):
        c = yaml.safe_load((run / "config.yaml").read_text())
        change(c)
        (run / "config.yaml").write_text(yaml.safe_dump(c))

    return edit


def _write(name, text):
    return lambda run: (run / name).write_text(text)


MALFORMED = {  # id: (edit of a good completed run, status, start of the reason)
    "config-model-is-a-string": (_write("config.yaml", "model: gpt2\n"), "corrupt",
                                 "config.yaml: model must be a mapping, found str 'gpt2'"),
    "config-model-missing": (_edit_config(lambda c: c.pop("model")), "corrupt", "config.yaml: model missing"),
    "config-unknown-family": (_edit_config(lambda c: c["model"].update(family="gpt3")), "corrupt",
                              "config.yaml: model: unknown model family 'gpt3'"),
    "config-unknown-field": (_edit_config(lambda c: c["model"].update(d_modle=64)), "corrupt",
                             "config.yaml: model: model family 'gpt2' has no field(s) ['d_modle']"),
    "config-train-is-a-string": (_edit_config(lambda c: c.update(train="fast")), "corrupt",
                                 "config.yaml: train must be a mapping, found str 'fast'"),
    "config-not-yaml": (_write("config.yaml", "model: [gpt2\n"), "corrupt", "config.yaml: not valid YAML"),
    "config-a-list": (_write("config.yaml", "- gpt2\n"), "corrupt", "config.yaml: expected a mapping, found list"),
    "summary-hardware-is-a-string": (_edit_summary(hardware="cpu"), "corrupt",
                                     "summary.json: hardware: Input should be a valid dictionary"),
    "summary-not-json": (_write("summary.json", "{status: completed"), "corrupt", "summary.json: not valid JSON"),
    "summary-a-list": (_write("summary.json", "[]"), "corrupt", "summary.json: expected a JSON object, found list"),
    "negative-val-loss": (_edit_summary(final_val_loss=-3), "invalid", "summary.json: final_val_loss -3.0 is negative"),
    "nan-train-loss": (_edit_summary(final_train_loss=float("nan")), "invalid",
                       "summary.json: final_train_loss nan is not finite"),
    "negative-params": (_edit_summary(params_nonembed=-1), "invalid", "summary.json: params_nonembed -1 is negative"),
    "tokens-disagree": (_edit_summary(tokens=lambda s: s["tokens"] + 64,
                                      flops_train=lambda s: s["flops_per_token"] * (s["tokens"] + 64)), "invalid",
                        "summary.json: tokens 2624 != steps 10 x config.yaml train.batch_size 4 x "
                        "config.yaml model.seq_len 64 = 2560"),
    "batch-size-disagrees-with-config": (_edit_summary(batch_size=8), "invalid",
                                         "summary.json: batch_size 8 disagrees with config.yaml train.batch_size 4"),
    "flops-train-disagrees": (_edit_summary(flops_train=lambda s: 2 * s["flops_train"]), "invalid",
                              "summary.json: flops_train"),
    "flops-per-token-not-the-accountants": (
        _edit_summary(flops_per_token=lambda s: 2 * s["flops_per_token"],
                      flops_train=lambda s: 2 * s["flops_train"]), "invalid",
        "summary.json: flops_per_token 1.57286e+06 != 786432, the FLOP accountant's count"),
    "completed-without-val-loss": (_edit_summary(final_val_loss=None), "failed",
                                   "completed without a finite final val loss"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_or_impossible_run_becomes_a_row_with_a_reason(sweep, tmp_path, case):
    edit, status, reason = MALFORMED[case]
    good = next(p for p in sorted(sweep.iterdir()) if p.is_dir() and "gpt2" in p.name)
    root = tmp_path / "s"
    _copy_run(good, root / "good")
    edit(_copy_run(good, root / "bad"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = collect(root).set_index("run")
    assert df.loc["good", "status"] == "completed"
    assert df.loc["bad", "status"] == status
    assert df.loc["bad", "reason"].startswith(reason), df.loc["bad", "reason"]
    excl = exclusions(df.reset_index())
    assert excl["run"].tolist() == ["bad"]
    assert excl.loc[0, "file"] == ("" if status == "failed" else reason.split(":")[0])


def test_skipped_metrics_lines_are_counted_and_reported(sweep, tmp_path):
    good = next(p for p in sorted(sweep.iterdir()) if p.is_dir() and "gpt2" in p.name)
    root = tmp_path / "s"
    garbled = _copy_run(good, root / "garbled")
    first, last = (garbled / "metrics.jsonl").read_text().splitlines()
    # garbage in the middle, a record without a step, and garbage last in a completed run
    (garbled / "metrics.jsonl").write_text(
        "\n".join([first, "garbage", '{"tokens": 5}', last, "garbage"]) + "\n"
    )
    torn = _copy_run(good, root / "torn")  # a crash mid-write while running: expected
    _edit_summary(status="running")(torn)
    with (torn / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "train_lo')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = collect(root)
    r = df.set_index("run")
    assert r.loc["garbled", "status"] == "completed" and r.loc["garbled", "metrics_skipped"] == 3
    assert r.loc["garbled", "metrics_reason"] == (
        "3 malformed lines skipped (lines 2, 5: not valid JSON (Expecting value); line 3: step: Field required)"
    )
    assert r.loc["torn", "metrics_skipped"] == 1 and r.loc["torn", "metrics_reason"] == ""
    excl = exclusions(df)
    lines_excl = excl[excl["file"] == "metrics.jsonl"]
    assert lines_excl["run"].tolist() == ["garbled"]
    assert exclusion_lines(lines_excl) == [
        "excluded garbled [metrics.jsonl]: " + r.loc["garbled", "metrics_reason"]
    ]
    c = curves(root, df)
    assert c[c.run == "garbled"].step.tolist() == c[c.run == "torn"].step.tolist() == [5, 10]


def test_reading_a_run_never_raises(tmp_path, monkeypatch):
    import harness.results as R

    (tmp_path / "s" / "a").mkdir(parents=True)
    (tmp_path / "s" / "a" / "summary.json").write_text("{}")

    def boom(d, root):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(R, "_read_run", boom)
    with pytest.warns(UserWarning, match="disk on fire"):
        df = collect(tmp_path / "s")
    assert df.loc[0, "status"] == "corrupt" and "RuntimeError: disk on fire" in df.loc[0, "reason"]


def test_tables_save_as_parquet_and_csv(sweep, tmp_path):
    import pandas as pd

    df = collect(sweep)
    pq, csv = save_table(df, tmp_path / "runs")
    assert pd.read_parquet(pq).shape == df.shape
    assert pd.read_csv(csv).shape == df.shape


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="results directory not found"):
        collect(tmp_path / "nope")


def test_hostile_values_in_parseable_files_do_not_stop_collect_or_curves(sweep, tmp_path):
    """Numbers past Python's digit limit, deep nesting, a record naming its own run, labels that are
    not strings: each run is still one row, and the tables still sort and save."""
    good = next(p for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").exists())
    root = tmp_path / "s"
    huge = _copy_run(good, root / "huge")
    (huge / "summary.json").write_text('{"status": "completed", "steps": ' + "9" * 5000 + "}")
    deep = _copy_run(good, root / "deep")
    lines = (deep / "metrics.jsonl").read_text().splitlines()
    (deep / "metrics.jsonl").write_text(
        "\n".join([lines[0], "[" * 100_000, '{"step": ' + "9" * 5000 + "}"] + lines[1:]) + "\n"
    )
    shadow = _copy_run(good, root / "shadow")
    rec = json.loads((shadow / "metrics.jsonl").read_text().splitlines()[0])
    (shadow / "metrics.jsonl").write_text(json.dumps({**rec, "run": "other", "arch": 7}) + "\n")
    _edit_config(lambda c: c["model"].update(name=[1, 2]))(_copy_run(good, root / "listname"))
    _edit_config(lambda c: c["model"].update(name=7))(_copy_run(good, root / "intname"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = collect(root).set_index("run")
        c = curves(root, df.reset_index())
    assert (
        df.loc["huge", "status"] == "corrupt" and "summary.json: not valid JSON" in df.loc["huge", "reason"]
    )
    assert df.loc["deep", "status"] == "completed" and df.loc["deep", "metrics_skipped"] == 2
    assert set(c[c.run == "shadow"].arch) == {df.loc["shadow", "arch"]}
    assert all(isinstance(a, str) for a in df.arch)
    save_table(df.reset_index(), tmp_path / "t")  # parquet needs one type per column
