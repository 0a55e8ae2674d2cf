"""The DataLoader every stage uses around a stream: prefetching workers, pinned memory
when batches go to a GPU, and workers that live across epochs.

Streams yield whole batches (``batch_size=None``), so the loader only moves them; the
number of workers is the number of CPU cores given to decoding.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from ssl_train.errors import USER_ERRORS


def _quiet_exit(signum: int, frame: object) -> None:
    os._exit(0)


def _worker_signals(worker_id: int) -> None:
    """Stop signals, the way the training process needs them.

    SIGTERM (preemption reaches the whole process group; the DataLoader and
    multiprocessing also stop workers with it) ends a worker at once with status 0: a
    worker killed by a signal makes torch raise in the training process wherever it is,
    possibly mid-step, while a clean exit only fails a wait for data, which the trainer
    expects once it has been asked to stop. Ctrl-C is left to the training process,
    which checkpoints and then stops its workers.
    """
    signal.signal(signal.SIGTERM, _quiet_exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class _WorkerFailed:
    """A user error met in a data worker, sent to the training process as a batch would be.

    Raised in a worker, any exception reaches the training process rebuilt by torch with
    its whole worker traceback as the message: 20 to 130 lines ending in the one that
    says what to fix. Sent as data instead, it is raised there as itself, one line.
    """

    error: Exception


class _ReportUserErrors(IterableDataset):
    """The stream as the workers run it, with user errors turned into ``_WorkerFailed``."""

    def __init__(self, stream: IterableDataset) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self.stream
        except USER_ERRORS as exc:
            yield _WorkerFailed(exc)


class Loader(DataLoader):
    """A DataLoader that raises a worker's user error as the error itself."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            if isinstance(batch, _WorkerFailed):
                raise batch.error
            yield batch


def _init_worker(extra: Callable[[int], None] | None, worker_id: int) -> None:
    _worker_signals(worker_id)
    if extra is not None:
        extra(worker_id)


def make_loader(
    stream: IterableDataset,
    workers: int,
    device: torch.device | str = "cpu",
    prefetch: int = 2,
    worker_init: Callable[[int], None] | None = None,
) -> Loader:
    """Wrap a stream for training on ``device``; ``worker_init`` runs in each worker.

    Example:
        >>> from ssl_train.data.stream import EvalStream
        >>> loader = make_loader(EvalStream("s3://b/val", 224, 256, 0, 1), workers=0)
        >>> loader.pin_memory
        False
    """
    if workers < 0 or prefetch < 1:
        raise ValueError("workers must be >= 0 and prefetch >= 1")
    on_gpu = torch.device(device).type == "cuda"
    return Loader(
        _ReportUserErrors(stream),
        batch_size=None,
        num_workers=workers,
        pin_memory=on_gpu,  # page-locked batches copy to the GPU asynchronously
        prefetch_factor=prefetch if workers else None,
        persistent_workers=workers > 0,
        worker_init_fn=functools.partial(_init_worker, worker_init) if workers else None,
    )
