"""``ssl-train STAGE --check-only`` and what TorchX jobs do with it: an error that no
restart can fix ends the job after one attempt, with its message in the job's status."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from stage_runs import TINY, command, run

from conftest import TinyShards, run_cli

BIN = Path(sys.executable).parent
CHECK = ["--preset", "tiny", "--image-size", "16", "--global-batch-size", "16", "--check-only"]


@pytest.fixture(scope="module")
def resumable(tiny_shards: TinyShards, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrain run dir stopped at step 2 of 10, its checkpoint saved."""
    root = tmp_path_factory.mktemp("resumable")
    args = ["--data", str(tiny_shards.train), "--run-dir", str(root / "run"), *TINY]
    args += ["--global-batch-size", "16", "--stop-at-step", "2", "--workers", "0"]
    run(command("pretrain", *args, "--metrics-port", "0"), root / "log")
    return root / "run"


def test_a_good_stage_is_checked_without_training(tiny_shards: TinyShards, resumable: Path) -> None:
    result = run_cli(
        "pretrain", "--data", tiny_shards.train, "--run-dir", resumable, *CHECK, tool="ssl-train"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checked = json.loads(result.stdout.strip().splitlines()[-1])
    assert checked["checked"] and checked["samples"] == 160 and checked["steps_per_epoch"] == 10
    assert checked["resumes_from_step"] == 2
    assert len(list((resumable / "checkpoints").iterdir())) == 1  # nothing trained or written


def test_a_run_dir_of_another_experiment_is_refused_before_torchrun(
    tiny_shards: TinyShards, resumable: Path
) -> None:
    result = run_cli(
        "pretrain", "--data", tiny_shards.train, "--run-dir", resumable, *CHECK,
        "--learning-rate", "0.5",
        tool="ssl-train",
    )  # fmt: skip
    assert result.returncode == 2
    assert "another configuration (learning_rate: 0.075 -> 0.5)" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_models_a_stage_starts_from_are_checked(
    tiny_shards: TinyShards, resumable: Path, tmp_path: Path
) -> None:
    """A pretrain run that has not finished is no model to finetune from yet."""
    result = run_cli(
        "finetune", "--data", tiny_shards.train, "--run-dir", tmp_path / "ft",
        "--pretrained", resumable, "--image-size", "16", "--global-batch-size", "16",
        "--check-only",
        tool="ssl-train",
    )  # fmt: skip
    assert result.returncode == 2
    assert f"--pretrained {resumable}/final holds no finished model" in result.stderr


@pytest.mark.parametrize("flag", ["--pretrained", "--teacher"])
def test_a_mistyped_model_path_is_named_as_missing(
    tiny_shards: TinyShards, flag: str, tmp_path: Path
) -> None:
    """`--pretrained runs/pretrian` names the flag and says nothing is there, instead of
    calling it a run that has not finished yet."""
    stage = "finetune" if flag == "--pretrained" else "distill"
    typo = tmp_path / "runs" / "pretrian"
    result = run_cli(
        stage, "--data", tiny_shards.train, "--run-dir", tmp_path / "out", flag, typo,
        "--image-size", "16", "--global-batch-size", "16", "--check-only",
        tool="ssl-train",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"{flag} {typo}: nothing is there; check the path" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_subset_that_names_nothing_is_refused(tiny_shards: TinyShards, tmp_path: Path) -> None:
    names = tmp_path / "labels.txt"
    names.write_text("n99999999_1.JPEG\n")
    result = run_cli(
        "supervised", "--data", tiny_shards.train, "--run-dir", tmp_path / "s", *CHECK,
        "--subset", names,
        tool="ssl-train",
    )  # fmt: skip
    assert result.returncode == 2 and f"--subset {names}: none of its 1 names" in result.stderr


def test_a_deterministic_error_ends_a_torchx_job_after_one_attempt(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    """It used to run 4 times on 2 ranks and print the same error 8 times: now the
    node's check fails once, torchrun never starts, and `torchx` shows the message as
    the job's error."""
    missing = tmp_path / "no-such-set"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = run_cli(
        "run", "-s", "local_cwd", "ssl.pretrain", "-j", "1x2", "--data", missing,
        "--run_dir", tmp_path / "run", "--preset", "tiny", "--global_batch_size", "16",
        "--max_restarts", "3", "--metrics_port", "0",
        env=env, tool="torchx",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("ssl-train: error: ") == 1, output[-3000:]
    assert "structured_error_msg" in output and output.count(f"{missing}/manifest.json") == 2
    assert "torch.distributed" not in output and "rendezvous" not in output.lower()
    assert not (tmp_path / "run").exists()


def test_a_job_with_more_processes_than_samples_is_refused_before_submission(
    tmp_path: Path,
) -> None:
    """`-j 1x4 --global_batch_size 3`: refused when `torchx run` builds the job (any world
    size up to the global batch trains it, with shares that differ by one)."""
    result = run_cli(
        "run", "-s", "local_cwd", "ssl.pretrain", "-j", "1x4", "--data", tmp_path,
        "--run_dir", tmp_path / "run", "--global_batch_size", "3",
        tool="torchx",
    )  # fmt: skip
    assert result.returncode == 1
    assert "-j 1x4 allows up to 4 processes, more than the 3 samples" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_a_copied_shard_set_is_what_the_check_reads(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    """The check reads the manifest the ranks will read: a set with fewer samples than
    one global batch is refused by it."""
    small = tmp_path / "small"
    shutil.copytree(tiny_shards.train, small)
    result = run_cli(
        "pretrain", "--data", small, "--run-dir", tmp_path / "r", "--preset", "tiny",
        "--global-batch-size", "256", "--check-only",
        tool="ssl-train",
    )  # fmt: skip
    assert result.returncode == 2 and "fewer than one global batch of 256" in result.stderr


def test_export_does_not_overwrite_another_model(resumable: Path, tmp_path: Path) -> None:
    """It used to replace whatever OUT_DIR held; the same export again is harmless."""
    from ssl_train.export import model_config, save_model
    from ssl_train.models import build_model

    out = tmp_path / "model"
    assert run_cli("export", resumable, out, tool="ssl-train").returncode == 0
    assert run_cli("export", resumable, out, tool="ssl-train").returncode == 0  # same model
    other = build_model("tiny", num_classes=4)
    save_model(
        other.state_dict(), model_config("tiny", 4, 3, 128, 1, 3, stage="finetune"), str(out)
    )
    before = (out / "model.safetensors").read_bytes()
    refused = run_cli("export", resumable, out, tool="ssl-train")
    assert refused.returncode == 2 and "already holds a model (a finetune tiny" in refused.stderr
    assert "--force" in refused.stderr and (out / "model.safetensors").read_bytes() == before
    assert run_cli("export", resumable, out, "--force", tool="ssl-train").returncode == 0
    assert json.loads((out / "config.json").read_text())["stage"] == "pretrain"


def test_export_refuses_another_run_of_the_same_configuration(
    tiny_shards: TinyShards, resumable: Path, tmp_path: Path
) -> None:
    """Two runs that differ only in their seed have the same config.json: the weights
    decide. The second export used to replace the first model without a word."""
    other_seed = tmp_path / "seed-1"
    args = ["--data", str(tiny_shards.train), "--run-dir", str(other_seed), *TINY]
    args += ["--global-batch-size", "16", "--stop-at-step", "2", "--workers", "0", "--seed", "1"]
    run(command("pretrain", *args, "--metrics-port", "0"), tmp_path / "log")
    out = tmp_path / "model"
    assert run_cli("export", resumable, out, tool="ssl-train").returncode == 0
    first = (out / "model.safetensors").read_bytes()
    refused = run_cli("export", other_seed, out, tool="ssl-train")
    assert refused.returncode == 2, refused.stderr
    assert "already holds a model (a pretrain tiny, step 2, with other weights)" in refused.stderr
    assert (out / "model.safetensors").read_bytes() == first
    assert run_cli("export", other_seed, out, "--force", tool="ssl-train").returncode == 0
    assert (out / "model.safetensors").read_bytes() != first
