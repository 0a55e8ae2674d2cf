"""How long the preemption checkpoint may take, and the windows a launch sets from it.

On a preempted pod the kubelet sends SIGTERM to torchrun (the container's first process),
which forwards it to the workers and SIGKILLs them after its shutdown timeout
(``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s unless set), whatever the pod's grace period;
the kubelet SIGKILLs the whole pod when the grace period ends. The checkpoint of the step
reached must fit the smaller of the two. So a launch sets torchrun's timeout from the
grace period (less a margin for torchrun's own exit), and the grace period's default
from the checkpoint's size at a stated write speed.
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
CHECKPOINT_BYTES_PER_PARAMETER = 8  # fp32 weights and the optimizer's momentum
# Agreeing on the step, the host copy, and a handful of small requests (state, commit,
# the run dir's lease) that a slow store answers in seconds each.
FIXED_SAVE_S = 60
TORCHRUN_EXIT_MARGIN_S = 15  # torchrun's own exit after its workers', inside the grace period
MIN_GRACE_PERIOD_S = 120


def grace_period_s(parameters: int | None) -> int:
    """The default grace period for a model of ``parameters`` (None: not known at launch,
    as for finetuning, whose network comes from the pretrained run).

    Example:
        >>> grace_period_s(None), grace_period_s(25_000_000), grace_period_s(800_000_000)
        (120, 120, 139)
    """
    if parameters is None:
        return MIN_GRACE_PERIOD_S
    write_s = parameters * CHECKPOINT_BYTES_PER_PARAMETER / STATED_WRITE_BYTES_PER_S
    return max(MIN_GRACE_PERIOD_S, math.ceil(FIXED_SAVE_S + write_s + TORCHRUN_EXIT_MARGIN_S))


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
