"""What the device can do: peak FLOP/s for MFU, and what a run reports about its machine.

MFU (model FLOPs utilisation, PaLM's definition) is the training FLOPs the accountant counts per
token (`harness.flops`, forward and backward, no rematerialisation) times tokens per second,
over the peak dense FLOP/s of every device the run holds. The peaks below are the vendors'
datasheet figures for dense math (no 2:4 sparsity), in TFLOP/s: bf16 on tensor cores, and fp32 on
the CUDA cores (TF32 tensor-core math is `tf32`). An unknown device has no MFU unless a peak is
given (`train.peak_tflops`).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from typing import Any

import torch

# (name fragment, {dtype: dense TFLOP/s}); the first fragment the device name contains wins, so
# the more specific names come first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM ("H100 80GB HBM3")
    ("GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # SXM and PCIe, 40 and 80 GB
    ("L40S", {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),  # A10 and A10G
    ("A40", {"bf16": 149.7, "tf32": 74.8, "fp32": 37.4}),
]


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The datasheet peak of `device_name` (as torch.cuda.get_device_name gives it) for `dtype`
    (bf16 | tf32 | fp32), or None for a device not in the table."""
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in device_name:
            return peaks.get(dtype)
    return None


def compute_dtype(device: torch.device) -> str:
    """The math the training loop's matmuls run in on this device: bf16 autocast on CUDA, fp32
    elsewhere."""
    if device.type == "cuda":
        return "bf16"
    return "fp32"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


def describe(device: torch.device) -> dict[str, Any]:
    """The machine a run trained on, for summary.json."""
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this process has held on `device`: allocated CUDA memory, or on the CPU
    the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
