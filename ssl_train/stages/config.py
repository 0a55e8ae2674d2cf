"""One configuration object per stage run, with the paper's defaults per stage.

The configuration is saved in every checkpoint. Resuming compares it field by field:
fields that shape the training trajectory (data, model, batch, schedule, seed) must
match, because a checkpoint continued under other values is a different experiment;
operational fields (workers, checkpoint cadence, trace file, ...) may change freely.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from typing import Any, get_args, get_type_hints

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


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    check: tuple[Callable[[Any], bool], str] | None = None,
    operational: bool = False,
) -> Any:
    """A configuration field, declared once: its default, its help (what ``--help`` and
    the TorchX components say, unless a stage words it its own way), a check of its value
    alone (a predicate and the message naming the flag, ``{value}`` filled in; an unset
    None is never checked), and whether a resumed run may change it freely
    (``operational``: workers, cadence, logging; anything that shapes the training
    trajectory may not, without --allow-config-change).

    Example:
        >>> fields_by_name()["workers"].metadata["operational"]
        True
    """
    metadata = {"help": help, "check": check, "operational": operational}
    return field(default=default, metadata=metadata)


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda value: value >= low


def _positive(value: Any) -> bool:
    return value > 0


@dataclass
class StageConfig:
    """Everything one stage run needs; ``StageConfig.for_stage`` fills the paper's defaults.

    Example:
        >>> config = StageConfig.for_stage("pretrain", data="s3://b/train", run_dir="/tmp/r")
        >>> config.global_batch_size, config.learning_rate, config.temperature
        (4096, 0.075, 0.1)
    """

    stage: str
    data: str = setting(help="training shard set: a local path or s3://bucket/prefix")
    run_dir: str = setting(
        help="where checkpoints and the final model go (local or s3://); running the same "
        "command again resumes from it",
        operational=True,
    )
    preset: str | None = setting(
        None,
        "model preset (see `ssl-train models`)",
        check=(
            lambda value: value in PRESET_NAMES,
            "unknown preset {value!r}; choose one of "
            + ", ".join(PRESET_NAMES)
            + " (`ssl-train models` describes them)",
        ),
    )
    global_batch_size: int = setting(
        4096,
        "samples per step over all processes",
        check=(_at_least(1), "--global-batch-size must be at least 1"),
    )
    epochs: float | None = setting(
        None, "training length in epochs", check=(_positive, "--epochs must be positive")
    )
    max_steps: int | None = setting(
        None,
        "training length in steps (overrides --epochs)",
        check=(_at_least(1), "--max-steps must be at least 1"),
    )
    image_size: int = setting(
        224,
        "side of the training crops in pixels",
        check=(_at_least(8), "--image-size must be at least 8"),
    )
    seed: int = setting(0, "fixes the initial weights, data order and augmentation")
    learning_rate: float = setting(
        0.075,
        "base learning rate, scaled by --lr-scaling",
        check=(_at_least(0), "--learning-rate must be 0 or more"),
    )
    lr_scaling: str = setting(
        "sqrt",
        "sqrt: lr*sqrt(B); linear: lr*B/256",
        check=(lambda value: value in ("sqrt", "linear"), "--lr-scaling must be sqrt or linear"),
    )
    warmup_epochs: float = setting(
        0.0,
        "linear warmup, then cosine decay",
        check=(_at_least(0), "--warmup-epochs must be 0 or more"),
    )
    weight_decay: float = setting(
        0.0,
        "L2 weight decay (not on BN or biases)",
        check=(_at_least(0), "--weight-decay must be 0 or more"),
    )
    momentum: float = setting(
        0.9,
        "optimizer momentum",
        check=(lambda value: 0 <= value < 1, "--momentum must be at least 0 and below 1"),
    )
    temperature: float = setting(
        0.1, "NT-Xent temperature", check=(_positive, "--temperature must be positive")
    )
    head_layers: int = setting(
        3, "projection head depth", check=(_at_least(1), "--head-layers must be at least 1")
    )
    proj_dim: int = setting(
        128, "projection output width", check=(_at_least(1), "--proj-dim must be at least 1")
    )
    from_proj_layer: int = setting(1, "head layer the classifier reads")
    partitions: int | None = setting(
        None,
        "data-plan partitions, part of the run's configuration like the seed (default 32, or "
        "the global batch when 32 does not divide it)",
        check=(_at_least(1), "--partitions must be at least 1"),
    )
    subset: str | None = setting(
        None, "labelled subset: 1percent, 10percent or a list file (default: every label)"
    )
    pretrained: str | None = setting(None, "run dir of a finished pretrain run")
    teacher: str | None = setting(None, "run dir of a finished finetune run")
    labeled_weight: float = setting(
        0.0,
        "weight of a cross-entropy term on the true labels (0 = unlabelled only)",
        check=(lambda value: 0.0 <= value <= 1.0, "--labeled-weight must be between 0 and 1"),
    )
    # None: bf16 on a GPU, fp32 on CPUs (on_device)
    precision: str | None = setting(
        None,
        "fp32, or bf16 autocast (default: bf16 on a GPU, fp32 on CPUs)",
        check=(
            lambda value: value in PRECISIONS,
            "--precision must be one of " + ", ".join(PRECISIONS),
        ),
    )
    # None: on for a GPU, off on CPUs (on_device)
    channels_last: bool | None = setting(
        None, "channels-last memory format (default: on for a GPU, off on CPUs)", operational=True
    )
    compile: bool = setting(False, "torch.compile the model", operational=True)
    device: str | None = setting(
        None, "cpu, cuda or cuda:N (default: cuda when a GPU is visible)", operational=True
    )
    workers: int = setting(
        4,
        "data-loading processes per rank",
        check=(_at_least(0), "--workers must be 0 or more"),
        operational=True,
    )
    # "gpu": the workers ship JPEG bytes, nvJPEG decodes (data.device_decode); the same
    # crops either way (pixels within a stated tolerance), so a resume may switch
    decode: str = setting(
        "cpu",
        "where training JPEGs are decoded and cropped: cpu (the data workers) or gpu (nvJPEG "
        "on the training GPU, batched; the workers then only read and ship the bytes). gpu "
        "takes GPU time from the step: use it when the workers cannot keep up",
        check=(
            lambda value: value in DECODES,
            "--decode {value}: use cpu (decode in the data workers) or gpu (nvJPEG on the "
            "training GPU)",
        ),
        operational=True,
    )
    checkpoint_every_steps: int | None = setting(
        None,
        "also checkpoint every N steps",
        check=(_at_least(1), "--checkpoint-every-steps must be at least 1"),
        operational=True,
    )
    checkpoint_every_minutes: float | None = setting(
        10.0,
        "checkpoint every M minutes",
        check=(_positive, "--checkpoint-every-minutes must be positive"),
        operational=True,
    )
    keep_checkpoints: int = setting(
        3,
        "how many recent checkpoints to keep",
        check=(_at_least(1), "--keep-checkpoints must be at least 1"),
        operational=True,
    )
    trace_samples: str | None = setting(
        None, "append one JSON line per rank and step with the sample keys", operational=True
    )
    stop_at_step: int | None = setting(
        None,
        "checkpoint and stop at this global step (run again to continue)",
        operational=True,
    )
    allow_config_change: bool = setting(
        False, "resume even if training settings differ from the checkpoint's", operational=True
    )
    single_writer_store: bool = setting(
        False,
        "the run dir's store does not honour conditional writes and only ever one job writes "
        "there: skip the check that refuses such a store (said at every start)",
        operational=True,
    )
    eval_data: str | None = setting(
        None,
        "shard set to report top-1/top-5 on at the end (checked at the start)",
        operational=True,
    )
    eval_batch_size: int = setting(
        256,
        "evaluation batch per process",
        check=(_at_least(1), "--eval-batch-size must be at least 1"),
        operational=True,
    )
    log_every_steps: int = setting(
        10,
        "progress line every N steps",
        check=(_at_least(1), "--log-every-steps must be at least 1"),
        operational=True,
    )
    metrics_port: int = setting(
        DEFAULT_PORT,
        "serve Prometheus /metrics for this node on PORT + node rank (0 = off)",
        check=(
            lambda value: 0 <= value <= 65535,
            "--metrics-port must be 0 (off) or a TCP port",
        ),
        operational=True,
    )
    # pretrain: SimCLRv2's memory (None: by preset; 0 = off)
    memory_size: int | None = setting(
        None,
        "negatives kept from earlier steps by SimCLRv2's memory (the paper's 64K, MoCo's "
        "queue of 65,536); 0 turns the memory off",
        check=(_at_least(0), "--memory-size must be 0 (off) or more"),
    )
    memory_momentum: float = setting(
        registry.DEFAULT_MEMORY_MOMENTUM,
        "moving-average coefficient of the memory network (SimCLRv2 and MoCo: 0.999)",
        check=(
            lambda value: 0 <= value < 1,
            "--memory-momentum must be at least 0 and below 1",
        ),
    )

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
        """Refuse values that would fail later, naming the flag: each field's own check
        (declared with the field), then those that read several fields or the stage."""
        for declared in fields(self):
            check, value = declared.metadata.get("check"), getattr(self, declared.name)
            if check is not None and value is not None and not check[0](value):
                raise UserError(check[1].format(value=value))
        checks = [
            (
                0 <= self.from_proj_layer <= self.head_layers,
                f"--from-proj-layer {self.from_proj_layer}: the classifier reads head layer 0 "
                f"(the backbone) to --head-layers ({self.head_layers})",
            ),
            (
                not self.eval_data or registry.stage(self.stage).classifies,
                f"--eval-data: {self.stage} trains no classifier to evaluate (linear-eval or "
                "finetune its run, and evaluate that)",
            ),
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


def fields_by_name() -> dict[str, Field]:
    """Every configuration field's declaration, by name."""
    return {declared.name: declared for declared in fields(StageConfig)}


