"""One run across several processes: who this process is, and the few collectives the loop needs.

A run with world size > 1 is started by `torchrun`, or by anything that exports the same variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): `export_from_submitit` does it for a Slurm job
of the submitit launcher with several tasks. Slurm's own SLURM_NTASKS is not read: a batch script
that runs a local sweep inside a multi-task allocation is not one run on many ranks. Each rank computes
on `cuda:LOCAL_RANK` (NCCL) or the CPU (gloo). Parameter gradients are averaged by torch's DDP or
FSDP (`harness.parallel`); the collectives here carry rank 0's decisions, metrics, and the loss
terms that are defined over the global batch (MoE balance losses). At world size 1 nothing is
initialised and every helper is the identity.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

# A rank that dies leaves the others blocked in a collective; torchrun and srun's --kill-on-bad-exit
# end them, and this bounds the wait where neither does.
TIMEOUT = timedelta(minutes=5)
CONTROL_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """This process's place in the run, from torchrun's variables."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return Dist(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    return Dist()


def export_from_submitit() -> None:
    """Inside a submitit job with several tasks (hydra.launcher.tasks_per_node, nodes), exports
    torchrun's variables for this task, so `from_env` sees the same run as under torchrun."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    if submitit.JobEnvironment().num_tasks > 1:
        # every task keeps every GPU it was given; the rank picks its own (`harness.train.pick_device`)
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


_CONTROL: tdist.ProcessGroup | None = None  # rank 0's decisions and results travel here


def init(d: Dist, device: torch.device) -> None:
    """Joins the process group (once) for a world size above 1. Each CUDA rank binds its own GPU
    before any collective, or NCCL would put every rank's traffic on GPU 0."""
    global _CONTROL
    if d.world == 1 or tdist.is_initialized():
        return
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"{d.world} ranks but {var} is not set: launch with torchrun, or export it")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        tdist.init_process_group("nccl", rank=d.rank, world_size=d.world, timeout=TIMEOUT, device_id=device)
    else:
        tdist.init_process_group("gloo", rank=d.rank, world_size=d.world, timeout=TIMEOUT)
    # Rank 0 alone tokenizes a new corpus, waits for a busy owner or writes a checkpoint while the
    # others wait for its word: on CPU (gloo), with a wait as long as that work may take.
    _CONTROL = tdist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of a tensor over ranks (each rank's value weighs the same)."""
    return x if d.world == 1 else sum_over_ranks(x) / d.world  # AVG is NCCL-only


def broadcast(obj, d: Dist):
    """Rank 0's `obj` on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, group=_CONTROL)
    return box[0]


def gather_to_main(obj, d: Dist) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world if d.main else None
    tdist.gather_object(obj, out, dst=0, group=_CONTROL)
    return out


def any_rank(flag: bool, d: Dist) -> bool:
    """Whether `flag` holds on any rank, agreed on the CPU (no device work waits for it)."""
    if d.world == 1:
        return flag
    x = torch.tensor([float(flag)])
    tdist.all_reduce(x, op=tdist.ReduceOp.SUM, group=_CONTROL)
    return bool(x.item() > 0)


class Terminated(BaseException):
    """SIGTERM, as torchrun sends to every rank once one has failed: raised so the run's failure
    handler records it, where the default action would end the process without a word."""


def raise_on_sigterm(d: Dist) -> None:
    """Under torchrun (not submitit, which handles its own signals for requeueing)."""
    main_thread = threading.current_thread() is threading.main_thread()
    if d.world > 1 and not os.environ.get("SUBMITIT_EXECUTOR") and main_thread:

        def handler(signum, frame):
            raise Terminated(f"signal {signal.Signals(signum).name}, sent to every rank once one fails")

        signal.signal(signal.SIGTERM, handler)


def ignore_sigterm() -> None:
    """While a failure is being recorded; the process ends right after."""
    if os.environ.get("SUBMITIT_EXECUTOR") is None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over every rank of the process group (itself when there is none)."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return x
    x = x.detach().clone()
    tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is the same all-reduce of the gradient: the derivative of a
    sum over ranks with respect to each rank's term."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        return grad


def sum_over_ranks_with_grad(x: torch.Tensor) -> torch.Tensor:
    """`sum_over_ranks` for a loss term: the backward sums gradients over ranks too, so each rank's
    tokens get the gradient of the global-batch term, and the data-parallel average over ranks
    then gives what one process computes."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return x
    return _SumOverRanks.apply(x)
