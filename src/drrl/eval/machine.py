"""One machine stamp for every report and benchmark: the GPU's name, or the CPU with its threads and torch."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str | None = None) -> str:
    """``"NVIDIA H100 80GB HBM3"`` on CUDA; on the CPU its name, the threads torch uses and torch's version,
    e.g. ``"AMD EPYC 7B13, 2 threads, torch 2.13.0+cpu"``."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
