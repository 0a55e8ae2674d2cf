"""The torchrun test helper really runs N gloo processes, reports failures and never hangs.

The functions the workers run are defined at module level here; the workers import
this module by name (``tests/`` is on their ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from stage_runs import alive

from distributed import TorchrunError, TorchrunTimeoutError, run_under_torchrun

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # every test starts torchrun


# --- functions run inside the torchrun workers ------------------------------------------


def rank_and_world_size() -> list[int]:
    return [dist.get_rank(), dist.get_world_size()]


def collectives(scale: int, marker_name: str) -> dict:
    rank = dist.get_rank()

    summed = torch.tensor([float(rank + 1)])
    dist.all_reduce(summed)  # 1 + 2 on two ranks

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(range(scale * (rank + 1))))  # sizes differ per rank

    shared = torch.tensor([42.0, 7.0]) if rank == 0 else torch.zeros(2)
    dist.broadcast(shared, src=0)

    return {
        "rank": rank,
        "backend": dist.get_backend(),
        "all_reduce": summed.item(),
        "all_gather": gathered,
        "broadcast": shared.tolist(),
        "pid": os.getpid(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "marker": os.environ.get(marker_name),
    }


def raise_on_rank_1() -> str:
    if dist.get_rank() == 1:
        raise RuntimeError("deliberate failure on rank 1 (marker 5f3a)")
    dist.barrier()  # rank 0 would wait here forever unless torchrun tears the job down
    return "unreachable"


def abort_on_rank_1() -> str:
    if dist.get_rank() == 1:
        print("last words of rank 1 (marker 9c2e)", flush=True)
        os.abort()  # as a C++ std::terminate would: SIGABRT, no Python exception
    dist.barrier()
    return "unreachable"


def sleep_forever(pid_dir: str) -> None:
    Path(pid_dir, f"worker-{dist.get_rank()}.pid").write_text(str(os.getpid()))
    while True:
        time.sleep(1)


# --- tests ------------------------------------------------------------------------------


def test_each_rank_sees_the_process_group() -> None:
    assert run_under_torchrun(rank_and_world_size, 2) == [[0, 2], [1, 2]]


def test_ranks_communicate_over_gloo_with_static_rendezvous() -> None:
    results = run_under_torchrun(
        collectives,
        2,
        3,
        "SSL_TRAIN_TEST_MARKER",
        env={"SSL_TRAIN_TEST_MARKER": "passed-through"},
        nnodes_standalone=False,
    )

    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["pid"] != results[1]["pid"]  # two real processes
    for r in results:
        assert r["backend"] == "gloo"
        assert r["all_reduce"] == 3.0
        assert r["all_gather"] == [[0, 1, 2], [0, 1, 2, 3, 4, 5]]
        assert r["broadcast"] == [42.0, 7.0]
        assert r["omp_num_threads"] == "1"
        assert r["marker"] == "passed-through"


def test_exception_on_one_rank_fails_the_run_with_its_traceback() -> None:
    started = time.monotonic()
    with pytest.raises(TorchrunError) as info:
        run_under_torchrun(raise_on_rank_1, 2, timeout_s=90)
    elapsed = time.monotonic() - started

    assert not isinstance(info.value, TorchrunTimeoutError)
    message = str(info.value)
    assert "deliberate failure on rank 1 (marker 5f3a)" in message
    assert "rank 1 raised" in message
    assert "raise_on_rank_1" in message  # the traceback, not just the text
    assert info.value.returncode not in (0, None)
    # Rank 0's barrier may fail too (gloo: connection closed by peer); rank 1 must be there.
    assert "deliberate failure" in info.value.rank_errors[1]
    assert elapsed < 60  # torchrun tore down rank 0, stuck in its barrier


def test_a_rank_killed_by_a_signal_is_reported_with_its_stack_and_last_words() -> None:
    """A worker that aborts raises nothing: its stack (faulthandler) and its output before
    torchrun's report come with the error, not only the tail of torchrun's teardown."""
    with pytest.raises(TorchrunError) as info:
        run_under_torchrun(abort_on_rank_1, 2, timeout_s=90)
    message = str(info.value)
    assert "--- rank 1 died of a signal; its threads then ---" in message
    assert "Fatal Python error: Aborted" in message and "abort_on_rank_1" in message
    assert "--- output before torchrun's report ---" in message
    assert "last words of rank 1 (marker 9c2e)" in message


@pytest.mark.timeout(90)
def test_hanging_run_is_killed_after_the_timeout(tmp_path: Path) -> None:
    # Long enough for two workers to import torch and reach the function on a slow, busy
    # machine (CI's took more than 10 s), so that the stack dump shows where they hang.
    started = time.monotonic()
    with pytest.raises(TorchrunTimeoutError) as info:
        run_under_torchrun(sleep_forever, 2, str(tmp_path), timeout_s=20)
    elapsed = time.monotonic() - started

    assert 20 <= elapsed < 35
    assert "timed out after 20 s" in str(info.value)
    assert "--- output tail ---" in str(info.value)
    assert "sleep_forever" in info.value.output  # the workers' stack dump before the kill

    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("worker-*.pid"))]
    assert len(pids) == 2
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if alive(pid)], "workers survived the timeout"


def test_functions_the_workers_cannot_import_are_refused() -> None:
    def local_function() -> None:
        pass

    with pytest.raises(ValueError, match="local function"):
        run_under_torchrun(local_function, 2)
    with pytest.raises(ValueError, match="local function or lambda"):
        run_under_torchrun(lambda: None, 2)

    def in_main() -> None:
        pass

    in_main.__module__ = "__main__"
    in_main.__qualname__ = "in_main"
    with pytest.raises(ValueError, match="__main__"):
        run_under_torchrun(in_main, 2)

    with pytest.raises(ValueError, match="JSON"):
        run_under_torchrun(rank_and_world_size, 2, object())
