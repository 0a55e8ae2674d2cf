"""GPU memory per rank against the world size: the meta-device measurement is the real
one, the smallest world size really is the smallest that fits, and the components refuse
an elastic minimum that cannot hold the global batch (checked on the dry-run job)."""

from __future__ import annotations

import pytest
import torch

from ssl_train.models.gpu_memory import (
    activation_bytes_per_image,
    per_gpu,
    smallest_world_size,
)
from ssl_train.models.presets import build_model


def _saved_on_cpu(model: torch.nn.Module, batch: int, image_size: int) -> int:
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = model(torch.randn(batch, 3, image_size, image_size))
    output.projection.sum().backward()  # the pass really trains
    return sum(storages.values())


def _real_cpu_bytes(preset: str, image_size: int) -> int:
    """Saved-for-backward bytes per image of a real CPU forward pass (random images)."""
    model = build_model(preset, num_classes=10).train()
    return (_saved_on_cpu(model, 4, image_size) - _saved_on_cpu(model, 2, image_size)) // 2


@pytest.mark.parametrize("preset, size", [("tiny", 32), ("r50_1x_sk0", 64)])
def test_the_meta_measurement_is_what_a_real_cpu_pass_saves(preset: str, size: int) -> None:
    measured = activation_bytes_per_image(preset, size, "fp32")
    assert measured == _real_cpu_bytes(preset, size)
    assert activation_bytes_per_image(preset, size, "bf16") < 0.6 * measured  # half, roughly


def test_the_smallest_world_size_is_the_first_that_fits() -> None:
    """Any world size works (shares differ by one), so the first that holds its largest
    share, whether or not it divides the global batch."""
    budget = 80 * 2**30
    fewest = smallest_world_size("pretrain", "r152_3x_sk1", 224, 4096, budget)
    assert fewest is not None and 4096 % fewest != 0  # 47: no divisor of 4096
    assert per_gpu("pretrain", "r152_3x_sk1", 224, 4096, fewest).total <= budget
    assert per_gpu("pretrain", "r152_3x_sk1", 224, 4096, fewest - 1).total > budget
    # half the memory needs more GPUs; the same preset finetuned (one view) needs fewer
    assert smallest_world_size("pretrain", "r152_3x_sk1", 224, 4096, budget // 2) > fewest
    assert smallest_world_size("supervised", "r152_3x_sk1", 224, 4096, budget) < fewest


def test_a_component_refuses_an_elastic_minimum_whose_gpus_cannot_hold_the_batch() -> None:
    """R152 3x+SK pretraining at 4096 on 2 nodes of 8 GPUs would give each GPU 512 images:
    the component says how many GPUs it needs; at that minimum it builds the job, and a
    job without GPUs is not checked (host memory is not a GPU's)."""
    from ssl_train import components

    # the component's pretraining keeps SimCLRv2's memory (65,536 entries) by default
    fewest = smallest_world_size(
        "pretrain", "r152_3x_sk1", 224, 4096, 80 * 2**30, memory_size=65536
    )
    nodes = -(-fewest // 8)  # 8-GPU nodes that hold it: any world size trains the batch
    common = {"data": "s3://b/train", "run_dir": "s3://b/runs/p", "preset": "r152_3x_sk1"}
    with pytest.raises(ValueError, match=f"the elastic minimum must be at least {fewest} GPUs"):
        components.pretrain(**common, j="2:16x8", gpu=8)
    app = components.pretrain(**common, j=f"{nodes}:{nodes + 3}x8", gpu=8)
    assert (app.roles[0].min_replicas, app.roles[0].num_replicas) == (nodes, nodes + 3)
    components.pretrain(**common, j="1:2x8")  # CPU processes
    with pytest.raises(ValueError, match="at least"):  # a 40 GiB card needs more of them
        components.pretrain(**common, j=f"{nodes}x8", gpu=8, gpu_memory_gb=40)
