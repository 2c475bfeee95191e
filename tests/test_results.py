import json

import pytest

from harness.config import compose
from harness.results import collect, curves, save_table
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
    assert len(df) == 2 and set(df.status) == {"completed"}
    assert set(df.arch) == {"gpt2", "transformer++"}
    assert (df.flops_train > 0).all() and (df.final_val_loss > 0).all()
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
        f.write('{"step": 99, "train_lo')  # torn last line
    with pytest.warns(UserWarning):
        df = collect(root).set_index("run")
    assert df.loc[good.name, "status"] == "completed"
    assert (
        df.loc[other.name, "status"] == "corrupt"
        and "summary.json unreadable" in df.loc[other.name, "reason"]
    )
    assert df.loc["half", "status"] == "corrupt" and "summary.json missing" in df.loc["half", "reason"]
    assert df.loc["junk", "status"] == "corrupt" and "config.yaml unreadable" in df.loc["junk", "reason"]
    with pytest.warns(UserWarning, match="unreadable metrics line"):
        c = curves(root)
    assert c[c.run == good.name].step.max() == 10


def test_tables_save_as_parquet_and_csv(sweep, tmp_path):
    import pandas as pd

    df = collect(sweep)
    pq, csv = save_table(df, tmp_path / "runs")
    assert pd.read_parquet(pq).shape == df.shape
    assert pd.read_csv(csv).shape == df.shape


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="results directory not found"):
        collect(tmp_path / "nope")
