"""The CUDA code paths, checked on a machine without a GPU (``tests/fake_cuda.py``).

Every stage's task is built on ``cuda`` as a GPU rank builds it (``config.on_device``:
bf16 autocast, channels_last), and two optimizer steps run through the training loop's
own ``train_step``: forward, loss, backward, LARS, and SimCLRv2's memory update and push.
Under FakeTensorMode any CUDA/CPU mix raises, as on a GPU, and so does reading a value
back to the host, which on a GPU would make the step wait for the device. Afterwards
every tensor the step touched must be on the GPU, and the contrastive logits float32.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from fake_cuda import CUDA, fake_cuda

import ssl_train.losses
from ssl_train.export import build_from_config, model_config, save_model
from ssl_train.stages.config import StageConfig
from ssl_train.stages.loop import train_step
from ssl_train.stages.tasks import Task, build_task

CLASSES = ["ant", "bee", "cat", "dog"]
SAMPLES = 4
SIZE = 32


def _off_the_gpu(task: Task) -> list[str]:
    """Every tensor of the task's state that is not on the GPU, by name."""
    named: dict[str, torch.Tensor] = {}
    named.update({f"model.{k}": v for k, v in task.model.state_dict().items()})
    named.update(
        {f"grad.{k}": p.grad for k, p in task.model.named_parameters() if p.grad is not None}
    )
    for index, state in enumerate(task.optimizer.state.values()):
        named.update({f"optimizer.{index}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    for part, state in task.extra_state().items():  # SimCLRv2's memory
        named.update({f"{part}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    teacher = getattr(task, "teacher", None)
    if teacher is not None:
        named.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
    return [f"{name} on {t.device}" for name, t in named.items() if t.device.type != "cuda"]


def _two_steps(task: Task, views: int) -> list[dict[str, torch.Tensor]]:
    results = []
    for _ in range(2):
        images = torch.rand(views * SAMPLES, 3, SIZE, SIZE, device=CUDA)
        labels = torch.randint(0, len(CLASSES), (SAMPLES,), device=CUDA)
        results.append(train_step(task, task.model, task.model, images, labels))
    return results


@pytest.mark.parametrize("channels_last", [True, False])
def test_pretraining_with_the_memory_takes_two_steps_on_cuda_under_bf16(
    monkeypatch: pytest.MonkeyPatch, channels_last: bool
) -> None:
    """SK ResNet, head, memory and LARS on the GPU; the memory's buffer fills without a
    host read, the logits stay float32 under autocast, and nothing leaves the GPU."""
    logits_dtypes: list[torch.dtype] = []
    contrastive_logits = ssl_train.losses._contrastive_logits

    def recorded(*args, **kwargs):
        logits, targets = contrastive_logits(*args, **kwargs)
        logits_dtypes.append(logits.dtype)
        assert logits.device.type == targets.device.type == "cuda"
        return logits, targets

    monkeypatch.setattr(ssl_train.losses, "_contrastive_logits", recorded)
    config = StageConfig.for_stage(
        "pretrain", data="d", run_dir="r", preset="tiny", memory_size=20, proj_dim=16
    ).on_device("cuda")
    assert (config.precision, config.memory_size) == ("bf16", 20)
    config = dataclasses.replace(config, channels_last=channels_last)
    with fake_cuda(monkeypatch):
        task = build_task(config, CLASSES, CUDA)
        assert task.memory is not None
        steps = _two_steps(task, views=2)
        assert task.memory.negatives().shape == (2 * 2 * SAMPLES, 16)  # both steps' entries
        assert _off_the_gpu(task) == []
    assert logits_dtypes == [torch.float32] * 4  # loss and accuracy, two steps
    for metrics in steps:
        assert sorted(metrics) == ["contrastive_top1", "loss"]
        assert all(value.device.type == "cuda" for value in metrics.values())


def _saved(folder: Path, config: dict) -> str:
    save_model(build_from_config(config).state_dict(), config, str(folder))
    return str(folder)


@pytest.mark.parametrize("stage", ["finetune", "supervised", "linear-eval", "distill"])
def test_every_other_stage_takes_two_steps_on_cuda_under_bf16(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stage: str
) -> None:
    """The models they start from are read from a run's files, as on a cluster, and
    built on the GPU; the step runs under bf16 autocast with channels_last."""
    torch.manual_seed(0)
    pretrained = _saved(tmp_path / "pretrained", model_config("tiny", None, 3, 16, 0, 3))
    teacher = _saved(
        tmp_path / "teacher", {**model_config("tiny", 4, 3, 16, 1, 1), "classes": CLASSES}
    )
    sources = {
        "finetune": {"pretrained": pretrained},
        "linear-eval": {"pretrained": pretrained},
        "supervised": {"preset": "tiny"},
        "distill": {"teacher": teacher, "preset": "tiny_student"},
    }[stage]
    config = StageConfig.for_stage(stage, data="d", run_dir="r", **sources).on_device("cuda")
    assert (config.precision, config.channels_last) == ("bf16", True)
    with fake_cuda(monkeypatch):
        task = build_task(config, CLASSES, CUDA)
        steps = _two_steps(task, views=1)
        assert _off_the_gpu(task) == []
    for metrics in steps:
        assert all(value.device.type == "cuda" for value in metrics.values())


def test_the_fake_gpu_catches_what_a_real_one_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests above can fail: a CPU tensor in a CUDA computation raises, and so does
    reading a CUDA value on the host."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        FakeTensorDeviceMismatchError,
    )

    with fake_cuda(monkeypatch):
        on_gpu = torch.ones(3, 3, device=CUDA)
        with pytest.raises(FakeTensorDeviceMismatchError):
            on_gpu @ torch.ones(3, 3)
        with pytest.raises(DataDependentOutputException):
            int(on_gpu.sum())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert (on_gpu @ on_gpu).dtype == torch.bfloat16  # autocast is really on


def test_the_per_step_agreement_never_waits_for_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step all ranks agree on host flags (stop, checkpoint due, lease lost). On a
    GPU rank that is a CPU tensor over the gloo control group: an NCCL all-reduce read
    back on the host would wait for every kernel queued before it, every step."""
    import torch.distributed as dist

    from ssl_train.stages import loop
    from ssl_train.stages.runtime import Runtime

    seen: list[tuple[torch.device, object]] = []

    def all_reduce(tensor: torch.Tensor, op: object = None, group: object = None) -> None:
        seen.append((tensor.device, group))
        tensor.copy_(torch.tensor([1.0, 0.0, 0.0]))  # another rank raised the first flag

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    control = object()  # what dist.new_group(backend="gloo") returned at start
    runtime = Runtime(0, 2, 0, CUDA, control_group=control)
    assert loop._agree([False, False, False], runtime) == [True, False, False]
    assert seen == [(torch.device("cpu"), control)]
