#!/usr/bin/env python
"""The c10d rendezvous of a 1,024-GPU elastic job, measured with its agents (issue 30).

A 1,024-GPU job on 8-GPU nodes has 128 torchrun agents meeting on one c10d store. What
a lost node costs in the rendezvous depends on how many agents share that store, on
the heartbeats they send it (``keep_alive_interval``; a node counts as dead after
``keep_alive_max_attempt`` missed ones) and on ``last_call_timeout`` (how long a round
that has its minimum waits for more nodes). None of that needs a GPU, so it is measured
here with the real thing: ``--agents`` instances of torch's own
``DynamicRendezvousHandler`` (torchrun's c10d backend), each with its own TCP
connection to one ``TCPStore`` that this process hosts, as the agent at the rendezvous
endpoint hosts it. Agents are threads in a few light processes (no worker, no GPU:
an agent between rounds only heartbeats), and one agent has a process of its own so it
can be SIGKILLed: its node is the one lost.

Each repeat, with a fresh store and run id:

  first round    every agent calls ``next_rendezvous`` at once: seconds until the last
                 one has its rank (the join traffic of ``--agents`` nodes on one key)
  steady state   ``--steady-s`` seconds of heartbeats: CPU seconds per second of the
                 store (this process) and of all agents together, and no node may be
                 taken for dead (the next round must have every survivor)
  lost node      the lone agent is SIGKILLed and every survivor calls
                 ``next_rendezvous`` (as its agent does once its workers failed;
                 ``--detect-spread`` spreads those calls over that many seconds):
                 seconds from the kill until the last survivor has its rank in the new
                 round, which must hold exactly the ``--agents`` - 1 survivors

This machine has 2 cores for all the agents, a cluster one node per agent, so the
join and heartbeat figures are upper bounds; the waits (keep-alive, last call) are
the settings' own.

``--gloo-ranks`` measures the other store a restart meets: the process group's, where
every rank of the new worker group publishes its address. A gloo group (the whole
group on CPU jobs, the per-step control group beside NCCL) connects every pair of
ranks when it is made, unless ``TORCH_GLOO_LAZY_INIT=1`` connects a pair on its first
use. For each size, real gloo ranks (forked processes) make the group and run one
small all-reduce (a step's agreement), and every store request and byte they send or
receive is counted, eager against lazy, to extrapolate to 1,024 ranks.

Run from the repository root:

    .venv/bin/python bench/rendezvous.py --agents 128 --repeats 3 \
        --rdzv-conf keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=5
    .venv/bin/python bench/rendezvous.py --agents 0 --gloo-ranks 8 16 32

The last line is one JSON object with every repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, process_cpu_seconds

AGENTS_PER_PROCESS = 16


def parse_conf(text: str) -> dict[str, str]:
    """``k=v,k=v`` as torchrun's ``--rdzv-conf`` takes it."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    return {key.strip(): value.strip() for key, value in pairs}


