"""``ssl-train import``: an official SimCLRv2 checkpoint as an ssl-train model folder.

The architecture comes from the checkpoint alone: the stem convolution's shape gives
the width and whether SK (ResNet-D's three-convolution stem) is on; every depth and
stem ssl-train has is then laid out in the official creation order
(``simclr_layout``) and the one whose names and shapes are exactly the checkpoint's
backbone is taken. Anything else under the model's scopes (squeeze-excitation weights,
another depth) leaves variables unexplained, and the import stops naming them. Optimizer
slots, moving averages (``.../ExponentialMovingAverage``) and step counters are not
model weights and are skipped.

The classifier's input is the one fact the variables do not hold. The official code
feeds it head layer ``ft_proj_selector`` (0: the backbone's pooled features), and builds
the whole projection head only "for checkpoint compatibility", so the default follows
what the checkpoint shows: a complete head (ending in its 128-wide layer without beta,
as pretrained checkpoints have, whose linear-eval classifier reads layer 0) means 0; a
head cut after layer k means the classifier reads layer k. ``from_proj_layer`` overrides
it (the paper finetunes from layer 1 on 1% and 10% of the labels).

Imported models use TensorFlow's stem max-pool padding (``stem_pool: "tensorflow"`` in
config.json); finetuning an imported model keeps it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shards import storage
from shards.sources import imagenet_wnids
from ssl_train.errors import UserError
from ssl_train.export import build_from_config, model_config, refuse_another_model, save_model
from ssl_train.models import PRESETS, SimCLRv2, resnet

from .object_graph import OBJECT_GRAPH_KEY, variable_paths
from .simclr_layout import (
    WEIGHT_SUFFIXES,
    Entry,
    backbone_entries,
    classifier_entries,
    classifier_name,
    head_entries,
    head_layer_name,
)
from .tf_checkpoint import TFCheckpoint
from .wire import WireError

SK_RATIO = 0.0625
DEPTHS = (18, 34, 50, 101, 152)
# Scopes of the official model's own variables, by format; anything else is not the model.
TF1_SCOPES = ("base_model/", "head_contrastive/", "head_supervised/")
TF2_SCOPES = ("resnet_model/", "_projection_head/", "supervised_head/")


class CheckpointImportError(UserError):
    """A checkpoint that is not an official SimCLR one ssl-train can rebuild."""


IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class Architecture:
    """What the checkpoint's variables say the network is."""

    preset: str
    depth: int
    width_multiplier: float
    sk: bool
    small_images: bool
    head_layers: int  # layers the module is built with
    kept_head_layers: int  # layers the checkpoint holds
    proj_dim: int
    num_classes: int | None
    from_proj_layer: int


