"""The time an elastic job loses to a lost node, phase by phase (issue 30).

A local elastic torchrun job: three agents on this machine stand in for three nodes
(``--nnodes 2:3``, one process each, c10d rendezvous with the settings the TorchX
components use), training ``ssl-train pretrain`` (tiny preset, 32 px, global batch 16,
one data worker per rank, a checkpoint every ``--checkpoint-every`` steps). Once it
trains at world size 3, one node is SIGKILLed (its agent and its worker at once). Every
line the surviving nodes print (their agents' and workers') is timestamped as it is
read, and the seconds from the kill to the next completed step are split into:

  detection     the kill -> the agent reports its worker group FAILED (the survivor's
                collective fails when the dead peer's sockets close)
  rendezvous    -> the agent starts a new worker group (a new round with the two nodes
                left; ``last_call_timeout`` of it is waiting for more)
  worker start  -> the new worker joined the process group (interpreter, imports,
                process group)
  build         -> the checkpoint's read begins (model, data plan, manifest)
  checkpoint    reading the newest checkpoint on rank 0 and sending it to every rank
                (as the worker reports it)
  first step    -> the first step after the resume completes (first batch included)

plus the steps redone (those trained after the checkpoint the job resumed from). The
figures are wall seconds on a shared 2-core machine whose three workers share two cores:
they say where the time goes, not what a cluster node takes (``bench/scale.py`` models
1,024 GPUs from them).

    .venv/bin/python bench/node_loss.py --repeats 3  # the components' rendezvous settings
    .venv/bin/python bench/node_loss.py --repeats 3 --rdzv-conf last_call_timeout=2,join_timeout=120
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info
from metrics_overhead import shard_set

from shards.local_s3 import free_port
from ssl_train import jobs

PHASES = ("detection", "rendezvous", "worker start", "build", "checkpoint", "first step")
# what the TorchX components give torchrun (ssl_train/jobs.py), with a join timeout
# that ends a broken run in 2 minutes instead of 10
RDZV_CONF = f"{jobs.RDZV_CONF},join_timeout=120"


class Node:
    """One torchrun agent whose output lines are kept with the time each was read."""

    def __init__(self, index: int, port: int, args: list[str], rdzv_conf: str = RDZV_CONF) -> None:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2:3",
            "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=node-loss", f"--rdzv-conf=is_host={int(index == 0)},{rdzv_conf}",
            "--max-restarts=3", "--monitor-interval=0.5",
            "-m", "ssl_train.cli", "pretrain", *args,
        ]  # fmt: skip
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "LOGLEVEL": "INFO",
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        }
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            start_new_session=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))

    def first(self, pattern: str, after: float) -> tuple[float, str] | None:
        for when, line in list(self.lines):
            if when >= after and re.search(pattern, line):
                return when, line
        return None

    def kill_with_workers(self) -> None:
        pids = [self.proc.pid, *_descendants(self.proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _descendants(pid: int) -> list[int]:
    table: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                table[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in table.items() if parent == current]
        found += children
        frontier += children
    return found


def _wait_for(
    nodes: list[Node], pattern: str, after: float, timeout: float = 240
) -> tuple[float, str]:
    """The earliest line of any of ``nodes`` after ``after`` matching ``pattern`` (rank 0,
    which prints the progress lines, may be on any node)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [hit for node in nodes if (hit := node.first(pattern, after)) is not None]
        if found:
            return min(found)
        if all(node.proc.poll() is not None for node in nodes):
            break
        time.sleep(0.05)
    tail = "\n".join(line for node in nodes for _, line in node.lines[-20:])
    raise RuntimeError(f"no line matching {pattern!r}:\n{tail}")


STEP = r"\[ssl-train pretrain\] step (\d+)/"


def _newest_step(nodes: list[Node]) -> int:
    steps = [
        int(m.group(1))
        for node in nodes
        for _, text in list(node.lines)
        if (m := re.search(STEP, text))
    ]
    return max(steps, default=-1)


def one_loss(data: Path, args: argparse.Namespace) -> dict:
    """Start the three nodes, kill node 2 (never the rendezvous host) mid-run, time the
    survivors' way back to a completed step."""
    with tempfile.TemporaryDirectory() as run_dir:
        argv = [
            "--data", str(data), "--run-dir", run_dir, "--preset", "tiny", "--image-size",
            "32", "--global-batch-size", "16", "--max-steps", str(args.steps), "--workers",
            "1", "--log-every-steps", "1", "--checkpoint-every-steps",
            str(args.checkpoint_every), "--metrics-port", "0",
        ]  # fmt: skip
        port = free_port()
        nodes = [Node(index, port, argv, args.rdzv_conf) for index in range(3)]
        survivors = nodes[:2]
        try:
            _wait_for(nodes, r"on 3 ranks", time.monotonic())
            while _newest_step(nodes) < args.kill_at:  # between two checkpoints
                time.sleep(0.02)
            lost_at = _newest_step(nodes)
            killed = time.monotonic()
            nodes[2].kill_with_workers()
            detect, _ = _wait_for(survivors, r"Worker group FAILED", killed)
            restart, _ = _wait_for(survivors, r"Starting worker group", detect)
            joined, _ = _wait_for(survivors, r"joined the process group", restart)
            resumed, text = _wait_for(survivors, r"resumed from step \d+", joined)
            match = re.search(r"resumed from step (\d+) .*in ([\d.]+) s\)", text)
            assert match is not None, text
            resumed_step, read_s = int(match.group(1)), float(match.group(2))
            first, _ = _wait_for(survivors, STEP, resumed)
            for node in survivors:
                node.proc.wait(timeout=240)
        finally:
            for node in nodes:
                if node.proc.poll() is None:
                    node.kill_with_workers()
        phases = {
            "detection": detect - killed,
            "rendezvous": restart - detect,
            "worker start": joined - restart,
            "build": resumed - joined - read_s,
            "checkpoint": read_s,
            "first step": first - resumed,
        }
        return {
            "phases_s": {k: round(v, 3) for k, v in phases.items()},
            "total_s": round(first - killed, 3),
            "lost_at_step": lost_at,
            "resumed_from_step": resumed_step,
            "steps_redone": lost_at - resumed_step,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kill-at", type=int, default=11, help="lose the node after this step")
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--rdzv-conf", default=RDZV_CONF, help="torchrun's --rdzv-conf")
    args = parser.parse_args()
    data = shard_set()
    runs = []
    for repeat in range(args.repeats):
        runs.append(one_loss(data, args))
        print(json.dumps({"repeat": repeat, **runs[-1]}), flush=True)
    print(f"{'phase':14} {'median s':>9}  runs")
    for phase in PHASES:
        values = [run["phases_s"][phase] for run in runs]
        print(f"{phase:14} {statistics.median(values):9.2f}  {values}")
    totals = [run["total_s"] for run in runs]
    print(f"{'total':14} {statistics.median(totals):9.2f}  {totals}")
    print(f"steps redone: {[run['steps_redone'] for run in runs]}")
    print(json.dumps({"bench": "node_loss", "machine": machine_info(), "settings": vars(args),
                      "runs": runs}))  # fmt: skip


if __name__ == "__main__":
    main()
