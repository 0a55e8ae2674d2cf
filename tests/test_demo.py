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
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from stage_runs import alive, assert_clean, descendants

from shards.sources import mnist5k
from ssl_train.demo import (
    COMMON_ARGS,
    FRACTIONS,
    MEMORY_SIZE,
    RECIPE,
    acceptance,
    claim_margins,
    keep_settings,
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


def test_the_demo_pretrains_with_the_memory_and_compares_without_it() -> None:
    """SimCLRv2 as the paper defines it: pretraining keeps a memory of negatives that an
    epoch can hold; --memory-size replaces it (0: without), and a size an epoch cannot
    hold is refused before any work."""
    from ssl_train.stages.config import StageConfig

    pretrain = RECIPE["pretrain"]
    config = StageConfig.for_stage(
        "pretrain", data="d", run_dir="r", preset="tiny", memory_size=int(pretrain["memory_size"])
    )
    assert 0 < config.memory_size < 4000 // 256 * 256
    assert recipe_with_threads(1)["pretrain"]["memory_size"] == pretrain["memory_size"]
    assert recipe_with_threads(1, memory_size=0)["pretrain"]["memory_size"] == "0"
    assert RECIPE["pretrain"]["memory_size"] == pretrain["memory_size"]  # left as it was
    with pytest.raises(ValueError, match=r"--memory-size -1: give 0 .*or more"):
        recipe_with_threads(1, memory_size=-1)
    # the rule the ranks apply (stages.config.check_memory_size), on the demo's epoch
    refused = r"--memory-size 3840: an epoch of the demo's training digits trains on 3840 samples"
    with pytest.raises(ValueError, match=refused + r".*use fewer than 3840"):
        recipe_with_threads(1, memory_size=3840)
    assert recipe_with_threads(1, memory_size=3839)["pretrain"]["memory_size"] == "3839"


def test_a_demo_folder_refuses_another_recipe(tmp_path: Path) -> None:
    """A rerun reuses finished stages, so another seed or memory would mix two recipes."""
    first = {"seed": 0, "threads": 1, "memory_size": 512}
    keep_settings(str(tmp_path), first)
    keep_settings(str(tmp_path), dict(first))  # the same flags resume
    with pytest.raises(ValueError, match=r"holds a demo run with --memory-size 512.*another --out"):
        keep_settings(str(tmp_path), {**first, "memory_size": 0})
    with pytest.raises(ValueError, match="--seed 0"):
        keep_settings(str(tmp_path), {**first, "seed": 1})
    assert json.loads((tmp_path / "settings.json").read_text()) == first


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


# A healthy demo prints a progress line every few seconds; the longest quiet spell (a job
# starting, a stage's evaluation) is under a minute on 2 cores. Silence this long is a hang.
STALL_SECONDS = 300


class DemoProcess:
    """``ssl-train demo`` writing to a log file, watched for progress: a slow machine only
    makes the test slower, while a stall fails it at once with the demo's last lines."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd
            )

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def dump_stacks(self) -> str:
        """Every thread's stack of the demo, its sharding workers and its training ranks
        (they dump on SIGUSR1, like every ssl-train process; torchrun, SeaweedFS and Prometheus
        would die of it), and the tails of the job logs the ranks write theirs to."""
        dumping = [self.process.pid] + [
            pid
            for pid, cmd in descendants(self.process.pid)
            if (
                "-m ssl_train.cli" in cmd and "torchrun" not in cmd and "distributed.run" not in cmd
            )
            or "multiprocessing.spawn" in cmd
        ]
        for pid in dumping:
            if alive(pid):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(3)
        logs = self.log.parent / "demo-out" / "logs"
        recent = [
            p for p in logs.rglob("*") if p.is_file() and time.time() - p.stat().st_mtime < 60
        ]
        return "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-3000:]}" for p in recent)

    def wait(self, until: Callable[[], bool] | None = None) -> str:
        """Until the demo exits (or ``until()`` holds); its output so far."""
        size, quiet_since = -1, time.monotonic()
        while self.process.poll() is None and not (until is not None and until()):
            if self.log.stat().st_size != size:
                size, quiet_since = self.log.stat().st_size, time.monotonic()
            elif time.monotonic() - quiet_since > STALL_SECONDS:
                stacks = self.dump_stacks()
                self.process.send_signal(signal.SIGINT)
                self.process.wait(timeout=60)
                pytest.fail(
                    f"the demo printed nothing for {STALL_SECONDS} s:\n{self.tail()}\n{stacks}"
                )
            time.sleep(0.5)
        return self.log.read_text()


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 12 minutes on 2 cores; a slower machine may take twice that
def test_demo_end_to_end_interrupted_then_resumed(tmp_path: Path) -> None:
    """The full `make demo` recipe, as a user runs it: Ctrl-C while finetuning stops every
    process it started; running it again reuses pretraining and ends with the paper's
    claims holding (exit 0), results.json and the chart."""
    out = tmp_path / "demo-out"
    # as `make demo` runs it: the venv not activated (its bin not on PATH), no AWS settings
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != str(BIN))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"PATH": path}
    cmd = [str(BIN / "ssl-train"), "demo", "--out", str(out)]
    first = DemoProcess(cmd, tmp_path / "first.log", env, tmp_path)
    pretrained = out / "runs" / "pretrain" / "final" / "model.safetensors"
    first.wait(until=(out / "runs" / "finetune-1pct" / "config.json").exists)
    assert first.process.poll() is None, first.tail()
    started = descendants(first.process.pid)
    assert any("weed mini" in cmd for _, cmd in started), started
    assert any("torchrun" in cmd or "torch.distributed.run" in cmd for _, cmd in started)
    first.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert first.process.wait(timeout=60) == 130
    first_log = first.log.read_text()
    assert "interrupted: finished stages stay in" in first_log
    assert "[demo] machine: " in first_log and " usable, torch " in first_log
    # the S3 server, Prometheus, TorchX's replicas, workers, and multiprocessing's resource
    # tracker (it leaves when the demo's end closes its pipe: give it a moment)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid, _ in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid, command in started:
        assert not alive(pid), f"still running after Ctrl-C: {pid} {command}"
    before = pretrained.read_bytes()

    second = DemoProcess(cmd, tmp_path / "second.log", env, tmp_path)
    output = second.wait()
    assert second.process.returncode == 0, output[-4000:]
    assert_clean(output)
    assert "pretrain: finished earlier" in output
    # the object store is kept under OUT/s3: the shards of the first run are not made again
    for split in ("train", "test"):
        assert f"mnist5k/{split} is already complete (" in output, output[-4000:]
    assert (out / "s3" / "identities.json").exists()
    assert pretrained.read_bytes() == before
    assert "ok: s3://ssl-train-demo/mnist5k/train: 8 shards, 4000 samples" in output
    assert "metrics of the running job: http://127.0.0.1:" in output
    assert "finetune-1pct: step " in output  # progress lines from the jobs
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"1%", "10%", "seconds", "settings"}
    assert results["settings"] == {"seed": 0, "threads": 1, "memory_size": MEMORY_SIZE}
    assert f"pretraining with SimCLRv2's memory: {MEMORY_SIZE} negatives" in first_log
    for fraction in ("1%", "10%"):
        assert set(results[fraction]) == {"supervised", "finetuned", "distilled"}
    assert all(ok for _, ok in acceptance(results)), results
    assert output.count("[demo] ok  ") == 4 and "FAIL" not in output
    with Image.open(out / "results.png") as chart:
        assert chart.format == "PNG"
    assert str(out / "results.json") in output and "total time" in output

    third = DemoProcess(cmd, tmp_path / "third.log", env, tmp_path)
    output = third.wait()
    assert third.process.returncode == 0, output[-4000:]
    assert_clean(output)
    assert "(7 finished stages reused)" in output
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["seconds"] == results["seconds"] and rerun["1%"] == results["1%"]
    assert 0 < rerun["rerun_seconds"] < results["seconds"]
