"""An elastic torchrun job that loses a node and gains one, on world sizes that do not
divide its global batch.

Three torchrun agents on this machine stand in for three nodes (one process each, c10d
rendezvous with the TorchX components' settings, ``--nnodes 2:3``), training a global
batch of 16: shares of 6, 5 and 5 at three nodes, 8 each at two. One agent is SIGKILLed mid-run: the other two restart their
workers, meet again at world size 2 and go on from the last checkpoint; then a new agent
joins, the two stop their workers (SIGTERM: they save the step reached) and all three
go on at world size 3 to the end. Every sample is trained exactly once per epoch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from stage_runs import TINY, Run, assert_exactly_once, descendants, start, trace

from shards.local_s3 import free_port
from ssl_train.jobs import RDZV_CONF

from conftest import TinyShards

pytestmark = pytest.mark.slow

STEPS, STEPS_PER_EPOCH = 30, 10  # three epochs of 160 samples, global batch 16


def _agent(node: int, port: int, args: list[str], log: Path) -> Run:
    """One torchrun agent ("node") of the elastic job; node 0 hosts the rendezvous store."""
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2:3", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic",
        f"--rdzv-conf=is_host={int(node == 0)},join_timeout=120,{RDZV_CONF}",
        "--max-restarts=5", "--monitor-interval=0.5",
        "-m", "ssl_train.cli", "pretrain", *args,
    ]  # fmt: skip
    # what the TorchX components set: their rendezvous settings (above), a fresh
    # rendezvous store per round
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return start(launcher, log.with_suffix(f".node{node}"), env)


def _until(condition, runs: list[Run], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for run in runs:
            if run.proc.poll() is not None:
                raise AssertionError(f"an agent ended before {what}:\n{run.output()[-3000:]}")
        time.sleep(0.2)
    for run in runs:
        run.kill()
    raise AssertionError(f"no {what} within {timeout} s:\n{runs[0].output()[-3000:]}")


def _last_world(trace_file: Path) -> tuple[int, int]:
    """(world size, global step) of the newest traced step, (0, -1) before the first."""
    lines = trace(trace_file)
    if not lines:
        return 0, -1
    newest = max(lines, key=lambda line: line["global_step"])
    return newest["world_size"], newest["global_step"]


def test_a_node_lost_then_one_gained_trains_every_sample_once(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    trace_file, run_dir = tmp_path / "trace", tmp_path / "run"
    args = [
        "--data", str(tiny_shards.train), "--run-dir", str(run_dir), *TINY,
        "--global-batch-size", "16", "--max-steps", str(STEPS), "--workers", "0",
        "--checkpoint-every-steps", "2", "--trace-samples", str(trace_file),
    ]  # fmt: skip
    port, log = free_port(), tmp_path / "log"
    agents = [_agent(node, port, args, log) for node in range(3)]
    try:
        _until(lambda: _last_world(trace_file)[1] >= 3, agents, "step 3")
        assert _last_world(trace_file)[0] == 3
        # the node and its worker at once (torchrun starts workers in sessions of their own)
        node = agents[2].proc.pid
        for pid in [node, *(child for child, _ in descendants(node))]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        agents[2].proc.wait(timeout=30)
        survivors = agents[:2]
        lost_at = _last_world(trace_file)[1]

        def two_steps_at_two() -> bool:
            world, step = _last_world(trace_file)
            return world == 2 and step >= lost_at + 2

        _until(two_steps_at_two, survivors, "two steps at world size 2")
        agents.append(_agent(3, port, args, log))
        everyone = [*survivors, agents[-1]]
        _until(lambda: _last_world(trace_file)[0] == 3, everyone, "a step at world size 3 again")
        for agent in everyone:
            agent.check(timeout=240, survived_a_kill=True)
    finally:
        for agent in agents:
            if agent.proc.poll() is None:
                agent.kill()
    lines = trace(trace_file)
    sizes = [line["world_size"] for line in sorted(lines, key=lambda x: x["global_step"])]
    assert set(sizes) == {2, 3} and sizes[0] == 3 and sizes[-1] == 3, sizes
    assert_exactly_once(lines, tiny_shards.keys, STEPS_PER_EPOCH)
    summary = (run_dir / "summary.json").read_text()
    assert '"finished": true' in summary and f'"steps": {STEPS}' in summary
