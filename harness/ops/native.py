"""C kernels for the CPU, compiled at first use with the machine's C compiler and loaded with ctypes.

Used for the Mamba scans, where PyTorch on CPU is bound by passes over large intermediates or by
small per-step ops (csrc/selective_scan.c and csrc/ssd_scan.c say why each one gets a kernel).
Each is built once per (source and headers, precision, flags, compiler, CPU) into a cache
directory (`$HARNESS_KERNEL_CACHE`, else `$XDG_CACHE_HOME/harness/kernels`, else
`~/.cache/harness/kernels`) with `-O3 -march=native`; builders write to temporary files and
rename, so parallel jobs never load a half-written library. If the OpenMP build fails the kernel
is built single-threaded (under its own cache key). No compiler, a failed build, an unwritable
cache, or `HARNESS_NATIVE=0` makes `load` return None and callers fall back to their PyTorch paths
(one warning says why). Kernels parallelise with OpenMP over `torch.get_num_threads()` threads,
in the OpenMP runtime torch already loaded when torch uses libgomp (see csrc/native.h); ctypes
releases the GIL during the call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
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
    if os.environ.get("XDG_CACHE_HOME"):  # empty counts as unset (XDG spec)
        return Path(os.environ["XDG_CACHE_HOME"]) / "harness" / "kernels"
    return Path.home() / ".cache" / "harness" / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and flags (a shared cache may span machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(keep)) or platform.machine()


def _compiler() -> list[str] | None:
    """The C compiler command: $CC (which may hold arguments, e.g. "ccache gcc"), else cc/gcc/clang."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _libs() -> list[str]:
    # glibc's libmvec provides the vector exp that -O3 calls on x86-64 (csrc/native.h); elsewhere libm.
    glibc = platform.libc_ver()[0] == "glibc"
    return ["-lm", "-lmvec"] if glibc and platform.machine() == "x86_64" else ["-lm"]


@functools.cache
def load(name: str, dtype: torch.dtype) -> ctypes.CDLL | None:
    """The compiled `csrc/<name>.c` for `dtype` (float32 or float64), or None with a warning."""
    if dtype not in REALS:
        raise ValueError(f"native kernels take float32 or float64, got {dtype}")
    if os.environ.get("HARNESS_NATIVE", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found (set CC): using the PyTorch path for %s", name)
        return None
    try:
        return _load_or_build(name, dtype, cc)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # unwritable cache, no HOME, timeout
        log.warning("could not build or load the %s kernel (%s): using the PyTorch path", name, e)
        return None


def _load_or_build(name: str, dtype: torch.dtype, cc: list[str]) -> ctypes.CDLL | None:
    # The key covers the shared headers too, so editing one rebuilds every kernel.
    src = "\0".join(p.read_text() for p in [CSRC / f"{name}.c", *sorted(CSRC.glob("*.h"))])
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    base = [*CFLAGS, f"-DREAL_BITS={REALS[dtype]}"]
    # Without OpenMP (e.g. a clang without libomp) the kernel still builds, single-threaded.
    for flags in (base, [f for f in base if f != "-fopenmp"]):
        parts = [src, *flags, *cc, version, _cpu_id(), *_libs()]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
        out = cache_dir() / f"{name}-fp{REALS[dtype]}-{key}.so"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            err = _build(cc, [*flags, str(CSRC / f"{name}.c")], out)
            if err is not None:
                log.warning("building %s with %s failed:\n%s", name, " ".join(flags), err[-2000:])
                continue
        return ctypes.CDLL(str(out))
    log.warning("using the PyTorch path for %s", name)
    return None


def _build(cc: list[str], args: list[str], out: Path) -> str | None:
    """Compile to a temporary file and rename it into place; the compiler's errors, or None."""
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cc, *args, "-o", tmp, *_libs()], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return proc.stderr or f"exit code {proc.returncode}"
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # mkstemp makes it 0600: others sharing the cache must load it
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
