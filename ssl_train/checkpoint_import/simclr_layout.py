"""Where each weight of ssl-train's SimCLRv2 lives in the official TF1 and TF2 checkpoints.

The names are facts of the official code (google-research/simclr): TF1 builds layers
with ``tf.layers`` under ``base_model/``, so convolutions and batch norms are numbered
in the order the graph creates them (``conv2d``, ``conv2d_1``, ...; a projection
shortcut before its block's first convolution; an SK convolution's 3x3, BN, 1x1, BN,
1x1); heads sit under ``head_contrastive/nl_J/`` and ``head_supervised/linear_layer/``.
TF2 (Keras layers) keys them by attribute path: ``resnet_model/block_groups/G/layers/B/
conv_relu_dropblock_layers/I/...``, ``_projection_head/linear_layers/J/...``,
``supervised_head/linear_layer/dense/...``, where list positions count the parameter-free
layers too (fixed padding, pooling, DropBlock, identity).

``layout`` walks an ssl-train backbone in that creation order and names each weight
both ways, so one walk serves both formats and a network the walk cannot name exactly
is not imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ssl_train.models.resnet import BasicBlock, Bottleneck, ResNet, SelectiveKernelConv

# torch BatchNorm name <- TensorFlow name
BN_WEIGHTS = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
WEIGHT_SUFFIXES = ("kernel", "bias", *BN_WEIGHTS)


@dataclass(frozen=True)
class Entry:
    """One tensor: its TF name, the ssl-train state-dict key, and how it converts
    (``conv``: HWIO -> OIHW; ``dense``: (in, out) -> (out, in); ``vector``: as is)."""

    tf_name: str
    torch_key: str
    kind: str


@dataclass(frozen=True)
class _Layer:
    kind: str  # "conv" or "bn"
    torch_prefix: str
    tf2_path: str


def _block_layers(block: nn.Module, prefix: str, tf2: str, stride: int) -> list[_Layer]:
    """A block's convolutions and batch norms in the order TF creates them."""
    layers: list[_Layer] = []
    sk = getattr(block, "sk", False)
    if isinstance(block, Bottleneck):
        if block.downsample is not None:
            if sk:  # ResNet-D: [FixedPadding (stride 2 only),] AveragePooling, conv, BN
                at = 2 if stride > 1 else 1
                layers += [
                    _Layer(
                        "conv", f"{prefix}.downsample.1", f"{tf2}/projection_layers/{at}/conv2d"
                    ),
                    _Layer("bn", f"{prefix}.downsample.2", f"{tf2}/projection_layers/{at + 1}/bn"),
                ]
            else:
                layers += [
                    _Layer("conv", f"{prefix}.downsample.0", f"{tf2}/projection_layers/0/conv2d"),
                    _Layer("bn", f"{prefix}.downsample.1", f"{tf2}/projection_layers/1/bn"),
                ]
        main = f"{tf2}/conv_relu_dropblock_layers"
        layers += [
            _Layer("conv", f"{prefix}.conv1", f"{main}/0/conv2d"),
            _Layer("bn", f"{prefix}.bn1", f"{main}/1/bn"),
        ]  # 2: DropBlock
        if sk:
            assert isinstance(block.conv2, SelectiveKernelConv)
            layers += [
                _Layer("conv", f"{prefix}.conv2.conv", f"{main}/3/conv2d_fixed_padding/conv2d"),
                _Layer("bn", f"{prefix}.conv2.bn", f"{main}/3/batch_norm_relu/bn"),
                _Layer("conv", f"{prefix}.conv2.fc1", f"{main}/3/conv2d_0"),
                _Layer("bn", f"{prefix}.conv2.fc1_bn", f"{main}/3/batch_norm_relu_1/bn"),
                _Layer("conv", f"{prefix}.conv2.fc2", f"{main}/3/conv2d_1"),
                _Layer("conv", f"{prefix}.conv3", f"{main}/5/conv2d"),
                _Layer("bn", f"{prefix}.bn3", f"{main}/6/bn"),
            ]  # 4, 7: DropBlock
        else:
            layers += [
                _Layer("conv", f"{prefix}.conv2", f"{main}/3/conv2d"),
                _Layer("bn", f"{prefix}.bn2", f"{main}/4/bn"),
                _Layer("conv", f"{prefix}.conv3", f"{main}/6/conv2d"),
                _Layer("bn", f"{prefix}.bn3", f"{main}/7/bn"),
            ]  # 5, 8: DropBlock
        return layers
    if isinstance(block, BasicBlock) and not sk:  # TF's basic block has no SK convolution
        if block.downsample is not None:
            layers += [
                _Layer("conv", f"{prefix}.downsample.0", f"{tf2}/shortcut_layers/0/conv2d"),
                _Layer("bn", f"{prefix}.downsample.1", f"{tf2}/shortcut_layers/1/bn"),
            ]
        layers += [
            _Layer("conv", f"{prefix}.conv1", f"{tf2}/conv2d_bn_layers/0/conv2d"),
            _Layer("bn", f"{prefix}.bn1", f"{tf2}/conv2d_bn_layers/1/bn"),
            _Layer("conv", f"{prefix}.conv2", f"{tf2}/conv2d_bn_layers/2/conv2d"),
            _Layer("bn", f"{prefix}.bn2", f"{tf2}/conv2d_bn_layers/3/bn"),
        ]
        return layers
    raise ValueError(f"the official code has no {type(block).__name__} with SK={sk}")