class NamedVariables:
    """The checkpoint's model variables by their official name (TF1 as stored; TF2 by
    object path below the model), with shapes; reading goes through ``TFCheckpoint``."""

    def __init__(self, checkpoint: TFCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.label = storage.redact(checkpoint.prefix)
        variables = checkpoint.variables()
        self.keys: dict[str, str] = {}
        if OBJECT_GRAPH_KEY in variables:
            self.style = "tf2"
            try:
                graph = checkpoint.read(OBJECT_GRAPH_KEY).item()
                paths = list(variable_paths(graph))
            except WireError as exc:
                raise CheckpointImportError(
                    f"{self.label}: its object graph is malformed ({exc})"
                ) from None
            for path, key in paths:
                name = _below_model(path)
                if name is not None and key in variables:
                    self.keys.setdefault(name, key)
        else:
            self.style = "tf1"
            for name in variables:
                if name.startswith(TF1_SCOPES) and name.rsplit("/", 1)[-1] in WEIGHT_SUFFIXES:
                    self.keys[name] = name
        self.shapes = {name: variables[key].shape for name, key in self.keys.items()}
        if not any(name.startswith(("base_model/", "resnet_model/")) for name in self.keys):
            some = ", ".join(sorted(variables)[:5])
            raise CheckpointImportError(
                f"{self.label} holds no SimCLR ResNet (no base_model/ or "
                f"resnet_model/ variables; it has {some}, ...): pass a checkpoint of "
                "google-research/simclr (TF1 model.ckpt-N or a TF2 checkpoint/SavedModel)"
            )

    def read_many(self, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, value)`` for ``names``, fetched together (``TFCheckpoint.read_many``)."""
        by_key = {self.keys[name]: name for name in names}
        for key, value in self.checkpoint.read_many(by_key):
            yield by_key[key], value


def _below_model(path: str) -> str | None:
    """``model/resnet_model/...`` (or any prefix before the model's own attributes) as
    ``resnet_model/...``; None for paths outside the model (optimizer, counters)."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if part + "/" in TF2_SCOPES:
            name = "/".join(parts[i:])
            return name if parts[-1] in WEIGHT_SUFFIXES else None
    return None


def _stem_name(style: str) -> str:
    return (
        "base_model/conv2d/kernel"
        if style == "tf1"
        else "resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel"
    )


def _expected_shape(entry: Entry, module_shape: tuple[int, ...]) -> tuple[int, ...]:
    if entry.kind == "conv":  # OIHW -> HWIO
        out, inp, h, w = module_shape
        return (h, w, inp, out)
    if entry.kind == "dense":
        return (module_shape[1], module_shape[0])
    return module_shape


def _backbone_candidates(named: NamedVariables) -> list[tuple[int, float, bool, bool]]:
    """(depth, width, sk, small_images) that the stem convolution allows."""
    stem = _stem_name(named.style)
    if stem not in named.shapes or named.shapes[stem] is None or len(named.shapes[stem]) != 4:
        raise CheckpointImportError(
            f"{named.label}: no stem convolution {stem!r} with a 4-d kernel: "
            "not a SimCLR ResNet checkpoint ssl-train can import"
        )
    kh, _, channels_in, out = named.shapes[stem]
    options = []
    if kh == 7:
        options.append((out / 64, False, False))
    elif kh == 3:
        options += [(out / 32, True, False), (out / 64, False, True), (out / 64, True, True)]
    return [
        (depth, width, sk, small)
        for width, sk, small in options
        for depth in DEPTHS
        if width > 0 and channels_in == 3
    ]


def _match_backbone(named: NamedVariables) -> tuple[tuple[int, float, bool, bool], list[Entry]]:
    scope = "base_model/" if named.style == "tf1" else "resnet_model/"
    present = {name for name in named.keys if name.startswith(scope)}
    best: tuple[int, list[str], list[str]] | None = None
    for candidate in _backbone_candidates(named):
        depth, width, sk, small = candidate
        try:
            backbone = resnet(depth, width, SK_RATIO if sk else 0.0, small, device="meta")
            entries = backbone_entries(backbone, named.style)
        except ValueError:
            continue
        state = backbone.state_dict()
        expected = {e.tf_name: e for e in entries}
        missing = sorted(set(expected) - present)
        unexpected = sorted(present - set(expected))
        wrong = [
            name
            for name, e in expected.items()
            if name in present
            and named.shapes[name]
            != _expected_shape(e, tuple(state[e.torch_key.removeprefix("backbone.")].shape))
        ]
        if not missing and not unexpected and not wrong:
            return candidate, entries
        score = len(missing) + len(unexpected) + len(wrong)
        if best is None or score < best[0]:
            best = (score, missing + wrong, unexpected)
    label = named.label
    if best is None:
        raise CheckpointImportError(f"{label}: its stem convolution fits no ResNet ssl-train has")
    _, missing, unexpected = best
    raise CheckpointImportError(
        f"{label}: its backbone is not an architecture ssl-train has (ResNet-{'/'.join(map(str, DEPTHS))}, "
        f"optionally SK); closest differs by missing or misshaped {missing[:4]} and "
        f"unexplained {unexpected[:4]}"
    )


def _preset_name(depth: int, width: float, sk: bool, small: bool, label: str) -> str:
    for name, preset in PRESETS.items():
        if (preset.depth, preset.width_multiplier, preset.sk, preset.small_images) == (
            depth,
            width,
            sk,
            small,
        ):
            return name
    raise CheckpointImportError(
        f"{label}: a ResNet-{depth} {width:g}x{' +SK' if sk else ''} is not one of "
        f"ssl-train's presets ({', '.join(PRESETS)})"
    )


def _head(named: NamedVariables) -> tuple[int, list[bool], int]:
    """(layers present, whether each has a beta, output width of the last)."""
    layers = 0
    while f"{head_layer_name(named.style, layers)[0]}/kernel" in named.keys:
        layers += 1
    centered = [f"{head_layer_name(named.style, j)[1]}/beta" in named.keys for j in range(layers)]
    out = named.shapes[f"{head_layer_name(named.style, layers - 1)[0]}/kernel"][1] if layers else 0
    return layers, centered, out


def infer_architecture(
    named: NamedVariables, from_proj_layer: int | None = None
) -> tuple[Architecture, list[Entry]]:
    """The network the variables describe, and every tensor's place in it.

    Example:
        >>> arch, entries = infer_architecture(NamedVariables(TFCheckpoint("r50_1x_sk0/model.ckpt-250228")))  # doctest: +SKIP
        >>> arch.preset, arch.from_proj_layer  # doctest: +SKIP
        ('r50_1x_sk0', 0)
    """
    label = named.label
    (depth, width, sk, small), entries = _match_backbone(named)
    preset = _preset_name(depth, width, sk, small, label)
    features = int(512 * width * (4 if depth >= 50 else 1))
    layers, centered, out = _head(named)
    complete = layers > 0 and not centered[-1]
    if layers and not all(centered[:-1]):
        raise CheckpointImportError(f"{label}: a projection-head layer below the last has no beta")
    if complete:
        head_layers, kept, proj_dim = layers, layers, out
    else:  # cut after layer `layers` (or no head): built one deeper, the top dropped
        head_layers, kept, proj_dim = layers + 1, layers, 128
    entries = entries + head_entries(named.style, layers, centered)
    kernel = f"{classifier_name(named.style)}/kernel"
    classifier = kernel in named.keys
    if from_proj_layer is None:  # what the checkpoint shows (module docstring)
        from_proj_layer = 0 if complete or not layers or not classifier else layers
    if not 0 <= from_proj_layer <= kept:
        raise CheckpointImportError(
            f"--from-proj-layer {from_proj_layer}: {label} holds {kept} projection-head "
            f"layers; choose 0 to {kept}"
        )
    num_classes = None
    if classifier:
        num_classes = int(named.shapes[kernel][1])
        entries = entries + classifier_entries(named.style)
        reads = named.shapes[kernel][0]
        width_read = proj_dim if complete and from_proj_layer == layers else features
        if reads != width_read:
            raise CheckpointImportError(
                f"{label}: its classifier reads {reads} features, but head layer "
                f"{from_proj_layer} has {width_read}: pass the --from-proj-layer it was "
                "trained on"
            )
    unexplained = sorted(set(named.keys) - {e.tf_name for e in entries})
    if unexplained:
        raise CheckpointImportError(
            f"{label}: variables of an architecture ssl-train does not have: "
            f"{', '.join(unexplained[:5])}{' ...' if len(unexplained) > 5 else ''}"
        )
    arch = Architecture(
        preset, depth, width, sk, small, head_layers, kept, proj_dim, num_classes, from_proj_layer
    )
    return arch, entries


def _convert(array: np.ndarray, kind: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if kind == "conv":
        return tensor.permute(3, 2, 0, 1).contiguous()
    if kind == "dense":
        return tensor.t().contiguous()
    return tensor


def build_imported(named: NamedVariables, config: dict[str, Any], entries: list[Entry]) -> SimCLRv2:
    """The module ``config`` describes (``export.build_from_config``, as every later load
    builds it), holding the checkpoint's weights (float32, in eval mode).

    Built on the meta device and given the converted tensors themselves, so an R152 3x
    (3.2 GB) is held once, not twice.
    """
    model = build_from_config(config, device="meta")
    state = model.state_dict()
    loaded = {}
    by_name = {entry.tf_name: entry for entry in entries}
    if len(by_name) != len(entries):
        raise RuntimeError("the layout maps one TensorFlow variable to two weights")
    for tf_name, array in named.read_many(list(by_name)):
        entry = by_name[tf_name]
        tensor = _convert(array, entry.kind)
        if tensor.shape != state[entry.torch_key].shape:
            raise CheckpointImportError(
                f"{named.label}: {entry.tf_name} has shape {tuple(tensor.shape)} after "
                f"conversion; {entry.torch_key} needs {tuple(state[entry.torch_key].shape)}"
            )
        loaded[entry.torch_key] = tensor
    for key in state:
        if key.endswith("num_batches_tracked"):  # TensorFlow keeps no such counter
            loaded[key] = torch.tensor(0, dtype=torch.long)
    left = sorted(set(state) - set(loaded))
    if left:  # the layout names every weight of the module, or the mapping is wrong
        raise RuntimeError(f"import left {left[:5]} unset")
    model.load_state_dict(loaded, assign=True)
    return model.eval()


def _known_classes(arch: Architecture) -> dict[str, list[str]]:
    """The class list of an ImageNet classifier: the official models were trained on
    TFDS's imagenet2012, whose label i is the i-th wnid in sorted order. Recorded, `eval`
    and distillation refuse shard sets whose classes are in another order instead of
    scoring permuted logits."""
    if arch.num_classes == IMAGENET_CLASSES and not arch.small_images:
        return {"classes": imagenet_wnids()}
    return {}


def import_checkpoint(
    src: str, out_dir: str, from_proj_layer: int | None = None, force: bool = False
) -> dict[str, Any]:
    """Write the official checkpoint ``src`` (folder, prefix or index file; any URL the
    project opens) as ``model.safetensors`` + ``config.json`` in ``out_dir``; returns the
    config written. An ``out_dir`` holding another model is refused before any weight is
    read, unless ``force``.

    Example:
        >>> import_checkpoint("/data/r50_1x_sk0", "/models/r50_1x_sk0")["preset"]  # doctest: +SKIP
        'r50_1x_sk0'
    """
    checkpoint = TFCheckpoint(src)
    named = NamedVariables(checkpoint)
    arch, entries = infer_architecture(named, from_proj_layer)
    config = model_config(
        arch.preset,
        arch.num_classes,
        arch.head_layers,
        arch.proj_dim,
        arch.from_proj_layer,
        arch.kept_head_layers,
        stem_pool="tensorflow",
        stage="import",
        image_size=32 if arch.small_images else 224,
        imported_from=storage.redact(checkpoint.prefix),
        checkpoint_format=named.style,
        **_known_classes(arch),
    )
    refuse_another_model(out_dir, config, None, force)  # before reading any tensor
    weights = build_imported(named, config, entries).state_dict()
    refuse_another_model(out_dir, config, weights, force)
    save_model(weights, config, out_dir)
    return config


__all__ = [
    "Architecture",
    "CheckpointImportError",
    "NamedVariables",
    "build_imported",
    "import_checkpoint",
    "infer_architecture",
]
