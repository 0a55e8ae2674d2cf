"""Preemption, crashes and world-size changes neither lose nor repeat work.

Every scenario runs the real ``ssl-train pretrain`` command, under real torchrun (gloo)
where it matters, on a tiny model, and compares its final weights with an
uninterrupted run of the same configuration: bitwise on the same world size, within
1e-4 across world sizes. The sample traces show every key exactly once per epoch.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
from flaky_proxy import FlakyProxy
from stage_runs import (
    TINY,
    assert_bitwise_equal,
    assert_exactly_once,
    children,
    command,
    final_weights,
    largest_difference,
    run,
    start,
    trace,
    wait_for_step,
)

from shards.storage import join, read_bytes, size_or_none
from ssl_train.lease import LEASE_FILE, LEASE_SECONDS_ENV

from conftest import TinyShards

# real torchrun/TorchX jobs: `make test` runs them, `make test-fast` does not
pytestmark = pytest.mark.slow

STEPS = 20  # two epochs of 10 steps (160 samples, global batch 16)
STEPS_PER_EPOCH = 10
# Across world sizes only rounding differs, and at the paper's temperature (0.1) this
# tiny net at 16 px is chaotic: in one process, 1 vs 2 OpenMP threads alone move some
# weights by 25% within 10 steps. A softer objective keeps 20 steps stable (1 vs 2
# threads: 2.4e-7 apart), so a 1e-4 comparison tests the world-size change itself.
CALM = ["--temperature", "1.0", "--learning-rate", "0.003", "--weight-decay", "0"]


# SimCLRv2's memory: 48 projections of the 320 an epoch makes (2 views x 160 samples);
# each step's 32 new ones wrap the ring. At momentum 0.9 (with CALM's learning rate) the
# tiny net turns chaotic: 1 vs 2 threads alone move a weight by 2.4e-4; at 0.99 by 2.4e-7,
# like the run without memory.
MEMORY = ["--memory-size", "48", "--memory-momentum", "0.99"]


def pretrain_args(data: Path, run_dir: Path | str, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--run-dir", str(run_dir), *TINY,
        "--global-batch-size", "16", "--max-steps", str(STEPS), "--workers", "0", *extra,
    ]  # fmt: skip


def _baseline_two_ranks(tiny_shards: TinyShards, root: Path, *extra: str) -> Path:
    """The uninterrupted 2-rank run every same-world-size scenario must reproduce."""
    args = pretrain_args(
        tiny_shards.train, root / "run", "--trace-samples", str(root / "trace"), *extra
    )
    run(command("pretrain", *args, nprocs=2), root / "log")
    assert_exactly_once(trace(root / "trace"), tiny_shards.keys, STEPS_PER_EPOCH)
    return root / "run"


@pytest.fixture(scope="module")
def baseline_two_ranks(tiny_shards: TinyShards, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _baseline_two_ranks(tiny_shards, tmp_path_factory.mktemp("baseline2"))


@pytest.fixture(scope="module")
def baseline_two_ranks_memory(
    tiny_shards: TinyShards, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return _baseline_two_ranks(tiny_shards, tmp_path_factory.mktemp("baseline2m"), *MEMORY)


@pytest.fixture(scope="module")
def baseline_one_rank(tiny_shards: TinyShards, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("baseline1")
    run(command("pretrain", *pretrain_args(tiny_shards.train, root / "run", *CALM)), root / "log")
    return root / "run"


@pytest.fixture(scope="module")
def baseline_one_rank_memory(
    tiny_shards: TinyShards, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = tmp_path_factory.mktemp("baseline1m")
    args = pretrain_args(tiny_shards.train, root / "run", *CALM, *MEMORY)
    run(command("pretrain", *args), root / "log")
    return root / "run"


# Stopping half way and resuming bitwise: tests/test_scale.py (2 nodes x 2 processes, S3).


def test_sigkilled_worker_is_restarted_and_the_run_matches(
    tiny_shards: TinyShards, baseline_two_ranks: Path, tmp_path: Path
) -> None:
    run_dir, trace_file = tmp_path / "run", tmp_path / "trace"
    args = pretrain_args(
        tiny_shards.train, run_dir, "--trace-samples", str(trace_file),
        "--checkpoint-every-steps", "3", "--workers", "1",
    )  # fmt: skip
    job = start(command("pretrain", *args, nprocs=2, max_restarts=2), tmp_path / "log")
    kill_at = random.Random().randint(4, STEPS - 4)
    wait_for_step(trace_file, kill_at, job)
    workers = children(job.proc.pid)
    assert len(workers) == 2, workers
    victim = random.choice(workers)
    os.kill(victim, signal.SIGKILL)
    out = job.check(timeout=180, survived_a_kill=True)
    assert re.search(r"resumed from step \d+", out), out[-2000:]
    assert "the run dir's lease is held by" not in out  # its own job's: taken back at once
    assert_bitwise_equal(final_weights(run_dir), final_weights(baseline_two_ranks))
    assert_exactly_once(trace(trace_file), tiny_shards.keys, STEPS_PER_EPOCH)


@pytest.mark.parametrize("memory", [False, True], ids=["", "with-memory"])
def test_sigterm_saves_the_current_step_and_resume_starts_there(
    tiny_shards: TinyShards, memory: bool, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """With SimCLRv2's memory too: its network and buffer are part of the checkpoint."""
    from ssl_train.checkpoint import CheckpointStore

    baseline_two_ranks = request.getfixturevalue(
        "baseline_two_ranks_memory" if memory else "baseline_two_ranks"
    )
    run_dir, trace_file = tmp_path / "run", tmp_path / "trace"
    args = pretrain_args(
        tiny_shards.train, run_dir, "--trace-samples", str(trace_file),
        "--checkpoint-every-steps", "4", "--workers", "1", *(MEMORY if memory else []),
    )  # fmt: skip
    job = start(command("pretrain", *args, nprocs=2), tmp_path / "log")
    wait_for_step(trace_file, 5, job)  # mid-epoch, past the periodic checkpoint at step 4
    job.proc.send_signal(signal.SIGTERM)  # what Kubernetes sends torchrun on preemption
    signalled = time.monotonic()
    code = job.wait(timeout=60)
    assert code != 0, "a preempted run must exit non-zero so that it is retried"
    assert time.monotonic() - signalled < 10, job.output()[-2000:]
    done = max(line["global_step"] for line in trace(trace_file)) + 1
    saved = CheckpointStore(str(run_dir)).latest()
    assert saved == done and saved % 4 != 0, (saved, done, job.output()[-2000:])
    out = run(command("pretrain", *args, nprocs=2), tmp_path / "log2")
    assert f"resumed from step {saved}" in out
    assert "the run dir's lease is held by" not in out  # released by the preempted job
    assert_bitwise_equal(final_weights(run_dir), final_weights(baseline_two_ranks))
    if memory:
        assert_bitwise_equal(memory_state(run_dir), memory_state(baseline_two_ranks))
    assert_exactly_once(trace(trace_file), tiny_shards.keys, STEPS_PER_EPOCH)


