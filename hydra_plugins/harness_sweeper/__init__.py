"""Hydra sweeper for harness: command-line sweeps crossed with a sweep file's run list.

`harness-train -m sweep=NAME [k=a,b ...]` reads `sweeps/NAME.yaml` when it exists:

    sweep: NAME                      # must equal the file stem
    common: [train.eval_every=50]    # optional, applied to every run
    runs:
      - [model=gpt2, model.d_model=64, train.tokens=1000000]
      - {run_name: big, overrides: [model=gpt2, model.d_model=128]}

Each run's overrides are combined with every point of the command-line sweep (Hydra's basic
cartesian grammar; the command line wins on a shared key). Before anything is launched, every job's
config is composed and validated (unknown family, missing corpus, budget smaller than a batch,
unsafe Slurm options), and runs whose directory already says "completed" are skipped, so
relaunching a sweep resumes it. The launcher (local or Slurm via submitit) is Hydra's choice.

Importing this module (Hydra's plugin discovery does) also registers two launcher schemas:
`hydra/launcher: submitit_slurm_open`, which `conf/hydra/launcher/slurm.yaml` extends, and
`harness_local`, which `conf/hydra/launcher/local.yaml` uses.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Values that end up in sbatch directives: one shell-safe word each, no spaces, quotes or newlines.
_SAFE = re.compile(r"[A-Za-z0-9._:,=@%/+-]*")
_SLURM_STR_FIELDS = ("name", "partition", "qos", "comment", "constraint", "exclude", "gres", "account",
                     "mem_per_gpu", "mem_per_cpu", "submitit_folder")  # fmt: skip


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*layers: list[str]) -> list[str]:
    """Later layers win on a shared key; order within the result follows first appearance."""
    merged: dict[str, str] = {}
    for layer in layers:
        for o in layer:
            merged[_key(o)] = o
    return list(merged.values())


def load_sweep_file(path: Path, expected_name: str) -> list[list[str]]:
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise HydraException(f"sweep file {path} is not valid YAML: {e}") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("runs"), list) or not spec["runs"]:
        raise HydraException(f"sweep file {path} needs a non-empty 'runs:' list")
    if spec.get("sweep", expected_name) != expected_name:
        raise HydraException(f"sweep file {path} says sweep: {spec['sweep']!r}, expected {expected_name!r}")
    common = [str(o) for o in spec.get("common") or []]
    runs = []
    for i, r in enumerate(spec["runs"]):
        if isinstance(r, dict):
            overrides = [str(o) for o in r.get("overrides") or []]
            if r.get("run_name"):
                overrides.append(f"run_name={r['run_name']}")
        elif isinstance(r, list):
            overrides = [str(o) for o in r]
        else:
            raise HydraException(f"sweep file {path}: run {i} must be a list of overrides or a mapping")
        runs.append(merge_overrides(common, overrides))
    return runs


def _lines(launcher_cfg: Any, field: str) -> list[str]:
    v = launcher_cfg.get(field)
    if v is None:
        return []
    if isinstance(v, str) or not isinstance(v, Sequence):
        raise HydraException(f"hydra.launcher.{field} must be a list, got {v!r}")
    return [str(x) for x in v]


def check_slurm_options(launcher_cfg: Any) -> None:
    """Refuses submitit launcher values that could change the job script beyond their own option.

    Options, extra sbatch options and srun arguments must each be one shell-safe word. `setup` (and
    `teardown`) items are the user's own shell commands, put verbatim into the job script, so only
    their shape is checked: each must be one line (no line feed, carriage return or NUL).
    """
    if "submitit" not in str(launcher_cfg.get("_target_", "")):
        return
    for f in _SLURM_STR_FIELDS:
        v = launcher_cfg.get(f)
        if v is not None and not _SAFE.fullmatch(str(v)):
            raise HydraException(f"hydra.launcher.{f}={v!r} is not a single shell-safe word")
    for k, v in (launcher_cfg.get("additional_parameters") or {}).items():
        if not _SAFE.fullmatch(str(k)) or not _SAFE.fullmatch(str(v)):
            raise HydraException(f"hydra.launcher.additional_parameters {k}={v!r} is not shell-safe")
    for arg in _lines(launcher_cfg, "srun_args"):
        if not _SAFE.fullmatch(arg):
            raise HydraException(f"hydra.launcher.srun_args item {arg!r} is not a single shell-safe word")
    for f in ("setup", "teardown"):
        for line in _lines(launcher_cfg, f):
            if any(c in line for c in "\n\r\0"):
                raise HydraException(
                    f"hydra.launcher.{f} item {line!r} holds a line break or NUL; give one command per item"
                )


def _open_slurm_schema() -> DictConfig:
    """hydra-submitit-launcher's Slurm schema with `additional_parameters` left open. Hydra closes
    every mapping of a composed config, so `hydra.launcher.additional_parameters={constraint: a100}`
    would otherwise fail on a key the empty default lacks; this node's own flag outranks that."""
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    node = OmegaConf.structured(SlurmQueueConf)
    OmegaConf.set_struct(node.additional_parameters, False)
    return node


