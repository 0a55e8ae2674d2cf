"""`ssl-train demo`: the label subsets, the claims it checks, what it writes, and the whole
demo end to end (interrupted with Ctrl-C, then run again to the end)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from stage_runs import descendants

from shards.sources import mnist5k
from ssl_train.demo import (
    COMMON_ARGS,
    FRACTIONS,
    RECIPE,
    acceptance,
    claim_margins,
    recipe_with_threads,
    report,
    subset_lists,
    timing,
)

BIN = Path(sys.executable).parent
GOOD = {
    "1%": {"supervised": 0.55, "finetuned": 0.80, "distilled": 0.79},
    "10%": {"supervised": 0.90, "finetuned": 0.93, "distilled": 0.95},
}


def test_label_subsets_are_balanced_fixed_and_from_the_training_split() -> None:
    labels = {item.key: item.cls for item in mnist5k("train").items}
    for _, per_class in FRACTIONS.values():
        keys = subset_lists(per_class)
        assert len(keys) == len(set(keys)) == 10 * per_class
        assert Counter(labels[k] for k in keys) == {digit: per_class for digit in range(10)}
        assert keys == subset_lists(per_class)
    assert subset_lists(4, seed=1) != subset_lists(4)


def test_each_claim_fails_on_its_own() -> None:
    assert all(ok for _, ok in acceptance(GOOD))
    cases = {
        0: {"1%": {**GOOD["1%"], "supervised": 0.71}},  # only 9 points ahead on 1%
        1: {"10%": {**GOOD["10%"], "supervised": 0.94}},  # worse than supervised on 10%
        2: {"1%": {**GOOD["1%"], "distilled": 0.77}},  # 3 points below its teacher
        3: {"10%": {**GOOD["10%"], "distilled": 0.9}},
    }
    for failing, change in cases.items():
        verdicts = [ok for _, ok in acceptance({**GOOD, **change})]
        assert verdicts == [i != failing for i in range(4)], (failing, verdicts)
    exact = {"1%": {"supervised": 0.5, "finetuned": 0.6, "distilled": 0.58}, "10%": GOOD["10%"]}
    assert all(ok for _, ok in acceptance(exact))  # the bounds themselves pass


def test_a_rerun_keeps_the_time_of_the_run_that_trained(tmp_path: Path) -> None:
    assert timing(str(tmp_path), 700, trained=7) == {"seconds": 700}
    assert report({**GOOD, "seconds": 700}, str(tmp_path)) == 0
    assert timing(str(tmp_path), 9, trained=0) == {"seconds": 700, "rerun_seconds": 9}
    report({**GOOD, "seconds": 700, "rerun_seconds": 9}, str(tmp_path))
    assert timing(str(tmp_path), 8, trained=0) == {"seconds": 700, "rerun_seconds": 8}
    # stages trained again (their run dirs removed) make a new figure
    assert timing(str(tmp_path), 300, trained=2) == {"seconds": 300}


def test_threads_fill_the_same_cores_in_every_job() -> None:
    """--threads T: T per process of the 2-process jobs, 2T for the single-process ones;
    every job's environment also keeps OpenMP from spinning on oversubscribed cores."""
    recipe = recipe_with_threads(2)
    assert RECIPE["pretrain"].get("j", COMMON_ARGS["j"]) == "1x2"
    assert RECIPE["finetune"]["j"] == RECIPE["supervised"]["j"] == "1x1"
    assert recipe["pretrain"]["env"] == recipe["distill"]["env"]
    assert recipe["pretrain"]["env"] == "OMP_NUM_THREADS=2,OMP_WAIT_POLICY=PASSIVE"
    assert recipe["finetune"]["env"] == "OMP_NUM_THREADS=4,OMP_WAIT_POLICY=PASSIVE"
    assert "env" not in RECIPE["pretrain"]  # the recipe itself is left as it was
    with pytest.raises(ValueError, match="--threads 0"):
        recipe_with_threads(0)


