"""How much GPU memory a stage needs per GPU, and so how few GPUs can hold a job.

The global batch stays fixed when an elastic job shrinks (that is what keeps it exact),
so each GPU's share grows as GPUs leave: the smallest world size a job may shrink to is
set by memory. Two parts, per GPU:

- state, per parameter: fp32 weights, gradients and LARS momentum, with a fourth copy
  as margin (16 bytes; ``STATE_BYTES_PER_PARAMETER``), plus a distillation teacher's
  fp32 weights;
- activations: bytes saved for the backward pass per image, measured by running the
  model's forward pass on the ``meta`` device (shapes and dtypes only, no arithmetic: a
  second even for R152 3x+SK; ``bench/scale.py`` shows it equals a real CPU pass),
  times the images each GPU holds (two views per sample when pretraining).

On top: ``BACKWARD_MARGIN`` for gradient buffers alive during backward and
``RESERVED_BYTES`` for the CUDA context, cuDNN workspaces and NCCL buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ssl_train.errors import UserError
from ssl_train.models.presets import build_model, get_preset
from ssl_train.stages import registry

# weights, gradients, momentum (fp32 each), and one copy more: DDP's buckets once held
# a second copy of the gradients; they share it now (gradient_as_bucket_view), and the
# estimate keeps the margin (4 bytes per parameter, R50: 0.1 GB)
STATE_BYTES_PER_PARAMETER = 16
TEACHER_BYTES_PER_PARAMETER = 4
MEMORY_NETWORK_BYTES_PER_PARAMETER = 4  # SimCLRv2's memory network: fp32 weights, no grads
PROJECTION_BYTES = 128 * 4  # one buffered 128-d fp32 projection
BACKWARD_MARGIN = 0.10
RESERVED_BYTES = 3 * 2**30


@lru_cache(maxsize=64)
def activation_bytes_per_image(
    preset: str, image_size: int, precision: str = "bf16", head_layers: int = 3
) -> int:
    """Bytes saved for backward per image, from a meta-device forward pass: half the
    difference between batches of 4 and 2, so weights (also saved) cancel out.

    Example:
        >>> round(activation_bytes_per_image("r50_1x_sk0", 224, "fp32") / 2**20)
        82
    """
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = build_model(preset, num_classes=1000, head_layers=head_layers, device="meta")
    model = model.to(dtype).train()
    per_batch = [
        _saved_bytes(model, torch.empty(n, 3, image_size, image_size, device="meta", dtype=dtype))
        for n in (2, 4)
    ]
    return (per_batch[1] - per_batch[0]) // 2


def _saved_bytes(model: torch.nn.Module, images: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[id(storage)] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(images)
    del output
    return sum(storages.values())


@lru_cache(maxsize=64)
def parameter_count(preset: str, head_layers: int = 3) -> int:
    """Trainable parameters of a preset's SimCLRv2 model (backbone and head)."""
    model = build_model(preset, num_classes=1000, head_layers=head_layers, device="meta")
    return sum(p.numel() for p in model.parameters())


@lru_cache(maxsize=64)
def checkpoint_bytes(
    preset: str,
    num_classes: int | None = None,
    head_layers: int = 3,
    proj_dim: int = 128,
    memory_size: int = 0,
) -> int:
    """Bytes of tensors in a training checkpoint of this network: its state dict
    (weights and batch-norm statistics), the optimizer's momentum for every parameter,
    and with SimCLRv2's memory (``memory_size`` projections) the memory network's state
    dict and its buffer. Counted on the meta device from the real modules, so nothing
    is assumed per parameter.

    Example:
        >>> round(checkpoint_bytes("r50_1x_sk0") / 2**20), round(checkpoint_bytes("r50_1x_sk0", memory_size=65536) / 2**20)
        (246, 401)
    """
    from ssl_train.contrastive_memory import ContrastiveMemory  # the module checkpoints hold

    model = build_model(preset, num_classes, head_layers, proj_dim, device="meta")
    total = _state_bytes(model) + sum(p.numel() * p.element_size() for p in model.parameters())
    if memory_size:
        total += _state_bytes(ContrastiveMemory(model, memory_size, 0.999, proj_dim))
    return total


