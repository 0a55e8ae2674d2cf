"""What differs between the stages: the model they train, its optimiser, the views they
read and the loss. Everything else (data stream, schedule, checkpoints, preemption,
tracing) is the one training loop in ``ssl_train.stages.loop``.

- pretrain: two augmented views per image, NT-Xent over the global batch.
- finetune: the pretrained network up to head layer ``from_proj_layer``, a zero
  classifier, cross-entropy on the labelled subset (crop + flip).
- distill: a frozen teacher's soft labels on all training images, learned by a fresh
  student that sees the very same view.
- linear-eval: a linear classifier on the frozen backbone's features.
- supervised: the baseline the paper compares with: finetuning's network (backbone, head
  up to ``from_proj_layer``, classifier) trained from random weights on the labels only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shards import storage
from ssl_train.contrastive_memory import ContrastiveMemory
from ssl_train.data.augment import SimCLRAugment, apply_view_params, flip_params
from ssl_train.errors import UserError
from ssl_train.export import load_model, model_config, model_url, read_config
from ssl_train.losses import batch_mean, contrastive_accuracy, distillation_loss, nt_xent
from ssl_train.models import SimCLRv2, build_model
from ssl_train.optim import LARS, lars_param_groups
from ssl_train.shares import Shares
from ssl_train.stages import registry
from ssl_train.stages.config import StageConfig
from ssl_train.stages.evaluate import first_difference


def _is_classifier(name: str, param: nn.Parameter) -> bool:
    return name.startswith("classifier.")


@dataclass
class Task:
    """One stage's model, optimiser and loss; ``loss`` gets the (DDP-wrapped) model.

    The training loop knows no stage: what a stage keeps besides its model (SimCLRv2's
    memory), how that follows the model's layout and batch norm, what it does after each
    step and which of its metrics are gauges all come from here.
    """

    config: StageConfig
    model: SimCLRv2
    optimizer: torch.optim.Optimizer
    model_config: dict[str, Any]
    frozen: list[nn.Module] = field(default_factory=list)  # stay in eval mode
    # progress-line metric -> Prometheus gauge (ssl_train.metrics) it also sets
    gauges: ClassVar[dict[str, str]] = {"loss": "loss"}

    @property
    def views(self) -> int:
        """Augmented views per sample it trains on (its declaration's)."""
        return registry.stage(self.config.stage).views

    def train_mode(self) -> None:
        self.model.train()
        for module in self.frozen:
            module.eval()

    def device_views(self, views: Tensor, keys: list[str], epoch: int) -> Tensor:
        """The device stage of augmentation: uint8 crops in, float network input out.
        Two views stack view 0 of every sample, then view 1."""
        seed = self.config.seed
        if self.views == 2:
            first, second = SimCLRAugment()(views[0], views[1], keys, seed, epoch)
            return torch.cat([first, second])
        return apply_view_params(views[0], flip_params(keys, seed, epoch, view=0))

    def to_memory_format(self, memory_format: torch.memory_format) -> None:
        """Lay out the model, and whatever trains with it, in ``memory_format``."""
        self.model.to(memory_format=memory_format)

    def use_global_batch_norm(self, convert: Callable[[nn.Module], nn.Module]) -> None:
        """Batch norm over the global batch (``convert``: ``dist.convert_to_global_bn``)
        for the model and every network that normalises with batch statistics."""
        self.model = convert(self.model)  # type: ignore[assignment]

    def extra_state(self) -> dict[str, Any]:
        """What checkpoints keep besides the model and optimiser (names of its own)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Take back what ``extra_state`` saved, from a checkpoint's ``state``."""

    def loss(
        self, model: nn.Module, images: Tensor, labels: Tensor, shares: Shares | None = None
    ) -> tuple[Tensor, dict]:
        """The loss and metrics of this rank's share of the global batch, each this
        rank's part of the global mean (``shares``: how the batch lies over the ranks;
        None: every rank holds as many samples as this one)."""
        raise NotImplementedError

    def after_step(self, online: nn.Module, images: Tensor, shares: Shares | None = None) -> None:
        """What follows each optimizer step, given the updated (unwrapped) network and the
        step's network input; nothing for most stages."""


@dataclass
class PretrainTask(Task):
    memory: ContrastiveMemory | None = None  # SimCLRv2's memory of negatives (--memory-size)
    gauges: ClassVar[dict[str, str]] = {"loss": "loss", "contrastive_top1": "contrastive_top1"}

    def to_memory_format(self, memory_format: torch.memory_format) -> None:
        super().to_memory_format(memory_format)
        if self.memory is not None:
            self.memory.to(memory_format=memory_format)

    def use_global_batch_norm(self, convert: Callable[[nn.Module], nn.Module]) -> None:
        super().use_global_batch_norm(convert)
        if self.memory is not None:  # it normalises with batch statistics too
            self.memory.network = convert(self.memory.network)

    def extra_state(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()} if self.memory is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])

    def loss(
        self, model: nn.Module, images: Tensor, labels: Tensor, shares: Shares | None = None
    ) -> tuple[Tensor, dict]:
        z1, z2 = model(images).projection.chunk(2)
        negatives = self.memory.negatives() if self.memory is not None else None
        loss = nt_xent(z1, z2, self.config.temperature, negatives, shares)
        accuracy = contrastive_accuracy(z1.detach(), z2.detach(), shares)
        return loss, {"contrastive_top1": accuracy}

    def after_step(self, online: nn.Module, images: Tensor, shares: Shares | None = None) -> None:
        """SimCLRv2's memory: average the updated weights in, then buffer this step's
        projections by the memory network (``ssl_train.contrastive_memory``)."""
        if self.memory is not None:
            self.memory.update(online)
            self.memory.push(images, shares)


