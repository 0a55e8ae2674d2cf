"""What a user gets wrong is one line that names the flag, file or URL, with exit status 2;
what the code gets wrong keeps its traceback.

Each command runs as a user runs it (the installed ``ssl-train``), against the tiny shard
sets; errors met inside DataLoader workers (a missing shard set, an unreachable endpoint,
a refused manifest, a shard gone mid-epoch) come out as the error itself, not as torch's
rebuilt worker traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

from shards.errors import ShardsError
from shards.local_s3 import free_port
from shards.manifest import read_manifest
from ssl_train import cli
from ssl_train.data.loader import make_loader
from ssl_train.errors import UserError
from ssl_train.export import final_url, model_config, save_model
from ssl_train.models import build_model

from conftest import TinyShards, run_cli

TINY_RUN = ["--preset", "tiny", "--image-size", "16", "--workers", "1", "--metrics-port", "0"]


def one_line_error(result, *named: str) -> str:
    """The run failed with status 2 and said so in one line naming every ``named``."""
    lines = [line for line in result.stderr.splitlines() if " WARNING " not in line]
    errors = [line for line in lines if line.startswith("ssl-train: error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for name in named:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tiny_shards: TinyShards, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir holding a finished 4-class tiny classifier, as a finetune leaves it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    classes = read_manifest(str(tiny_shards.train)).classes
    config = model_config(
        "tiny", len(classes), 3, 128, 1, 1, stage="finetune", image_size=16, classes=classes
    )
    model = build_model("tiny", num_classes=len(classes), head_layers=3, proj_dim=128)
    model.keep_head_layers(1)
    save_model(model.state_dict(), config, final_url(str(run_dir)))
    return run_dir


def test_eval_of_a_missing_shard_set(finished_run: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-set"
    result = run_cli("eval", finished_run, "--data", missing, "--workers", "1", tool="ssl-train")
    one_line_error(result, "--data", str(missing), "no manifest")


def test_eval_against_an_unreachable_endpoint(finished_run: Path) -> None:
    env = {
        **__import__("os").environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "user",
        "AWS_SECRET_ACCESS_KEY": "not-logged",
    }
    result = run_cli(
        "eval", finished_run, "--data", "s3://bucket/val", "--workers", "1",
        env=env, tool="ssl-train",
    )  # fmt: skip
    line = one_line_error(result, "s3://bucket/val", "AWS_ENDPOINT_URL")
    assert "not-logged" not in result.stderr + result.stdout, line


def test_missing_storage_credentials_say_what_to_set() -> None:
    """No keys in the environment, no credentials file, no instance role: the line
    names the variables to set instead of botocore's "Unable to locate credentials"."""
    env = {
        key: value for key, value in __import__("os").environ.items()
        if not key.startswith("AWS_")
    }  # fmt: skip
    env.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials",
        AWS_CONFIG_FILE="/nonexistent/config",
        AWS_EC2_METADATA_DISABLED="true",  # no instance role to ask on this machine
    )
    result = run_cli(
        "pretrain", "--data", "s3://bucket/train", "--run-dir", "s3://bucket/run",
        "--check-only", env=env, tool="ssl-train",
    )  # fmt: skip
    one_line_error(result, "s3://bucket/", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda"])
def test_a_device_that_cannot_work(
    finished_run: Path, tiny_shards: TinyShards, device: str
) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda works here")
    result = run_cli(
        "eval", finished_run, "--data", tiny_shards.test, "--device", device, tool="ssl-train"
    )
    one_line_error(result, f"--device {device}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --device cuda works")
@pytest.mark.parametrize("check_only", [True, False])
def test_a_gpu_job_without_a_usable_gpu_names_the_driver_it_needs(
    tiny_shards: TinyShards, tmp_path: Path, check_only: bool
) -> None:
    """What a GPU job's ranks run (the components pass --device cuda), where the GPU is
    missing: the check before torchrun, and the stage itself, stop in one line naming
    the driver this torch needs, before anything is written."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "pretrain", "--data", tiny_shards.train, "--run-dir", run_dir, *TINY_RUN,
        "--global-batch-size", "16", "--device", "cuda",
        *(["--check-only"] if check_only else []), tool="ssl-train",
    )  # fmt: skip
    line = one_line_error(result, "--device cuda", "NVIDIA driver", f"CUDA {torch.version.cuda}")
    assert "or newer" in line and not run_dir.exists()


def test_eval_data_is_checked_before_the_first_step(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    """A typo in --eval-data used to cost the whole run: it was opened after the last step."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "supervised", "--data", tiny_shards.train, "--run-dir", run_dir, *TINY_RUN,
        "--global-batch-size", "16", "--eval-data", tmp_path / "typo",
        tool="ssl-train",
    )  # fmt: skip
    one_line_error(result, "--eval-data", str(tmp_path / "typo"))
    assert not (run_dir / "checkpoints").exists() and "step 1/" not in result.stderr


def test_eval_data_on_a_stage_without_classifier(tiny_shards: TinyShards, tmp_path: Path) -> None:
    """Pretraining has nothing to evaluate: it used to fail after its last step."""
    result = run_cli(
        "pretrain", "--data", tiny_shards.train, "--run-dir", tmp_path / "run", *TINY_RUN,
        "--eval-data", tiny_shards.test,
        tool="ssl-train",
    )  # fmt: skip
    one_line_error(result, "--eval-data: pretrain trains no classifier")