def _state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's share of a job, in bytes."""

    state: int
    activations: int
    images: int

    @property
    def total(self) -> int:
        return int(self.state + self.activations * (1 + BACKWARD_MARGIN) + RESERVED_BYTES)


def per_gpu(
    stage: str,
    preset: str,
    image_size: int,
    global_batch_size: int,
    gpus: int,
    precision: str = "bf16",
    teacher: str | None = None,
    memory_size: int = 0,
) -> GpuMemory:
    """What each of ``gpus`` GPUs holds for one training step (with SimCLRv2's memory of
    ``memory_size`` projections: its network's weights and the buffer, no activations
    kept, since its forward pass has no backward).

    Example:
        >>> m = per_gpu("pretrain", "r50_1x_sk0", 224, 4096, 8)
        >>> m.images, round(m.total / 2**30)
        (1024, 49)
    """
    images = registry.stage(stage).views * math.ceil(global_batch_size / gpus)  # per sample
    state = STATE_BYTES_PER_PARAMETER * parameter_count(preset)
    if teacher:
        state += TEACHER_BYTES_PER_PARAMETER * parameter_count(teacher)
    if memory_size:
        state += MEMORY_NETWORK_BYTES_PER_PARAMETER * parameter_count(preset)
        state += PROJECTION_BYTES * memory_size
    return GpuMemory(
        state, images * activation_bytes_per_image(preset, image_size, precision), images
    )


def smallest_world_size(
    stage: str,
    preset: str,
    image_size: int,
    global_batch_size: int,
    gpu_memory_bytes: int,
    precision: str = "bf16",
    teacher: str | None = None,
    memory_size: int = 0,
) -> int | None:
    """The fewest GPUs whose largest share of the global batch fits
    ``gpu_memory_bytes``; None if even one image per GPU does not fit.

    Example:
        >>> smallest_world_size("pretrain", "r50_1x_sk0", 224, 4096, 80 * 2**30)  # 820 samples each
        5
    """
    for gpus in range(1, global_batch_size + 1):
        need = per_gpu(
            stage, preset, image_size, global_batch_size, gpus, precision, teacher, memory_size
        )
        if need.total <= gpu_memory_bytes:
            return gpus
    return None


def check_fits(
    stage: str,
    preset: str,
    image_size: int,
    global_batch_size: int,
    min_gpus: int,
    gpu_memory_gb: float,
    precision: str = "bf16",
    teacher: str | None = None,
    memory_size: int = 0,
) -> None:
    """Refuse a job whose smallest allowed size cannot hold the global batch.

    Example:
        >>> check_fits("pretrain", "r50_1x_sk0", 224, 4096, 2, 80)
        Traceback (most recent call last):
        ...
        ssl_train.errors.UserError: pretrain of r50_1x_sk0 at 224 px, global batch 4096: on 2 GPUs each holds 4096 images and needs about 187 GiB, more than 80 GiB; the elastic minimum must be at least 5 GPUs (raise MIN in -j MIN:MAXxGPUS, or lower --global_batch_size)
    """
    get_preset(preset)  # an unknown name is its own error
    budget = int(gpu_memory_gb * 2**30)
    need = per_gpu(
        stage, preset, image_size, global_batch_size, min_gpus, precision, teacher, memory_size
    )
    if need.total <= budget:
        return
    fewest = smallest_world_size(
        stage, preset, image_size, global_batch_size, budget, precision, teacher, memory_size
    )
    advice = (
        f"the elastic minimum must be at least {fewest} GPUs (raise MIN in -j MIN:MAXxGPUS, "
        "or lower --global_batch_size)"
        if fewest is not None
        else "no number of GPUs holds it: choose a smaller preset or image size"
    )
    raise UserError(
        f"{stage} of {preset} at {image_size} px, global batch {global_batch_size}: on "
        f"{min_gpus} GPUs each holds {need.images} images and needs about "
        f"{need.total / 2**30:.0f} GiB, more than {gpu_memory_gb:g} GiB; {advice}"
    )
