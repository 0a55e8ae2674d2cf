"""Top-1/top-5 accuracy on a whole shard set: every sample once, in order, nothing
dropped, whatever the number of ranks (each counts its contiguous share; the counts are
summed once at the end)."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ssl_train.data.augment import to_unit_float
from ssl_train.data.loader import make_loader
from ssl_train.data.stream import EvalStream
from ssl_train.stages.runtime import Runtime

log = logging.getLogger(__name__)


def topk_correct(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> list[int]:
    """How many rows have their label among the k highest logits, for each k.

    Example:
        >>> logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
        >>> topk_correct(logits, torch.tensor([1, 2]), ks=(1, 2))
        [1, 1]
    """
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module, data: str, image_size: int, batch_size: int, runtime: Runtime, workers: int
) -> dict[str, Any]:
    """Accuracy of ``model``'s classifier on the shard set ``data`` (centre crops).

    Example:
        >>> evaluate(model, "s3://b/imagenet/val", 224, 256, runtime, workers=4)  # doctest: +SKIP
        {'top1': 0.7391, 'top5': 0.9162, 'samples': 50000, 'corrupt': 0}
    """
    if getattr(model, "classifier", None) is None:
        raise ValueError(
            "this model has no classifier to evaluate: evaluate a finetune, "
            "linear-eval or distill run"
        )
    was_training = model.training
    model.eval()
    stream = EvalStream(data, image_size, batch_size, runtime.rank, runtime.world_size)
    counts = torch.zeros(4, dtype=torch.float64)  # top1, top5, samples, corrupt
    for batch in make_loader(stream, workers, runtime.device):
        counts[3] += len(batch.corrupt)
        if not batch.keys:
            continue
        images = to_unit_float(batch.images.to(runtime.device, non_blocking=True))
        logits = model(images).logits.float()
        top1, top5 = topk_correct(logits, batch.labels.to(runtime.device))
        counts[:3] += torch.tensor([top1, top5, len(batch.keys)], dtype=torch.float64)
    if runtime.distributed:
        reduced = counts.to(runtime.device) if runtime.device.type == "cuda" else counts
        dist.all_reduce(reduced)
        counts = reduced.cpu()
    model.train(was_training)
    top1, top5, samples, corrupt = counts.tolist()
    if corrupt:
        log.warning("evaluation skipped %d corrupt samples of %s", int(corrupt), data)
    return {
        "top1": top1 / samples if samples else 0.0,
        "top5": top5 / samples if samples else 0.0,
        "samples": int(samples),
        "corrupt": int(corrupt),
    }
