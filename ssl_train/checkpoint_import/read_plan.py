"""Which byte ranges to request when many tensors of one checkpoint are read.

Importing an R152 3x+SK release reads 1,101 tensors; one ranged request each is 1,101
sequential round trips to object storage (at 40 ms each, 44 s of waiting for an import
that moves 3.5 GB). The tensors sit in the data file in name order, so the ones an
import wants lie close together, separated only by what it skips (each weight's
``/Momentum`` slot, EMA copies). Merging neighbours into one request whenever the bytes
between them are cheaper to download than another round trip cuts the requests to a few
per 64 MB.

Example:
    >>> plan = plan_reads({"a": (0, 0, 10), "b": (0, 12, 10), "c": (0, 10**8, 4)})
    >>> [(r.start, r.end, r.members) for r in plan]
    [(0, 22, ('a', 'b')), (100000000, 100000004, ('c',))]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Bytes between two wanted tensors that are downloaded rather than paying another
# request: about one round trip's worth (40 ms at 100 MB/s).
MAX_GAP_BYTES = 4 << 20
# The largest merged request: bounds the memory one read holds before it is sliced.
MAX_REQUEST_BYTES = 64 << 20


@dataclass(frozen=True)
class RangedRead:
    """One request: bytes ``[start, end)`` of data shard ``shard``, holding ``members``."""

    shard: int
    start: int
    end: int
    members: tuple[str, ...]


def plan_reads(
    spans: Mapping[str, tuple[int, int, int]],
    max_gap_bytes: int = MAX_GAP_BYTES,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> list[RangedRead]:
    """Group ``spans`` (name -> (shard, offset, size)) into ranged reads, in file order.

    Neighbours in one shard join a read while the gap before them is at most
    ``max_gap_bytes`` and the read stays within ``max_request_bytes``; a tensor larger
    than that is a read of its own. Every name is in exactly one read.
    """
    reads: list[RangedRead] = []
    members: list[str] = []
    shard = start = end = -1
    for name, (span_shard, offset, size) in sorted(spans.items(), key=lambda item: item[1]):
        joins = (
            members
            and span_shard == shard
            and offset - end <= max_gap_bytes
            and max(end, offset + size) - start <= max_request_bytes
        )
        if joins:
            members.append(name)
            end = max(end, offset + size)
            continue
        if members:
            reads.append(RangedRead(shard, start, end, tuple(members)))
        members, shard, start, end = [name], span_shard, offset, offset + size
    if members:
        reads.append(RangedRead(shard, start, end, tuple(members)))
    return reads