def test_ctrl_c_saves_the_step_reached_and_exits_130(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT) stops a run as SIGTERM does, with the status a shell gives SIGINT
    (128 + 2), not SIGTERM's 143."""
    from ssl_train.checkpoint import CheckpointStore

    run_dir, trace_file = tmp_path / "run", tmp_path / "trace"
    args = pretrain_args(tiny_shards.train, run_dir, "--trace-samples", str(trace_file))
    job = start(command("pretrain", *args), tmp_path / "log")
    wait_for_step(trace_file, 2, job)
    job.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the foreground process
    assert job.wait(timeout=60) == 130, job.output()[-2000:]
    assert "stopped by SIGINT" in job.output()
    done = max(line["global_step"] for line in trace(trace_file)) + 1
    assert CheckpointStore(str(run_dir)).latest() == done


def memory_state(run_dir: Path) -> dict:
    """The memory network and buffer of the run's last checkpoint."""
    from ssl_train.checkpoint import CheckpointStore

    state = CheckpointStore(str(run_dir)).load()["memory"]
    assert int(state["filled"]) == 48
    return state


def test_sigterm_at_three_ranks_then_two_then_three_matches_the_one_rank_run(
    tiny_shards: TinyShards, baseline_one_rank: Path, tmp_path: Path
) -> None:
    """World sizes that do not divide the global batch of 16 (shares 6, 5, 5 at three
    ranks): preempted at 3 mid-epoch, resumed at 2 across an epoch boundary, finished at
    3. Every sample once per epoch, and the weights as near the one-rank run as an
    uninterrupted three-rank run's are (the two world sizes round differently; the bound
    is measured, as in the two-ranks-then-one test below)."""
    from ssl_train.checkpoint import CheckpointStore

    uninterrupted = tmp_path / "three-ranks"
    run(command("pretrain", *pretrain_args(tiny_shards.train, uninterrupted, *CALM), nprocs=3),
        tmp_path / "log")  # fmt: skip
    spread = largest_difference(final_weights(uninterrupted), final_weights(baseline_one_rank))
    bound = 2 * spread + 1e-5

    run_dir, trace_file = tmp_path / "run", tmp_path / "trace"
    args = pretrain_args(tiny_shards.train, run_dir, "--trace-samples", str(trace_file), *CALM)
    job = start(command("pretrain", *args, "--checkpoint-every-steps", "100", nprocs=3),
                tmp_path / "log-3")  # fmt: skip
    wait_for_step(trace_file, 3, job)
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) != 0
    first = CheckpointStore(str(run_dir)).latest()
    # the step reached (mid-epoch unless the machine is very fast)
    assert first is not None and 3 < first < STEPS - 4, job.output()[-2000:]
    second = max(first + 2, STEPS_PER_EPOCH + 3)  # past the epoch boundary
    out = run(command("pretrain", *args, "--stop-at-step", str(second), nprocs=2),
              tmp_path / "log-2")  # fmt: skip
    assert f"resumed from step {first} (saved on 3 ranks;" in out
    half_way = CheckpointStore(str(run_dir)).load(second)["model"]
    out = run(command("pretrain", *args, nprocs=3), tmp_path / "log-3b")
    assert f"resumed from step {second} (saved on 2 ranks;" in out
    assert "(6 or 5 each)" in out
    final = final_weights(run_dir)
    assert largest_difference(final, final_weights(baseline_one_rank)) <= bound, spread
    moved = max((final[k] - half_way[k]).abs().max().item() for k in final if "running" not in k)
    assert moved > 10 * bound, (moved, bound)
    lines = trace(trace_file)
    assert {line["world_size"] for line in lines} == {2, 3}
    assert_exactly_once(lines, tiny_shards.keys, STEPS_PER_EPOCH)


