"""`ssl-train data-bench` as a user runs it: real console script, real shards, a worker."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert any(line.startswith("CPU stage:") for line in lines[:-1])  # human lines first
    report = json.loads(lines[-1])

    for field in (
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


def test_data_bench_refuses_a_batch_the_partitions_do_not_divide(tmp_path: Path) -> None:
    shards = tmp_path / "mnist"
    assert run_cli("create", "mnist5k:test", shards, "--shard-samples", "500").returncode == 0
    result = run_cli(
        "data-bench", "--data", shards, "--global-batch-size", "30", "--partitions", "4",
        tool="ssl-train",
    )  # fmt: skip
    assert result.returncode == 2 and "multiple of the number of partitions" in result.stderr
