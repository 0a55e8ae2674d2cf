"""Resume every rank from one read of the checkpoint: rank 0 loads it from storage and
sends it to the others over the process group.

A restart on 1,024 GPUs that let each rank fetch its own copy of a 6.4 GB checkpoint
would pull 6.5 TB from object storage; broadcasting moves the same bytes over the
cluster's own network (NCCL's pipelined broadcast on GPUs) and reads storage once.
Nothing is pickled on the way: the state's structure travels as the same JSON skeleton
a checkpoint's ``state.json`` holds, and the tensors as raw bytes in bounded chunks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from shards import storage
from shards.errors import ShardsError
from ssl_train.checkpoint import CheckpointError, CheckpointStore, flatten_state, unflatten_state

# Bytes per broadcast call: bounds the extra device or host memory a transfer needs.
CHUNK_BYTES = 256 * 2**20


def load_latest_once(store: CheckpointStore, device: torch.device) -> tuple[int, dict] | None:
    """The newest complete checkpoint's step and state on every rank (None for a fresh
    run), read from storage by rank 0 only. ``device`` carries the transfer: the rank's
    GPU under NCCL, the CPU under gloo. Without a process group it is ``store``'s own.

    A checkpoint rank 0 cannot read raises the same :class:`CheckpointError` on every
    rank, so no rank waits for bytes that will never come.

    Example:
        >>> import tempfile
        >>> store = CheckpointStore(tempfile.mkdtemp())
        >>> _ = store.save(5, {"w": torch.ones(2)})
        >>> load_latest_once(store, torch.device("cpu"))
        (5, {'w': tensor([1., 1.])})
    """
    if not _distributed():
        step = store.latest()
        return None if step is None else (step, store.load(step))
    state: dict | None = None
    header: dict[str, Any] = {"step": None, "error": None}
    if dist.get_rank() == 0:
        try:
            step = store.latest()
            if step is not None:
                state = store.load(step)
                header["step"] = step
        except CheckpointError as exc:
            header["error"] = str(exc)
    step, state = broadcast_state(header, state, device)
    return None if step is None else (step, state)


def read_bytes_once(url: str, device: torch.device) -> bytes:
    """``storage.read_bytes(url)`` on every rank, fetched by rank 0 only (a pretrained
    model or a teacher that every rank of a job starts from). A read that fails on
    rank 0 raises the same error everywhere.

    Example:
        >>> read_bytes_once("/etc/hostname", torch.device("cpu")) != b""
        True
    """
    if not _distributed():
        return storage.read_bytes(url)
    rank = dist.get_rank()
    data, header = b"", {"error": None}
    if rank == 0:
        try:
            data = storage.read_bytes(url)
        except ShardsError as exc:
            header["error"] = str(exc)
        header["bytes"] = len(data)
    header = _broadcast_json(header if rank == 0 else None, device)
    if header["error"] is not None:
        raise ShardsError(header["error"])
    buffer = bytearray(data) if rank == 0 else bytearray(header["bytes"])
    if buffer:
        _broadcast_bytes([torch.frombuffer(buffer, dtype=torch.uint8)], rank == 0, device)
    return bytes(buffer)


def transfer_device(device: torch.device | str) -> torch.device:
    """Where a collective's buffers live: NCCL moves GPU memory, gloo CPU memory.

    Example:
        >>> transfer_device("cpu")
        device(type='cpu')
    """
    device = torch.device(device)
    return device if device.type == "cuda" else torch.device("cpu")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_state(
    header: dict[str, Any], state: dict | None, device: torch.device
) -> tuple[int | None, dict]:
    """Send rank 0's ``header`` ({"step", "error"}) and ``state`` to every rank."""
    rank = dist.get_rank()
    tensors: dict[str, torch.Tensor] = {}
    if rank == 0:
        if state is not None:
            tensors, header["skeleton"] = flatten_state(state)
        header["tensors"] = [[name, str(t.dtype), list(t.shape)] for name, t in tensors.items()]
    header = _broadcast_json(header if rank == 0 else None, device)
    if header["error"] is not None:
        raise CheckpointError(header["error"])
    if header["step"] is None:
        return None, {}
    if rank != 0:
        tensors = {
            name: torch.empty(shape, dtype=_dtype(dtype))
            for name, dtype, shape in header["tensors"]
        }
    _broadcast_bytes([_bytes_of(t) for t in tensors.values()], rank == 0, device)
    state = state if rank == 0 else unflatten_state(header["skeleton"], tensors)
    return int(header["step"]), state


def _broadcast_json(value: dict | None, device: torch.device) -> dict:
    """Rank 0's JSON document on every rank (length first, then the UTF-8 bytes)."""
    data = json.dumps(value, allow_nan=False).encode() if value is not None else b""
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    buffer = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    if value is not None:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.cpu().numpy()))


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's storage (writes go to the tensor)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"rank 0 sent a tensor of unknown dtype {name!r}")
    return dtype


def _segments(sizes: list[int], chunk: int) -> Iterator[list[tuple[int, int, int, int]]]:
    """Per chunk of the concatenated bytes: (tensor, offset in it, offset in the
    chunk, length) pieces that fill it."""
    total, tensor, offset = sum(sizes), 0, 0
    for start in range(0, total, chunk):
        pieces, filled, size = [], 0, min(chunk, total - start)
        while filled < size:
            while sizes[tensor] - offset == 0:
                tensor, offset = tensor + 1, 0
            length = min(sizes[tensor] - offset, size - filled)
            pieces.append((tensor, offset, filled, length))
            filled, offset = filled + length, offset + length
        yield pieces


def _broadcast_bytes(views: list[torch.Tensor], sending: bool, device: torch.device) -> None:
    """Copy rank 0's ``views`` into every other rank's, CHUNK_BYTES at a time."""
    for pieces in _segments([v.numel() for v in views], CHUNK_BYTES):
        size = sum(length for *_, length in pieces)
        buffer = torch.empty(size, dtype=torch.uint8, device=device)
        if sending:
            for tensor, offset, at, length in pieces:
                buffer[at : at + length].copy_(views[tensor][offset : offset + length])
        dist.broadcast(buffer, src=0)
        if not sending:
            for tensor, offset, at, length in pieces:
                views[tensor][offset : offset + length].copy_(buffer[at : at + length])
