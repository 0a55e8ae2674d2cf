"""What a stage tells its user: a start line, progress with an ETA, evaluation progress,
the final model's folder, the result once per job, and no warnings from torch's
deprecated APIs, under torchrun as in one process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from stage_runs import TINY, command, run

from conftest import TinyShards

pytestmark = pytest.mark.slow  # real stage commands, one under torchrun


def test_two_ranks_log_once_with_a_start_line_an_eta_and_the_model(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = ["--data", str(tiny_shards.train), "--run-dir", str(run_dir), *TINY]
    args += ["--global-batch-size", "16", "--max-steps", "3", "--workers", "0"]
    out = run(command("pretrain", *args, "--metrics-port", "0", nprocs=2), tmp_path / "log")
    tagged = [line for line in out.splitlines() if "[ssl-train pretrain] " in line]
    starts = [line for line in tagged if "] start: " in line]
    assert len(starts) == 1, tagged  # rank 0 only
    assert re.search(
        r"start: 160 samples \(4 classes\) of .+; 3 steps \(0\.3 epochs of 10\) from step 0; "
        r"global batch 16 on 2 ranks \(8 each\); cpu fp32; run dir ",
        starts[0],
    ), starts[0]
    steps = [line for line in tagged if "] step " in line]
    assert len(steps) == 3 and all(re.search(r" eta \d+:\d\d:\d\d$", s) for s in steps), steps
    assert tagged[-1].endswith(f"finished: 3 steps; model in {run_dir}/final"), tagged[-1]
    results = [line for line in out.splitlines() if line.startswith('{"finished"')]
    assert len(results) == 1 and json.loads(results[0])["world_size"] == 2
    assert "FutureWarning" not in out and "DeprecationWarning" not in out, out[-3000:]


def test_evaluation_reports_its_progress(tiny_shards: TinyShards, tmp_path: Path) -> None:
    args = ["--data", str(tiny_shards.train), "--run-dir", str(tmp_path / "run"), *TINY]
    args += ["--global-batch-size", "16", "--max-steps", "2", "--workers", "0"]
    args += ["--eval-data", str(tiny_shards.test), "--eval-batch-size", "8"]
    out = run(command("supervised", *args, "--metrics-port", "0"), tmp_path / "log")
    evals = re.findall(r"\[ssl-train supervised\] eval (\d+)/40 samples", out)
    assert evals and all(0 < int(done) < 40 for done in evals), out[-3000:]
    assert "finished: 2 steps; top-1 " in out and " on 40 samples of " in out
