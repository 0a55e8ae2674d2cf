"""The DataLoader every stage uses around a stream: prefetching workers, pinned memory
when batches go to a GPU, and workers that live across epochs.

Streams yield whole batches (``batch_size=None``), so the loader only moves them; the
number of workers is the number of CPU cores given to decoding.
"""

from __future__ import annotations

import os
import signal

import torch
from torch.utils.data import DataLoader, IterableDataset


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


def make_loader(
    stream: IterableDataset, workers: int, device: torch.device | str = "cpu", prefetch: int = 2
) -> DataLoader:
    """Wrap a stream for training on ``device``.

    Example:
        >>> from ssl_train.data.stream import EvalStream
        >>> loader = make_loader(EvalStream("s3://b/val", 224, 256, 0, 1), workers=0)
        >>> loader.pin_memory
        False
    """
    if workers < 0 or prefetch < 1:
        raise ValueError("workers must be >= 0 and prefetch >= 1")
    on_gpu = torch.device(device).type == "cuda"
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=on_gpu,  # page-locked batches copy to the GPU asynchronously
        prefetch_factor=prefetch if workers else None,
        persistent_workers=workers > 0,
        worker_init_fn=_worker_signals if workers else None,
    )
