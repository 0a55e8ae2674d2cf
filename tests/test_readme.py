"""The README's quick start, run verbatim, and its S3 path as a cluster job takes it:
what a new user types first must work, and say nothing alarming when it does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from stage_runs import TINY, assert_clean, command, run

from conftest import TinyShards

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent


def quick_start() -> str:
    text = README.read_text()
    block = re.search(r"<!-- quickstart -->\n```sh\n(.*?)```\n<!-- /quickstart -->", text, re.S)
    assert block, "README.md lost its quick start block"
    return block.group(1)


@pytest.mark.slow
def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    script = "set -euo pipefail\n" + quick_start()
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluated = [json.loads(line) for line in result.stdout.splitlines() if '"top1"' in line]
    assert evaluated and evaluated[-1]["samples"] == 1000
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors"]
    assert_clean(result.stdout + result.stderr)


@pytest.mark.slow
def test_the_s3_path_under_torchrun_with_data_workers_prints_no_traceback(
    tiny_shards: TinyShards, s3_bucket, tmp_path: Path
) -> None:
    """The README's S3 path as a cluster job takes it: shards and run dir in the S3
    server (`shards serve`'s SeaweedFS), 2 ranks under torchrun, 2 data workers each.
    Every rank uses S3 (plan, lease) before it forks its workers; a successful run must
    say nothing alarming (stage_runs.ALARMS: no asyncio task exception, no traceback)."""
    from shards.copy import copy

    data, run_dir = f"{s3_bucket.url}/train", f"{s3_bucket.url}/runs/pretrain"
    copy(str(tiny_shards.train), data)
    args = ["--data", data, "--run-dir", run_dir, *TINY, "--global-batch-size", "16"]
    out = run(
        command("pretrain", *args, "--max-steps", "3", "--workers", "2", nprocs=2),
        tmp_path / "log",
        s3_bucket.env,
        timeout=300,
    )
    assert f"finished: 3 steps; model in {run_dir}/final" in out


def test_the_several_process_path_stops_a_mistake_in_one_line_before_torchrun(
    tmp_path: Path,
) -> None:
    """README's torchrun command checks first: a missing shard set is one line, status 2,
    and torchrun (whose own traceback wraps every rank's copy of it) never starts."""
    text = README.read_text()
    command_line = re.search(r"^ssl-train pretrain \$ARGS --check-only && torchrun .*$", text, re.M)
    assert command_line, "README.md lost its check-then-torchrun command"
    assert re.search(r'^ARGS="--data s3://\S+ --run-dir s3://\S+ ', text, re.M)
    missing = tmp_path / "no-such-shards"
    script = f'ARGS="--data {missing} --run-dir {tmp_path / "run"} --preset tiny"\n'
    script += command_line.group(0) + "\n"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ssl-train: error: "), errors
    assert str(missing) in errors[0]
    assert not (tmp_path / "run").exists()
