"""``bench/gpu_all.py``, the one script of every GPU measurement, checked end to end.

Without a GPU it must say so in one line and exit 0; its ``--allow-cpu`` smoke mode runs
every part (step comparison, device augmentation, peak memory against the model, decode
throughput, two ranks against one process with global batch norm's step cost, a
pretraining run with SimCLRv2's memory, the decoded pixels against the CPU path, the
gpu-marked tests) with tiny sizes, records one row per part and renders them as a CPU
smoke run; a part whose estimate no longer fits the budget is skipped, not run. On a GPU
machine the same command runs them on the GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_all.py"
sys.path.insert(0, str(REPO / "bench"))  # as the script imports its neighbours

import gpu_all  # noqa: E402
import results  # noqa: E402

PARTS = ["step", "augment", "peak-memory", "decode", "ranks", "global-bn", "memory"]
PARTS += ["decode-pixels", "tests", "total"]


def _run(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *flags], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path: Path) -> None:
    result = _run("--results-dir", str(tmp_path))
    assert result.returncode == 0 and result.stderr == ""
    [line] = result.stdout.splitlines()
    assert "no CUDA device is visible" in line and "nothing is measured" in line
    assert f"--allow-cpu {gpu_all.SMOKE_FLAGS}" in line  # how to run the CPU smoke run
    assert list(tmp_path.iterdir()) == []  # nothing recorded


def test_a_part_that_no_longer_fits_the_budget_is_skipped_and_reported() -> None:
    ran = []
    report: dict = {"seconds": {}, "results": {}, "errors": {}, "skipped": {}}
    budget = gpu_all.Budget(total_s=gpu_all.PART_ESTIMATES_S["augment"] + 5)
    assert budget.timeout(600) <= budget.total_s and budget.timeout(1) == 1.0
    gpu_all.timed_part("step", lambda: ran.append("step"), report, budget)  # needs 90 s
    gpu_all.timed_part("augment", lambda: ran.append("augment") or {"x": 1}, report, budget)
    assert ran == ["augment"] and set(report["skipped"]) == {"step"}
    assert "budget left, the part needs about 90 s" in report["skipped"]["step"]
    rows = {row["part"]: row for row in gpu_all.part_rows(report)}
    assert rows["step"]["status"] == "skipped" and rows["augment"]["status"] == "ran"
    assert rows["ranks"]["status"] == rows["global-bn"]["status"] == "not run"
    assert sum(gpu_all.PART_ESTIMATES_S.values()) <= gpu_all.BUDGET_S  # all fit on plan


def test_the_smoke_run_measures_every_part_and_records_a_smoke_row_each(tmp_path: Path) -> None:
    result = _run("--allow-cpu", *gpu_all.SMOKE_FLAGS.split(), "--results-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["bench"] == "gpu_all" and report["errors"] == report["skipped"] == {}
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        assert gpu_all.SMOKE_MARK in report["machine"]["device"]
    lines = results.latest_run("gpu_all", directory=tmp_path)
    rows = {line["row"]["part"]: line["row"] for line in lines}
    assert list(rows) == PARTS and {line["machine"]["device"] for line in lines} == {
        report["machine"]["device"]
    }
    assert all(rows[p]["status"] == "ran" for p in PARTS[:-1])
    assert rows["total"]["exit_status"] == 0 and rows["total"]["budget_s"] == gpu_all.BUDGET_S

    step = rows["step"]["result"]["eager"]
    assert step["simclr"]["pairs_per_s"] > 0 and step["supervised"]["images_per_s"] > 0
    augment = rows["augment"]["result"]
    assert augment["batch"] == 4 and augment["image_size"] == 32 and augment["repeats"] == 2
    assert augment["two_view_samples_per_s"] > 0 and augment["draw_s"] > 0
    assert augment["share_of_simclr_step"] > 0
    peak = rows["peak-memory"]["result"]
    assert peak["images"] == 8 and peak["preset"] == "tiny" and peak["precision"] == "fp32"
    # the model's figures stand on their own: its reserve is 3 GiB, activations are real
    assert peak["model_total_gib"] > 3 > peak["model_allocator_gib"] > 0
    assert peak["model_activations_gib"] > 0
    if on_gpu:
        assert peak["measured"]["peak_allocated_gib"] > 0 and peak["allocated_over_model"] > 0
    else:  # no figure is made up for the CPU
        assert peak["measured"] is None and peak["verdict"] == "N/A"
        assert "not measurable on cpu" in peak["summary"]
    bn = rows["global-bn"]["result"]
    assert bn["world"] == 2 and bn["images_per_rank"] == 8 and bn["repeats"] == 2
    assert bn["batch_norm_layers"] > 10 and len(bn["seconds_global"]) == 2
    assert bn["plain_s_per_step"] > 0 and bn["global_s_per_step"] > 0
    lo, hi = bn["ratio_range"]
    assert lo <= bn["ratio_median"] <= hi
    decode = rows["decode"]["result"]
    assert decode["samples_timed"] == 8  # 16 samples in batches of 4, 2 of them warm-up
    assert decode["gpu_two_view_samples_per_s"] > 0 and decode["decode_share_of_simclr_step"] > 0
    assert 0 < decode["worker_cpu_s_per_sample_with_decode_gpu"] < 0.05  # headers only
    tests = rows["tests"]["result"]
    assert tests["returncode"] == 0 and "-m gpu" in tests["command"]
    ran = tests["counts"].get("passed", 0) + tests["counts"].get("skipped", 0)
    assert ran >= 7 and tests["counts"].get("failed", 0) == 0  # every gpu test of the file

    # the checks of what the single-process parts skip: one verdict line each
    out = result.stdout.splitlines()
    for part in ("ranks", "memory", "decode-pixels"):
        verdicts = [line for line in out if line.split(":")[0].split(" ")[-1] == part]
        assert len(verdicts) == 1 and verdicts[0].startswith(f"PASS {part}: "), verdicts
    assert "| eager |" in result.stdout and "--decode cpu (PIL" in result.stdout
    ranks = rows["ranks"]["result"]
    assert ranks["device"] == ("cuda:0" if on_gpu else "cpu") and ranks["failures"] == []
    assert ranks["figures"]["memory_buffer_between_ranks"] == 0.0
    assert ranks["figures"]["bn_fp32_grad_weight"] <= 1e-4
    memory = rows["memory"]["result"]
    assert memory["returncode"] == 0 and memory["steps"] == 4 and memory["memory_wraps"]
    pixels = rows["decode-pixels"]["result"]["sizes"]
    assert pixels["224"]["batch_mean_abs"] <= pixels["224"]["tolerance_batch"]

    # BENCHMARKS.md's section: a CPU run says, first, that its figures are not a GPU's
    text = gpu_all.render(lines)
    smoke = text.startswith("**CPU smoke run: not GPU figures.**")
    assert smoke != on_gpu and text.count("\n| ") == len(PARTS)  # the header, a line a part
    card = [{**line, "machine": {**line["machine"], "device": "NVIDIA H100"}} for line in lines]
    assert gpu_all.render(card).startswith("On NVIDIA H100 (CUDA ")
