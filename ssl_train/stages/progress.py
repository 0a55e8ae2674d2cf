"""The lines a stage writes for people, and for ``ssl-train pipeline --follow``.

Rank 0 writes them through the ``ssl_train.progress`` logger, each starting with the tag
``[ssl-train STAGE]``, so a reader finds them with ``PROGRESS_PATTERN`` whatever the log
format around them:

    [ssl-train pretrain] start: 160 samples (4 classes) of /data/train; 100 steps (10 epochs of 10) from step 0; global batch 16 on 2 ranks (8 each); cpu fp32; run dir /runs/p
    [ssl-train pretrain] step 10/100 epoch 0 loss 11.9880 contrastive_top1 0.000 lr 0.3 130.1 samples/s eta 0:01:05
    [ssl-train finetune] eval 2560/25000 samples of rank 0's share
    [ssl-train pretrain] finished: 100 steps; model in /runs/p/final
"""

from __future__ import annotations

import json
import logging
import math
import re
import time

PROGRESS_LOGGER = "ssl_train.progress"
PROGRESS_PATTERN = r"\[ssl-train [a-z-]+\] "  # what `ssl-train pipeline --follow` echoes

_log = logging.getLogger(PROGRESS_LOGGER)


def say(stage: str, text: str) -> None:
    """Write one progress line of ``stage``.

    Example:
        >>> say("pretrain", "start: ...")  # logs "[ssl-train pretrain] start: ..."
    """
    _log.info("[ssl-train %s] %s", stage, text)


def text_of(line: str) -> str:
    """What a progress line says, without the log format and tag around it.

    Example:
        >>> text_of("2026-12-01 10:00:00 INFO ssl_train.progress: [ssl-train pretrain] step 5/20")
        'step 5/20'
    """
    return re.split(PROGRESS_PATTERN, line, maxsplit=1)[-1]


def eta(remaining_steps: int, seconds_per_step: float) -> str:
    """Time left as ``H:MM:SS`` at the pace so far.

    Example:
        >>> eta(90, 0.5), eta(0, 1.0), eta(5, float("nan"))
        ('0:00:45', '0:00:00', '?')
    """
    if not math.isfinite(seconds_per_step):
        return "?"
    seconds = round(max(0, remaining_steps) * seconds_per_step)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


PROGRESS_FILE = "progress.json"
PROGRESS_EVERY_S = 30.0  # one small write per half minute at most, whatever the step rate


class ProgressRecord:
    """Where a running stage stands, for readers elsewhere (``ssl-train pipeline
    status``): ``RUN_DIR/progress.json`` with the step, total steps, epoch and ETA of
    rank 0's last progress line, written at most every ``PROGRESS_EVERY_S`` seconds.
    Not part of what a resume reads, and so not fenced by the run dir's lease.

    Example:
        >>> record = ProgressRecord("/tmp/ssl-train-progress-doc", "pretrain")
        >>> record.update(10, 100, 0, 45.0, now=1000.0)
        >>> read_progress("/tmp/ssl-train-progress-doc")["step"]
        10
    """

    def __init__(self, run_dir: str, stage: str) -> None:
        self.run_dir, self.stage = run_dir, stage
        self.written = -math.inf

    def update(
        self, step: int, total_steps: int, epoch: int, eta_s: float, now: float | None = None
    ) -> None:
        from shards import storage
        from shards.errors import ShardsError

        now = time.time() if now is None else now
        if now - self.written < PROGRESS_EVERY_S and step < total_steps:
            return
        body = {
            "stage": self.stage,
            "step": step,
            "total_steps": total_steps,
            "epoch": epoch,
            "eta_s": eta_s if math.isfinite(eta_s) else None,
            "updated": now,
        }
        try:
            storage.write_bytes_atomic(
                storage.join(self.run_dir, PROGRESS_FILE), json.dumps(body).encode() + b"\n"
            )
        except (OSError, ShardsError) as exc:  # a record for readers: never stops training
            logging.getLogger(__name__).warning("could not write %s: %s", PROGRESS_FILE, exc)
            return
        self.written = now


def read_progress(run_dir: str) -> dict | None:
    """A run dir's last progress record, or None (not started, or an older version)."""
    from shards import storage

    url = storage.join(run_dir, PROGRESS_FILE)
    if storage.size_or_none(url) is None:
        return None
    return json.loads(storage.read_bytes(url))
