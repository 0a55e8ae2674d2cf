"""Run the real ``ssl-train`` stage commands in tests, alone or under real ``torchrun``,
and look at what they leave behind: final weights, checkpoints, sample traces.

Each run is its own session (so a test can kill torchrun with all its workers) and
writes its output to a log file that failures print. Nothing here waits without a
deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

TINY = ["--preset", "tiny", "--image-size", "16", "--log-every-steps", "1"]


@dataclass
class Run:
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"run still going after {timeout}s:\n{self.output()[-3000:]}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the run and every worker: torchrun starts each worker in a session of
        its own, so killing torchrun's group alone would leave them running."""
        workers = children(self.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for worker in workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def check(self, timeout: float = 120, survived_a_kill: bool = False) -> str:
        """The output of a run that must succeed, and say nothing alarming doing it.

        ``survived_a_kill``: a test killed one of its workers on purpose; the ranks that
        lost their peer print a traceback each before torchrun restarts the group, and
        those are allowed (the other alarms are not)."""
        code = self.wait(timeout)
        assert code == 0, f"exit {code}:\n{self.output()[-4000:]}"
        assert_clean(self.output(), tracebacks_allowed=survived_a_kill)
        return self.output()


# What a successful run must never print: a user reads each as something gone wrong.
ALARMS = (
    "Traceback (most recent call last)",
    "Task exception was never retrieved",  # asyncio: an S3 client's task left to die
    "Exception ignored in",  # an error raised in a finaliser, lost
    "Grad strides do not match bucket view strides",  # DDP: images and model differ
)


def assert_clean(output: str, tracebacks_allowed: bool = False) -> None:
    """Fail with the first alarming line of a successful run's output, and its context."""
    for alarm in ALARMS:
        if tracebacks_allowed and alarm == "Traceback (most recent call last)":
            continue
        at = output.find(alarm)
        assert at < 0, (
            f"a successful run printed {alarm!r}:\n{output[max(0, at - 500) : at + 2500]}"
        )


def command(stage: str, *args: str, nprocs: int | None = None, max_restarts: int = 0) -> list[str]:
    """``ssl-train STAGE ARGS`` as one process, or under torchrun with ``nprocs`` ranks."""
    cli = ["-m", "ssl_train.cli", stage, *args]
    if nprocs is None:
        return [sys.executable, *cli]
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nprocs}", f"--max-restarts={max_restarts}", "--monitor-interval=0.2",
    ]  # fmt: skip
    return [*launcher, *cli]


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    environment = {**(env if env is not None else os.environ), "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
    return Run(proc, log)


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Run to completion; fail the test with the output on a non-zero exit."""
    return start(cmd, log, env).check(timeout)


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            table[int(entry.name)] = (parent, cmdline)
    return table


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (torchrun's workers), from /proc."""
    return sorted(child for child, (parent, _) in _process_table().items() if parent == pid)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie is dead, only not yet reaped), from /proc."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid`` (TorchX's replicas and theirs)."""
    table, found, frontier = _process_table(), [], [pid]
    while frontier:
        current = frontier.pop()
        for child, (parent, cmdline) in table.items():
            if parent == current:
                found.append((child, cmdline))
                frontier.append(child)
    return found


def trace(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(path: Path, step: int, run: Run, timeout: float = 90) -> None:
    """Until the trace shows global step ``step`` done (or fail, with the run's output)."""

    def done() -> bool:
        return any(line["global_step"] >= step for line in trace(path))

    wait_until(done, run, f"step {step}", timeout)


def wait_until(holds: Callable[[], bool], run: Run, what: str, timeout: float = 90) -> None:
    """Until ``holds()``; fail, with the run's output, if the run ends first or ``what``
    has not happened within ``timeout`` seconds (the run is then killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if holds():
            return
        if run.proc.poll() is not None:
            raise AssertionError(f"run ended before {what}:\n{run.output()[-3000:]}")
        time.sleep(0.05)
    run.kill()
    raise AssertionError(f"no {what} within {timeout}s:\n{run.output()[-3000:]}")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run_dir / "final" / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts' floating-point tensors
    (integer ones, step counters, must be equal: 1.0 if not)."""
    assert a.keys() == b.keys()
    return max(
        (a[k] - b[k]).abs().max().item()
        if a[k].is_floating_point()
        else float(not torch.equal(a[k], b[k]))
        for k in a
    )


def assert_exactly_once(lines: list[dict], keys: set[str], steps_per_epoch: int) -> None:
    """Every step of the trace once, and per whole epoch every key exactly once."""
    steps = Counter((line["global_step"], line["rank"], line["world_size"]) for line in lines)
    assert all(n == 1 for n in steps.values()), "a step was traced twice by one rank"
    by_epoch: dict[int, Counter] = {}
    for line in lines:
        assert line["epoch"] * steps_per_epoch + line["step"] == line["global_step"]
        by_epoch.setdefault(line["epoch"], Counter()).update(line["keys"])
    for epoch, seen in by_epoch.items():
        assert set(seen) == keys, f"epoch {epoch}: {len(keys - set(seen))} keys never seen"
        assert max(seen.values()) == 1, f"epoch {epoch}: {seen.most_common(2)} seen twice"
