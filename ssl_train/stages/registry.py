"""Every training stage, declared once.

A stage is its name, a one-line summary, the paper's defaults, its own flags, the values
it cannot run without, what its batches hold (two augmented views of unlabelled images,
or one labelled view), whether it trains on a label subset, the function that builds its
task and its place in the pipeline. The CLI's subcommands and their help, the stage
configuration, the TorchX components (``ssl_train/components.py`` is generated from
here), the pipeline's order and the task builder all read this module: adding a stage is
one ``StageSpec`` here, its task builder, and its tests.

Torch-free: TorchX imports it (through the components) on the machine that submits jobs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

DEFAULT_PRESET = "r50_1x_sk0"
# SimCLRv2's memory: "64K" negatives and a moving-average decay of 0.999, MoCo v1's
# defaults (its main_moco.py: --moco-k 65536, --moco-m 0.999)
DEFAULT_MEMORY_SIZE = 65536
DEFAULT_MEMORY_MOMENTUM = 0.999


@dataclass(frozen=True)
class Flag:
    """One command-line flag, which is also the TorchX component argument of the same
    name (``--warmup-epochs`` is ``warmup_epochs``): it sets ``StageConfig.<field>``,
    which declares its kind, default, help and check once."""

    field: str  # its kind, default, help and check are the field's (stages.config)
    help: str | None = None  # the stage's own wording, where the field's does not fit
    name: str | None = None  # when the flag is not the field's name (distill's --student)
    aliases: tuple[str, ...] = ()  # older spellings, still accepted

    @property
    def flag(self) -> str:
        return self.name or "--" + self.field.replace("_", "-")

    @property
    def argument(self) -> str:
        """The component argument (TorchX spells arguments with underscores)."""
        return self.flag[2:].replace("-", "_")


@dataclass(frozen=True)
class StageSpec:
    """One training stage (see the module's docstring)."""

    name: str
    summary: str
    defaults: Mapping[str, Any]  # the paper's values; fields not named take StageConfig's
    flags: tuple[Flag, ...]  # the stage's own flags, listed before the common ones
    required: frozenset[str]  # fields without which it cannot run (beyond data and run_dir)
    views: int  # 2: two augmented views, unlabelled (contrastive); 1: one labelled view
    label_subset: bool  # trains on --subset's labelled samples only
    needs_labels: bool  # refuses an unlabeled shard set (its loss reads the labels)
    task: str  # "module:function" that builds its Task (torch; imported when training)
    pipeline_order: int  # its place in `ssl-train pipeline`: lower runs first
    model_field: str | None = None  # field naming the network it trains (GPU memory check)
    # defaults that are not one value, as --help words them
    default_notes: Mapping[str, str] = field(default_factory=dict)
    # what it starts from: the field naming a finished run (``pretrained``, ``teacher``)
    # and the stage that run is of; the pipeline fills the field with that stage's run dir
    starts_from: tuple[str, str] | None = None
    per_subset: bool = False  # in the pipeline: one run per label subset
    uses_memory: bool = False  # SimCLRv2's memory of negatives (--memory-size)
    in_pipeline: str = "no"  # "always", "optional" (asked for by name) or "no"
    # training length when --epochs and --max-steps are unset: ``epochs`` by subset name
    # (None: any other subset or none), for stages without an ``epochs`` default
    epochs_by_subset: Mapping[str | None, float] = field(default_factory=lambda: {None: 100.0})

    @property
    def mode(self) -> str:
        """What the data stream yields: ``pretrain`` (two views) or ``finetune`` (one)."""
        return "pretrain" if self.views == 2 else "finetune"

    @property
    def classifies(self) -> bool:
        """Whether its model ends in a classifier (what --eval-data evaluates)."""
        return self.views == 1

    @property
    def component(self) -> str:
        """Its TorchX component's function name (``linear-eval`` is ``ssl.linear_eval``)."""
        return self.name.replace("-", "_")

    def model_argument(self) -> str | None:
        """The component argument that names the network it trains (``preset``, or
        distillation's ``student``), if it names one."""
        if self.model_field is None:
            return None
        return next(f.argument for f in self.all_flags if f.field == self.model_field)

    def default_epochs(self, subset: str | None) -> float:
        """Training length in epochs when neither --epochs nor --max-steps is given."""
        return self.epochs_by_subset.get(subset, self.epochs_by_subset[None])

    @property
    def all_flags(self) -> tuple[Flag, ...]:
        return self.flags + COMMON_FLAGS

    def build_task(self) -> Callable[..., Any]:
        module, _, function = self.task.partition(":")
        return getattr(importlib.import_module(module), function)


# Flags every stage has, in the order --help lists them.
COMMON_FLAGS: tuple[Flag, ...] = tuple(
    Flag(name)
    for name in (
        "data",
        "run_dir",
        "global_batch_size",
        "epochs",
        "max_steps",
        "image_size",
        "seed",
        "learning_rate",
        "lr_scaling",
        "warmup_epochs",
        "weight_decay",
        "momentum",
        "head_layers",
        "proj_dim",
        "partitions",
        "precision",
        "channels_last",
        "compile",
        "device",
        "workers",
        "decode",
        "checkpoint_every_steps",
        "checkpoint_every_minutes",
        "keep_checkpoints",
        "trace_samples",
        "stop_at_step",
        "allow_config_change",
        "single_writer_store",
        "eval_data",
        "eval_batch_size",
        "log_every_steps",
        "metrics_port",
    )
)

# the flags of the stages that start from a pretraining run
_FROM_PRETRAINED = (Flag("pretrained"), Flag("subset"), Flag("from_proj_layer"))

STAGES: Mapping[str, StageSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            StageSpec(
                name="pretrain",
                summary="SimCLRv2 contrastive pretraining on unlabelled images",
                defaults={
                    "preset": DEFAULT_PRESET,
                    "global_batch_size": 4096,
                    "epochs": 800.0,
                    "learning_rate": 0.075,
                    "lr_scaling": "sqrt",
                    "warmup_epochs": 10.0,
                    "weight_decay": 1e-4,
                    "temperature": 0.1,
                },
                flags=(
                    Flag("preset"),
                    Flag("temperature"),
                    Flag("memory_size"),
                    Flag("memory_momentum"),
                ),
                required=frozenset(),
                views=2,
                label_subset=False,
                needs_labels=False,
                task="ssl_train.stages.tasks:build_pretrain",
                pipeline_order=0,
                model_field="preset",
                uses_memory=True,
                in_pipeline="always",
                default_notes={
                    "memory_size": f"{DEFAULT_MEMORY_SIZE} for the Table-1 presets, 0 for tiny"
                },
            ),
            StageSpec(
                name="finetune",
                summary="finetune a pretrained network on labelled images (e.g. 1% or 10% of them)",
                defaults={
                    "global_batch_size": 1024,
                    "learning_rate": 0.005,
                    "lr_scaling": "sqrt",
                    "warmup_epochs": 0.0,
                    "weight_decay": 0.0,
                    "from_proj_layer": 1,
                },
                flags=_FROM_PRETRAINED,
                required=frozenset({"pretrained"}),
                views=1,
                label_subset=True,
                needs_labels=True,
                task="ssl_train.stages.tasks:build_finetune",
                pipeline_order=1,
                default_notes={"epochs": "60 on the 1percent subset, 30 otherwise"},
                starts_from=("pretrained", "pretrain"),
                per_subset=True,
                in_pipeline="always",
                epochs_by_subset={"1percent": 60.0, None: 30.0},
            ),
            StageSpec(
                name="supervised",
                summary="the baseline: finetuning's network trained from random weights on labels only",
                defaults={
                    "preset": DEFAULT_PRESET,
                    "global_batch_size": 1024,
                    "learning_rate": 0.005,
                    "lr_scaling": "sqrt",
                    "warmup_epochs": 0.0,
                    "weight_decay": 1e-4,
                    "from_proj_layer": 1,
                },
                flags=(
                    Flag("preset"),
                    Flag("subset"),
                    Flag("from_proj_layer", help="head layers kept under the classifier"),
                ),
                required=frozenset(),
                views=1,
                label_subset=True,
                needs_labels=True,
                task="ssl_train.stages.tasks:build_supervised",
                pipeline_order=2,
                model_field="preset",
                default_notes={"epochs": "100"},
                per_subset=True,
                in_pipeline="optional",  # the paper's baseline: --supervised-baseline
            ),
            StageSpec(
                name="distill",
                summary="distill a finetuned teacher into a student on unlabelled images",
                defaults={  # pretraining's optimiser settings; the teacher's soft labels at tau=1
                    "preset": DEFAULT_PRESET,
                    "global_batch_size": 4096,
                    "epochs": 400.0,
                    "learning_rate": 0.075,
                    "lr_scaling": "sqrt",
                    "warmup_epochs": 10.0,
                    "weight_decay": 1e-4,
                    "temperature": 1.0,
                },
                flags=(
                    Flag("teacher"),
                    Flag(
                        "preset",
                        help="student preset (same size as the teacher or smaller)",
                        name="--student",
                    ),
                    Flag("temperature", help="distillation temperature"),
                    Flag("labeled_weight"),
                ),
                required=frozenset({"teacher"}),
                views=1,
                label_subset=False,
                needs_labels=False,
                task="ssl_train.stages.tasks:build_distill",
                pipeline_order=3,
                model_field="preset",
                starts_from=("teacher", "finetune"),
                per_subset=True,  # one student per finetuned teacher
                in_pipeline="always",
            ),
            StageSpec(
                name="linear-eval",
                summary="train a linear classifier on a frozen pretrained backbone",
                defaults={  # SimCLR's linear protocol: frozen backbone, momentum SGD, 90 epochs
                    "global_batch_size": 4096,
                    "epochs": 90.0,
                    "learning_rate": 0.1,
                    "lr_scaling": "linear",
                    "warmup_epochs": 0.0,
                    "weight_decay": 0.0,
                    "from_proj_layer": 0,
                },
                flags=_FROM_PRETRAINED,
                required=frozenset({"pretrained"}),
                views=1,
                label_subset=True,
                needs_labels=True,
                task="ssl_train.stages.tasks:build_linear_eval",
                pipeline_order=4,
                starts_from=("pretrained", "pretrain"),
                per_subset=True,
                in_pipeline="optional",
            ),
        )
    }
)

