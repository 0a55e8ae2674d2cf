"""How long the preemption checkpoint may take, and the windows a launch sets from it:
the grace period, torchrun's shutdown window, and the collectives' timeout.

On a preempted pod the kubelet sends SIGTERM to torchrun (the container's first process),
which forwards it to the workers and SIGKILLs them after its shutdown timeout
(``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s unless set), whatever the pod's grace period;
the kubelet SIGKILLs the whole pod when the grace period ends. The checkpoint of the step
reached must fit the smaller of the two. So a launch sets torchrun's timeout from the
grace period (less a margin for torchrun's own exit), and the grace period's default
from the checkpoint's size at a stated write speed.

The same size bounds how long one rank can keep the others waiting in a collective:
rank 0 alone reads the checkpoint a resume starts from, waits for a checkpoint's write
and writes the final model, while the others wait. NCCL gives up after 10 minutes by
default and ends the job; at the stated speed a large checkpoint on a slow store takes
longer, so the process group's timeout is set from the size too, never below torch's.
"""

from __future__ import annotations

import math
import os

from ssl_train.errors import UserError

SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
TORCHRUN_DEFAULT_SHUTDOWN_S = 30
# The speed the default assumes: one writer to S3-class storage, multipart parts of
# 32 MiB ten at a time (s3fs's concurrency). A slower store needs a longer grace period
# (`-cfg grace_period_s=...` on Kubernetes).
STATED_WRITE_BYTES_PER_S = 100e6
# Agreeing on the step, the host copy, and a handful of small requests (state, commit,
# the run dir's lease) that a slow store answers in seconds each.
FIXED_SAVE_S = 60
TORCHRUN_EXIT_MARGIN_S = 15  # torchrun's own exit after its workers', inside the grace period
MIN_GRACE_PERIOD_S = 120
COLLECTIVE_TIMEOUT_ENV = "SSL_TRAIN_COLLECTIVE_TIMEOUT_S"
TORCH_COLLECTIVE_TIMEOUT_S = 600  # NCCL's default in torch
GLOO_TIMEOUT_S = 1800  # gloo's
# A store this many times slower than stated is still a slow store, not a hang.
SLOW_STORE_FACTOR = 4


def _transfer_s(checkpoint_bytes: int) -> float:
    return FIXED_SAVE_S + checkpoint_bytes / STATED_WRITE_BYTES_PER_S


def grace_period_s(checkpoint_bytes: int | None) -> int:
    """The default grace period for a checkpoint of ``checkpoint_bytes`` (None: not
    known at launch, as for finetuning, whose network comes from the pretrained run;
    sizes from ``ssl_train.models.gpu_memory.checkpoint_bytes``).

    Example:
        >>> grace_period_s(None), grace_period_s(400_000_000), grace_period_s(10_500_000_000)
        (120, 120, 180)
    """
    if checkpoint_bytes is None:
        return MIN_GRACE_PERIOD_S
    return max(
        MIN_GRACE_PERIOD_S, math.ceil(_transfer_s(checkpoint_bytes) + TORCHRUN_EXIT_MARGIN_S)
    )


def collective_timeout_s(
    checkpoint_bytes: int | None = None, floor_s: int = TORCH_COLLECTIVE_TIMEOUT_S
) -> int:
    """How long a collective may wait for the slowest rank: ``SSL_TRAIN_COLLECTIVE_TIMEOUT_S``
    when set (the TorchX components set it in the job spec), else long enough for rank
    0 to read or write a checkpoint of ``checkpoint_bytes`` on a store
    ``SLOW_STORE_FACTOR`` times slower than stated, and never below ``floor_s`` (torch's
    own default for the backend: 10 minutes for NCCL, 30 for gloo).

    Example:
        >>> collective_timeout_s(400_000_000), collective_timeout_s(40_000_000_000)
        (600, 1840)
    """
    raw = os.environ.get(COLLECTIVE_TIMEOUT_ENV)
    if raw:
        try:
            seconds = int(raw)
        except ValueError:
            seconds = 0
        if seconds <= 0:
            raise UserError(
                f"{COLLECTIVE_TIMEOUT_ENV}={raw!r}: give a whole number of seconds above 0, "
                "or unset it for the default"
            )
        return seconds
    if checkpoint_bytes is None:
        return floor_s
    return max(floor_s, math.ceil(SLOW_STORE_FACTOR * _transfer_s(checkpoint_bytes)))


def shutdown_timeout_s(grace_s: int) -> int:
    """torchrun's window for its workers' checkpoint inside a grace period of ``grace_s``.

    Example:
        >>> shutdown_timeout_s(120)
        105
    """
    if grace_s <= TORCHRUN_EXIT_MARGIN_S:
        raise UserError(
            f"grace_period_s={grace_s}: give more than {TORCHRUN_EXIT_MARGIN_S} s, or the "
            "preemption checkpoint has no time at all"
        )
    return grace_s - TORCHRUN_EXIT_MARGIN_S


def window_s() -> float | None:
    """The seconds this worker has for its preemption checkpoint once torchrun forwards
    a SIGTERM (None: not under torchrun, nothing kills it after a set time)."""
    raw = os.environ.get(SHUTDOWN_TIMEOUT_ENV)
    if raw:
        try:
            return float(raw)
        except ValueError:
            return None
    return float(TORCHRUN_DEFAULT_SHUTDOWN_S) if "TORCHELASTIC_RUN_ID" in os.environ else None
