"""`ssl-train pipeline -s local_cwd`: a tiny recipe as TorchX jobs (pretrain, finetune on
a label subset, distill the teacher); killed mid-way and run again, it finishes without
redoing the finished stages. How several subsets become stages is the plan's test below."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stage_runs import assert_clean, descendants

from ssl_train.pipeline import PipelinePlan, Stage, how_to_follow, where_its_log_is, with_log_dir

from conftest import TinyShards

BIN = Path(sys.executable).parent


def _tiny_recipe(
    tiny_shards: TinyShards, tmp_path: Path, root: Path, *extra: str
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a tiny recipe on local_cwd (pretrain, finetune on
    an eighth of the labels, distill; 4 steps each), its leases 4 s long so that a
    killed job's is waited out quickly."""
    keys = sorted(tiny_shards.keys)
    small_file = tmp_path / "eighth.txt"
    small_file.write_text("".join(f"{k}.JPEG\n" for k in keys[::8]))
    cmd = [
        str(BIN / "ssl-train"), "pipeline", "-s", "local_cwd", "--data", str(tiny_shards.train),
        "--eval-data", str(tiny_shards.test), "--root", str(root), "--subset", str(small_file),
        "--preset", "tiny", "--student", "tiny_student",
        "--arg", "j=1x1", "--arg", "image_size=16", "--arg", "precision=fp32",
        "--arg", "workers=0", "--arg", "metrics_port=0", "--arg", "channels_last=False",
        "--arg", "global_batch_size=8", "--arg", "max_steps=4", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env["SSL_TRAIN_LEASE_SECONDS"] = "4"
    return cmd, env


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_a_rerun_skips_finished_ones(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    root = tmp_path / "runs"
    cmd, env = _tiny_recipe(tiny_shards, tmp_path, root)
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    first = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True
    )
    deadline = time.monotonic() + 180
    while not (root / "finetune-eighth" / "config.json").exists():  # pretrain done, finetune going
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "pretrain did not finish in time"
        time.sleep(0.2)
    for pid in [first.pid, *(child for child, _ in descendants(first.pid))]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    first.wait(timeout=10)
    pretrained = root / "pretrain" / "final" / "model.safetensors"
    before = (pretrained.stat().st_mtime_ns, pretrained.read_bytes())

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert_clean(second.stdout + second.stderr)
    assert "pretrain: finished earlier" in second.stdout
    assert "finetune-eighth: submitted" in second.stdout
    # the advice works for local_cwd: a file another shell can follow, kept after the job
    first_log = (tmp_path / "first.log").read_text()
    followed = re.findall(
        r"follow it: tail -f (\S+) \(a local_cwd job lives in this process", first_log
    )
    assert followed and followed[0].startswith(str(root / "logs")), first_log[-3000:]
    assert "[ssl-train pretrain] finished: 4 steps" in Path(followed[0]).read_text()
    advised = re.findall(r"follow it: tail -f (\S+) ", second.stdout)
    assert len(advised) == 2, second.stdout  # finetune and distill
    assert "[ssl-train distill] finished: 4 steps" in Path(advised[-1]).read_text()
    assert "follow it: torchx status" not in second.stdout
    assert (pretrained.stat().st_mtime_ns, pretrained.read_bytes()) == before
    for stage in ("pretrain", "finetune-eighth", "distill-eighth"):
        summary = json.loads((root / stage / "summary.json").read_text())
        assert summary["finished"] and summary["steps"] == 4, stage
    assert (
        json.loads((root / "distill-eighth" / "summary.json").read_text())["eval"]["samples"] == 40
    )


@pytest.mark.slow
def test_a_killed_driver_leaves_its_job_running_and_the_next_driver_follows_it(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    """Issue 36: the driver SIGKILLed while pretraining runs; the pretraining job goes
    on; the pipeline started again follows that job instead of submitting a second one,
    and the recipe completes with every stage's run dir written by one job."""
    from ssl_train.lease import live_holder, read_head

    root = tmp_path / "runs"
    long_pretrain = [
        "--stage-arg",
        "pretrain:max_steps=200",
        "--stage-arg",
        "pretrain:log_every_steps=1",
    ]
    cmd, env = _tiny_recipe(tiny_shards, tmp_path, root, *long_pretrain)
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    first = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True
    )
    pretrain = root / "pretrain"
    deadline = time.monotonic() + 180
    while not (pretrain / "progress.json").exists():  # pretraining is under way
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "pretrain did not start in time"
        time.sleep(0.2)
    first.kill()  # the driver alone: its job runs on
    first.wait(timeout=10)
    time.sleep(5)  # more than a lease period: a job that died with it would have lost it
    holder = live_holder(str(pretrain))
    assert holder is not None and not (pretrain / "summary.json").exists(), "pretrain stopped"

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert_clean(second.stdout + second.stderr)
    first_out = (tmp_path / "first.log").read_text()
    assert first_out.count("pretrain: submitted") == 1
    assert "pretrain: submitted" not in second.stdout
    assert re.search(
        r"pretrain: its job local_cwd://\S+ is still running; following it", second.stdout
    )
    for stage in ("pretrain", "finetune-eighth", "distill-eighth"):
        summary = json.loads((root / stage / "summary.json").read_text())
        assert summary["finished"], stage
        head = read_head(str(root / stage))
        assert head is not None and head.generation == 1, (stage, head)  # one job only
    assert json.loads((pretrain / "summary.json").read_text())["steps"] == 200
    status = subprocess.run(
        [str(BIN / "ssl-train"), "pipeline", "status", "--root", str(root), "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    states = {s["name"]: s["state"] for s in json.loads(status.stdout)["stages"]}
    assert states == dict.fromkeys(("pretrain", "finetune-eighth", "distill-eighth"), "finished")


def test_plan_adds_the_supervised_baseline_and_passes_stage_flags_through() -> None:
    plan = PipelinePlan(
        "s3://b/train",
        "s3://b/runs",
        ["s3://b/lists/1pct.txt", "10percent"],
        eval_data="s3://b/test",
        preset="tiny",
        common={"j": "1x2", "warmup_epochs": "1", "channels_last": "False", "compile": "true"},
        per_stage={
            "supervised": {"learning_rate": "0.1", "epochs": "90"},
            "supervised-10percent": {"epochs": "30"},
        },
        supervised_baseline=True,
    )
    stages = {s.name: s for s in plan.stages()}
    assert list(stages) == [
        "pretrain", "finetune-1pct", "finetune-10percent", "supervised-1pct",
        "supervised-10percent", "distill-1pct", "distill-10percent",
    ]  # fmt: skip
    args = plan.component_args(stages["supervised-1pct"])
    named = dict(zip(args[::2], args[1::2], strict=True))
    assert named["--preset"] == "tiny" and named["--subset"] == "s3://b/lists/1pct.txt"
    assert named["--learning_rate"] == "0.1" and named["--epochs"] == "90"
    assert named["--eval_data"] == "s3://b/test" and named["-j"] == "1x2"
    # every stage flag is a component argument: no `--` passthrough needed
    assert named["--warmup_epochs"] == "1" and named["--compile"] == "true"
    ten = plan.component_args(stages["supervised-10percent"])
    assert ten[ten.index("--epochs") + 1] == "30"  # a stage's name beats its kind
    pretrain = plan.component_args(stages["pretrain"])
    assert "--channels_last" in pretrain and "--warmup_epochs" in pretrain
    with pytest.raises(ValueError, match=r"ssl\.finetune has no argument lr"):
        PipelinePlan("d", "r", ["1percent"], per_stage={"finetune": {"lr": "1"}}).component_args(
            Stage("finetune-1percent", "finetune", {"pretrained": "r/pretrain"})
        )
    with pytest.raises(ValueError, match="'finetune-2percent': name a kind"):
        PipelinePlan("d", "r", ["1percent"], per_stage={"finetune-2percent": {}}).stages()
    with pytest.raises(ValueError, match="--arg warmup: no stage of this plan takes it"):
        PipelinePlan("d", "r", ["1percent"], common={"warmup": "1"}).stages()


def test_the_advice_to_follow_a_job_fits_its_scheduler(tmp_path: Path) -> None:
    """local_cwd keeps its jobs in this process (another shell's `torchx status` answers
    that they do not exist): the advice is the replica's log file, in a log dir that
    stays; other schedulers' jobs are TorchX's to show."""
    stage = Stage("finetune-1percent", "finetune", {})
    cfg = with_log_dir("local_cwd", {}, str(tmp_path / "runs"))
    assert cfg == {"log_dir": str(tmp_path / "runs" / "logs")}
    assert with_log_dir("local_cwd", {"log_dir": "/mine"}, "/r") == {"log_dir": "/mine"}
    remote = with_log_dir("local_cwd", {}, "s3://b/runs")["log_dir"]
    assert remote == os.path.abspath("ssl-train-logs")
    handle = "local_cwd://torchx/ssl-finetune-abc"
    log = f"{tmp_path}/runs/logs/torchx/ssl-finetune-abc/finetune/0/combined.log"
    assert how_to_follow(handle, "local_cwd", cfg, stage).startswith(f"tail -f {log} ")
    assert where_its_log_is(handle, "local_cwd", cfg, stage) == log
    handle = "kubernetes://torchx/default:ssl-finetune-abc"
    assert how_to_follow(handle, "kubernetes", {}, stage) == (
        f"torchx status {handle}; torchx log {handle}"
    )
    assert where_its_log_is(handle, "kubernetes", {}, stage) == f"`torchx log {handle}`"


def test_scheduler_options_are_spelled_as_torchx_run_spells_them() -> None:
    from ssl_train.cli import build_parser

    base = ["pipeline", "--data", "d", "--root", "r"]
    for spelling in ("-cfg", "--cfg"):
        args = build_parser().parse_args([*base, spelling, "log_dir=/l,queue=q"])
        assert args.cfg == "log_dir=/l,queue=q"


def test_linear_eval_joins_the_pipeline_through_its_declaration() -> None:
    """An optional stage (registry: in_pipeline="optional", starts_from, per_subset) is
    planned from its declaration alone: its run dirs, the run it starts from, its
    component (ssl.linear_eval for linear-eval) and its evaluation."""
    from ssl_train.cli import build_parser

    args = build_parser().parse_args(
        ["pipeline", "--data", "s3://b/t", "--root", "s3://b/r", "--include", "linear-eval"]
    )
    plan = PipelinePlan(
        "s3://b/t", "s3://b/r", ["1percent", "10percent"], eval_data="s3://b/v",
        optional=args.include,
    )  # fmt: skip
    stages = {s.name: s for s in plan.stages()}
    assert list(stages)[-2:] == ["linear-eval-1percent", "linear-eval-10percent"]
    probe = stages["linear-eval-10percent"]
    assert probe.component == "linear_eval"
    named = dict(zip(*[iter(plan.component_args(probe))] * 2, strict=True))
    assert named["--pretrained"] == "s3://b/r/pretrain" and named["--subset"] == "10percent"
    assert (
        named["--eval_data"] == "s3://b/v"
        and named["--run_dir"] == "s3://b/r/linear-eval-10percent"
    )
    assert "linear-eval-1percent" not in {
        s.name for s in PipelinePlan("d", "r", ["1percent"]).stages()
    }
    with pytest.raises(ValueError, match="--include pretrain: not an optional stage"):
        PipelinePlan("d", "r", ["1percent"], optional=["pretrain"]).stages()
