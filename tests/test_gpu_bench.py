"""``bench/gpu_all.py``, the one script of every GPU measurement, checked end to end.

Without a GPU it must refuse politely, and its ``--allow-cpu`` smoke mode must run all
six parts (step comparison, decode throughput, two ranks against one process, a
pretraining run with SimCLRv2's memory, the decoded pixels against the CPU path, the
gpu-marked tests) with tiny sizes, each new check printing its PASS line; on a GPU
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


def _run(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *flags], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_it_refuses_and_says_how_to_smoke_test() -> None:
    result = _run()
    assert result.returncode == 2 and result.stdout == ""
    assert "no CUDA device is visible" in result.stderr and "--allow-cpu" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_smoke_run_measures_and_checks_all_six_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # as the script imports its neighbours
    from gpu_all import SMOKE_FLAGS  # the flags its refusal and docstring give

    result = _run("--allow-cpu", *SMOKE_FLAGS.split())
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["bench"] == "gpu_all" and report["errors"] == {}
    if not torch.cuda.is_available():
        assert "smoke run, not a GPU figure" in report["machine"]["device"]
    step = report["results"]["step"]["eager"]
    assert step["simclr"]["pairs_per_s"] > 0 and step["supervised"]["images_per_s"] > 0
    decode = report["results"]["decode"]
    assert decode["samples_timed"] == 8  # 16 samples in batches of 4, 2 of them warm-up
    assert decode["gpu_two_view_samples_per_s"] > 0
    assert decode["cpu_path_two_view_samples_per_cpu_s"] > 0
    assert 0 < decode["worker_cpu_s_per_sample_with_decode_gpu"] < 0.05  # headers only
    assert decode["decode_share_of_simclr_step"] > 0
    tests = report["results"]["tests"]
    assert tests["returncode"] == 0 and "-m gpu" in tests["command"]
    ran = tests["counts"].get("passed", 0) + tests["counts"].get("skipped", 0)
    assert ran >= 7 and tests["counts"].get("failed", 0) == 0  # every gpu test of the file
    assert set(report["seconds"]) == {
        "step", "decode", "ranks", "memory", "decode-pixels", "tests", "total"
    }  # fmt: skip
    assert "| eager |" in result.stdout and "--decode cpu (PIL" in result.stdout

    # the checks of what the single-process parts skip: one verdict line each
    lines = result.stdout.splitlines()
    for part in ("ranks", "memory", "decode-pixels"):
        verdicts = [line for line in lines if line.split(":")[0].split(" ")[-1] == part]
        assert len(verdicts) == 1 and verdicts[0].startswith(f"PASS {part}: "), verdicts
    assert report["verdicts"] == {"ranks": "PASS", "memory": "PASS", "decode-pixels": "PASS"}
    ranks = report["results"]["ranks"]
    assert ranks["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert ranks["failures"] == [] and ranks["figures"]["memory_buffer_between_ranks"] == 0.0
    assert {"bn_fp32_output", "bn_bf16_grad_input", "nt_xent_grad_z1", "memory_buffer"} <= set(
        ranks["figures"]
    )
    assert ranks["figures"]["bn_fp32_grad_weight"] <= 1e-4
    memory = report["results"]["memory"]
    assert memory["returncode"] == 0 and memory["steps"] == 4 and memory["memory_wraps"]
    assert memory["samples_per_s_logged"] > 0 and "--memory-size 24" in memory["command"]
    pixels = report["results"]["decode-pixels"]["sizes"]
    assert set(pixels) == {"224", "32"}
    assert pixels["224"]["batch_mean_abs"] <= pixels["224"]["tolerance_batch"]