ConfigStore.instance().store(
    group="hydra/launcher", name="submitit_slurm_open", node=_open_slurm_schema(), provider="harness"
)


class LocalLauncher(BasicLauncher):
    """Hydra's basic launcher: every run, one after another, as one process here. It takes the Slurm
    launcher's fields that ask for several ranks per run only to refuse them in words, where the
    basic launcher would report an unknown key."""

    def __init__(self, tasks_per_node: int = 1, nodes: int = 1, gpus_per_node: int | None = None) -> None:
        if tasks_per_node != 1 or nodes != 1 or (gpus_per_node or 0) > 1:
            raise HydraException(
                f"hydra/launcher=local runs each run as one process, so it cannot give a run "
                f"tasks_per_node={tasks_per_node}, nodes={nodes}, gpus_per_node={gpus_per_node}. For "
                "several ranks per run use hydra/launcher=slurm (or submitit_local) with "
                "hydra.launcher.tasks_per_node=N, or start one run with torchrun --nproc_per_node=N"
            )
        super().__init__()


_LOCAL = {"_target_": f"{__name__}.LocalLauncher", "tasks_per_node": 1, "nodes": 1, "gpus_per_node": None}
ConfigStore.instance().store(group="hydra/launcher", name="harness_local", node=_LOCAL, provider="harness")


class HarnessSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None,
                 sweeps_dir: str = "sweeps") -> None:  # fmt: skip
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.sweeps_dir = sweeps_dir

    def sweep(self, arguments: list[str]) -> Any:
        from harness.config import check_sweep_name, to_run_config
        from harness.owner import live_owner
        from harness.rundir import is_final, read_summary

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # every rank would run its own sweeper and the ranks could drift apart run by run
            raise HydraException(
                "a sweep (-m) under torchrun is refused: launch one run per torchrun, or run the sweep "
                "with hydra/launcher=slurm and hydra.launcher.tasks_per_node=N"
            )
        check_slurm_options(self.config.hydra.launcher)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        parsed = parser.parse_overrides(self._parse_config() + list(arguments))
        points = BasicSweeper.split_arguments(parsed, None)[0]

        sweep_name = str(self.config.get("sweep", "default"))
        try:
            check_sweep_name(sweep_name)  # before it names a file to read
        except ValueError as e:
            raise HydraException(str(e)) from e
        sweep_file = Path(self.sweeps_dir) / f"{sweep_name}.yaml"
        runs = load_sweep_file(sweep_file, sweep_name) if sweep_file.exists() else [[]]
        if sweep_file.exists():
            log.info("sweep %s: %d runs from %s", sweep_name, len(runs), sweep_file)

        jobs, seen, done, busy = [], set(), 0, 0
        for point in points:
            for run in runs:
                overrides = merge_overrides(run, list(point))
                try:
                    cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
                    rc = to_run_config(cfg, overrides)
                except Exception as e:  # report which job is broken before launching any
                    raise HydraException(f"invalid sweep job {overrides}: {e}") from e
                if rc.run_dir in seen:
                    raise HydraException(f"two sweep jobs share the run directory {rc.run_dir}")
                seen.add(rc.run_dir)
                summary = read_summary(rc.run_dir)
                if is_final(summary):
                    log.info("skipping %s run %s", "completed" if summary["status"] == "completed"
                             else "diverged", rc.run_dir)  # fmt: skip
                    done += 1
                    continue
                owner = live_owner(rc.run_dir, rc.train.owner_stale_s)
                if owner is not None:  # a job of an earlier launch still trains it
                    log.warning("skipping %s: it is being trained by %s", rc.run_dir, owner.describe())
                    busy += 1
                    continue
                jobs.append(overrides)

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        if busy:
            log.warning("%d run(s) live elsewhere skipped; relaunch once they end", busy)
        log.info("launching %d job(s) (%d already completed or diverged)", len(jobs), done)
        returns = []
        n = self.max_batch_size or max(1, len(jobs))
        for start in range(0, len(jobs), n):
            results = self.launcher.launch(jobs[start : start + n], initial_job_idx=start)
            for r in results:
                _ = r.return_value  # re-raises a job's exception after the batch has run
            returns.append(results)
        return returns