def agent_group(args: argparse.Namespace) -> None:
    """A light process of ``args.count`` agents; commands arrive on stdin, events leave
    on stdout as JSON lines with wall-clock times (one clock: one machine)."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    printing = threading.Lock()
    start, go = threading.Event(), threading.Event()

    def emit(**event: object) -> None:
        with printing:
            print(json.dumps({**event, "t": time.time()}), flush=True)

    def agent(index: int) -> None:
        params = RendezvousParameters(
            backend="c10d",
            endpoint=f"127.0.0.1:{args.port}",
            run_id=args.run_id,
            min_nodes=args.min_nodes,
            max_nodes=args.max_nodes,
            is_host="false",  # the store lives in the bench's own process
            **parse_conf(args.rdzv_conf),
        )
        handler = get_rendezvous_handler(params)
        emit(event="ready", agent=index)
        start.wait()
        info = handler.next_rendezvous()
        emit(event="round", agent=index, rank=info.rank, world=info.world_size)
        go.wait()
        time.sleep(args.detect_offset * index)
        info = handler.next_rendezvous()
        emit(event="again", agent=index, rank=info.rank, world=info.world_size)

    for index in range(args.count):
        threading.Thread(target=agent, args=(args.first + index,), daemon=True).start()
    for line in sys.stdin:
        command = line.strip()
        if command == "start":
            start.set()
        elif command == "go":
            go.set()
        elif command == "quit":
            break


class Group:
    """One light process of agents, its events read into a shared queue."""

    def __init__(
        self,
        first: int,
        count: int,
        args: argparse.Namespace,
        port: int,
        run_id: str,
        events: queue.Queue,
    ) -> None:
        offset = args.detect_spread / max(1, args.agents - 2)
        command = [
            sys.executable,
            __file__,
            "--agent-group",
            "--first",
            str(first),
            "--count",
            str(count),
            "--port",
            str(port),
            "--run-id",
            run_id,
            "--min-nodes",
            str(args.min_nodes),
            "--max-nodes",
            str(args.agents),
            "--rdzv-conf",
            args.rdzv_conf,
            "--detect-offset",
            str(offset),
        ]
        env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        threading.Thread(target=self._read, args=(events,), daemon=True).start()

    def _read(self, events: queue.Queue) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                events.put(json.loads(line))

    def send(self, command: str) -> None:
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def cpu_s(self) -> float:
        """CPU seconds this process used so far (user and system, its threads')."""
        return process_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        self.send("quit")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def collect(events: queue.Queue, kind: str, count: int, limit_s: float) -> list[dict]:
    """The next ``count`` events of ``kind`` (others are dropped), or a clear failure."""
    found: list[dict] = []
    deadline = time.monotonic() + limit_s
    while len(found) < count:
        try:
            event = events.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise SystemExit(
                f"only {len(found)} of {count} agents reported '{kind}' in {limit_s:.0f}s: "
                "the rendezvous did not complete (see the agents' stderr above)"
            ) from None
        if event["event"] == kind:
            found.append(event)
    return found


def check_round(events: list[dict], world: int, what: str) -> None:
    """Every agent in one round of ``world`` nodes, each with its own rank."""
    worlds = {event["world"] for event in events}
    ranks = sorted(event["rank"] for event in events)
    if worlds != {world} or ranks != list(range(world)):
        raise SystemExit(f"{what}: world sizes {sorted(worlds)}, not one round of {world}")


def repeat(args: argparse.Namespace) -> dict:
    """One store, one job's agents: first round, steady heartbeats, one node lost."""
    from torch.distributed import TCPStore

    store = TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        multi_tenant=True,
        timeout=timedelta(seconds=60),
    )
    run_id = uuid.uuid4().hex[:12]
    events: queue.Queue = queue.Queue()
    survivors = args.agents - 1
    groups = [
        Group(first, min(AGENTS_PER_PROCESS, survivors - first), args, store.port, run_id, events)
        for first in range(0, survivors, AGENTS_PER_PROCESS)
    ]
    victim = Group(survivors, 1, args, store.port, run_id, events)
    everyone = [*groups, victim]
    try:
        collect(events, "ready", args.agents, 600)
        progress(f"{args.agents} agents ready: first round")
        began = time.time()
        for group in everyone:
            group.send("start")
        first = collect(events, "round", args.agents, 600)
        check_round(first, args.agents, "first round")
        first_round_s = max(event["t"] for event in first) - began
        progress(f"first round in {first_round_s:.1f}s: {args.steady_s:.0f}s of heartbeats")
        time.sleep(2)  # every agent's heartbeat timer running
        store_cpu = resource.getrusage(resource.RUSAGE_SELF)
        agents_cpu = sum(group.cpu_s() for group in everyone)
        time.sleep(args.steady_s)
        after = resource.getrusage(resource.RUSAGE_SELF)
        store_cpu_s = (after.ru_utime + after.ru_stime) - (store_cpu.ru_utime + store_cpu.ru_stime)
        agents_cpu_s = sum(group.cpu_s() for group in everyone) - agents_cpu
        os.kill(victim.process.pid, signal.SIGKILL)
        killed = time.time()
        for group in groups:
            group.send("go")
        progress("one node SIGKILLed: the survivors' next round")
        again = collect(events, "again", survivors, 180)
        check_round(again, survivors, "the round after the lost node")
        times = sorted(event["t"] - killed for event in again)
        return {
            "agents": args.agents,
            "first_round_s": round(first_round_s, 2),
            "store_cpu_per_s": round(store_cpu_s / args.steady_s, 3),
            "agents_cpu_per_s": round(agents_cpu_s / args.steady_s, 3),
            "lost_node_first_s": round(times[0], 2),
            "lost_node_last_s": round(times[-1], 2),
        }
    finally:
        for group in everyone:
            group.stop()
        del store


