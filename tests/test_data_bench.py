"""`ssl-train data-bench` as a user runs it: real console script, real shards, a worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli


def test_data_bench_reports_sane_figures_from_a_worker_process(tmp_path: Path) -> None:
    shards = tmp_path / "mnist"
    created = run_cli("create", "mnist5k:test", shards, "--shard-samples", "90")
    assert created.returncode == 0, created.stderr

    # --partitions 4: chunks of 8 samples, so a request carries several samples (with the
    # default 32 partitions a batch of 32 is one sample per partition and per request)
    result = run_cli(
        "data-bench",
        "--data",
        shards,
        "--workers",
        "1",
        "--batches",
        "3",
        "--global-batch-size",
        "32",
        "--image-size",
        "16",
        "--partitions",
        "4",
        tool="ssl-train",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    # the headline first: samples per CPU-second of the workers, then the cores per GPU
    assert lines[0].startswith(
        f"CPU stage:    {report['samples_per_cpu_s']:.1f} two-view samples per CPU-second"
    )
    assert lines[1].strip() == (
        f"one GPU at 1 steps/s with 32 samples per step needs "
        f"{report['cores_per_gpu']:.2f} cores of this CPU"
    )

    for field in (
        "samples_per_cpu_s",
        "cores_per_gpu",
        "worker_cpu_s",
        "batch_cpu_s",
        "samples_per_s",
        "samples_per_s_per_core",
        "cpu_cores_used",
        "device",
        "device_s_per_batch",
        "bytes_read",
        "bytes_per_epoch_ratio",
        "requests",
        "samples_per_request",
        "batches",
        "global_batch_size",
        "image_size",
        "workers",
    ):
        assert field in report, field
    assert report["samples_per_s"] > 0 and report["samples_per_s_per_core"] > 0
    # the workers' whole processes (making and handing over batches) cost more than
    # making them alone (give or take /proc's 10 ms ticks: these batches are tiny);
    # samples per CPU-second and cores per GPU come from that
    assert report["worker_cpu_scope"] == "process"
    assert report["worker_cpu_s"] >= report["batch_cpu_s"] - 0.02 and report["batch_cpu_s"] > 0
    # the worker's first batch (one-off costs) is left out of the CPU figures
    assert report["steady_samples"] == 3 * 32
    # (worker_cpu_s is rounded to the millisecond: these tiny batches take a few dozen)
    assert report["samples_per_cpu_s"] == pytest.approx(96 / report["worker_cpu_s"], rel=0.05)
    assert (report["steps_per_s"], report["batch_per_gpu"], report["gpus"]) == (1.0, 32, 1)
    assert abs(report["cores_per_gpu"] - 32 / report["samples_per_cpu_s"]) < 1e-3
    assert report["cpu_cores_used"] == 1 and report["workers"] == 1
    assert report["device_s_per_batch"] > 0 and report["device"]
    assert (report["batches"], report["global_batch_size"], report["image_size"]) == (3, 32, 16)
    # counted inside the worker process: warm-up + 3 batches of 32, nothing prefetched beyond
    assert report["samples_consumed"] == 4 * 32
    assert report["requests"] > 0 and report["bytes_read"] > 0
    assert report["samples_per_request"] >= 1
    # every sample byte is read once; manifest and indexes come on top
    assert report["range_bytes"] == report["sample_shard_bytes"]
    assert 1.0 <= report["bytes_per_epoch_ratio"] < 1.5


def test_data_bench_measures_one_gpus_share_at_its_step_rate(tmp_path: Path) -> None:
    shards = tmp_path / "mnist"
    assert run_cli("create", "mnist5k:test", shards, "--shard-samples", "90").returncode == 0
    common = ["data-bench", "--data", shards, "--workers", "1", "--batches", "2"]
    result = run_cli(
        *common, "--global-batch-size", "64", "--image-size", "16", "--partitions", "4",
        "--gpus", "4", "--steps-per-s", "5", "--mode", "finetune", tool="ssl-train", timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    # rank 0 of 4 makes 16 of every 64: warm-up + 2 batches of 16, one view each
    assert (report["gpus"], report["batch_per_gpu"], report["views"]) == (4, 16, 1)
    assert report["samples_consumed"] == 3 * 16
    assert abs(report["cores_per_gpu"] - 5 * 16 / report["samples_per_cpu_s"]) < 1e-3
    assert "one-view samples per CPU-second" in lines[0]
    assert "one GPU at 5 steps/s with 16 samples per step needs" in lines[1]

    refused = run_cli(*common, "--global-batch-size", "64", "--gpus", "3", tool="ssl-train")
    assert refused.returncode == 2 and "--gpus 3 must be at least 1 and divide" in refused.stderr


def test_data_bench_refuses_a_batch_the_partitions_do_not_divide(tmp_path: Path) -> None:
    shards = tmp_path / "mnist"
    assert run_cli("create", "mnist5k:test", shards, "--shard-samples", "500").returncode == 0
    result = run_cli(
        "data-bench", "--data", shards, "--global-batch-size", "30", "--partitions", "4",
        tool="ssl-train",
    )  # fmt: skip
    assert result.returncode == 2 and "multiple of the number of partitions" in result.stderr


def test_worker_cpu_is_read_on_the_clock_that_marks_the_steady_state() -> None:
    # The steady state starts at the worker's process_time() (nanoseconds); the end is
    # read from outside. Read in /proc's 10 ms ticks, a few milliseconds of work came
    # out as 0 or as a negative CPU time, and the report divided by zero.
    import os
    import time

    from ssl_train.data.bench import process_cpu_s

    before_inside, before_outside = time.process_time(), process_cpu_s(os.getpid())
    while time.process_time() - before_inside < 0.003:
        pass
    spent_inside = time.process_time() - before_inside
    spent_outside = process_cpu_s(os.getpid()) - before_outside  # type: ignore[operator]
    assert abs(spent_outside - spent_inside) < 0.5e-3, (spent_inside, spent_outside)
