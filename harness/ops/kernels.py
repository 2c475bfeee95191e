"""Optional GPU kernels: which one each family runs on, and whether an installed one loads.

`note(family, op, kernel)` logs "<family> <op>: <kernel>" at INFO on the "harness.kernels" logger
the first time it sees that triple. Call it where a model picks its backend, on every forward:
repeats cost one dict lookup, and under torch.compile they trace to nothing.

`find(module, package, hint)` imports an optional kernel module and returns it, or None. None is
silent when `package` is not installed (the usual case without the `cuda` extra); when `package`
is installed but `module` does not load (a wheel built without its compiled extension, or for
another torch or CUDA), one warning says why and what to do (`hint`), so an "auto" backend falls
back at its first call instead of failing mid-run. Each module is imported once per process.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType

import torch

log = logging.getLogger("harness.kernels")

# Dicts, not sets: under torch.compile a membership test on a dict guards on that one key, while
# one on a set guards on the whole set, and every later `note` elsewhere would recompile each block.
_noted: dict[tuple[str, str, str], bool] = {}
_found: dict[str, ModuleType | None] = {}


def note(family: str, op: str, kernel: str) -> None:
    """Log once that `family`'s `op` runs on `kernel` (e.g. "mamba", "selective_scan", "mamba-ssm")."""
    key = (family, op, kernel)
    if key not in _noted:
        _log_once(key)


@torch.compiler.disable  # logging graph-breaks anyway; this runs once per triple
def _log_once(key: tuple[str, str, str]) -> None:
    if key not in _noted:
        _noted[key] = True
        log.info("%s %s: %s", *key)


def find(module: str, package: str, hint: str) -> ModuleType | None:
    """`module` imported, or None (with one warning if `package` is installed but `module` fails)."""
    if module not in _found:
        _import(module, package, hint)
    return _found[module]


@torch.compiler.disable  # importlib is not traceable; this runs once per module
def _import(module: str, package: str, hint: str) -> None:
    try:
        _found[module] = importlib.import_module(module)
    except Exception as e:  # an extension built for another torch raises ImportError, OSError or RuntimeError
        _found[module] = None
        if _installed(package):
            log.warning(
                "%s is installed but %s does not load (%s: %s): %s",
                package,
                module,
                type(e).__name__,
                e,
                hint,
            )


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a parent that fails to import, or a module without a spec
        return True
