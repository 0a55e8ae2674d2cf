"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform
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
