"""The stages after pretraining and the commands around them, run as users run them:
finetune trains on the subset only, from head layer 1 and a zero classifier; distill
never changes its teacher; eval counts every sample once; export loads into torchvision;
bad configurations fail before any work with a message that says what to do."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from stage_runs import TINY, assert_exactly_once, command, run, start, trace

from conftest import TinyShards

pytestmark = pytest.mark.slow  # every test runs the stage commands as real processes
FINETUNE_BATCH = 8


@pytest.fixture(scope="module")
def pretrained(tiny_shards: TinyShards, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pretrained")
    args = ["--data", str(tiny_shards.train), "--run-dir", str(root / "run"), *TINY]
    args += ["--global-batch-size", "16", "--max-steps", "4", "--workers", "0"]
    run(command("pretrain", *args), root / "log")
    return root / "run"


class Subset(NamedTuple):
    file: Path
    keys: set[str]


@pytest.fixture(scope="module")
def subset(tiny_shards: TinyShards, tmp_path_factory: pytest.TempPathFactory) -> Subset:
    """40 labelled keys (a quarter of the set, every class), as a list file."""
    keys = sorted(tiny_shards.keys)[::4]
    path = tmp_path_factory.mktemp("subset") / "subset.txt"
    path.write_text("".join(f"{key}.JPEG\n" for key in keys))
    return Subset(path, set(keys))


def finetune_args(data: Path, pretrained: Path, run_dir: Path, subset_file: Path) -> list[str]:
    return [
        "--data", str(data), "--pretrained", str(pretrained), "--run-dir", str(run_dir),
        "--subset", str(subset_file), "--image-size", "16", "--workers", "0",
        "--global-batch-size", str(FINETUNE_BATCH), "--log-every-steps", "1",
    ]  # fmt: skip


def test_finetune_trains_on_the_subset_from_head_layer_one(
    tiny_shards: TinyShards, pretrained: Path, subset: Subset, tmp_path: Path
) -> None:
    import safetensors.torch

    subset_file = subset.file
    run_dir, trace_file = tmp_path / "ft", tmp_path / "trace"
    args = finetune_args(tiny_shards.train, pretrained, run_dir, subset_file)
    out = run(
        command(
            "finetune", *args, "--epochs", "2", "--trace-samples", str(trace_file),
            "--eval-data", str(tiny_shards.test),
        ),
        tmp_path / "log",
    )  # fmt: skip
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 2 * len(subset.keys) // FINETUNE_BATCH
    assert summary["eval"]["samples"] == 40 and 0.0 <= summary["eval"]["top1"] <= 1.0
    assert_exactly_once(trace(trace_file), subset.keys, len(subset.keys) // FINETUNE_BATCH)
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert (config["from_proj_layer"], config["kept_head_layers"]) == (1, 1)
    weights = safetensors.torch.load_file(str(run_dir / "final" / "model.safetensors"))
    assert "head.linears.0.weight" in weights and "head.linears.1.weight" not in weights
    assert weights["classifier.weight"].shape[1] == weights["head.linears.0.weight"].shape[0]

    # With a zero learning rate the finetuned weights are exactly where finetuning started:
    # the pretrained backbone and head layer 1, and an all-zero classifier.
    frozen_dir = tmp_path / "lr0"
    frozen_args = finetune_args(tiny_shards.train, pretrained, frozen_dir, subset_file)
    run(
        command("finetune", *frozen_args, "--max-steps", "2", "--learning-rate", "0"),
        tmp_path / "log0",
    )
    start_weights = safetensors.torch.load_file(str(frozen_dir / "final" / "model.safetensors"))
    source = safetensors.torch.load_file(str(pretrained / "final" / "model.safetensors"))
    assert (
        not start_weights["classifier.weight"].any() and not start_weights["classifier.bias"].any()
    )
    for name, value in start_weights.items():
        if name.startswith("classifier.") or "running" in name or "num_batches" in name:
            continue
        assert torch.equal(value, source[name]), name


def test_distill_never_updates_the_teacher(
    tiny_shards: TinyShards, pretrained: Path, subset: Subset, tmp_path: Path
) -> None:
    from ssl_train.export import final_url, load_model
    from ssl_train.stages.config import StageConfig
    from ssl_train.stages.loop import Trainer
    from ssl_train.stages.runtime import start as start_runtime

    subset_file = subset.file
    teacher_dir = tmp_path / "teacher"
    args = finetune_args(tiny_shards.train, pretrained, teacher_dir, subset_file)
    run(command("finetune", *args, "--max-steps", "3"), tmp_path / "log")
    teacher_before, _ = load_model(final_url(str(teacher_dir)))
    config = StageConfig.for_stage(
        "distill", data=str(tiny_shards.train), run_dir=str(tmp_path / "student"),
        teacher=str(teacher_dir), preset="tiny_student", image_size=16, global_batch_size=16,
        max_steps=3, workers=0, labeled_weight=0.3, metrics_port=0,
    )  # fmt: skip
    trainer = Trainer(config, start_runtime("cpu"))
    student_before = {k: v.clone() for k, v in trainer.task.model.state_dict().items()}
    summary = trainer.run()
    assert summary["finished"] and summary["steps"] == 3
    teacher = trainer.task.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, value in teacher_before.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), f"teacher changed: {name}"
    student_after = trainer.task.model.state_dict()
    assert any(not torch.equal(student_after[k], v) for k, v in student_before.items())
    config_json = json.loads((tmp_path / "student" / "final" / "config.json").read_text())
    assert (config_json["preset"], config_json["kept_head_layers"]) == ("tiny_student", 0)

    # The same images sharded with the classes in another order: the teacher's logit i
    # would be another class there, so the stage refuses before building anything.
    from shards.create import CreateOptions, create
    from ssl_train.errors import UserError

    classes = json.loads((teacher_dir / "final" / "config.json").read_text())["classes"]
    order = tmp_path / "reversed.txt"
    order.write_text("\n".join(reversed(classes)) + "\n")
    src = tiny_shards.train.parent / "src-train"
    create(CreateOptions(src=str(src), dest=str(tmp_path / "rev"), classes=str(order), workers=1))
    reordered = dataclasses.replace(
        config, data=str(tmp_path / "rev"), run_dir=str(tmp_path / "student-2")
    )
    with pytest.raises(UserError, match=f"classifier's class 0 is {classes[0]!r}"):
        Trainer(reordered, start_runtime("cpu"))


def test_eval_counts_every_sample_once_and_matches_a_hand_count(
    tiny_shards: TinyShards, pretrained: Path, subset: Subset, tmp_path: Path
) -> None:
    from shards.reader import ShardSet
    from ssl_train.data.augment import to_unit_float
    from ssl_train.data.decode import eval_view
    from ssl_train.export import final_url, load_model, save_model

    subset_file = subset.file
    ft_dir = tmp_path / "ft"
    args = finetune_args(tiny_shards.train, pretrained, ft_dir, subset_file)
    run(
        command("finetune", *args, "--max-steps", "20", "--learning-rate", "0.05"), tmp_path / "log"
    )

    # A classifier that 20 steps left nearly constant would make the check weak, and how
    # constant it is depends on the CPU's rounding: give the exported model seeded random
    # classifier weights, so that its predictions vary on every machine.
    model, saved = load_model(final_url(str(ft_dir)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = model.classifier.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 10 / weight.shape[1] ** 0.5)
    save_model(model.state_dict(), saved, final_url(str(ft_dir)))

    # By hand: every test sample in manifest order, one at a time.
    model, _ = load_model(final_url(str(ft_dir)))
    model.eval()
    shard_set = ShardSet(str(tiny_shards.test))
    correct = total = 0
    predictions = set()
    with torch.no_grad():
        for shard, size in enumerate(shard_set.shard_sizes):
            for sample in shard_set.read(shard, 0, size):
                image = torch.from_numpy(eval_view(sample.jpeg, 16)).permute(2, 0, 1)[None]
                predicted = int(model(to_unit_float(image)).logits.argmax())
                predictions.add(predicted)
                correct += predicted == sample.cls
                total += 1
    assert len(predictions) > 1, "a constant classifier would make this check weak"

    eval_args = [
        str(ft_dir),
        "--data",
        str(tiny_shards.test),
        "--batch-size",
        "7",
        "--workers",
        "1",
    ]
    out = run(command("eval", *eval_args, nprocs=2), tmp_path / "log-eval")
    results = [json.loads(line) for line in out.splitlines() if line.startswith('{"top1"')]
    assert results and all(r == results[0] for r in results)
    assert results[0]["samples"] == total == 40
    assert results[0]["top1"] == correct / total


def test_export_of_a_plain_r50_loads_into_torchvision(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    import safetensors.torch
    from torchvision.models import resnet50

    from ssl_train.export import load_model

    args = ["--data", str(tiny_shards.train), "--run-dir", str(tmp_path / "r50"), "--workers", "0"]
    args += ["--preset", "r50_1x_sk0", "--image-size", "32", "--global-batch-size", "4"]
    args += ["--memory-size", "0"]  # the paper's 64K would not fit 160 samples
    run(command("pretrain", *args, "--max-steps", "1"), tmp_path / "log")
    run(
        [
            sys.executable,
            "-m",
            "ssl_train.cli",
            "export",
            str(tmp_path / "r50"),
            str(tmp_path / "out"),
        ],
        tmp_path / "log",
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    tensors = safetensors.torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    backbone = {
        k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")
    }
    theirs = resnet50(weights=None)
    theirs.fc = torch.nn.Identity()
    theirs.load_state_dict(backbone, strict=True)
    ours, config = load_model(str(tmp_path / "out"))
    assert config["preset"] == "r50_1x_sk0" and config["step"] == 1
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), ours.eval().backbone(x))


def test_more_processes_than_samples_per_batch_fail_before_any_work(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    args = ["--data", str(tiny_shards.train), "--run-dir", str(tmp_path / "run"), *TINY]
    job = start(command("pretrain", *args, "--global-batch-size", "2", nprocs=3), tmp_path / "log")
    assert job.wait(timeout=120) != 0
    assert "--global-batch-size 2 over 3 processes: every process needs" in job.output()
    assert not (tmp_path / "run").exists()


def test_resuming_with_another_configuration_is_refused_unless_allowed(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    base = ["--data", str(tiny_shards.train), "--run-dir", str(tmp_path / "run"), *TINY]
    base += ["--workers", "0", "--max-steps", "6"]
    run(
        command("pretrain", *base, "--global-batch-size", "16", "--stop-at-step", "2"),
        tmp_path / "log",
    )
    refused = subprocess.run(
        command("pretrain", *base, "--global-batch-size", "8"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert (
        "global_batch_size: 16 -> 8" in refused.stderr and "--allow-config-change" in refused.stderr
    )
    allowed = run(
        command("pretrain", *base, "--global-batch-size", "8", "--allow-config-change"),
        tmp_path / "log2",
    )
    assert "continuing with changed configuration" in allowed and '"finished": true' in allowed


def test_resuming_on_replaced_data_or_an_edited_subset_is_refused(
    tiny_shards: TinyShards, subset: Subset, tmp_path: Path
) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_shards.train, data)
    base = ["--data", str(data), "--run-dir", str(tmp_path / "run"), *TINY, "--workers", "0"]
    base += ["--max-steps", "6", "--global-batch-size", "16"]
    run(command("pretrain", *base, "--stop-at-step", "2"), tmp_path / "log")
    shutil.rmtree(data)  # re-made at the same URL from other images
    shutil.copytree(tiny_shards.test, data)
    refused = subprocess.run(
        command("pretrain", *base), capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2, refused.stderr
    assert f"the shard set at {data} was replaced (content sha256 " in refused.stderr

    listed = tmp_path / "subset.txt"
    shutil.copy(subset.file, listed)
    args = ["--data", str(tiny_shards.train), "--run-dir", str(tmp_path / "sup"), *TINY]
    args += ["--subset", str(listed), "--workers", "0", "--global-batch-size", "8"]
    args += ["--max-steps", "4"]
    run(command("supervised", *args, "--stop-at-step", "2"), tmp_path / "log2")
    listed.write_text("".join(listed.read_text().splitlines(keepends=True)[:-8]))
    refused = subprocess.run(
        command("supervised", *args), capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2, refused.stderr
    assert f"the label subset {listed} changed (list sha256 " in refused.stderr
    assert "shard set" not in refused.stderr  # only what changed is named


def test_a_crafted_pickle_checkpoint_is_refused_without_running_it(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    import hashlib
    import os
    import pickle

    base = ["--data", str(tiny_shards.train), "--run-dir", str(tmp_path / "run"), *TINY]
    base += ["--workers", "0", "--max-steps", "4", "--global-batch-size", "16"]
    run(command("pretrain", *base, "--stop-at-step", "2"), tmp_path / "log")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    checkpoint = tmp_path / "run" / "checkpoints" / "step-000000002-g1"
    crafted = pickle.dumps({"model": Payload()})
    (checkpoint / "tensors.safetensors").write_bytes(crafted)
    complete = json.loads((checkpoint / "COMPLETE.json").read_text())  # vouch for it, as an
    complete["files"]["tensors.safetensors"] = {  # attacker with write access could
        "bytes": len(crafted),
        "sha256": hashlib.sha256(crafted).hexdigest(),
    }
    (checkpoint / "COMPLETE.json").write_text(json.dumps(complete))
    refused = subprocess.run(
        command("pretrain", *base), capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2, refused.stderr
    assert "not a safetensors file" in refused.stderr and "step-000000002" in refused.stderr
    assert not marker.exists()


def test_bf16_and_channels_last_train_under_torchrun(
    tiny_shards: TinyShards, tmp_path: Path
) -> None:
    """The GPU code paths (bf16 autocast, channels-last) also run on CPU, so they are
    exercised here; torch.compile and NCCL need the GPU benchmark (bench/gpu_step.py)."""
    args = ["--data", str(tiny_shards.train), "--run-dir", str(tmp_path / "run"), *TINY]
    args += ["--workers", "0", "--max-steps", "3", "--global-batch-size", "16"]
    out = run(
        command("pretrain", *args, "--precision", "bf16", "--channels-last", nprocs=2),
        tmp_path / "log",
    )
    losses = [
        float(line.split(" loss ")[1].split()[0]) for line in out.splitlines() if " loss " in line
    ]
    assert len(losses) == 3 and all(0 < loss < 100 for loss in losses), losses


def test_linear_eval_trains_only_a_classifier_on_the_frozen_backbone(
    tiny_shards: TinyShards, pretrained: Path, tmp_path: Path
) -> None:
    import safetensors.torch

    args = ["--data", str(tiny_shards.train), "--pretrained", str(pretrained)]
    args += ["--run-dir", str(tmp_path / "le"), "--image-size", "16", "--workers", "0"]
    run(
        command("linear-eval", *args, "--global-batch-size", "16", "--max-steps", "3"),
        tmp_path / "log",
    )
    trained = safetensors.torch.load_file(str(tmp_path / "le" / "final" / "model.safetensors"))
    source = safetensors.torch.load_file(str(pretrained / "final" / "model.safetensors"))
    backbone = [name for name in trained if name.startswith("backbone.")]
    assert backbone and all(torch.equal(trained[n], source[n]) for n in backbone)  # BN stats too
    assert not any(name.startswith("head.") for name in trained)  # reads the features
    assert trained["classifier.weight"].any()


def test_supervised_baseline_trains_finetunings_network_from_scratch_on_the_subset(
    tiny_shards: TinyShards, subset: Subset, tmp_path: Path
) -> None:
    import safetensors.torch

    run_dir, trace_file = tmp_path / "sup", tmp_path / "trace"
    args = ["--data", str(tiny_shards.train), "--run-dir", str(run_dir), "--preset", "tiny"]
    args += ["--subset", str(subset.file), "--image-size", "16", "--workers", "0"]
    args += ["--global-batch-size", str(FINETUNE_BATCH), "--epochs", "1"]
    out = run(
        command(
            "supervised",
            *args,
            "--trace-samples",
            str(trace_file),
            "--eval-data",
            str(tiny_shards.test),
        ),
        tmp_path / "log",
    )
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["finished"] and summary["eval"]["samples"] == 40
    assert_exactly_once(trace(trace_file), subset.keys, len(subset.keys) // FINETUNE_BATCH)
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert (config["stage"], config["from_proj_layer"], config["kept_head_layers"]) == (
        "supervised",
        1,
        1,
    )
    weights = safetensors.torch.load_file(str(run_dir / "final" / "model.safetensors"))
    assert "head.linears.0.weight" in weights and "head.linears.1.weight" not in weights
    assert weights["classifier.weight"].any()
