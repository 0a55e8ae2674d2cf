"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
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


def process_cpu_seconds(pid: int) -> float:
    """CPU-seconds (user + system, all its threads) a running process has used so far;
    0.0 once it is gone.

    Example:
        >>> process_cpu_seconds(os.getpid()) > 0
        True
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def report_ab(
    bench: str, what: str, labels: tuple[str, str], a: list[float], b: list[float], settings: Any
) -> None:
    """Print an interleaved A/B comparison: each side's median and runs, the median and
    range of the per-pair ratios a/b, then the JSON line (the last line).

    Example:
        >>> report_ab("x", "memory", ("on", "off"), [2.0], [1.0], {})  # doctest: +ELLIPSIS
        memory ...
    """
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    ratio = statistics.median(ratios)
    print(f"{what:8} {'CPU s/step (median)':>20} runs")
    for label, runs in zip(labels, (a, b), strict=True):
        print(f"{label:8} {statistics.median(runs):>20.4f} {', '.join(f'{x:.4f}' for x in runs)}")
    print(
        f"ratio {labels[0]}/{labels[1]}: median {ratio:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}"
    )
    print(
        json.dumps(
            {
                "bench": bench,
                "machine": machine_info(),
                "settings": settings,
                "cpu_s_per_step": dict(zip(labels, (a, b), strict=True)),
                "ratios": [round(r, 4) for r in ratios],
                "median_ratio": round(ratio, 4),
            }
        )
    )


def status_kib(field: str) -> int:
    """A field of this process's /proc/self/status in KiB (VmRSS, VmHWM: the peak RSS).

    Example:
        >>> status_kib("VmRSS") > 0
        True
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)
