"""``bench/scale.py`` runs end to end at a size that takes seconds, so it cannot rot.

The script is run as BENCHMARKS.md's commands run it (a subprocess), every part at once,
at 8 and 16 GPUs on a 9-shard synthetic set, with the tiny preset for the memory and
checkpoint parts and 2 rendezvous agents with short timeouts for the restart part. Its
rows must land in the results directory it was given, stamped with the commit and the
machine, with values that hold at any size (each rank reads exactly its own samples;
every memory figure says whether it was measured or modelled), and ``render`` must make
tables of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import results  # noqa: E402

SMALL = [
    "--world-sizes", "8", "16",
    "--datasets", "small", "--batches", "512", "--nodes", "1",
    "--presets", "tiny", "--image-size", "32",
    "--checkpoint-preset", "tiny", "--checkpoint-repeats", "1",
    "--restart-gpus", "16", "--restart-preset", "tiny",
    "--rdzv-conf", "keep_alive_interval=1,keep_alive_max_attempt=2,last_call_timeout=1",
    "--steady-s", "1", "--import-repeats", "1", "--gloo-ranks", "2", "4",
]  # fmt: skip
MEMORY_FIGURES = {
    "memory": ("activation_mib_per_image_bf16", "state_gib", "per_gpu_gib", "fewest_80gib"),
    "activation_check": ("cpu_bytes_per_image", "meta_bytes_per_image"),
    "checkpoint": ("file_bytes", "save_peak_rss_added_bytes", "load_peak_rss_added_bytes"),
    "data": ("plan_bytes", "manifest_bytes", "worker_index_bytes", "per_rank_bytes"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One run of the script; its lines as ``results.latest_run`` reads them."""
    folder = tmp_path_factory.mktemp("scale-results")
    committed = REPO / "bench" / "results" / "scale.jsonl"
    before = committed.read_bytes() if committed.exists() else None
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "scale.py"), *SMALL, "--results-dir", str(folder)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the rows went to --results-dir, not into the committed results
    assert (committed.read_bytes() if committed.exists() else None) == before
    return results.latest_run("scale", directory=folder)


def rows_of(lines: list[dict], part: str) -> list[dict]:
    return [line["row"] for line in lines if line["row"]["part"] == part]


def test_every_part_leaves_rows_stamped_with_the_commit_and_the_machine(run: list[dict]) -> None:
    parts = {line["row"]["part"] for line in run}
    assert {"run", "memory", "activation_check", "checkpoint", "data"} <= parts
    assert {"restart_phase", "restart", "gloo", "cadence"} <= parts
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert {line["commit"] for line in run} == {head}
    assert {line["run"] for line in run} == {run[0]["run"]}
    assert all(line["machine"]["nproc"] >= 1 and line["machine"]["torch"] for line in run)
    # the command BENCHMARKS.md prints is the one that ran, without where the rows went
    (command,) = rows_of(run, "run")
    assert command["argv"] == SMALL


def test_each_rank_reads_its_own_samples_in_a_few_requests_per_step(run: list[dict]) -> None:
    data = rows_of(run, "data")
    assert [(r["dataset"], r["global_batch"], r["world_size"]) for r in data] == [
        ("small", 512, 8),
        ("small", 512, 16),
    ]
    for r in data:
        assert r["samples_read_per_sample_used"] == 1.0
        # the last partial batch is dropped (under 1), the nodes' scaling is exact at 1 node
        assert 0.95 <= r["data_bytes_ratio"] <= 1.0
        assert 0 < r["index_bytes_ratio"] < 0.01 and 0 < r["manifest_bytes_ratio"] < 0.001
        # about max(32 partitions, W) data requests a step, plus the indexes
        assert 32 <= r["requests_per_step"] < 40 and r["requests_per_step_per_rank"] > 0
        assert r["samples_per_data_request"] > 1 and r["plan_us_per_rank_step"] > 0
        assert 0 < r["bytes_before_first_batch"] < 50 * 2**20
        assert 1 <= r["indexes_kept"] <= r["index_bound"]
        assert r["plan_bytes"] > 0 and r["worker_index_bytes"] > 0
        assert (
            r["per_rank_bytes"]
            == 9 * (r["plan_bytes"] + r["manifest_bytes"]) + 8 * r["worker_index_bytes"]
        )


def test_every_memory_figure_says_whether_it_was_measured_or_modelled(run: list[dict]) -> None:
    for part, figures in MEMORY_FIGURES.items():
        for row in rows_of(run, part):
            for figure in figures:
                assert row["sources"][figure] in {"measured", "modelled"}, (part, figure)
    (check,) = rows_of(run, "activation_check")
    assert check["cpu_bytes_per_image"] == check["meta_bytes_per_image"] > 0
    (checkpoint,) = rows_of(run, "checkpoint")
    # the file holds the state's tensors and a little metadata
    assert checkpoint["state_bytes"] <= checkpoint["file_bytes"] < 1.05 * checkpoint["state_bytes"]
    assert checkpoint["save_blocks_cpu_s"] >= 0 and checkpoint["load_wall_s"] > 0
    (memory,) = rows_of(run, "memory")
    assert memory["per_gpu_gib"]["8"] > memory["per_gpu_gib"]["16"] > memory["state_gib"]


def test_restart_phases_are_each_measured_quoted_or_stated_and_add_up(run: list[dict]) -> None:
    phases = rows_of(run, "restart_phase")
    assert {p["source"] for p in phases} == {"measured", "quoted", "stated"}
    (restart,) = rows_of(run, "restart")
    assert restart["total_s"] == pytest.approx(sum(p["seconds"] for p in phases), abs=0.1)
    assert restart["rendezvous"]["agents"] == 2
    # the first batch is the data part's count at the restart's size
    (at_16,) = [r for r in rows_of(run, "data") if r["world_size"] == 16]
    assert restart["first_batch_bytes"] == at_16["bytes_before_first_batch"]
    lazy = {g["ranks"]: g for g in rows_of(run, "gloo") if g["lazy"]}
    eager = {g["ranks"]: g for g in rows_of(run, "gloo") if not g["lazy"]}
    assert lazy[4]["make_requests"] < eager[4]["make_requests"]


def test_render_makes_the_tables_benchmarks_md_shows(run: list[dict]) -> None:
    import scale

    text = scale.render(run)
    assert run[0]["commit"][:10] in text
    assert "bench/scale.py " + " ".join(SMALL) in text
    assert "| small | 512 | 8 | 1.000 |" in text and "| small | 512 | 16 | 1.000 |" in text
    for heading in ("GPU memory per rank", "Checkpoint of tiny", "Data, per epoch", "lost node"):
        assert heading in text
    assert "(measured)" in text and "modelled" in text and "| stated |" in text