def test_eval_data_with_another_class_list(tiny_shards: TinyShards, tmp_path: Path) -> None:
    """Its labels would index the wrong logits: refused before training, naming the flag."""
    other = tmp_path / "other-classes"
    shutil.copytree(tiny_shards.test, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][::-1]
    (other / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(
        "supervised", "--data", tiny_shards.train, "--run-dir", tmp_path / "run", *TINY_RUN,
        "--global-batch-size", "16", "--eval-data", other,
        tool="ssl-train",
    )  # fmt: skip
    one_line_error(result, "--eval-data", "classes")


def test_a_contrastive_batch_of_one(tiny_shards: TinyShards, tmp_path: Path) -> None:
    result = run_cli(
        "pretrain", "--data", tiny_shards.train, "--run-dir", tmp_path / "run", *TINY_RUN,
        "--global-batch-size", "1",
        tool="ssl-train",
    )  # fmt: skip
    one_line_error(result, "--global-batch-size 1", "at least 2")


def test_data_bench_on_a_refused_shard_name(tiny_shards: TinyShards, tmp_path: Path) -> None:
    shards = tmp_path / "set"
    shutil.copytree(tiny_shards.train, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../outside.tar"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(
        "data-bench", "--data", shards, "--global-batch-size", "16", "--image-size", "16",
        "--batches", "1", "--workers", "1",
        tool="ssl-train",
    )  # fmt: skip
    one_line_error(result, "../outside.tar", "refusing")


def test_a_shard_gone_mid_epoch(tiny_shards: TinyShards, tmp_path: Path) -> None:
    """Met by a data worker after training started: still one line, naming the shard."""
    shards = tmp_path / "set"
    shutil.copytree(tiny_shards.train, shards)
    gone = sorted(shards.glob("*.tar"))[-1]
    gone.unlink()
    result = run_cli(
        "pretrain", "--data", shards, "--run-dir", tmp_path / "run", *TINY_RUN,
        "--global-batch-size", "16",
        tool="ssl-train",
    )  # fmt: skip
    one_line_error(result, str(gone), "not found")


class _Failing(IterableDataset):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def __iter__(self):
        yield torch.zeros(1)
        raise self.error


def test_a_worker_user_error_arrives_as_itself() -> None:
    """torch rebuilds a worker's exception with its whole traceback as the message; the
    project's loader sends user errors across as they are."""
    batches = iter(make_loader(_Failing(ShardsError("s3://b/x.tar: not found")), workers=1))
    assert torch.equal(next(batches), torch.zeros(1))
    with pytest.raises(ShardsError) as raised:
        next(batches)
    assert str(raised.value) == "s3://b/x.tar: not found"


def test_a_worker_bug_keeps_its_traceback() -> None:
    batches = iter(make_loader(_Failing(KeyError("internal")), workers=1))
    next(batches)
    with pytest.raises(KeyError) as raised:
        next(batches)
    assert "Traceback" in str(raised.value) and "in __iter__" in str(raised.value)


def test_cli_says_user_errors_in_one_line_and_lets_bugs_through(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A ValueError from inside the code is a bug, not a typo: it is not turned into a
    usage message (it used to be)."""
    from ssl_train.stages import loop

    def raise_(error: Exception):
        def run_stage(config: object) -> None:
            raise error

        return run_stage

    args = ["pretrain", "--data", "d", "--run-dir", "r", "--preset", "tiny"]
    monkeypatch.setattr(loop, "run_stage", raise_(UserError("--data d: no such shard set")))
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    assert exited.value.code == 2
    assert capfd.readouterr().err == "ssl-train: error: --data d: no such shard set\n"
    monkeypatch.setattr(loop, "run_stage", raise_(ValueError("bug: shapes differ")))
    with pytest.raises(ValueError, match="bug: shapes differ"):
        cli.main(args)


@pytest.mark.parametrize(
    ("values", "flag"),
    [
        ({"from_proj_layer": 4}, "--from-proj-layer 4"),
        ({"head_layers": 0}, "--head-layers"),
        ({"learning_rate": -1.0}, "--learning-rate"),
        ({"momentum": 1.0}, "--momentum"),
        ({"partitions": 0}, "--partitions"),
        ({"metrics_port": 70000}, "--metrics-port"),
        ({"device": "tpu"}, "--device tpu"),
    ],
)
def test_flags_that_would_fail_later_are_refused_by_name(values: dict, flag: str) -> None:
    """Before any work, as a UserError (one line), not a ValueError from deep inside."""
    from ssl_train.stages.config import StageConfig

    with pytest.raises(UserError, match=flag):
        StageConfig.for_stage("supervised", data="d", run_dir="r", preset="tiny", **values)


@pytest.mark.parametrize(
    "argv", [["ssl-train", "metrics"], ["ssl-train", "models"], ["shards", "--help"]]
)
def test_a_closed_pipe_ends_the_output_quietly(argv: list[str]) -> None:
    """`ssl-train metrics | head`: the reader went away before we wrote."""
    import subprocess
    import sys
    from pathlib import Path

    command = [str(Path(sys.executable).parent / argv[0]), *argv[1:]]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # closed before the command imports and writes anything
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"BrokenPipe" not in err, err.decode()[-2000:]