# What a TorchX job passes to its stage unless told otherwise: the one place where a
# cluster job's settings differ from the command's. A cluster node gives every rank
# several CPU cores to decode with; a laptop does not. (Device-dependent choices,
# bf16 and channels-last, follow the device instead: see StageConfig.on_device.)
JOB_DEFAULTS: Mapping[str, Any] = MappingProxyType({"workers": 8})


@dataclass(frozen=True)
class CommandSpec:
    """A command that uses a finished run instead of training one (``eval``), declared
    like a stage: its flags are configuration fields too (kind, help and check are the
    field's), ``defaults`` where the command's differ from the field's, and the job
    settings of its TorchX component. The CLI's subcommand and the generated component
    both read it."""

    name: str
    summary: str
    description: str
    run_dir: Flag  # the finished run, the positional RUN_DIR
    flags: tuple[Flag, ...]
    required: frozenset[str]
    defaults: Mapping[str, Any]
    job_flag_defaults: Mapping[str, Any]  # a job's own flag values (more data workers)
    job_options: Mapping[str, Any]  # the component's job settings (memMB, max_retries)
    default_notes: Mapping[str, str] = field(default_factory=dict)

    @property
    def component(self) -> str:
        return self.name.replace("-", "_")

    @property
    def all_flags(self) -> tuple[Flag, ...]:
        return self.flags


