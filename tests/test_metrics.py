"""Metrics as operators see them: a real Prometheus server scrapes a real 2-process
torchrun training run, and its HTTP API answers the questions dashboards and alerts ask.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from stage_runs import TINY, children, command, run, start, trace, wait_for_step

from shards.local_s3 import free_port
from ssl_train.local_prometheus import LocalPrometheus, available
from ssl_train.metrics import METRICS, markdown_table

from conftest import TinyShards

README = Path(__file__).resolve().parent.parent / "README.md"
# Set only in some runs: GPU memory (CUDA), final evaluation (--eval-data), train top-1
# (finetune), a storage failure; everything else must be in every training scrape.
CONDITIONAL = {
    "gpu_memory_allocated_bytes", "gpu_memory_reserved_bytes", "eval_top1", "eval_top5",
    "train_top1",
}  # fmt: skip


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def pretrain(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--run-dir", str(run_dir), *TINY, "--global-batch-size", "16",
        "--log-every-steps", "5", *extra,
    ]  # fmt: skip


def metered(port: int, trace_file: Path, *extra: str) -> list[str]:
    """Flags of a run that serves metrics on ``port`` and traces its steps."""
    return ["--metrics-port", str(port), "--trace-samples", str(trace_file), *extra]


def test_every_metric_is_exported_with_its_listed_type_and_documented(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    port, trace_file = free_port(), tmp_path / "trace"
    args = pretrain(tiny_shards.train, tmp_path / "run", "--max-steps", "100000", "--workers", "0")
    args += metered(port, trace_file, "--checkpoint-every-steps", "3")
    job = start(command("pretrain", *args), tmp_path / "log")
    try:
        wait_for_step(trace_file, 6, job)

        def scraped_with_loss() -> str | None:
            text = scrape(port)
            return text if "ssl_train_loss" in text else None

        text = wait_until(scraped_with_loss, 30, "a logged loss")
    finally:
        job.kill()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    exported = {
        name: family.type for name, family in families.items() if name.startswith("ssl_train_")
    }
    for spec in METRICS:
        name = spec.full_name.removesuffix("_total") if spec.kind == "counter" else spec.full_name
        if spec.name in CONDITIONAL:
            assert name not in exported or exported[name] == spec.kind
            continue
        assert exported.get(name) == spec.kind, (
            f"{name}: listed {spec.kind}, exported {exported.get(name)}"
        )
        labels = {key for sample in families[name].samples for key in sample.labels} - {"le"}
        assert labels == set(spec.labels), (name, labels)
    listed = {
        spec.full_name.removesuffix("_total") if spec.kind == "counter" else spec.full_name
        for spec in METRICS
    }
    assert set(exported) <= listed, f"exported but not listed: {set(exported) - listed}"
    assert markdown_table() in README.read_text(), (
        "README's metrics table is stale: paste markdown_table()"
    )


def test_data_loader_workers_counters_reach_the_scrape(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    """Only DataLoader workers read sample bytes (the training process reads manifests
    and indexes, a few KB): the scrape must count the workers' reads."""
    metrics_dir = tmp_path / "metrics"
    env = {**os.environ, "SSL_TRAIN_METRICS_DIR": str(metrics_dir)}
    args = pretrain(tiny_shards.train, tmp_path / "run", "--max-steps", "10", "--workers", "2")
    run(command("pretrain", *args), tmp_path / "log", env)
    from prometheus_client import CollectorRegistry, multiprocess

    files = list(metrics_dir.glob("counter_*.db"))
    assert len(files) >= 3, files  # the training process and its two workers
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    read = registry.get_sample_value(
        "ssl_train_storage_read_bytes_total", {"stage": "pretrain", "run": "run", "rank": "0"}
    )
    from shards.manifest import read_index, read_manifest

    entries = read_manifest(str(tiny_shards.train)).shards
    indexes = [read_index(str(tiny_shards.train), entry) for entry in entries]
    sample_bytes = sum(r.end - r.offset for index in indexes for r in index.samples)
    assert read is not None and read >= sample_bytes, (read, sample_bytes)  # one epoch: all


