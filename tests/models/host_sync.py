"""A CPU check that code would not make the host wait for a CUDA device (a host sync).

On CUDA the host queues kernels and runs ahead; an op whose result the host must read (a number,
or a shape that depends on the data) stops it until the GPU catches up. `HostSyncs` records every
aten op called under it, forward and backward, and the Tensor methods that hand data to Python, and
names those that sync on CUDA, so a test on CPU can prove structurally that a step has none. It sees the ops Python dispatches, not those a kernel
calls inside itself (torch's own CUDA fallbacks are for the tests marked gpu to catch).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read device data on the host (item, tolist, bool and int of a tensor all reach
# _local_scalar_dense) or size their output from the data.
ALWAYS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::nonzero_numpy",
    "aten::bincount",
    "aten::histc",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
    "aten::equal",
    "aten::is_nonzero",
}
BOOL_INDEX = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


def sync_reason(func, args, kwargs) -> str | None:
    """Why `func(*args, **kwargs)` would sync on CUDA, or None."""
    name = func._schema.name
    if name in ALWAYS:
        return name
    if name in BOOL_INDEX:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return f"{name} with a boolean mask"
    if (
        name == "aten::repeat_interleave"
        and func._overloadname == "Tensor"
        and kwargs.get("output_size") is None
    ):
        return f"{name} without output_size"
    if name in ("aten::masked_fill", "aten::masked_fill_") and isinstance(args[2], torch.Tensor):
        return f"{name} with a tensor value (read with .item())"
    return None


# Tensor methods that hand device data to Python. `tolist` reads a CPU tensor's memory directly,
# so on CPU only its Python call shows it.
READ_ON_HOST = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}


class _AtenOps(TorchDispatchMode):
    def __init__(self, owner: HostSyncs):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.owner.ops.add(func._schema.name)
        self.owner.note(sync_reason(func, args, kwargs))
        return func(*args, **kwargs)


class _TensorMethods(TorchFunctionMode):
    def __init__(self, owner: HostSyncs):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READ_ON_HOST and args and isinstance(args[0], torch.Tensor):
            self.owner.note(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


class HostSyncs:
    """`with HostSyncs() as s: ...`, then `s.found` lists each reason to sync once, in call order,
    and `s.ops` every aten op called (forward and backward)."""

    def __init__(self):
        self.found: list[str] = []
        self.ops: set[str] = set()
        self._modes = (_TensorMethods(self), _AtenOps(self))

    def note(self, why: str | None) -> None:
        if why is not None and why not in self.found:
            self.found.append(why)

    def __enter__(self) -> HostSyncs:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
