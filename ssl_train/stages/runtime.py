"""Where a stage runs: one process or torchrun's ranks, which device, and preemption.

The same command runs under plain ``python``, ``torchrun`` (any nodes x processes) and
TorchX: torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``...) selects the distributed path; without it the run is one process.
GPUs talk over NCCL, CPUs over gloo.
"""

from __future__ import annotations

import logging
import os
import signal
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ssl_train.errors import UserError
from ssl_train.stages.config import check_device_flag

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start(device: str | None = None) -> Runtime:
    """Join torchrun's process group when launched by it; pick this rank's device.

    Example:
        >>> runtime = start("cpu")  # a plain process
        >>> runtime.rank, runtime.world_size, runtime.device.type
        (0, 1, 'cpu')
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        store, rank, world = next(dist.rendezvous("env://"))
        dist.init_process_group(
            backend,
            store=_store_for_this_attempt(store, world),
            rank=rank,
            world_size=world,
            device_id=chosen if chosen.type == "cuda" else None,
        )
    return Runtime(rank, world, local_rank, chosen)


def pick_device(device: str | None, local_rank: int = 0) -> torch.device:
    """The device of this rank: ``--device`` or the GPU when one is visible; a rank of
    torchrun takes the GPU of its local rank unless an index is given.

    Example:
        >>> pick_device("cpu")
        device(type='cpu')
    """
    check_device_flag(device)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {device}: this machine has no usable CUDA GPU (no NVIDIA driver or "
                "device is visible to torch); use --device cpu, or run where a GPU is"
            )
        if chosen.index is None:
            chosen = torch.device("cuda", local_rank)
        if chosen.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {device}: GPU {chosen.index} does not exist here "
                f"({torch.cuda.device_count()} visible); check CUDA_VISIBLE_DEVICES and "
                "--nproc-per-node"
            )
        torch.cuda.set_device(chosen)
    return chosen


def _store_for_this_attempt(store: dist.Store, world: int) -> dist.Store:
    """Keep a restarted worker group from reading its predecessor's addresses.

    torchrun shares its rendezvous store with the workers by default and keeps it across
    restarts, so the keys the dead group published (gloo/NCCL peer addresses) are still
    there when the new group starts: a rank can connect to a dead peer's port and fail
    (pytorch/pytorch#135712). On one node every worker is restarted together and sees the
    same TORCHELASTIC_RESTART_COUNT, which makes a safe key prefix. Across nodes that
    count can differ, so there the fix is torchrun's own: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    (the TorchX components set it), which gives every rendezvous round a fresh store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store  # a fresh store per round, or no torchrun at all
    if int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == world:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return dist.PrefixStore(f"ssl-train/attempt-{attempt}", store)
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get("RANK") == "0":
        log.warning(
            "torchrun shares its store with the workers across restarts: set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun so that restarted workers connect"
        )
    return store


def stop(runtime: Runtime) -> None:
    """Leave the process group cleanly (a no-op for one process)."""
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


class StopRequest:
    """Turns SIGTERM (preemption; torchrun forwards it to every worker) and SIGINT into a
    flag that the training loop checks between steps, so the run saves a checkpoint at a
    step boundary instead of dying mid-step.

    Example:
        >>> with StopRequest() as request:
        ...     request.signal_name is None
        True
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.signal_name is None:
            log.warning(
                "%s received: saving a checkpoint at the next step", signal.Signals(signum).name
            )
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
