"""Top-1/top-5 accuracy on a whole shard set: every sample once, in order, nothing
dropped, whatever the number of ranks (each counts its contiguous share; the counts are
summed once at the end)."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shards import storage
from shards.errors import ShardsError
from shards.manifest import Manifest, read_manifest
from ssl_train.data.augment import to_unit_float
from ssl_train.data.loader import make_loader
from ssl_train.data.stream import EvalStream
from ssl_train.errors import UserError
from ssl_train.stages import progress
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


def first_difference(theirs: list[str], ours: list[str]) -> int:
    """The first class index where two class lists differ (the shorter one's length when
    one extends the other): what a refusal names so the user can find the mismatch.

    Example:
        >>> first_difference(["cat", "dog"], ["cat", "eel"]), first_difference(["a"], ["a", "b"])
        (1, 1)
    """
    pairs = enumerate(zip(theirs, ours, strict=False))
    return next((i for i, (a, b) in pairs if a != b), min(len(theirs), len(ours)))


def check_eval_data(data: str, classes: list[str] | None, flag: str = "--eval-data") -> Manifest:
    """Open the evaluation shard set's manifest now, in this process, so that a wrong
    path, an unreachable endpoint or another label set is one clear line before any work
    (a training stage checks this before its first step, not after its last).

    ``classes`` are the labels the model's classifier was trained on, in order: an
    evaluation set whose class list differs would score the wrong logits.

    Example:
        >>> check_eval_data("s3://b/imagenet/val", ["n01440764", ...])  # doctest: +SKIP
    """
    try:
        manifest = read_manifest(data)
    except ShardsError as exc:
        raise UserError(f"{flag}: {exc}") from None
    if manifest.classes is None:
        raise UserError(
            f"{flag} {storage.redact(data)} is unlabeled (its manifest lists no classes): "
            "evaluation needs labels; shard labelled images (shards create SRC DEST --labels FILE)"
        )
    if classes is not None and manifest.classes != list(classes):
        theirs, ours = manifest.classes, list(classes)
        differ = first_difference(theirs, ours)
        raise UserError(
            f"{flag} {storage.redact(data)}: its {len(theirs)} classes are not the model's "
            f"{len(ours)} in the same order (first difference at class {differ}); evaluate on "
            "a shard set made with the training set's class list"
        )
    return manifest


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: str,
    image_size: int,
    batch_size: int,
    runtime: Runtime,
    workers: int,
    classes: list[str] | None = None,
    flag: str = "--data",
    stage: str = "eval",
) -> dict[str, Any]:
    """Accuracy of ``model``'s classifier on the shard set ``data`` (centre crops);
    ``classes``, when known, are the model's labels, checked against the data's (an
    error names ``data`` by ``flag``). Rank 0 reports its progress about ten times, as
    ``stage``'s progress lines.

    Example:
        >>> evaluate(model, "s3://b/imagenet/val", 224, 256, runtime, workers=4)  # doctest: +SKIP
        {'top1': 0.7391, 'top5': 0.9162, 'samples': 50000, 'corrupt': 0}
    """
    if getattr(model, "classifier", None) is None:
        raise UserError(
            "this model has no classifier to evaluate: evaluate a finetune, "
            "linear-eval or distill run"
        )
    total = check_eval_data(data, classes, flag).num_samples
    rank, world = runtime.rank, runtime.world_size
    share = (rank + 1) * total // world - rank * total // world  # as EvalStream splits
    report_every, reported = max(1, share // 10), 0
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
        done = int(counts[2] + counts[3])
        if runtime.is_main and done - reported >= report_every and done < share:
            reported = done
            whose = "" if runtime.world_size == 1 else " of rank 0's share"
            progress.say(stage, f"eval {done}/{share} samples{whose}")
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
