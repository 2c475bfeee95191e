"""C kernels for the CPU, compiled at first use with the machine's C compiler and loaded with ctypes.

Used where a recurrence has no matmul form and PyTorch on CPU is bound by passes over large
intermediates (Mamba-1's selective scan). The sources live in `harness/ops/csrc/`. Each is built
once per (source, precision, compiler, CPU) into a cache directory (`$HARNESS_KERNEL_CACHE`, else
`~/.cache/harness/kernels`) with `-O3 -march=native`; concurrent builders write to temporary files
and rename, so parallel jobs never load a half-written library. No compiler, a failed build, or
`HARNESS_NATIVE=0` makes `load` return None and callers fall back to their PyTorch paths (one
warning says why). Kernels parallelise with OpenMP over `torch.get_num_threads()` threads, in the
OpenMP runtime torch already loaded (see csrc/native.h); ctypes releases the
GIL during the call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# No -ffast-math: with gcc < 13 it links crtfastmath.o into the library, which flushes subnormals
# for the whole process. These flags are enough for gcc to vectorise the loops and call libmvec.
CFLAGS = [
    *os.environ.get("HARNESS_NATIVE_CFLAGS", "").split(),
    "-O3",
    "-march=native",
    "-fopenmp",  # csrc/native.h: shares the OpenMP runtime torch loaded
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fPIC",
    "-shared",
]
REALS = {torch.float32: "32", torch.float64: "64"}


def cache_dir() -> Path:
    if os.environ.get("HARNESS_KERNEL_CACHE"):
        return Path(os.environ["HARNESS_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "harness" / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and flags (a shared cache may span machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(keep)) or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _libs() -> list[str]:
    # libmvec provides the vector exp that -O3 calls on x86-64 glibc; elsewhere plain libm.
    return ["-lm", "-lmvec"] if platform.system() == "Linux" and platform.machine() == "x86_64" else ["-lm"]


@functools.cache
def load(name: str, dtype: torch.dtype) -> ctypes.CDLL | None:
    """The compiled `csrc/<name>.c` for `dtype` (float32 or float64), or None with a warning."""
    if os.environ.get("HARNESS_NATIVE", "1") == "0":
        return None
    if dtype not in REALS:
        raise ValueError(f"native kernels take float32 or float64, got {dtype}")
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found (set CC): using the PyTorch path for %s", name)
        return None
    # The key covers the shared headers too, so editing one rebuilds every kernel.
    src = "\0".join(p.read_text() for p in [CSRC / f"{name}.c", *sorted(CSRC.glob("*.h"))])
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("C compiler %s does not run (%s): using the PyTorch path for %s", cc, e, name)
        return None
    cmd = [*CFLAGS, f"-DREAL_BITS={REALS[dtype]}"]
    key = hashlib.sha256("\0".join([src, *cmd, version, _cpu_id(), *_libs()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{name}-fp{REALS[dtype]}-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # Without OpenMP (e.g. a clang without libomp) the kernel still builds, single-threaded.
        for flags in (cmd, [f for f in cmd if f != "-fopenmp"]):
            err = _build(cc, [*flags, str(CSRC / f"{name}.c")], out)
            if err is None:
                break
            log.warning("building %s with %s failed:\n%s", name, " ".join(flags), err[-2000:])
        else:
            log.warning("using the PyTorch path for %s", name)
            return None
    try:
        return ctypes.CDLL(str(out))
    except OSError as e:
        log.warning("loading %s failed (%s): using the PyTorch path", out, e)
        return None


def _build(cc: str, args: list[str], out: Path) -> str | None:
    """Compile to a temporary file and rename it into place; the compiler's errors, or None."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *args, "-o", tmp, *_libs()], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return proc.stderr or f"exit code {proc.returncode}"
        os.replace(tmp, out)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check(code: int) -> None:
    if code:
        raise MemoryError("native kernel could not allocate its work buffers")


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """Address of a contiguous tensor's data (None -> NULL)."""
    if t is None:
        return ctypes.c_void_p(None)
    assert t.is_contiguous() and t.device.type == "cpu", "native kernels take contiguous CPU tensors"
    return ctypes.c_void_p(t.data_ptr())