def _classification(logits: Tensor, labels: Tensor, shares: Shares | None) -> tuple[Tensor, dict]:
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    hits = (logits.detach().argmax(1) == labels).float()
    return batch_mean(losses, shares), {"top1": batch_mean(hits, shares)}


class FinetuneTask(Task):
    gauges: ClassVar[dict[str, str]] = {"loss": "loss", "top1": "train_top1"}

    def loss(
        self, model: nn.Module, images: Tensor, labels: Tensor, shares: Shares | None = None
    ) -> tuple[Tensor, dict]:
        return _classification(model(images).logits, labels, shares)


class DistillTask(Task):
    teacher: SimCLRv2

    def loss(
        self, model: nn.Module, images: Tensor, labels: Tensor, shares: Shares | None = None
    ) -> tuple[Tensor, dict]:
        with torch.no_grad():
            teacher_logits = self.teacher(images).logits
        student_logits = model(images).logits
        config = self.config
        loss = distillation_loss(
            student_logits,
            teacher_logits,
            config.temperature,
            labels if config.labeled_weight > 0 else None,
            config.labeled_weight,
            shares,
        )
        agreement = (student_logits.detach().argmax(1) == teacher_logits.argmax(1)).float()
        return loss, {"teacher_agreement": batch_mean(agreement, shares)}


def _lars(model: nn.Module, config: StageConfig) -> LARS:
    groups = lars_param_groups(model, config.weight_decay, exclude=_is_classifier)
    return LARS(groups, lr=0.0, momentum=config.momentum)


def stage_classes(config: StageConfig, classes: list[str] | None) -> list[str] | None:
    """The classes the stage's model learns, in label order, given --data's (None for an
    unlabeled set); refuses an unlabeled set where the loss needs labels.

    Distillation learns its teacher's classes: on an unlabeled pool they come from the
    teacher (its config.json), on a labelled set they must be the same list.

    Example:
        >>> config = StageConfig.for_stage("finetune", data="/d/pool", run_dir="/r", pretrained="/p")
        >>> stage_classes(config, None)
        Traceback (most recent call last):
        ...
        ssl_train.errors.UserError: ssl-train finetune trains on labels, and --data /d/pool is unlabeled (its manifest lists no classes): pass a labelled shard set (shards create SRC DEST --labels FILE)
    """
    spec = registry.stage(config.stage)
    if classes is None:
        needs = "trains on labels" if spec.needs_labels else None
        if config.labeled_weight > 0:
            needs = f"with --labeled-weight {config.labeled_weight:g} reads labels"
        if needs is not None:
            raise UserError(
                f"ssl-train {config.stage} {needs}, and --data {storage.redact(config.data)} "
                "is unlabeled (its manifest lists no classes): pass a labelled shard set "
                "(shards create SRC DEST --labels FILE)"
            )
        if config.teacher:
            return _model_config("--teacher", config.teacher).get("classes")
    return classes