EVAL = CommandSpec(
    name="eval",
    summary="top-1/top-5 of a finished run's model on a shard set",
    description="Evaluate RUN_DIR's final model on every sample of --data, in order.",
    run_dir=Flag("run_dir", help="run dir of a finished finetune, distill or linear-eval run"),
    flags=(
        Flag("data", help="shard set to evaluate on (e.g. s3://b/imagenet/val)"),
        Flag(
            "eval_batch_size",
            help="images per process and batch, as the stages' flag",
            aliases=("--batch-size",),
        ),
        Flag("image_size", help="evaluation size (default: what the model trained at)"),
        Flag("workers"),
        Flag("device"),
    ),
    required=frozenset({"data"}),
    defaults=MappingProxyType({"image_size": None}),
    job_flag_defaults=MappingProxyType({"workers": 8}),
    job_options=MappingProxyType({"memMB": 16384, "max_retries": 1}),
)


def stage(name: str) -> StageSpec:
    """The declaration of stage ``name``; a clear error for an unknown one.

    Example:
        >>> stage("distill").mode, stage("pretrain").views
        ('finetune', 2)
    """
    from ssl_train.errors import UserError

    try:
        return STAGES[name]
    except KeyError:
        raise UserError(f"unknown stage {name!r}; use one of {', '.join(STAGES)}") from None


def pipeline_stages() -> list[StageSpec]:
    """The stages ``ssl-train pipeline`` may run, in its order.

    Example:
        >>> [(s.name, s.in_pipeline) for s in pipeline_stages()][:2]
        [('pretrain', 'always'), ('finetune', 'always')]
    """
    return sorted(
        (spec for spec in STAGES.values() if spec.in_pipeline != "no"),
        key=lambda spec: spec.pipeline_order,
    )
