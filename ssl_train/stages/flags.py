"""Command-line flags of the training stages: one flag per ``StageConfig`` field, its
help showing the stage's paper default, so ``ssl-train pretrain --help`` documents the
recipe."""

from __future__ import annotations

import argparse
from typing import Any

from ssl_train.stages.config import STAGE_DEFAULTS, StageConfig

# (flag, field, type, help); type bool = a switch
COMMON: list[tuple[str, str, Any, str]] = [
    ("--data", "data", str, "training shard set: a local path or s3://bucket/prefix"),
    (
        "--run-dir",
        "run_dir",
        str,
        "where checkpoints and the final model go (local or s3://); "
        "running the same command again resumes from it",
    ),
    ("--global-batch-size", "global_batch_size", int, "samples per step over all processes"),
    ("--epochs", "epochs", float, "training length in epochs"),
    ("--max-steps", "max_steps", int, "training length in steps (overrides --epochs)"),
    ("--image-size", "image_size", int, "side of the training crops in pixels (default 224)"),
    ("--seed", "seed", int, "fixes the initial weights, data order and augmentation (default 0)"),
    ("--learning-rate", "learning_rate", float, "base learning rate, scaled by --lr-scaling"),
    ("--lr-scaling", "lr_scaling", str, "sqrt: lr*sqrt(B); linear: lr*B/256"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warmup, then cosine decay"),
    ("--weight-decay", "weight_decay", float, "L2 weight decay (not on BN or biases)"),
    ("--momentum", "momentum", float, "optimizer momentum (default 0.9)"),
    ("--head-layers", "head_layers", int, "projection head depth (default 3)"),
    ("--proj-dim", "proj_dim", int, "projection output width (default 128)"),
    ("--partitions", "partitions", int, "data-plan partitions (default 32, or the batch)"),
    ("--precision", "precision", str, "fp32, or bf16 autocast (CUDA)"),
    ("--channels-last", "channels_last", bool, "channels-last memory format (faster on GPUs)"),
    ("--compile", "compile", bool, "torch.compile the model"),
    ("--device", "device", str, "cpu or cuda (default: cuda when present)"),
    ("--workers", "workers", int, "data-loading processes per rank (default 4)"),
    ("--checkpoint-every-steps", "checkpoint_every_steps", int, "also checkpoint every N steps"),
    (
        "--checkpoint-every-minutes",
        "checkpoint_every_minutes",
        float,
        "checkpoint every M minutes (default 10)",
    ),
    (
        "--keep-checkpoints",
        "keep_checkpoints",
        int,
        "how many recent checkpoints to keep (default 3)",
    ),
    (
        "--trace-samples",
        "trace_samples",
        str,
        "append one JSON line per rank and step with the sample keys trained on",
    ),
    (
        "--stop-at-step",
        "stop_at_step",
        int,
        "checkpoint and stop at this global step (run again to continue)",
    ),
    (
        "--allow-config-change",
        "allow_config_change",
        bool,
        "resume even if training settings differ from the checkpoint's",
    ),
    ("--eval-data", "eval_data", str, "shard set to report top-1/top-5 on at the end"),
    ("--eval-batch-size", "eval_batch_size", int, "evaluation batch per process (default 256)"),
    ("--log-every-steps", "log_every_steps", int, "progress line every N steps (default 10)"),
    (
        "--metrics-port",
        "metrics_port",
        int,
        "serve Prometheus /metrics for this node on PORT + node rank (default 9732; 0 = off)",
    ),
]

PER_STAGE: dict[str, list[tuple[str, str, Any, str]]] = {
    "pretrain": [
        ("--preset", "preset", str, "model preset (see `ssl-train models`; default r50_1x_sk0)"),
        ("--temperature", "temperature", float, "NT-Xent temperature"),
    ],
    "finetune": [
        ("--pretrained", "pretrained", str, "run dir of a finished pretrain run"),
        ("--subset", "subset", str, "labelled subset: 1percent, 10percent or a list file"),
        ("--from-proj-layer", "from_proj_layer", int, "head layer the classifier reads"),
    ],
    "distill": [
        ("--teacher", "teacher", str, "run dir of a finished finetune run"),
        ("--student", "preset", str, "student preset (same size as the teacher or smaller)"),
        ("--temperature", "temperature", float, "distillation temperature"),
        (
            "--labeled-weight",
            "labeled_weight",
            float,
            "weight of a cross-entropy term on the true labels (0 = unlabelled only)",
        ),
    ],
    "supervised": [
        ("--preset", "preset", str, "model preset (see `ssl-train models`; default r50_1x_sk0)"),
        ("--subset", "subset", str, "labelled subset: 1percent, 10percent or a list file"),
        ("--from-proj-layer", "from_proj_layer", int, "head layer the classifier reads"),
    ],
    "linear-eval": [
        ("--pretrained", "pretrained", str, "run dir of a finished pretrain run"),
        ("--subset", "subset", str, "train on a labelled subset only"),
        ("--from-proj-layer", "from_proj_layer", int, "head layer the classifier reads"),
    ],
}

REQUIRED = {
    "pretrain": {"data", "run_dir"},
    "finetune": {"data", "run_dir", "pretrained"},
    "distill": {"data", "run_dir", "teacher", "preset"},
    "linear-eval": {"data", "run_dir", "pretrained"},
    "supervised": {"data", "run_dir"},
}
DEFAULT_PRESET = "r50_1x_sk0"


def stage_flags(stage: str) -> dict[str, tuple[str, Any]]:
    """The stage's command-line flags keyed as component arguments are (``warmup_epochs``),
    with each flag and its type; lets callers pass any stage flag through a TorchX job.

    Example:
        >>> stage_flags("distill")["student"]
        ('--student', <class 'str'>)
    """
    return {
        flag[2:].replace("-", "_"): (flag, kind) for flag, _, kind, _ in PER_STAGE[stage] + COMMON
    }


def add_stage_parser(sub: argparse._SubParsersAction, stage: str, summary: str) -> None:
    """One subcommand whose flags fill a ``StageConfig``."""
    # argparse %-formats help strings (not descriptions): "1% or 10%" must be escaped there
    parser = sub.add_parser(stage, help=summary.replace("%", "%%"), description=summary)
    defaults = STAGE_DEFAULTS[stage]
    for flag, name, kind, text in PER_STAGE[stage] + COMMON:
        if name in defaults:
            text = (
                f"{text} (default {defaults[name]:g})"
                if isinstance(defaults[name], float)
                else f"{text} (default {defaults[name]})"
            )
        if kind is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=None, help=text)
        else:
            parser.add_argument(
                flag, dest=name, type=kind, required=name in REQUIRED[stage], help=text
            )


def config_from_args(stage: str, args: argparse.Namespace) -> StageConfig:
    """The run's configuration from parsed flags (unset flags take the stage's defaults).

    Example:
        >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers(dest="command")
        >>> add_stage_parser(sub, "finetune", "finetune")
        >>> args = parser.parse_args(["finetune", "--data", "d", "--run-dir", "r", "--pretrained", "p"])
        >>> config_from_args("finetune", args).learning_rate
        0.005
    """
    names = {name for _, name, _, _ in PER_STAGE[stage] + COMMON}
    values = {name: getattr(args, name) for name in names}
    if stage in ("pretrain", "supervised") and values.get("preset") is None:
        values["preset"] = DEFAULT_PRESET
    return StageConfig.for_stage(stage, **values)