class CountingStore:
    """Built on first use (it subclasses torch's ``Store``): a store that counts the
    requests and value bytes gloo sends through it."""

    def __new__(cls, inner):  # type: ignore[no-untyped-def]
        import torch.distributed as dist

        class Counting(dist.Store):
            def __init__(self, inner: dist.Store) -> None:
                super().__init__()
                self.inner, self.requests, self.bytes = inner, 0, 0

            def _count(self, nbytes: int) -> None:
                self.requests += 1
                self.bytes += nbytes

            def set(self, key, value):  # type: ignore[no-untyped-def]
                value = value if isinstance(value, bytes) else str(value).encode()
                self._count(len(value))
                return self.inner.set(key, value)

            def get(self, key):  # type: ignore[no-untyped-def]
                value = self.inner.get(key)
                self._count(len(value))
                return value

            def multi_get(self, keys):  # type: ignore[no-untyped-def]
                values = self.inner.multi_get(keys)
                self._count(sum(len(value) for value in values))
                return values

            def multi_set(self, keys, values):  # type: ignore[no-untyped-def]
                self._count(sum(len(value) for value in values))
                return self.inner.multi_set(keys, values)

            def add(self, key, amount):  # type: ignore[no-untyped-def]
                self._count(8)
                return self.inner.add(key, amount)

            def wait(self, keys, timeout=None):  # type: ignore[no-untyped-def]
                self._count(0)
                return self.inner.wait(keys) if timeout is None else self.inner.wait(keys, timeout)

            def check(self, keys):  # type: ignore[no-untyped-def]
                self._count(0)
                return self.inner.check(keys)

            def compare_set(self, key, expected, desired):  # type: ignore[no-untyped-def]
                self._count(len(desired))
                return self.inner.compare_set(key, expected, desired)

            def delete_key(self, key):  # type: ignore[no-untyped-def]
                return self.inner.delete_key(key)

            def num_keys(self):  # type: ignore[no-untyped-def]
                return self.inner.num_keys()

            def set_timeout(self, timeout):  # type: ignore[no-untyped-def]
                return self.inner.set_timeout(timeout)

        return Counting(inner)


def gloo_group(ranks: int, lazy: bool) -> dict:
    """``ranks`` forked processes make one gloo group on one TCPStore and run one small
    all-reduce; their store requests and bytes, summed (the server sees all of them)."""
    import socket

    import torch
    import torch.distributed as dist

    os.environ["TORCH_GLOO_LAZY_INIT"] = "1" if lazy else "0"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    children = []
    for rank in range(ranks):
        reading, writing = os.pipe()
        pid = os.fork()
        if pid == 0:  # one rank: nothing but its store client, its group and one step
            os.close(reading)
            client = dist.TCPStore(
                "127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60)
            )
            store = CountingStore(client)
            began = time.perf_counter()
            group = dist.ProcessGroupGloo(
                dist.PrefixStore("pg", store), rank, ranks, timedelta(seconds=120)
            )
            made = (time.perf_counter() - began, store.requests, store.bytes)
            group.allreduce([torch.zeros(3)]).wait()
            os.write(writing, json.dumps([*made, store.requests, store.bytes]).encode())
            os._exit(0)
        os.close(writing)
        children.append((pid, reading))
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    rows = []
    for pid, reading in children:
        with os.fdopen(reading) as pipe:
            text = pipe.read()
        os.waitpid(pid, 0)
        if not text:
            raise SystemExit(f"a gloo rank of {ranks} ended without a result")
        rows.append(json.loads(text))
    del server
    return {
        "ranks": ranks,
        "lazy": lazy,
        "make_s_slowest_rank": round(max(row[0] for row in rows), 3),
        "make_requests": sum(row[1] for row in rows),
        "make_bytes": sum(row[2] for row in rows),
        "with_first_step_requests": sum(row[3] for row in rows),
        "with_first_step_bytes": sum(row[4] for row in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=128, help="nodes of the job (default 128)")
    parser.add_argument("--min-nodes", type=int, help="the job's smallest size (default half)")
    parser.add_argument("--rdzv-conf", default="", help="as torchrun's --rdzv-conf")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steady-s", type=float, default=15.0)
    parser.add_argument("--detect-spread", type=float, default=0.0)
    parser.add_argument("--gloo-ranks", nargs="*", type=int, default=[])
    # an agent group's own arguments (the bench starts them)
    parser.add_argument("--agent-group", action="store_true", help=argparse.SUPPRESS)
    for name, kind in (
        ("--first", int),
        ("--count", int),
        ("--port", int),
        ("--max-nodes", int),
        ("--detect-offset", float),
    ):
        parser.add_argument(name, type=kind, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--run-id", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.agent_group:
        agent_group(args)
        return
    if args.agents and args.agents < 3:
        parser.error("--agents: at least 3 (one is lost, and the rest must still be a job)")
    args.min_nodes = args.min_nodes or max(2, args.agents // 2)
    if args.agents and not 1 <= args.min_nodes < args.agents:
        parser.error(f"--min-nodes {args.min_nodes}: between 1 and {args.agents - 1}")
    report = {
        "machine": machine_info(),
        "rdzv_conf": args.rdzv_conf or "(torch's defaults)",
        "min_nodes": args.min_nodes,
        "detect_spread_s": args.detect_spread,
        "repeats": [],
    }
    for _ in range(args.repeats if args.agents else 0):
        row = repeat(args)
        report["repeats"].append(row)
        print(json.dumps(row), flush=True)
    rows = report["repeats"]
    if rows:
        report["median"] = {
            key: statistics.median(row[key] for row in rows) for key in rows[0] if key != "agents"
        }
    report["gloo"] = []
    for ranks in args.gloo_ranks:
        for lazy in (False, True):
            row = gloo_group(ranks, lazy)
            report["gloo"].append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
