"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """The machine and software line every benchmark's JSON starts with."""
    import torch

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_before": round(os.getloadavg()[0], 2),
    }