def _backbone_layers(backbone: ResNet, prefix: str) -> list[_Layer]:
    stem = "resnet_model/initial_conv_relu_max_pool"
    if backbone.small_images:  # conv, identity, BN, identity
        layers = [_Layer("conv", f"{prefix}.conv1", f"{stem}/0/conv2d")]
        bn_at = 2
    elif backbone.sk_ratio > 0:  # conv, BN, conv, BN, conv, identity, BN, max-pool, identity
        layers = [
            _Layer("conv", f"{prefix}.conv1.0", f"{stem}/0/conv2d"),
            _Layer("bn", f"{prefix}.conv1.1", f"{stem}/1/bn"),
            _Layer("conv", f"{prefix}.conv1.3", f"{stem}/2/conv2d"),
            _Layer("bn", f"{prefix}.conv1.4", f"{stem}/3/bn"),
            _Layer("conv", f"{prefix}.conv1.6", f"{stem}/4/conv2d"),
        ]
        bn_at = 6
    else:  # conv, identity, BN, max-pool, identity
        layers = [_Layer("conv", f"{prefix}.conv1", f"{stem}/0/conv2d")]
        bn_at = 2
    layers.append(_Layer("bn", f"{prefix}.bn1", f"{stem}/{bn_at}/bn"))
    for g in range(4):
        group: nn.Sequential = getattr(backbone, f"layer{g + 1}")
        for b, block in enumerate(group):
            stride = (1 if g == 0 else 2) if b == 0 else 1
            tf2 = f"resnet_model/block_groups/{g}/layers/{b}"
            layers += _block_layers(block, f"{prefix}.layer{g + 1}.{b}", tf2, stride)
    return layers


def _numbered(base: str, index: int) -> str:
    return base if index == 0 else f"{base}_{index}"


def backbone_entries(backbone: ResNet, style: str, prefix: str = "backbone") -> list[Entry]:
    """Every backbone tensor, named as ``style`` ("tf1" or "tf2") names it.

    Example:
        >>> from ssl_train.models import resnet
        >>> entries = backbone_entries(resnet(50, 1, device="meta"), "tf1")
        >>> entries[0], entries[-1].tf_name
        (Entry(tf_name='base_model/conv2d/kernel', torch_key='backbone.conv1.weight', kind='conv'), 'base_model/batch_normalization_52/moving_variance')
    """
    entries = []
    counts = {"conv": 0, "bn": 0}
    for layer in _backbone_layers(backbone, prefix):
        index = counts[layer.kind]
        counts[layer.kind] += 1
        if style == "tf1":
            base = "base_model/" + _numbered(
                "conv2d" if layer.kind == "conv" else "batch_normalization", index
            )
        else:
            base = layer.tf2_path
        if layer.kind == "conv":
            entries.append(Entry(f"{base}/kernel", f"{layer.torch_prefix}.weight", "conv"))
        else:
            for tf_name, torch_name in BN_WEIGHTS.items():
                entries.append(
                    Entry(f"{base}/{tf_name}", f"{layer.torch_prefix}.{torch_name}", "vector")
                )
    return entries


def head_layer_name(style: str, j: int) -> tuple[str, str]:
    """(dense, batch norm) name prefixes of projection-head layer ``j``."""
    if style == "tf1":
        return f"head_contrastive/nl_{j}/dense", f"head_contrastive/nl_{j}/batch_normalization"
    base = f"_projection_head/linear_layers/{j}"
    return f"{base}/dense", f"{base}/bn_relu/bn"


def head_entries(style: str, layers: int, centered: list[bool]) -> list[Entry]:
    """The projection head's tensors; ``centered[j]``: layer j's BN has a beta."""
    entries = []
    for j in range(layers):
        dense, bn = head_layer_name(style, j)
        entries.append(Entry(f"{dense}/kernel", f"head.linears.{j}.weight", "dense"))
        for tf_name, torch_name in BN_WEIGHTS.items():
            if tf_name == "beta" and not centered[j]:
                continue
            entries.append(Entry(f"{bn}/{tf_name}", f"head.norms.{j}.{torch_name}", "vector"))
    return entries


def classifier_name(style: str) -> str:
    """The supervised head's dense-layer prefix."""
    return (
        "head_supervised/linear_layer/dense"
        if style == "tf1"
        else "supervised_head/linear_layer/dense"
    )


def classifier_entries(style: str) -> list[Entry]:
    base = classifier_name(style)
    return [
        Entry(f"{base}/kernel", "classifier.weight", "dense"),
        Entry(f"{base}/bias", "classifier.bias", "vector"),
    ]
