"""Which device a rank trains on, and the one line it stops with when the GPU it was
asked for (or the one the machine has) cannot be used: a GPU job must never fall back
to training on the CPU in silence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssl_train.errors import UserError
from ssl_train.stages import runtime

# /proc/driver/nvidia/version as two driver generations write it
OLD_DRIVER = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)
NEW_DRIVER = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 07:09:45 UTC 2025\n"
)


def test_the_driver_version_is_read_as_both_generations_write_it(tmp_path: Path) -> None:
    for text, version in ((OLD_DRIVER, "535.104.05"), (NEW_DRIVER, "580.65.06")):
        (tmp_path / "version").write_text(text)
        assert runtime.nvidia_driver_version(str(tmp_path / "version")) == version
    assert runtime.nvidia_driver_version(str(tmp_path / "missing")) is None


def test_each_reason_says_what_to_change() -> None:
    old = runtime.cuda_unavailable_reason(driver="535.104.05", build="13.0")
    assert "535.104.05" in old and "CUDA 13.0" in old and "580.65.06 or newer" in old
    assert "upgrade the driver" in old and torch.__version__ in old
    # the same driver suits a CUDA 12 build: then the GPU itself is what is missing
    invisible = runtime.cuda_unavailable_reason(driver="535.104.05", build="12.8")
    assert "no GPU is visible" in invisible and "--gpu N" in invisible
    none = runtime.cuda_unavailable_reason(driver=None, build="13.0")
    assert "no NVIDIA driver is loaded" in none and "580.65.06" in none
    cpu_build = runtime.cuda_unavailable_reason(driver="580.65.06", build=None)
    assert "CPU-only build" in cpu_build


@pytest.mark.skipif(torch.cuda.is_available(), reason="a usable GPU is here")
def test_a_machine_with_a_driver_torch_cannot_use_refuses_instead_of_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --device: a GPU machine whose driver is too old for this torch used to train on
    its CPU without a word."""
    assert runtime.pick_device(None).type == "cpu"  # no driver here: the CPU, as asked
    (tmp_path / "version").write_text(OLD_DRIVER)
    monkeypatch.setattr(runtime, "NVIDIA_DRIVER_FILE", str(tmp_path / "version"))
    with pytest.raises(UserError, match="NVIDIA driver but torch cannot use its GPU") as info:
        runtime.pick_device(None)
    assert "535.104.05" in str(info.value) and "--device cpu" in str(info.value)
    assert runtime.pick_device("cpu").type == "cpu"  # the way out it names
    with pytest.raises(UserError, match=r"--device cuda: the NVIDIA driver here is 535\.104\.05"):
        runtime.pick_device("cuda")
