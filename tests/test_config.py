from pathlib import Path

import pytest
import yaml

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
