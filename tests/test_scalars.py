"""Training curves in RUN_DIR/tensorboard, read back by TensorBoard's own reader: every
step once, also when a killed run resumes and trains some steps again."""

from __future__ import annotations

from pathlib import Path

import pytest
from stage_runs import TINY, command, run, start, wait_for_step

from ssl_train.stages.scalars import EVENTS_DIR, ScalarLog

from conftest import TinyShards


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag, every event TensorBoard reads under RUN_DIR."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # without purging: TensorBoard would hide a step written twice (it drops events whose
    # step goes backwards), which is what this must show
    accumulator = EventAccumulator(str(run_dir / EVENTS_DIR), purge_orphaned_data=False)
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_tensorboard_reads_what_is_written(tmp_path: Path) -> None:
    log = ScalarLog(str(tmp_path))
    log.add(10, {"train/loss": 3.25, "train/lr": 0.5})
    log.add(20, {"train/loss": 2.5, "train/lr": 0.25})
    log.add(30, {"train/loss": 2.0, "train/lr": 0.125})
    log.write_through(20)  # a checkpoint at step 20 is complete
    assert read_scalars(tmp_path) == {
        "train/loss": [(10, 3.25), (20, 2.5)],
        "train/lr": [(10, 0.5), (20, 0.25)],
    }
    log.write_through(30)
    assert read_scalars(tmp_path)["train/loss"] == [(10, 3.25), (20, 2.5), (30, 2.0)]


@pytest.mark.slow
def test_a_killed_and_resumed_run_has_every_step_once(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    run_dir, trace_file = tmp_path / "run", tmp_path / "trace"
    args = ["--data", str(tiny_shards.train), "--run-dir", str(run_dir), *TINY]
    args += ["--global-batch-size", "16", "--epochs", "2", "--workers", "0", "--metrics-port", "0"]
    args += ["--checkpoint-every-steps", "4", "--eval-data", str(tiny_shards.test)]
    job = start(command("supervised", *args, "--trace-samples", str(trace_file)), tmp_path / "a")
    wait_for_step(trace_file, 6, job)  # past the checkpoint of step 4
    job.kill()
    run(command("supervised", *args), tmp_path / "b")
    scalars = read_scalars(run_dir)
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 21))
    assert [step for step, _ in scalars["train/lr"]] == list(range(1, 21))
    assert [step for step, _ in scalars["eval/top1"]] == [20]
