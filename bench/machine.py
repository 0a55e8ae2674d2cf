"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from typing import Any

from ssl_train.machine import cpu_model, usable_cores


def machine_info() -> dict[str, Any]:
    """The machine and software line every benchmark's JSON starts with."""
    import torch

    return {
        "nproc": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_before": round(os.getloadavg()[0], 2),
    }


def child_cpu_seconds(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """CPU-seconds (user + system) of a command and the children it waited for: what the
    work cost, whatever the shared machine's neighbours do to its wall time.

    Example:
        >>> child_cpu_seconds(["true"]) >= 0
        True
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
