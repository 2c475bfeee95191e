"""Typed run configuration, registered with Hydra's ConfigStore, and `compose()` for tests and notebooks.

The YAML under `conf/` is validated against these dataclasses on composition. The `model` node is a
plain mapping at the Hydra level (its fields depend on the family) and becomes the family's own
dataclass in `to_run_config`, so unknown families and fields fail there, before any compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from harness.layers import LMConfig
from harness.models import make_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Sweep and run names become directory names under results_dir (and sweep files under sweeps/):
# no separators and no leading dot, so no name can reach outside its parent.
_SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,-]*")


def check_sweep_name(name: str) -> str:
    """`name` if it is a valid sweep name, else ValueError saying what one may hold."""
    if not _SWEEP_NAME.fullmatch(str(name)):
        raise ValueError(
            f"sweep name {name!r} may use only letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return str(name)


def check_run_name(name: str) -> str:
    if not _RUN_NAME.fullmatch(str(name)):
        raise ValueError(
            f"run_name {name!r} may use only letters, digits and . _ = , -, starting with a letter or digit"
        )
    return str(name)


class BadNameError(InterpolationResolutionError, CompactHydraException):
    """A bad name met while resolving Hydra's output directory. Being a CompactHydraException, Hydra
    prints its message alone: its traceback trimming fails on errors raised outside the task."""


def _sweep_name_resolver(name: str) -> str:
    try:
        return check_sweep_name(name)
    except ValueError as e:
        raise BadNameError(str(e)) from None


# conf/config.yaml names Hydra's output directories through this resolver, so a bad sweep name fails
# before Hydra writes anything. Registered on import rather than in main(): submitit and joblib
# workers resolve hydra.sweep.dir from an unpickled config, and unpickling the task imports this module.
if not OmegaConf.has_resolver("harness.sweep_name"):
    OmegaConf.register_new_resolver("harness.sweep_name", _sweep_name_resolver)


@dataclass(kw_only=True)
class DataConfig:
    source: str = "shakespeare"  # "shakespeare" (embedded) | "text_file" | "hf_disk"
    path: str = ""  # a text file (text_file) or a `datasets.save_to_disk` directory (hf_disk)
    text_field: str = "text"  # hf_disk: the column holding the text
    split: str = "train"  # hf_disk: which split of a saved DatasetDict
    tokenizer: str = "byte"  # "byte" (vocab 256) or a path to a Hugging Face tokenizer.json
    val_fraction: float = 0.05
    decode: str = "strict"  # text_file: "strict" refuses invalid UTF-8; "replace" maps it to U+FFFD
    cache_dir: str = ".cache/data"  # tokenized shards, keyed by content hash

    def __post_init__(self) -> None:
        if self.source not in ("shakespeare", "text_file", "hf_disk"):
            raise ValueError(f"data.source must be shakespeare, text_file or hf_disk, got {self.source!r}")
        if self.source == "text_file":
            if not self.path:
                raise ValueError("data.source=text_file needs data.path=<a text file>")
            if not Path(self.path).is_file():
                raise ValueError(f"corpus file not found: data.path={self.path!r}")
        if self.source == "hf_disk" and not (Path(self.path) / "dataset_dict.json").exists() \
                and not (Path(self.path) / "state.json").exists():  # fmt: skip
            raise ValueError(f"no dataset saved with datasets.save_to_disk at data.path={self.path!r}")
        if self.tokenizer != "byte" and not Path(self.tokenizer).is_file():
            raise ValueError(f"tokenizer file not found: data.tokenizer={self.tokenizer!r}")
        if self.decode not in ("strict", "replace"):
            raise ValueError(f"data.decode must be strict or replace, got {self.decode!r}")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    schedule: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay) | "constant"
    warmup_frac: float = 0.05  # of all steps
    decay_frac: float = 0.2  # wsd: final fraction of steps spent decaying linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"optim.schedule must be cosine, wsd or constant, got {self.schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.decay_frac <= 1:
            raise ValueError("optim.warmup_frac must be in [0, 1) and optim.decay_frac in [0, 1]")


@dataclass(kw_only=True)
class TrainConfig:
    tokens: int = 500_000  # training budget; the run stops once it has seen this many tokens
    flops_budget: float = 0.0  # informational: the IsoFLOP budget this run was planned for (0: none)
    batch_size: int = 16  # sequences per step; each is model.seq_len tokens
    eval_every: int = 50  # steps; the final step is always evaluated
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 100  # steps; 0 writes only the final checkpoint
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1" ...
    threads: int = 0  # torch CPU threads; 0 leaves the default
    progress: bool = True
    stop_after_steps: int = 0  # stop (as if preempted) after this many steps in this process; tests
    # Another live process owns the run directory: "fail" names it and exits non-zero, "skip" logs
    # and returns, "wait" polls until it finishes (then skips) or dies (then takes over).
    if_busy: str = "fail"
    owner_stale_s: float = 600.0  # an owner whose heartbeat is older is presumed dead
    # Divergence beside non-finite losses (harness.train.Divergence): the moving average of the
    # train loss above spike_factor x its running minimum for spike_steps steps in a row (0
    # disables), or a final validation loss worse than guessing uniformly, ln(vocab_size) (twice
    # that mid-run). Either ends the run as failed with the reason.
    spike_factor: float = 2.0
    spike_steps: int = 10
    fail_above_uniform: bool = True
    # "auto" resumes from the newest checkpoint and stops, naming it, when it cannot be loaded;
    # "skip-broken" moves such checkpoints to ckpt/broken_* and resumes from the one before (or
    # from scratch).
    resume: str = "auto"
    keep_checkpoints: int = 1  # newest checkpoints kept; 2 leaves skip-broken somewhere to go
    # Several ranks (torchrun, or Slurm tasks): batch_size stays the global batch; each rank takes
    # its share in forward passes of micro_batch_size sequences (0: batch_size / world size, one pass),
    # accumulating gradients, so the loss curve does not depend on either. parallel: auto (none on one
    # rank, ddp above) | none | ddp | fsdp (harness.parallel).
    micro_batch_size: int = 0
    parallel: str = "auto"
    fsdp_param_dtype: str = "bf16"  # FSDP on CUDA gathers parameters in bf16, or fp32 as DDP computes
    # Speed, not results. compile: auto (on for CUDA, off for the CPU) | true | false, block by
    # block, for the families that compile (harness.models.FAMILIES says which do not, and why).
    # tf32: fp32 matmuls outside autocast may use TF32 tensor cores on CUDA. prefetch: batches
    # prepared ahead in a background thread. peak_tflops: the device's peak for MFU, where
    # harness.hardware's table does not know it (0: from the table).
    compile: str = "auto"
    tf32: bool = True
    prefetch: int = 2
    peak_tflops: float = 0.0

    def __post_init__(self) -> None:
        for f in ("tokens", "batch_size", "eval_every", "eval_batches", "log_every", "keep_checkpoints"):
            if getattr(self, f) < 1:
                raise ValueError(f"train.{f} must be >= 1, got {getattr(self, f)}")
        if self.if_busy not in ("fail", "skip", "wait"):
            raise ValueError(f"train.if_busy must be fail, skip or wait, got {self.if_busy!r}")
        if self.parallel not in ("auto", "none", "ddp", "fsdp"):
            raise ValueError(f"train.parallel must be auto, none, ddp or fsdp, got {self.parallel!r}")
        if self.fsdp_param_dtype not in ("bf16", "fp32"):
            raise ValueError(f"train.fsdp_param_dtype must be bf16 or fp32, got {self.fsdp_param_dtype!r}")
        self.compile = str(self.compile).lower()
        if self.compile not in ("auto", "true", "false"):
            raise ValueError(f"train.compile must be auto, true or false, got {self.compile!r}")
        if self.prefetch < 0 or self.peak_tflops < 0:
            raise ValueError("train.prefetch and train.peak_tflops must be >= 0")
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.batch_size % self.micro_batch_size):
            raise ValueError(
                f"train.micro_batch_size={self.micro_batch_size} must divide train.batch_size={self.batch_size}"
            )
        if self.resume not in ("auto", "skip-broken"):
            raise ValueError(f"train.resume must be auto or skip-broken, got {self.resume!r}")
        if self.spike_factor and self.spike_factor <= 1:
            raise ValueError(f"train.spike_factor must be > 1 (or 0 to disable), got {self.spike_factor}")
        if self.spike_steps < 1 or self.owner_stale_s <= 0:
            raise ValueError("train.spike_steps must be >= 1 and train.owner_stale_s > 0")


@dataclass(kw_only=True)
class RunConfig:
    model: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: str = "default"  # results/<sweep>/ ; also names sweeps/<sweep>.yaml for multirun
    run_name: str = ""  # empty: derived from the run's overrides
    results_dir: str = "results"
    allow_noncausal: bool = False  # let a language-model run use a non-causal mixer (flagged in results)

    def __post_init__(self) -> None:
        if isinstance(self.model, (dict, DictConfig)):
            self.model = make_config(dict(self.model))
        if not isinstance(self.model, LMConfig):
            raise ValueError("config has no model; choose one with model=<preset> (see conf/model/)")
        check_sweep_name(self.sweep)
        per_step = self.train.batch_size * self.model.seq_len
        if self.train.tokens < per_step:
            raise ValueError(
                f"token budget train.tokens={self.train.tokens} is smaller than one batch "
                f"(train.batch_size={self.train.batch_size} x model.seq_len={self.model.seq_len} = {per_step})"
            )
        if getattr(self.model, "causal", True) is False and not self.allow_noncausal:
            raise ValueError(
                f"model {self.model.name!r} is not causal: it mixes future tokens into the past, so its "
                "language-model loss is not comparable. Set allow_noncausal=true to run it anyway "
                "(results are flagged comparable=false)."
            )

    @property
    def steps(self) -> int:
        return self.train.tokens // (self.train.batch_size * self.model.seq_len)

    @property
    def run_dir(self) -> Path:
        return Path(self.results_dir) / self.sweep / self.run_name


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


# Fields that choose where or how an attempt executes, not what it computes: left out of run names,
# and free to change when a run resumes.
EXECUTION_ONLY: dict[str, tuple[str, ...]] = {
    "train": (
        "device",
        "threads",
        "progress",
        "log_every",
        "ckpt_every",
        "stop_after_steps",
        "if_busy",
        "owner_stale_s",
        "spike_factor",
        "spike_steps",
        "fail_above_uniform",
        "resume",
        "keep_checkpoints",
        "micro_batch_size",
        "parallel",
        "fsdp_param_dtype",
        "compile",
        "tf32",
        "prefetch",
        "peak_tflops",
    ),
    "data": ("cache_dir",),
    "model": ("backend",),  # which kernels compute the same function (torch, native C, CUDA)
}
_NOT_IDENTITY = ("sweep", "results_dir", "run_name") + tuple(
    f"{group}.{f}" for group, fields in EXECUTION_ONLY.items() for f in fields
)


def run_name_from_overrides(overrides: list[str]) -> str:
    """A stable directory name from a run's overrides, so relaunching a sweep finds finished runs."""
    kept = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.") or key.startswith("hydra/") or key in _NOT_IDENTITY:
            continue
        kept.append(o.lstrip("+"))
    name = ",".join(sorted(kept)) or "base"
    name = re.sub(r"[^A-Za-z0-9._=,-]", "_", name)
    if len(name) > 120:
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def to_run_config(cfg: DictConfig | dict, overrides: list[str] | None = None) -> RunConfig:
    """Composed Hydra config -> validated `RunConfig` (runs every `__post_init__`)."""
    if isinstance(cfg, DictConfig):
        # Hydra's own node holds job-time interpolations (job number...) that cannot resolve here.
        cfg = OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
        )
    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    run: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if not run.run_name:
        run.run_name = run_name_from_overrides(overrides or [])
    else:
        check_run_name(run.run_name)
    return run


def compose(overrides: list[str] | None = None) -> RunConfig:
    """The same validated config the command line gets for these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides or [])
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return to_run_config(cfg, overrides)


def run_config_dict(run: RunConfig) -> dict[str, Any]:
    """Plain, fully resolved mapping of a run's config (what `config.yaml` holds)."""
    return dataclasses.asdict(run)