@pytest.mark.parametrize("memory", [True], ids=["with-memory"])
def test_two_ranks_then_one_rank_matches_the_one_rank_run(
    tiny_shards: TinyShards, memory: bool, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Resuming on another world size continues the same run: its weights are as near the
    one-rank run as an uninterrupted two-rank run's are. How near that is depends on the
    data and the CPU (the two world sizes round differently and the tiny net amplifies
    it: 5e-6 with one decoder's pixels, 8e-4 with another's), so the bound is measured,
    and the resumed half must move the weights far more than it."""
    from ssl_train.checkpoint import CheckpointStore

    baseline_one_rank = request.getfixturevalue(
        "baseline_one_rank_memory" if memory else "baseline_one_rank"
    )
    extra = [*CALM, *(MEMORY if memory else [])]
    uninterrupted = tmp_path / "two-ranks"
    run(command("pretrain", *pretrain_args(tiny_shards.train, uninterrupted, *extra), nprocs=2),
        tmp_path / "log")  # fmt: skip
    spread = largest_difference(final_weights(uninterrupted), final_weights(baseline_one_rank))
    bound = 2 * spread + 1e-5

    run_dir, trace_file = tmp_path / "run", tmp_path / "trace"
    args = pretrain_args(tiny_shards.train, run_dir, "--trace-samples", str(trace_file), *extra)
    run(command("pretrain", *args, "--stop-at-step", str(STEPS // 2), nprocs=2), tmp_path / "log")
    half_way = CheckpointStore(str(run_dir)).load(STEPS // 2)["model"]
    out = run(command("pretrain", *args), tmp_path / "log")
    assert f"resumed from step {STEPS // 2} (saved on 2 ranks;" in out
    final = final_weights(run_dir)
    assert largest_difference(final, final_weights(baseline_one_rank)) <= bound, spread
    if memory:
        assert largest_difference(memory_state(run_dir), memory_state(baseline_one_rank)) <= (
            2 * largest_difference(memory_state(uninterrupted), memory_state(baseline_one_rank))
            + 1e-5
        )
    moved = max((final[k] - half_way[k]).abs().max().item() for k in final if "running" not in k)
    assert moved > 10 * bound, (
        f"the one-process half moved the weights by {moved:.2g}, too little next to the "
        f"two world sizes' rounding spread {spread:.2g} for the check to mean anything"
    )
    lines = trace(trace_file)
    assert {line["world_size"] for line in lines} == {1, 2}
    assert_exactly_once(lines, tiny_shards.keys, STEPS_PER_EPOCH)


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(
    tiny_shards: TinyShards, baseline_one_rank: Path, s3_bucket, tmp_path: Path
) -> None:
    """The writer is frozen mid-checkpoint (its data uploaded, its COMPLETE marker not),
    then the process is SIGKILLed: the next start ignores that checkpoint."""
    run_dir = f"{s3_bucket.url}/runs/pretrain"
    args = pretrain_args(tiny_shards.train, run_dir, "--checkpoint-every-steps", "4", *CALM)
    env = dict(s3_bucket.env)
    with FlakyProxy(
        env["AWS_ENDPOINT_URL"], hold_writes=["step-000000008-g1/COMPLETE.json"]
    ) as proxy:
        job = start(
            command("pretrain", *args),
            tmp_path / "log",
            {**env, "AWS_ENDPOINT_URL": proxy.endpoint},
        )
        assert proxy.holding.wait(timeout=90), job.output()[-3000:]
        job.kill()
        proxy.drop_held = True
        proxy.release.set()
    listing = s3_bucket.client().list_objects_v2(
        Bucket=s3_bucket.name, Prefix="runs/pretrain/checkpoints/"
    )
    names = {obj["Key"].split("checkpoints/")[1] for obj in listing["Contents"]}
    assert "step-000000008-g1/tensors.safetensors" in names  # the interrupted checkpoint's data...
    assert "step-000000008-g1/COMPLETE.json" not in names  # ...without its marker
    # the killed job's lease stays until it expires; then the new one takes it over
    lease = json.loads(read_bytes(join(run_dir, LEASE_FILE)))
    assert not lease["released"] and lease["pid"] == job.proc.pid
    out = run(command("pretrain", *args), tmp_path / "log2", {**env, LEASE_SECONDS_ENV: "6"})
    assert f"took over the run dir's expired lease from job {lease['job']} on " in out
    assert time.time() > lease["expires"]
    assert "resumed from step 4 " in out
    assert_bitwise_equal(final_weights_s3(s3_bucket, run_dir), final_weights(baseline_one_rank))


LONG = ["--max-steps", "80", *CALM]  # long enough for a second job to start meanwhile


@pytest.fixture(scope="module")
def lone_long_run(tiny_shards: TinyShards, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lone-long")
    run(command("pretrain", *pretrain_args(tiny_shards.train, root / "run", *LONG)), root / "log")
    return root / "run"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_job_on_the_run_dir_is_refused_and_the_first_matches_a_lone_run(
    where: str,
    tiny_shards: TinyShards,
    lone_long_run: Path,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """A user submits twice: the second job names the first and exits; the first runs
    to the end undisturbed, bit for bit what it would have been alone."""
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        run_dir, env = f"{bucket.url}/runs/p", dict(bucket.env)
    else:
        run_dir, env = str(tmp_path / "run"), dict(os.environ)
    # The first job is paused until the second has found its lease, so that it cannot
    # finish first however slowly the second starts. The lease period leaves room for
    # that pause: the holder gives up after half a period without renewing, and renews
    # as soon as it runs again, which the second sees as a live holder. The first is
    # paused again right after that renewal until the second has decided: otherwise a
    # fast first job finishes and releases the lease before the second's next look,
    # and the second (rightly) takes over a finished run.
    env[LEASE_SECONDS_ENV] = "40"
    args = pretrain_args(tiny_shards.train, run_dir, *LONG)
    first = start(command("pretrain", *args), tmp_path / "first.log", env)
    deadline = time.monotonic() + 60
    while size_or_none(join(run_dir, LEASE_FILE)) is None:
        assert first.proc.poll() is None and time.monotonic() < deadline, first.output()[-3000:]
        time.sleep(0.05)
    os.killpg(first.proc.pid, signal.SIGSTOP)
    try:
        second = start(command("pretrain", *args), tmp_path / "second.log", env)
        deadline = time.monotonic() + 60
        while "waiting to see whether it is alive" not in second.output():
            assert second.proc.poll() is None and time.monotonic() < deadline, second.output()
            time.sleep(0.05)
        found = read_bytes(join(run_dir, LEASE_FILE))
        os.killpg(first.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while read_bytes(join(run_dir, LEASE_FILE)) == found:  # the first renews at once
            assert time.monotonic() < deadline, first.output()[-3000:]
            time.sleep(0.02)
        os.killpg(first.proc.pid, signal.SIGSTOP)
        assert second.wait(timeout=60) == 2, second.output()[-3000:]
    finally:
        os.killpg(first.proc.pid, signal.SIGCONT)
    refusal = second.output()
    assert "another job is writing this run dir: job " in refusal
    assert f"(pid {first.proc.pid}), holding it since " in refusal  # the holder, by name
    first.check()
    if where == "s3":
        finished = final_weights_s3(request.getfixturevalue("s3_bucket"), run_dir)
    else:
        finished = final_weights(Path(run_dir))
    assert_bitwise_equal(finished, final_weights(lone_long_run))
    lease = json.loads(read_bytes(join(run_dir, LEASE_FILE)))
    assert lease["released"] and lease["pid"] == first.proc.pid  # a clean end gives it back


def final_weights_s3(s3_bucket, run_dir: str):
    import safetensors.torch

    from shards.storage import join, read_bytes

    return safetensors.torch.load(read_bytes(join(run_dir, "final", "model.safetensors")))
