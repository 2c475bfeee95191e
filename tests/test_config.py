import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

from harness.config import CONF_DIR, compose, run_name_from_overrides
from harness.models import FAMILIES, get_family, make_config

MODEL_PRESETS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_model_preset_composes_against_its_schema(preset):
    run = compose([f"model={preset}", "allow_noncausal=true"])
    assert isinstance(run.model, get_family(run.model.family).config)


@pytest.mark.parametrize("group", ["data", "optim", "train"])
def test_every_other_preset_composes(group):
    for p in sorted((CONF_DIR / group).glob("*.yaml")):
        if p.stem in ("text_file", "hf_disk"):
            continue  # need a path; tested in test_data
        compose([f"{group}={p.stem}"])


def test_every_family_has_a_tiny_preset():
    tiny_families = {yaml.safe_load((CONF_DIR / "model" / f"{p}.yaml").read_text())["family"]
                     for p in MODEL_PRESETS if p.endswith("_tiny")}  # fmt: skip
    assert set(FAMILIES) <= tiny_families


def test_make_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="no field"):
        make_config({"family": "gpt2", "widht": 3})


def test_run_names_ignore_where_a_run_executes():
    a = run_name_from_overrides(
        ["model=gpt2", "train.tokens=100", "train.device=cuda", "sweep=x", "++model.backend=native"]
    )
    b = run_name_from_overrides(["train.tokens=100", "model=gpt2"])
    assert a == b == "model=gpt2,train.tokens=100"
    long = run_name_from_overrides([f"model.d_model={i}" for i in range(40)])
    assert len(long) <= 120 and long != run_name_from_overrides([f"model.d_model={i}" for i in range(41)])


def test_compose_equals_the_command_line_config(tmp_path):
    run = compose(["model=gpt2_tiny", "model.d_model=32", "sweep=abc", f"results_dir={tmp_path}"])
    assert run.model.d_model == 32 and run.model.family == "gpt2" and run.model.pos == "learned"
    assert run.run_dir == Path(tmp_path) / "abc" / "model.d_model=32,model=gpt2_tiny"


def test_unsafe_sweep_name_is_rejected():
    with pytest.raises(ValueError, match="sweep name"):
        compose(["sweep='a;rm -rf x'"])


def harness_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from harness.train import main; main()", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message, written_inside",
    [
        pytest.param(["sweep=../../x"], "sweep name '../../x' may use only", False, id="sweep"),
        pytest.param(
            ["-m", "sweep=../../x"], "sweep name '../../x' may use only", False, id="sweep-multirun"
        ),
        pytest.param(["-m", "run_name=../x"], "run_name '../x' may use only", False, id="run_name-multirun"),
        # refused once the config is validated: Hydra has recorded it under results_dir by then
        pytest.param(["run_name=../x"], "run_name '../x' may use only", True, id="run_name"),
    ],
)
def test_bad_names_write_nothing_outside_results_dir(tmp_path, args, message, written_inside):
    cwd, inner = tmp_path / "a" / "b", tmp_path / "a" / "b" / "inner"
    cwd.mkdir(parents=True)
    r = harness_train(*args, f"results_dir={inner}", "model=gpt2_tiny", "train.tokens=2560", cwd=cwd)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    written = [p for p in tmp_path.rglob("*") if p not in (cwd, cwd.parent)]
    if written_inside:
        written = [p for p in written if not p.is_relative_to(inner)]
    assert written == []


def test_sweep_name_resolver_passes_good_names_and_refuses_bad_ones_in_one_message():
    cfg = OmegaConf.create({"sweep": "ok-1.2", "dir": "r/${harness.sweep_name:${sweep}}"})
    assert cfg.dir == "r/ok-1.2"
    cfg.sweep = "../x"
    with pytest.raises(CompactHydraException, match="sweep name '../x' may use only"):  # no traceback
        OmegaConf.to_container(cfg, resolve=True)