def check_sources(config: StageConfig, classes: list[str] | None) -> None:
    """The models a stage starts from exist, are finished, and fit it (their configs
    only: what ``--check-only`` reads before a job starts torchrun).

    Example:
        >>> config = StageConfig.for_stage("finetune", data="d", run_dir="/r", pretrained="/nope")
        >>> check_sources(config, ["cat", "dog"])
        Traceback (most recent call last):
        ...
        ssl_train.export.ExportError: --pretrained /nope: nothing is there; check the path (the run dir of the stage that trained the model)
    """
    if config.pretrained:
        check_pretrained(config, _model_config("--pretrained", config.pretrained))
    if config.teacher:
        check_teacher(config, _model_config("--teacher", config.teacher), classes)


def check_pretrained(config: StageConfig, saved: dict[str, Any]) -> None:
    """``saved`` (the --pretrained model's config) is a whole pretraining network whose
    head has the layer the classifier reads."""
    if saved.get("kept_head_layers") != saved.get("head_layers"):
        raise UserError(
            f"--pretrained {config.pretrained}: its projection head was cut; pass a pretraining run"
        )
    if config.from_proj_layer > saved["head_layers"]:
        raise UserError(
            f"--from-proj-layer {config.from_proj_layer}: --pretrained {config.pretrained} "
            f"has a {saved['head_layers']}-layer head; choose 0 to {saved['head_layers']}"
        )


def check_teacher(config: StageConfig, saved: dict[str, Any], classes: list[str] | None) -> None:
    """``saved`` (the --teacher model's config) classifies the training data's classes,
    in the same order where it records them: a teacher whose logit i means another
    class would teach permuted labels, and nothing later would say so. ``classes`` is
    None for a teacher without class names distilling on an unlabeled pool."""
    teacher = storage.redact(config.teacher or "")
    if not saved.get("num_classes"):
        raise UserError(
            f"--teacher {teacher} has no classifier: pass a finetune run (a teacher "
            "classifies; a pretraining run does not)"
        )
    if classes is None:
        return
    if saved.get("num_classes") != len(classes):
        raise UserError(
            f"--teacher {teacher} has no classifier for the {len(classes)} classes "
            "of --data: pass a finetune run on the same classes"
        )
    theirs = saved.get("classes")
    if theirs is not None and len(theirs) != len(classes):
        raise UserError(
            f"--teacher {teacher}: its config.json names {len(theirs)} classes for "
            f"{len(classes)} outputs: the file is damaged; export or import it again"
        )
    if theirs is not None and list(theirs) != list(classes):
        at = first_difference(theirs, classes)
        raise UserError(
            f"--teacher {teacher}: its classifier's class {at} is {theirs[at]!r}, "
            f"--data {storage.redact(config.data)}'s is {classes[at]!r}: the same classes "
            "must be in the same order; shard the data with the teacher's class list "
            "(shards create --classes)"
        )


def _model_config(flag: str, run_dir: str) -> dict[str, Any]:
    try:
        return read_config(model_url(run_dir))
    except UserError as exc:
        if not storage.holds_anything(run_dir):  # a typo, not a run still training
            raise type(exc)(
                f"{flag} {storage.redact(run_dir)}: nothing is there; check the path (the "
                "run dir of the stage that trained the model)"
            ) from None
        raise type(exc)(f"{flag} {exc}") from None


