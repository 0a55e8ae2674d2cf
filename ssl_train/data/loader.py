"""The DataLoader every stage uses around a stream: prefetching workers, pinned memory
when batches go to a GPU, and workers that live across epochs.

Streams yield whole batches (``batch_size=None``), so the loader only moves them; the
number of workers is the number of CPU cores given to decoding.
"""

from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader, IterableDataset


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the training process, which checkpoints at the
    next step and then stops them; dying first would fail the batch it is waiting for.
    They still exit with their parent (the DataLoader's watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
        worker_init_fn=_ignore_stop_signals if workers else None,
    )
