"""Where a stage runs: one process or torchrun's ranks, which device, and preemption.

The same command runs under plain ``python``, ``torchrun`` (any nodes x processes) and
TorchX: torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``...) selects the distributed path; without it the run is one process.
GPUs talk over NCCL, CPUs over gloo.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import signal
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

from ssl_train.errors import UserError
from ssl_train.preemption import collective_timeout_s
from ssl_train.stages.config import check_device_flag

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # gloo group for the loop's per-step agreements on host values (stop, checkpoint
    # due): on NCCL, reading a collective's result waits for every kernel queued before
    # it, so each step would wait for the previous one to finish on the GPU. None: the
    # default group (gloo already, or one process)
    control_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


GLOO_LAZY_INIT_ENV = "TORCH_GLOO_LAZY_INIT"  # torch's switch; a user's 0 is kept


def start(device: str | None = None, checkpoint_bytes: int | None = None) -> Runtime:
    """Join torchrun's process group when launched by it; pick this rank's device. The
    group's collectives wait as long as rank 0 may need for a checkpoint of
    ``checkpoint_bytes`` (``ssl_train.preemption.collective_timeout_s``).

    Example:
        >>> runtime = start("cpu")  # a plain process
        >>> runtime.rank, runtime.world_size, runtime.device.type
        (0, 1, 'cpu')
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    control = None
    if world > 1 and not dist.is_initialized():
        # gloo connects every pair of ranks when a group is made unless a pair is to
        # connect on its first use: at 1,024 ranks that is about 2M requests and 8 GB
        # through rank 0's store on every restart, for groups whose ring collectives
        # talk to two neighbours (bench/rendezvous.py --gloo-ranks; BENCHMARKS.md)
        os.environ.setdefault(GLOO_LAZY_INIT_ENV, "1")
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        floor = default_pg_nccl_timeout if backend == "nccl" else default_pg_timeout
        seconds = collective_timeout_s(checkpoint_bytes, int(floor.total_seconds()))
        timeout = datetime.timedelta(seconds=seconds)
        store, rank, world = next(dist.rendezvous("env://"))
        dist.init_process_group(
            backend,
            store=_store_for_this_attempt(store, world),
            rank=rank,
            world_size=world,
            device_id=chosen if chosen.type == "cuda" else None,
            timeout=timeout,
        )
        if backend != "gloo":
            control = dist.new_group(backend="gloo", timeout=timeout)
        # a marker for the time a restart costs (bench/node_loss.py): imports and
        # rendezvous are behind this rank now, its model and checkpoint ahead
        log.info("rank %d of %d joined the process group (%s, %s)", rank, world, backend, chosen)
    return Runtime(rank, world, local_rank, chosen, control)


def pick_device(device: str | None, local_rank: int = 0) -> torch.device:
    """The device of this rank: ``--device`` or the GPU when one is visible; a rank of
    torchrun takes the GPU of its local rank unless an index is given.

    Example:
        >>> pick_device("cpu")
        device(type='cpu')
    """
    check_device_flag(device)
    if device is None:
        if not torch.cuda.is_available() and nvidia_driver_version() is not None:
            # a GPU machine whose GPU torch cannot use: training on its CPU instead would
            # look like a working job that is a hundred times too slow
            raise UserError(
                f"this machine has an NVIDIA driver but torch cannot use its GPU: "
                f"{cuda_unavailable_reason(nvidia_driver_version(), torch.version.cuda)}; or "
                "pass --device cpu to train on the CPU"
            )
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            reason = cuda_unavailable_reason(nvidia_driver_version(), torch.version.cuda)
            raise UserError(f"--device {device}: {reason}")
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


# The oldest Linux driver each CUDA major version runs on (NVIDIA's minor-version
# compatibility floor, CUDA Toolkit release notes, table 3).
DRIVER_FLOOR = {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}
NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"


def nvidia_driver_version(path: str | None = None) -> str | None:
    """The loaded NVIDIA kernel driver's version (from ``NVIDIA_DRIVER_FILE`` unless
    ``path``), None when no driver is loaded.

    Example:
        >>> nvidia_driver_version("/nonexistent")  # no driver
    """
    try:
        with open(path or NVIDIA_DRIVER_FILE, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    found = re.search(r"\b(\d{3,}\.\d+(?:\.\d+)?)\b", text)
    return found.group(1) if found else "unknown"


def cuda_unavailable_reason(driver: str | None, build: str | None) -> str:
    """Why torch sees no CUDA GPU, in words that say what to change, given the loaded
    driver's version (``nvidia_driver_version()``; None: none loaded) and the CUDA
    version torch was built for (``torch.version.cuda``; None: a CPU-only build).

    Example:
        >>> cuda_unavailable_reason(driver="535.104.05", build="13.0")  # doctest: +ELLIPSIS
        'the NVIDIA driver here is 535.104.05, and this torch (... built for CUDA 13.0) needs driver 580.65.06 or newer: upgrade the driver, or install a torch built for an older CUDA (README: GPUs)'
    """
    if build is None:
        return (
            f"this torch ({torch.__version__}) is a CPU-only build: install its CUDA build "
            "(README: GPUs)"
        )
    this = f"this torch ({torch.__version__} built for CUDA {build})"
    floor = DRIVER_FLOOR.get(build.split(".")[0])
    if driver is None:
        return (
            f"no NVIDIA driver is loaded on this machine ({NVIDIA_DRIVER_FILE} is missing); "
            f"{this} needs driver {floor or 'for CUDA ' + build} or newer; run where a GPU "
            "is, or use --device cpu"
        )
    if floor is not None and _version(driver) < _version(floor):
        return (
            f"the NVIDIA driver here is {driver}, and {this} needs driver {floor} or "
            "newer: upgrade the driver, or install a torch built for an older CUDA "
            "(README: GPUs)"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (
        f"the NVIDIA driver here ({driver}) suits {this}, but no GPU is visible to it"
        + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
        + ": give the job a GPU (Kubernetes: --gpu N), or use --device cpu"
    )


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


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
