"""One configuration object per stage run, with the paper's defaults per stage.

The configuration is saved in every checkpoint. Resuming compares it field by field:
fields that shape the training trajectory (data, model, batch, schedule, seed) must
match, because a checkpoint continued under other values is a different experiment;
operational fields (workers, checkpoint cadence, trace file, ...) may change freely.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

from shards import storage
from ssl_train.errors import UserError
from ssl_train.metrics import DEFAULT_PORT
from ssl_train.preset_names import PRESET_NAMES, TABLE1_NAMES
from ssl_train.stages import registry

PRECISIONS = ("fp32", "bf16")
DEVICES = ("cpu", "cuda")
DECODES = ("cpu", "gpu")  # --decode: in the data workers, or nvJPEG on the training GPU


def check_decode_flag(decode: str, device_type: str) -> None:
    """Refuse ``--decode gpu`` on a run that does not train on a GPU, before any work.

    Why not fall back to the CPU path quietly: the user asked for the GPU to decode, and a
    run that silently decodes elsewhere would be sized and measured wrongly.

    Example:
        >>> check_decode_flag("gpu", "cpu")
        Traceback (most recent call last):
        ...
        ssl_train.errors.UserError: --decode gpu decodes JPEGs with nvJPEG on the training GPU, and this run trains on cpu (no CUDA device visible, or --device cpu): leave --decode out (or give --decode cpu) to decode in the data workers, or run on a machine with a GPU
    """
    if decode == "gpu" and device_type != "cuda":
        raise UserError(
            "--decode gpu decodes JPEGs with nvJPEG on the training GPU, and this run trains "
            f"on {device_type} (no CUDA device visible, or --device {device_type}): leave "
            "--decode out (or give --decode cpu) to decode in the data workers, or run on a "
            "machine with a GPU"
        )


def check_device_flag(device: str | None) -> None:
    """Refuse a ``--device`` ssl-train cannot train on, before anything starts.

    Example:
        >>> check_device_flag("tpu")
        Traceback (most recent call last):
        ...
        ssl_train.errors.UserError: --device tpu: use cpu, cuda or cuda:N (leave it out to take cuda when a GPU is visible)
    """
    if device is None:
        return
    kind, _, index = device.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise UserError(
            f"--device {device}: use cpu, cuda or cuda:N (leave it out to take cuda when a "
            "GPU is visible)"
        )


# Fields a resumed run may change without --allow-config-change.
OPERATIONAL = frozenset(
    {
        "run_dir",
        "workers",
        "checkpoint_every_steps",
        "checkpoint_every_minutes",
        "keep_checkpoints",
        "trace_samples",
        "stop_at_step",
        "allow_config_change",
        "compile",
        "channels_last",
        "device",
        "decode",  # the same crops either way (pixels within a stated tolerance)
        "eval_data",
        "eval_batch_size",
        "log_every_steps",
        "metrics_port",
    }
)


@dataclass
class StageConfig:
    """Everything one stage run needs; ``StageConfig.for_stage`` fills the paper's defaults.

    Example:
        >>> config = StageConfig.for_stage("pretrain", data="s3://b/train", run_dir="/tmp/r")
        >>> config.global_batch_size, config.learning_rate, config.temperature
        (4096, 0.075, 0.1)
    """

    stage: str
    data: str
    run_dir: str
    preset: str | None = None
    global_batch_size: int = 4096
    epochs: float | None = None
    max_steps: int | None = None
    image_size: int = 224
    seed: int = 0
    learning_rate: float = 0.075
    lr_scaling: str = "sqrt"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    temperature: float = 0.1
    head_layers: int = 3
    proj_dim: int = 128
    from_proj_layer: int = 1
    partitions: int | None = None
    subset: str | None = None
    pretrained: str | None = None
    teacher: str | None = None
    labeled_weight: float = 0.0
    precision: str | None = None  # None: bf16 on a GPU, fp32 on CPUs (on_device)
    channels_last: bool | None = None  # None: on for a GPU, off on CPUs (on_device)
    compile: bool = False
    device: str | None = None
    workers: int = 4
    decode: str = "cpu"  # "gpu": the workers ship JPEG bytes, nvJPEG decodes (data.device_decode)
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float | None = 10.0
    keep_checkpoints: int = 3
    trace_samples: str | None = None
    stop_at_step: int | None = None
    allow_config_change: bool = False
    eval_data: str | None = None
    eval_batch_size: int = 256
    log_every_steps: int = 10
    metrics_port: int = DEFAULT_PORT  # 0 = no metrics
    memory_size: int | None = None  # pretrain: SimCLRv2's memory (None: by preset; 0 = off)
    memory_momentum: float = registry.DEFAULT_MEMORY_MOMENTUM

    @classmethod
    def for_stage(cls, stage: str, **values: Any) -> StageConfig:
        """The stage's paper defaults (its ``StageSpec``), overridden by ``values`` (None
        means default)."""
        merged = dict(registry.stage(stage).defaults)
        merged.update({k: v for k, v in values.items() if v is not None})
        config = cls(stage=stage, **merged)
        if config.memory_size is None and registry.stage(stage).uses_memory:
            # the paper's memory for Table 1's networks; the tiny presets choose per run
            config.memory_size = (
                registry.DEFAULT_MEMORY_SIZE if config.preset in TABLE1_NAMES else 0
            )
        config.validate()
        return config

    def validate(self) -> None:
        """Refuse values that would fail later, naming the flag."""
        checks = [
            (self.global_batch_size >= 1, "--global-batch-size must be at least 1"),
            (self.image_size >= 8, "--image-size must be at least 8"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.epochs is None or self.epochs > 0, "--epochs must be positive"),
            (
                self.precision is None or self.precision in PRECISIONS,
                f"--precision must be one of {', '.join(PRECISIONS)}",
            ),
            (self.lr_scaling in ("sqrt", "linear"), "--lr-scaling must be sqrt or linear"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (
                self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1,
                "--checkpoint-every-steps must be at least 1",
            ),
            (
                self.checkpoint_every_minutes is None or self.checkpoint_every_minutes > 0,
                "--checkpoint-every-minutes must be positive",
            ),
            (0.0 <= self.labeled_weight <= 1.0, "--labeled-weight must be between 0 and 1"),
            (self.workers >= 0, "--workers must be 0 or more"),
            (
                self.decode in DECODES,
                f"--decode {self.decode}: use cpu (decode in the data workers) or gpu (nvJPEG "
                "on the training GPU)",
            ),
            (self.temperature > 0, "--temperature must be positive"),
            (
                self.preset is None or self.preset in PRESET_NAMES,
                f"unknown preset {self.preset!r}; choose one of {', '.join(PRESET_NAMES)} "
                "(`ssl-train models` describes them)",
            ),
            (self.learning_rate >= 0, "--learning-rate must be 0 or more"),
            (0 <= self.momentum < 1, "--momentum must be at least 0 and below 1"),
            (self.warmup_epochs >= 0, "--warmup-epochs must be 0 or more"),
            (self.weight_decay >= 0, "--weight-decay must be 0 or more"),
            (self.head_layers >= 1, "--head-layers must be at least 1"),
            (self.proj_dim >= 1, "--proj-dim must be at least 1"),
            (
                0 <= self.from_proj_layer <= self.head_layers,
                f"--from-proj-layer {self.from_proj_layer}: the classifier reads head layer 0 "
                f"(the backbone) to --head-layers ({self.head_layers})",
            ),
            (self.partitions is None or self.partitions >= 1, "--partitions must be at least 1"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
            (self.log_every_steps >= 1, "--log-every-steps must be at least 1"),
            (
                self.memory_size is None or self.memory_size >= 0,
                "--memory-size must be 0 (off) or more",
            ),
            (0 <= self.memory_momentum < 1, "--memory-momentum must be at least 0 and below 1"),
            (
                not self.eval_data or registry.stage(self.stage).classifies,
                f"--eval-data: {self.stage} trains no classifier to evaluate (linear-eval or "
                "finetune its run, and evaluate that)",
            ),
            (0 <= self.metrics_port <= 65535, "--metrics-port must be 0 (off) or a TCP port"),
            (
                registry.stage(self.stage).views == 1 or self.global_batch_size >= 2,
                f"--global-batch-size {self.global_batch_size}: contrastive pretraining needs "
                "at least 2 samples per global batch (an image's negatives are the batch's "
                "other images; with none the loss is 0 and nothing is learnt)",
            ),
        ]
        spec = registry.stage(self.stage)
        for required in sorted(spec.required):
            flag = next(f.flag for f in spec.all_flags if f.field == required)
            checks.append((getattr(self, required) is not None, f"{self.stage} needs {flag}"))
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        check_device_flag(self.device)

    def on_device(self, device_type: str) -> StageConfig:
        """This configuration with the device-dependent choices made: bf16 autocast and
        channels-last on a GPU, fp32 and the default layout on CPUs, unless set. Resolved
        before training so checkpoints record what the run did; ``--decode gpu`` off a GPU
        is refused here.

        Example:
            >>> config = StageConfig.for_stage("pretrain", data="d", run_dir="/r")
            >>> gpu = config.on_device("cuda")
            >>> (gpu.precision, gpu.channels_last), config.on_device("cpu").precision
            (('bf16', True), 'fp32')
        """
        on_gpu = device_type == "cuda"
        check_decode_flag(self.decode, device_type)
        return replace(
            self,
            precision=self.precision or ("bf16" if on_gpu else "fp32"),
            channels_last=on_gpu if self.channels_last is None else self.channels_last,
        )

    def resolved_epochs(self) -> float:
        """Epochs to train when --max-steps is not given."""
        if self.epochs is not None:
            return self.epochs
        return registry.stage(self.stage).default_epochs(self.subset)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Training length: --max-steps, else whole epochs of the stream's steps."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.resolved_epochs() * steps_per_epoch))

    def warmup_steps(self, steps_per_epoch: int) -> int:
        return round(self.warmup_epochs * steps_per_epoch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StageConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# Fields added after checkpoints were first written, with the value those checkpoints
# trained with: the memory did not exist (0 = off).
ADDED_LATER: dict[str, Any] = {"memory_size": 0}


def config_changes(saved: dict[str, Any], current: StageConfig) -> list[str]:
    """Fields that shape training and differ from the checkpoint's, as ``name: old -> new``.

    Example:
        >>> a = StageConfig.for_stage("pretrain", data="d", run_dir="/r")
        >>> b = StageConfig.for_stage("pretrain", data="d", run_dir="/r", global_batch_size=512, workers=1)
        >>> config_changes(a.to_dict(), b)
        ['global_batch_size: 4096 -> 512']
    """
    now = current.to_dict()
    saved = {**ADDED_LATER, **saved}  # a checkpoint from before a field existed
    if not saved.get("memory_size") and not now.get("memory_size"):
        saved["memory_momentum"] = now.get("memory_momentum")  # no memory: no momentum
    return [
        f"{name}: {saved.get(name)!r} -> {now[name]!r}"
        for name in now
        if name not in OPERATIONAL and saved.get(name) != now[name]
    ]


def check_memory_size(memory_size: int, samples_per_epoch: int, data: str) -> None:
    """A memory that holds as many projections as an epoch has samples would show every
    anchor its own earlier projection as a negative: refused before any work (by the
    ranks, ``--check-only`` and the demo's ``--memory-size``).

    Example:
        >>> check_memory_size(65536, 1281167, "s3://b/imagenet/train")
    """
    if memory_size and memory_size >= samples_per_epoch:
        raise UserError(
            f"--memory-size {memory_size}: an epoch of {storage.redact(data)} trains on "
            f"{samples_per_epoch} samples, so the memory would hold an anchor's own earlier "
            f"projection as a negative; use fewer than {samples_per_epoch} (SimCLRv2 keeps "
            "65,536 of ImageNet's 1.28M), or 0 to turn it off"
        )


def stage_default(spec: registry.StageSpec, field_name: str) -> Any:
    """The value a field takes in stage ``spec`` when its flag is not given: the
    stage's declared default, else the configuration's.

    Example:
        >>> stage_default(registry.stage("finetune"), "learning_rate"), stage_default(registry.stage("finetune"), "seed")
        (0.005, 0)
    """
    if field_name in spec.defaults:
        return spec.defaults[field_name]
    return {f.name: f.default for f in fields(StageConfig)}[field_name]


def flag_help(spec: registry.StageSpec, flag: registry.Flag) -> str:
    """A flag's help, ending with the default the stage gives it (none for unset ones).

    Example:
        >>> flag_help(registry.stage("pretrain"), registry.stage("pretrain").flags[1])
        'NT-Xent temperature (default 0.1)'
    """
    if flag.field in spec.default_notes:
        return f"{flag.help} (default {spec.default_notes[flag.field]})"
    value = stage_default(spec, flag.field)
    if value is None or value is MISSING or flag.kind is bool:
        return flag.help
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{flag.help} (default {shown})"
