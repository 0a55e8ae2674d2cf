"""What a run says about its machine: a CPU quota counts, not only the cores listed."""

from __future__ import annotations

import os
from pathlib import Path

from ssl_train.machine import describe, usable_cores


def test_a_cgroup_quota_caps_the_usable_cores(tmp_path: Path) -> None:
    listed = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("50000 100000\n")  # a container started with --cpus 0.5
    assert usable_cores(str(v2)) == 0.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert usable_cores(str(v2)) == listed
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(str(v1)) == min(listed, 1.5)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores(str(v1)) == listed
    assert usable_cores(str(tmp_path / "none")) == listed


def test_the_line_names_the_cores_and_torchs_kernels() -> None:
    import torch

    line = describe()
    assert f"{usable_cores():g} core" in line
    assert f"CPU kernels {torch.backends.cpu.get_cpu_capability()}" in line
