"""How one model trains on several ranks, and the full state a checkpoint holds at any world size.

    none   one process: the model as it is
    ddp    DistributedDataParallel: every rank holds the whole model; gradients are averaged
    fsdp   FSDP2 (`torch.distributed.fsdp.fully_shard`) on each block and at the root: parameters,
           gradients and optimizer state are sharded; gradients reduce in fp32. On CUDA,
           `train.fsdp_param_dtype=bf16` (the default, torchtitan's policy) also gathers the
           parameters in bf16, so norms and the residual stream compute in bf16 where DDP's
           autocast keeps them in fp32; `fp32` computes as DDP does

A checkpoint holds one format whatever the mode: the full state dict (gathered from the shards
under FSDP) in safetensors and the optimizer's own `state_dict()` layout in state.pt, so a
checkpoint written at any world size or mode resumes at any other. Under FSDP the model and
optimizer are first built and restored whole on the CPU, then sharded onto the device: a device
holds its shard, plus one full tensor at a time while a checkpoint is gathered or scattered.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch

from harness import dist

log = logging.getLogger("harness.parallel")


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def choose(parallel: str, world: int) -> str:
    """The mode a run uses (train.parallel), refused before any compute when it cannot work."""
    if parallel == "fsdp" and not fsdp_available():
        raise ValueError(
            f"train.parallel=fsdp needs torch.distributed.fsdp.fully_shard (FSDP2), which torch "
            f"{torch.__version__} lacks; upgrade torch or use train.parallel=ddp"
        )
    if world == 1:
        if parallel == "fsdp":
            log.info("train.parallel=fsdp on one rank shards nothing: training unsharded")
        return "none"
    if parallel == "none":
        raise ValueError(f"{world} ranks need train.parallel=ddp or fsdp (or auto)")
    return "ddp" if parallel == "auto" else parallel


def rank_seed(seed: int, rank: int) -> int:
    """The RNG seed of a rank other than 0 (rank 0 keeps the run's seed, as at world size 1), so
    noisy routers draw different noise for different ranks' tokens."""
    return seed + 1_000_003 * rank


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{name dropped: name kept} for parameters registered under several names (a head tied to the
    embedding). The file keeps the alphabetically first, as safetensors' `save_model` does."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n: min(group) for group in names.values() for n in group if n != min(group)}


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the order `opt.state_dict()` numbers them."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for g in opt.param_groups for p in g["params"]]


def wrap(mode: str, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device, make_optimizer,
         param_dtype: str = "bf16"):  # fmt: skip
    """(module the step runs, optimizer) for `mode`. `model` and `opt` are whole and restored;
    under FSDP `model` is sharded in place and a new optimizer takes over `opt`'s state."""
    if mode == "none":
        return model, opt
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # the buffers (RoPE tables, the MoE balance bias) are equal on every rank by construction
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False), opt
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    full = opt.state_dict()
    by_name = _param_names(model, opt)
    bf16 = device.type == "cuda" and param_dtype == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    # the mesh on this rank's device type: FSDP's default would pick CUDA whenever it exists
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the embedding, head and final norm
    sharded = make_optimizer(model)
    if full["state"]:  # a resumed run: each rank keeps its shard of the full state
        named = {
            "state": {by_name[i]: v for i, v in full["state"].items()},
            "param_groups": [
                {**g, "params": [by_name[i] for i in g["params"]]} for g in full["param_groups"]
            ],
        }
        # not strict: like opt.load_state_dict, a parameter without state (never had a gradient) is fine
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(model, sharded, named, options=options)
    return model, sharded


def grad_sync(net, on: bool):
    """A context in which backward averages gradients across ranks (`on`) or only accumulates
    them locally, for the micro batches before the last of an optimizer step."""
    if on:
        return nullcontext()
    if hasattr(net, "no_sync"):  # DDP
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2: a flag, not a context
        net.set_requires_gradient_sync(False)
        return _Resync(net)
    return nullcontext()


class _Resync:
    def __init__(self, net):
        self.net = net

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.net.set_requires_gradient_sync(True)


def full_state(mode: str, model: torch.nn.Module, opt, aliases: dict[str, str], d: dist.Dist):
    """(weights, optimizer state) in the checkpoint format, on rank 0 (None elsewhere). Every rank
    must call it: under FSDP it gathers the shards. `model` is the module itself, not DDP's wrapper."""
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, rank 0 only
        weights = get_model_state_dict(model, options=options)
        named = get_optimizer_state_dict(model, opt, options=options)
        if not d.main:
            return None, None
        order = [n for g in named["param_groups"] for n in g["params"]]
        index = {n: i for i, n in enumerate(order)}
        optim = {
            "state": {index[n]: v for n, v in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]],
        }
    else:
        if not d.main:
            return None, None
        weights, optim = model.state_dict(), opt.state_dict()
    weights = {k: v.detach().contiguous() for k, v in weights.items() if k not in aliases}
    return weights, optim


def rng_states(d: dist.Dist) -> dict[str, Any]:
    """This process's RNG state, and under several ranks every other rank's (on rank 0)."""
    own: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():  # noisy routers draw on the CUDA generator
        own["cuda_rng"] = torch.cuda.get_rng_state_all()
    if d.world == 1:
        return own
    every = dist.gather_to_main(own, d)
    return {**own, "rank_rng": every[1:]} if d.main else {}
