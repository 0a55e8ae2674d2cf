"""Training curves for TensorBoard: ``tensorboard --logdir RUN_DIR``.

Rank 0 keeps the scalars of its progress lines (loss, learning rate, accuracies,
samples/s) and of the final evaluation in memory, and writes them as one TensorBoard
event file under ``RUN_DIR/tensorboard/`` each time a checkpoint is complete, holding the
steps up to that checkpoint. A run that dies loses only the steps it will train again
from its checkpoint, so a resumed run's curves have every step once. One small write per
checkpoint works the same on object storage, which cannot append to a file.

The files are TensorBoard's own format, written here without TensorFlow or TensorBoard:
TFRecord framing (length, masked CRC-32C of the length, the record, masked CRC-32C of it)
around ``Event`` protocol buffers holding scalar summaries.
"""

from __future__ import annotations

import socket
import struct
import time

from shards import storage
from ssl_train.crc32c import crc32c, mask

EVENTS_DIR = "tensorboard"


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", mask(crc32c(length)))
        + data
        + struct.pack("<I", mask(crc32c(data)))
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    """An ``Event``: wall_time (1, double), step (2, int64), then ``body``."""
    return _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step)) + body


def _scalars(values: dict[str, float]) -> bytes:
    """``summary`` (5): one ``Value`` (tag 1, simple_value 2 as float) per scalar."""
    summary = b"".join(
        _length_delimited(
            1,
            _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)),
        )
        for tag, value in values.items()
    )
    return _length_delimited(5, summary)


def event_file(entries: list[tuple[float, int, dict[str, float]]]) -> bytes:
    """A whole event file: the version record, then one event per (time, step, scalars).

    Example:
        >>> len(event_file([(0.0, 1, {"loss": 2.5})])) > 0
        True
    """
    first = entries[0][0] if entries else time.time()
    records = [_record(_event(first, 0, _length_delimited(3, b"brain.Event:2")))]
    records += [_record(_event(t, step, _scalars(values))) for t, step, values in entries]
    return b"".join(records)


class ScalarLog:
    """Rank 0's scalars, written to ``RUN_DIR/tensorboard`` up to each complete checkpoint.

    Example:
        >>> log = ScalarLog("/tmp/run")
        >>> log.add(10, {"train/loss": 3.2})
        >>> log.write_through(10)  # doctest: +SKIP
    """

    def __init__(self, run_dir: str) -> None:
        self.url = storage.join(run_dir, EVENTS_DIR)
        self.pending: list[tuple[float, int, dict[str, float]]] = []

    def add(self, step: int, values: dict[str, float]) -> None:
        self.pending.append((time.time(), step, dict(values)))

    def write_through(self, step: int) -> None:
        """Write the scalars of steps up to ``step`` (a complete checkpoint's) as one file."""
        done = [entry for entry in self.pending if entry[1] <= step]
        if not done:
            return
        self.pending = [entry for entry in self.pending if entry[1] > step]
        first, last = done[0][1], done[-1][1]
        # "tfevents" in the name is how TensorBoard finds it; names sort in writing order
        name = (
            f"events.out.tfevents.{first:012d}-{last:012d}-{time.time_ns()}.{socket.gethostname()}"
        )
        storage.write_bytes_atomic(storage.join(self.url, name), event_file(done))