@pytest.mark.slow
@pytest.mark.skipif(
    not available(), reason="needs the prometheus binary (Debian package prometheus)"
)
def test_prometheus_sees_progress_on_both_ranks_and_the_restart(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    port, trace_file = free_port(), tmp_path / "trace"
    args = pretrain(tiny_shards.train, tmp_path / "run", "--max-steps", "100000", "--workers", "1")
    args += metered(port, trace_file, "--checkpoint-every-steps", "2")
    job = start(command("pretrain", *args, nprocs=2, max_restarts=1), tmp_path / "log")
    try:
        with LocalPrometheus([f"127.0.0.1:{port}"], interval_s=1.0) as prometheus:
            wait_for_step(trace_file, 5, job)

            def per_rank(expr: str) -> dict[str, float] | None:
                found = {
                    r["metric"].get("rank"): float(r["value"][1]) for r in prometheus.query(expr)
                }
                return found if set(found) == {"0", "1"} else None

            rates = wait_until(
                lambda: per_rank("rate(ssl_train_samples_total[30s])"), 60, "a sample rate"
            )
            assert all(rate > 0 for rate in rates.values()), rates
            p90 = "histogram_quantile(0.9, sum by (le, rank) (rate(ssl_train_step_duration_seconds_bucket[30s])))"
            quantiles = wait_until(lambda: per_rank(p90), 30, "step-time quantiles")
            assert all(0 < q < 60 for q in quantiles.values()), quantiles
            waits = wait_until(
                lambda: per_rank("rate(ssl_train_data_wait_seconds_sum[30s])"), 30, "data wait"
            )
            assert all(w >= 0 for w in waits.values()), waits
            assert per_rank("ssl_train_restarts") == {"0": 0.0, "1": 0.0}

            done = max(line["global_step"] for line in trace(trace_file))
            victim = children(job.proc.pid)[-1]
            os.kill(victim, signal.SIGKILL)
            restarted = wait_until(
                lambda: per_rank("ssl_train_restarts") == {"0": 1.0, "1": 1.0},
                90,
                "the restart count",
            )
            assert restarted
            wait_for_step(trace_file, done + 3, job)  # training goes on after the restart

            def resumed() -> bool:
                found = prometheus.query("sum(ssl_train_resumes_total)")
                return bool(found) and float(found[0]["value"][1]) >= 1

            assert wait_until(resumed, 30, "a resume in the scrape")
    finally:
        job.proc.send_signal(signal.SIGTERM)
        try:
            job.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            job.kill()


@pytest.mark.slow
def test_two_nodes_on_one_host_serve_their_own_ranks(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    """Two torchrun agents (nodes) on one host: node r serves on PORT + r, its own rank."""
    import sys

    port, rendezvous, trace_file = free_port(), free_port(), tmp_path / "trace"
    args = pretrain(tiny_shards.train, tmp_path / "run", "--max-steps", "100000", "--workers", "0")
    args += metered(port, trace_file)
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{rendezvous}", "--rdzv-id=two-nodes",
    ]  # fmt: skip
    nodes = [
        start([*launcher, "-m", "ssl_train.cli", "pretrain", *args], tmp_path / f"log{n}")
        for n in range(2)
    ]
    try:
        wait_for_step(trace_file, 3, nodes[0])
        seen = []
        for node in range(2):
            text = scrape(port + node)
            steps = [line for line in text.splitlines() if line.startswith("ssl_train_steps_total")]
            assert len(steps) == 1, text  # one node, one rank: not the other node's as well
            seen.append(steps[0].split('rank="')[1].split('"')[0])
        assert sorted(seen) == ["0", "1"]
    finally:
        for node in nodes:
            node.kill()
