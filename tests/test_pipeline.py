"""`ssl-train pipeline -s local_cwd`: a tiny recipe as TorchX jobs (pretrain, finetune on
two label subsets, distill each teacher); killed mid-way and run again, it finishes
without redoing the finished stages."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stage_runs import descendants

from conftest import TinyShards

BIN = Path(sys.executable).parent


def test_pipeline_runs_every_stage_and_a_rerun_skips_finished_ones(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    keys = sorted(tiny_shards.keys)
    subset_file, small_file = tmp_path / "quarter.txt", tmp_path / "eighth.txt"
    subset_file.write_text("".join(f"{k}.JPEG\n" for k in keys[::4]))
    small_file.write_text("".join(f"{k}.JPEG\n" for k in keys[::8]))
    root = tmp_path / "runs"
    cmd = [
        str(BIN / "ssl-train"), "pipeline", "-s", "local_cwd", "--data", str(tiny_shards.train),
        "--eval-data", str(tiny_shards.test), "--root", str(root), "--subset", str(small_file), "--subset", str(subset_file),
        "--preset", "tiny", "--student", "tiny_student",
        "--arg", "j=1x1", "--arg", "image_size=16", "--arg", "precision=fp32",
        "--arg", "workers=0", "--arg", "metrics_port=0", "--arg", "channels_last=False",
        "--arg", "global_batch_size=8", "--arg", "max_steps=4",
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
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
    assert "pretrain: finished earlier" in second.stdout
    assert "finetune-eighth: submitted" in second.stdout and "torchx status" in second.stdout
    assert (pretrained.stat().st_mtime_ns, pretrained.read_bytes()) == before
    stages = [
        "pretrain",
        "finetune-eighth",
        "finetune-quarter",
        "distill-eighth",
        "distill-quarter",
    ]
    for stage in stages:
        summary = json.loads((root / stage / "summary.json").read_text())
        assert summary["finished"] and summary["steps"] == 4, stage
    assert (
        json.loads((root / "distill-quarter" / "summary.json").read_text())["eval"]["samples"] == 40
    )
