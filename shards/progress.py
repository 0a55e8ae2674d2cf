"""Progress for long runs: a bar on a terminal, plain timestamped lines in logs."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from tqdm import tqdm

from shards import progress_metrics


def human_bytes(n: float) -> str:
    """Bytes for people.

    Example:
        >>> human_bytes(256 * 1024**2)
        '256.0 MiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Counts finished units (shards) and the bytes they carried.

    Example:
        >>> import io
        >>> p = Progress("create", total=2, stream=io.StringIO())
        >>> p.advance(samples=10, nbytes=2048)
        >>> p.close()
    """

    def __init__(
        self,
        what: str,
        total: int,
        stream: TextIO | None = None,
        every_s: float = 10.0,
        node: str | None = None,
    ):
        self.total, self.every_s = total, every_s
        self.what = f"{what} {node}" if node else what
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.samples = self.nbytes = 0
        self.started = self._last_line = time.monotonic()
        self.metrics = progress_metrics.for_command(what, node)
        if self.metrics is not None:
            self.metrics.update(0, total, 0, 0)
        self._bar = (
            tqdm(
                total=total,
                unit="shard",
                desc=what,
                file=self.stream,
                # a terminal that reports a 0x0 size (a fresh pty) would hide the bar
                ncols=shutil.get_terminal_size().columns,
                nrows=shutil.get_terminal_size().lines,
            )
            if self.stream.isatty()
            else None
        )

    def advance(self, samples: int, nbytes: int, shards: int = 1) -> None:
        self.done += shards
        self.samples += samples
        self.nbytes += nbytes
        if self.metrics is not None:
            self.metrics.update(self.done, self.total, self.samples, self.nbytes)
        if self._bar is not None:
            self._bar.update(shards)
            self._bar.set_postfix_str(f"{self.samples} samples, {human_bytes(self.nbytes)}")
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s or self.done == self.total:
            self._last_line = now
            elapsed = max(now - self.started, 1e-9)
            rate = self.nbytes / elapsed
            left = elapsed / self.done * (self.total - self.done)
            print(
                f"{self.what}: {self.done}/{self.total} shards, {self.samples} samples, "
                f"{human_bytes(self.nbytes)} ({human_bytes(rate)}/s)"
                + (f", ETA {_clock(left)}" if self.done < self.total else ""),
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self._bar is not None:
            self._bar.close()


def _clock(seconds: float) -> str:
    """A duration as H:MM:SS.

    Example:
        >>> _clock(3725.4)
        '1:02:05'
    """
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
