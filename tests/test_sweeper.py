"""Multirun through the real `harness-train` entry point with the sweep-file sweeper (local launcher),
and the Slurm launcher options it checks, composed as `harness-train -m` composes them."""

import re
import shlex
import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from harness.config import CONF_DIR, register_configs
from harness.results import collect
from hydra_plugins.harness_sweeper import check_slurm_options

FAST = ["train.batch_size=4", "train.eval_batches=2", "train.eval_every=5", "train.progress=false"]


def harness_train(*args, cwd):
    cmd = [sys.executable, "-c", "from harness.train import main; main()", "-m", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "sweeps").mkdir()
    return tmp_path


def test_sweep_file_runs_every_point_and_skips_finished_ones(workdir):
    (workdir / "sweeps" / "mini.yaml").write_text(
        "sweep: mini\ncommon: [train.tokens=2560]\nruns:\n"
        "  - [model=gpt2_tiny]\n  - {run_name: llama_named, overrides: [model=llama_tiny]}\n"
    )
    r = harness_train("sweep=mini", "results_dir=results", "data.cache_dir=.cache", *FAST, cwd=workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    df = collect(workdir / "results" / "mini")
    gpt2_run = "model=gpt2_tiny,train.batch_size=4,train.eval_batches=2,train.eval_every=5,train.tokens=2560"
    assert sorted(df.run) == ["llama_named", gpt2_run]
    assert set(df.status) == {"completed"}
    again = harness_train("sweep=mini", "results_dir=results", "data.cache_dir=.cache", *FAST, cwd=workdir)
    assert (
        again.returncode == 0
        and "launching 0 job(s) (2 already completed or diverged)" in again.stdout + again.stderr
    )


def test_broken_job_fails_before_any_job_runs(workdir):
    r = harness_train(
        "model=gpt2_tiny,llama_tiny", "train.tokens=2560,10", "results_dir=results", *FAST, cwd=workdir
    )
    assert r.returncode != 0
    assert "smaller than one batch" in r.stderr
    assert not (workdir / "results" / "default").exists() or not collect(workdir / "results" / "default").size


def test_unsafe_slurm_option_is_rejected_before_submission(workdir):
    r = harness_train("hydra/launcher=slurm", "hydra.launcher.partition='debug;touch /tmp/x'", "model=gpt2_tiny",
                      "train.tokens=2560", "results_dir=results", cwd=workdir)  # fmt: skip
    assert r.returncode != 0 and "not a single shell-safe word" in r.stderr


def compose_multirun(overrides: list[str]):
    """The config `harness-train -m <overrides>` composes and hands its sweeper."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return GlobalHydra.instance().hydra.compose_config("config", overrides, run_mode=RunMode.MULTIRUN)


def readme_slurm_overrides() -> list[str]:
    """The overrides of the command in README.md's "On Slurm" section, as a shell would split them."""
    section = (CONF_DIR.parent / "README.md").read_text().split("### On Slurm", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    words = shlex.split(block.replace("\\\n", " "), comments=True)
    assert words[:2] == [".venv/bin/harness-train", "-m"], words
    return words[2:]


def test_readme_slurm_command_composes_and_passes_the_checks():
    overrides = readme_slurm_overrides()
    cfg = compose_multirun(overrides)
    check_slurm_options(cfg.hydra.launcher)
    launcher_opts = [o for o in OverridesParser.create().parse_overrides(overrides)
                     if o.key_or_group.startswith("hydra.launcher.")]  # fmt: skip
    assert any(o.key_or_group == "hydra.launcher.additional_parameters" for o in launcher_opts)
    for o in launcher_opts:  # each arrives as written, extra sbatch options included
        assert OmegaConf.select(cfg, o.key_or_group) == o.value(), o.input_line


def launcher(*overrides: str):
    return compose_multirun(["hydra/launcher=slurm", *overrides]).hydra.launcher


@pytest.mark.parametrize(
    "override, error",
    [
        pytest.param('+hydra.launcher.srun_args=["--cpu-bind=cores","--mpi=pmix"]', None, id="words"),
        pytest.param("+hydra.launcher.srun_args=['--cpu-bind=cores;touch /tmp/x']",
                     "srun_args item '--cpu-bind=cores;touch /tmp/x' is not a single", id="two-commands"),
        pytest.param("+hydra.launcher.srun_args=['--export=A=1 B=2']", "is not a single", id="space"),
        pytest.param("+hydra.launcher.srun_args='--cpu-bind=cores'", "srun_args must be a list", id="not-a-list"),
    ],
)  # fmt: skip
def test_srun_args_must_be_shell_safe_words(override, error):
    cfg = launcher(override)
    if error is None:
        check_slurm_options(cfg)
    else:
        with pytest.raises(HydraException, match=error):
            check_slurm_options(cfg)


def test_setup_items_are_shell_lines_one_command_each():
    cfg = launcher()
    # verbatim shell by design: spaces, operators and variables pass
    cfg.setup = ["module load cuda/12.1", "source .venv/bin/activate && echo $SLURM_JOB_ID"]
    check_slurm_options(cfg)
    for line in ("echo ok\nrm -rf ~", "echo ok\rrm -rf ~", "echo ok\0"):
        cfg.setup = ["module load cuda/12.1", line]
        with pytest.raises(HydraException, match="setup item .* holds a line break or NUL"):
            check_slurm_options(cfg)


def test_runs_live_elsewhere_are_skipped_naming_their_owner(workdir):
    """A relaunched sweep leaves alone a run another live process is training."""
    import json
    from dataclasses import asdict

    from harness.owner import OWNER_FILE, me

    (workdir / "sweeps" / "two.yaml").write_text(
        "sweep: two\ncommon: [train.tokens=2560]\nruns:\n"
        "  - {run_name: free, overrides: [model=gpt2_tiny]}\n  - {run_name: busy, overrides: [model=llama_tiny]}\n"
    )
    busy = workdir / "results" / "two" / "busy"
    busy.mkdir(parents=True)
    (busy / OWNER_FILE).write_text(json.dumps(asdict(me())))  # this test process: alive, on this host
    r = harness_train("sweep=two", "results_dir=results", "data.cache_dir=.cache", *FAST, cwd=workdir)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "being trained by pid" in out and "1 run(s) live elsewhere skipped" in out
    df = collect(workdir / "results" / "two")
    assert list(df.run) == ["free"] and list(df.status) == ["completed"]
    assert sorted(p.name for p in busy.iterdir()) == [OWNER_FILE]  # untouched


@pytest.mark.parametrize("override", ["hydra.launcher.tasks_per_node=2", "hydra.launcher.nodes=2",
                                      "hydra.launcher.gpus_per_node=8"])  # fmt: skip
def test_several_ranks_per_run_with_the_local_launcher_are_refused_in_words(override):
    from hydra.utils import instantiate

    instantiate(compose_multirun(["hydra/launcher=local"]).hydra.launcher)  # one rank per run: fine
    with pytest.raises(Exception, match="hydra/launcher=local runs each run as one process") as e:
        instantiate(compose_multirun(["hydra/launcher=local", override]).hydra.launcher)
    assert "hydra/launcher=slurm" in str(e.value) and "torchrun" in str(e.value)