# Fields a resumed run may change without --allow-config-change (declared operational).
OPERATIONAL = frozenset(
    name for name, declared in fields_by_name().items() if declared.metadata.get("operational")
)


def field_kind(name: str) -> type:
    """What a field holds, as its flag parses it: int, float, str, or bool (a switch).

    Example:
        >>> field_kind("channels_last"), field_kind("max_steps")
        (<class 'bool'>, <class 'int'>)
    """
    hint = get_type_hints(StageConfig)[name]
    kinds = [kind for kind in get_args(hint) if kind is not type(None)] or [hint]
    return kinds[0]


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


def stage_default(spec: registry.StageSpec | registry.CommandSpec, field_name: str) -> Any:
    """The value a field takes in stage ``spec`` when its flag is not given: the
    stage's declared default, else the configuration's.

    Example:
        >>> stage_default(registry.stage("finetune"), "learning_rate"), stage_default(registry.stage("finetune"), "seed")
        (0.005, 0)
    """
    if field_name in spec.defaults:
        return spec.defaults[field_name]
    return {f.name: f.default for f in fields(StageConfig)}[field_name]


def flag_text(flag: registry.Flag) -> str:
    """What a flag sets, without its default: the stage's wording, else its field's.

    Example:
        >>> flag_text(registry.Flag("seed"))
        'fixes the initial weights, data order and augmentation'
    """
    return flag.help or fields_by_name()[flag.field].metadata["help"]


def flag_help(spec: registry.StageSpec | registry.CommandSpec, flag: registry.Flag) -> str:
    """A flag's help (its field's, or the stage's own wording), ending with the default
    the stage gives it (none for unset ones).

    Example:
        >>> flag_help(registry.stage("pretrain"), registry.stage("pretrain").flags[1])
        'NT-Xent temperature (default 0.1)'
    """
    text = flag_text(flag)
    if flag.field in spec.default_notes:
        return f"{text} (default {spec.default_notes[flag.field]})"
    value = stage_default(spec, flag.field)
    if value is None or value is MISSING or field_kind(flag.field) is bool:
        return text
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{text} (default {shown})"
