"""What the demo and the benchmarks say about the machine they ran on.

The same recipe takes 11 minutes on one 2-core machine and much longer on another (other
float kernels, a CPU quota, fewer cores than the CPU reports), so a run's output names
what it ran on: a slow run can then be told apart from a stalled one.
"""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows elsewhere).

    Example:
        >>> isinstance(cpu_model(), str)
        True
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores(cgroup: str = "/sys/fs/cgroup") -> float:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota
    (a container's ``--cpus``), which ``os.cpu_count()`` does not see.

    Example:
        >>> usable_cores() >= 0.01
        True
    """
    cores = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    v2, v1 = os.path.join(cgroup, "cpu.max"), os.path.join(cgroup, "cpu")
    quota = _cgroup2_quota(v2) if os.path.exists(v2) else _cgroup1_quota(v1)
    return cores if quota is None else min(cores, quota)


def _cgroup2_quota(path: str) -> float | None:
    try:
        with open(path) as f:
            limit, period = f.read().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        return None


def _cgroup1_quota(folder: str) -> float | None:
    try:
        with open(os.path.join(folder, "cpu.cfs_quota_us")) as f:
            limit = int(f.read())
        with open(os.path.join(folder, "cpu.cfs_period_us")) as f:
            period = int(f.read())
    except (OSError, ValueError):
        return None
    return None if limit <= 0 else limit / period


def describe() -> str:
    """One line for a run's output: CPU, usable cores, torch's CPU kernels.

    Example:
        >>> "cores" in describe()
        True
    """
    import torch

    cores = usable_cores()
    shown = f"{cores:g} core{'s' if cores != 1 else ''}"
    kernels = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model()}, {shown} usable, torch {torch.__version__} CPU kernels {kernels}"
