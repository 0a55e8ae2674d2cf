"""``--trace-samples FILE``: which sample keys every rank trained on at every step.

One JSON line per rank and step, appended with a single ``write`` on an ``O_APPEND``
descriptor so lines of concurrent ranks never interleave. A resumed run first drops the
lines of steps after its checkpoint (work that was lost with the crash), so the file
always lists what the model learned from: every key once per epoch.
"""

from __future__ import annotations

import json
import os


def append(
    path: str, global_step: int, epoch: int, step: int, rank: int, world_size: int, keys: list[str]
) -> None:
    """Add this rank's line for one step.

    Example:
        >>> append("/tmp/ssl-train-trace.jsonl", 0, 0, 0, rank=0, world_size=1, keys=["a", "b"])
    """
    line = {
        "epoch": epoch,
        "step": step,
        "global_step": global_step,
        "rank": rank,
        "world_size": world_size,
        "keys": keys,
    }
    data = (json.dumps(line) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def rewind(path: str, global_step: int) -> int:
    """Drop the lines of steps at or after ``global_step``; returns how many were dropped.
    Call on one rank before any rank appends (the loop holds a barrier after it).

    Example:
        >>> path = f"/tmp/ssl-train-rewind-{os.getpid()}.jsonl"
        >>> for step in (4, 5):
        ...     append(path, step, 0, step, rank=0, world_size=1, keys=["k"])
        >>> rewind(path, 5), rewind(path, 5)
        (1, 0)
    """
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [
        line for line in lines if line.strip() and json.loads(line)["global_step"] < global_step
    ]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return len(lines) - len(kept)