def build_task(config: StageConfig, classes: list[str] | None, device: torch.device) -> Task:
    """The stage's task on ``device``, by the builder its declaration names; reads the
    previous stage's model where needed. ``classes`` are the ones it learns, in label
    order (``stage_classes``; None when it learns none, as pretraining).

    Example:
        >>> config = StageConfig.for_stage("pretrain", data="d", run_dir="/r", preset="tiny")
        >>> task = build_task(config, [str(i) for i in range(10)], torch.device("cpu"))
        >>> task.views, task.model.classifier is None
        (2, True)
    """
    return registry.stage(config.stage).build_task()(config, classes, device)


def build_pretrain(config: StageConfig, classes: list[str], device: torch.device) -> Task:
    """SimCLRv2's network with its projection head and no classifier, under LARS."""
    model = build_model(config.preset, None, config.head_layers, config.proj_dim, device=device)
    described = model_config(
        config.preset, None, config.head_layers, config.proj_dim, 0, config.head_layers
    )
    memory = None
    if config.memory_size:  # starts as a copy of the initial network, as MoCo's does
        memory = ContrastiveMemory(
            model, config.memory_size, config.memory_momentum, config.proj_dim
        )
    return PretrainTask(config, model, _lars(model, config), described, memory=memory)


def build_supervised(config: StageConfig, classes: list[str], device: torch.device) -> Task:
    """Finetuning's network from random weights."""
    layer, num_classes = config.from_proj_layer, len(classes)
    model = build_model(
        config.preset, num_classes, config.head_layers, config.proj_dim, layer, device
    )
    model.keep_head_layers(layer)
    described = model_config(
        config.preset, num_classes, config.head_layers, config.proj_dim, layer, layer
    )
    return FinetuneTask(config, model, _lars(model, config), described)


def _from_pretrained(
    config: StageConfig, num_classes: int, device: torch.device
) -> tuple[SimCLRv2, dict[str, Any]]:
    """The pretrained backbone and head layers up to --from-proj-layer, a zero classifier."""
    base, saved = load_model(model_url(config.pretrained), device)  # its config once
    check_pretrained(config, saved)
    layer = config.from_proj_layer
    with torch.device(device):  # the new classifier is made where the loaded network is
        model = SimCLRv2(base.backbone, saved["head_layers"], saved["proj_dim"], num_classes, layer)
    model.head = base.head
    model.keep_head_layers(layer)
    model.zero_init_classifier()
    described = model_config(
        saved["preset"],
        num_classes,
        saved["head_layers"],
        saved["proj_dim"],
        layer,
        layer,
        saved.get("stem_pool", "torchvision"),
    )
    return model, described


def build_finetune(config: StageConfig, classes: list[str], device: torch.device) -> Task:
    """Every layer trained from the pretrained weights, under LARS."""
    model, described = _from_pretrained(config, len(classes), device)
    return FinetuneTask(config, model, _lars(model, config), described)


def build_linear_eval(config: StageConfig, classes: list[str], device: torch.device) -> Task:
    """Only the classifier trained (Nesterov momentum SGD); backbone and head frozen."""
    model, described = _from_pretrained(config, len(classes), device)
    for param in list(model.backbone.parameters()) + list(model.head.parameters()):
        param.requires_grad_(False)
    optimizer = torch.optim.SGD(
        model.classifier.parameters(), lr=0.0, momentum=config.momentum, nesterov=True
    )
    return FinetuneTask(config, model, optimizer, described, frozen=[model.backbone, model.head])


def build_distill(config: StageConfig, classes: list[str] | None, device: torch.device) -> Task:
    """A student from random weights learning the frozen teacher's soft labels; it has
    the teacher's outputs (``classes``: the teacher's, from ``stage_classes``)."""
    teacher, saved = load_model(model_url(config.teacher), device)
    check_teacher(config, saved, classes)
    teacher.eval().requires_grad_(False)
    num_classes = saved["num_classes"]
    model = build_model(config.preset, num_classes, config.head_layers, config.proj_dim, 0, device)
    model.keep_head_layers(0)
    described = model_config(config.preset, num_classes, config.head_layers, config.proj_dim, 0, 0)
    task = DistillTask(config, model, _lars(model, config), described)
    task.teacher = teacher
    return task