def test_claim_margins_are_points_beyond_each_bound() -> None:
    margins = claim_margins(GOOD)
    assert margins == {
        "1% finetuned - supervised >= 10": 15.0,
        "10% finetuned - supervised >= 0": 3.0,
        "1% distilled - teacher >= -2": 1.0,
        "10% distilled - teacher >= -2": 4.0,
    }


def test_report_writes_results_and_chart_and_fails_when_a_claim_fails(
    tmp_path: Path, capsys
) -> None:
    assert report({**GOOD, "seconds": 612}, str(tmp_path)) == 0
    assert json.loads((tmp_path / "results.json").read_text()) == {**GOOD, "seconds": 612}
    with Image.open(tmp_path / "results.png") as chart:
        assert chart.format == "PNG" and chart.size[0] >= 600
    out = capsys.readouterr().out
    assert "80.0%" in out and "FAIL" not in out and str(tmp_path / "results.png") in out
    bad = {**GOOD, "1%": {**GOOD["1%"], "finetuned": 0.6}, "seconds": 1}
    assert report(bad, str(tmp_path)) == 1
    assert "FAIL 1% labels: SimCLRv2 finetuned 60.0%" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["1%"]["finetuned"] == 0.6


@pytest.mark.slow
@pytest.mark.timeout(2100)  # the whole demo (at most 12 minutes on 2 cores), interrupted, rerun
def test_demo_end_to_end_interrupted_then_resumed(tmp_path: Path) -> None:
    """The full `make demo` recipe, as a user runs it: Ctrl-C while finetuning stops every
    process it started; running it again reuses pretraining and ends with the paper's
    claims holding (exit 0), results.json and the chart."""
    out = tmp_path / "demo-out"
    # as `make demo` runs it: the venv not activated (its bin not on PATH), no AWS settings
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != str(BIN))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"PATH": path}
    cmd = [str(BIN / "ssl-train"), "demo", "--out", str(out)]
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    pretrained = out / "runs" / "pretrain" / "final" / "model.safetensors"
    deadline = time.monotonic() + 900
    while not (out / "runs" / "finetune-1pct" / "config.json").exists():
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "pretraining did not finish in 15 minutes"
        time.sleep(0.5)
    started = descendants(first.pid)
    assert any("moto" in cmd for _, cmd in started), started
    assert any("torchrun" in cmd or "torch.distributed.run" in cmd for _, cmd in started)
    first.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert first.wait(timeout=60) == 130
    first_log = (tmp_path / "first.log").read_text()
    assert "interrupted: finished stages stay in" in first_log
    for pid, command in started:  # the S3 server, Prometheus, TorchX's replicas, workers
        assert not _alive(pid), f"still running after Ctrl-C: {pid} {command}"
    before = pretrained.read_bytes()

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert "pretrain: finished earlier" in second.stdout
    assert pretrained.read_bytes() == before
    assert "ok: s3://ssl-train-demo/mnist5k/train: 8 shards, 4000 samples" in second.stdout
    assert "metrics of the running job: http://127.0.0.1:" in second.stdout
    assert "finetune-1pct: step " in second.stdout  # progress lines from the jobs
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"1%", "10%", "seconds"}
    for fraction in ("1%", "10%"):
        assert set(results[fraction]) == {"supervised", "finetuned", "distilled"}
    assert all(ok for _, ok in acceptance(results)), results
    assert second.stdout.count("[demo] ok  ") == 4 and "FAIL" not in second.stdout
    with Image.open(out / "results.png") as chart:
        assert chart.format == "PNG"
    assert str(out / "results.json") in second.stdout and "total time" in second.stdout

    third = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert third.returncode == 0, (third.stdout + third.stderr)[-4000:]
    assert "(7 finished stages reused)" in third.stdout
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["seconds"] == results["seconds"] and rerun["1%"] == results["1%"]
    assert 0 < rerun["rerun_seconds"] < results["seconds"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
