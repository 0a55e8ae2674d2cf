"""ResNet v1 backbones as in SimCLRv2's official code, with Selective Kernels and ResNet-D.

Follows google-research/simclr `tf2/resnet.py`: stride on the 3x3 convolution, the last
BN of every block starts with gamma = 0, BN eps 1e-5 and momentum 0.1 (Keras 0.9), and
with ``sk_ratio > 0`` a three-convolution stem, SK convolutions and average-pool
shortcuts. Module names follow torchvision's ResNet, so a plain R50 exports to
``torchvision.models.resnet50`` key for key.

Two choices differ from the TF code, both parameter-free: the stem's max-pool pads one
pixel on each side as torchvision does (TF's 'SAME' pads only after on even sizes), so an
exported model computes the same in torchvision; and depths 18/34 (not in the paper) put
the SK convolution on the first 3x3 of each basic block, so small test models exercise
the same operator. The padding moves every later feature map by half a pixel, which
changes an imported network's features by 7-26%, so ``stem_pool="tensorflow"`` selects
TF's padding; models imported from the official checkpoints use it and record it in
their config.json (``ssl_train.checkpoint_import``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # torch sense; Keras' momentum 0.9
SK_MIN_DIM = 32

_LAYERS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


def batch_norm(channels: int, zero_init: bool = False) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
    if zero_init:
        nn.init.zeros_(bn.weight)
    return bn


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free convolution, padded like TF's Conv2dFixedPadding for odd kernels.

    Initialised as TF's VarianceScaling(): truncated normal, fan-in, scale 1.
    """
    layer = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    std = math.sqrt(1.0 / (in_ch * kernel * kernel)) / 0.87962566103423978
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    return layer


class SelectiveKernelConv(nn.Module):
    """SK convolution: one 3x3 conv to 2x channels (two streams), BN-ReLU, then a softmax
    over the two streams weighted by globally pooled features.

    Example:
        >>> sk = SelectiveKernelConv(16, 8, stride=2, sk_ratio=0.0625)
        >>> sk(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, in_ch: int, filters: int, stride: int, sk_ratio: float) -> None:
        super().__init__()
        self.filters = filters
        self.conv = conv(in_ch, 2 * filters, 3, stride)
        self.bn = batch_norm(2 * filters)
        mid = max(int(filters * sk_ratio), SK_MIN_DIM)
        self.fc1 = conv(filters, mid, 1)
        self.fc1_bn = batch_norm(mid)
        self.fc2 = conv(mid, 2 * filters, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        streams = F.relu(self.bn(self.conv(x)))
        first, second = streams.chunk(2, dim=1)
        pooled = (first + second).mean(dim=(2, 3), keepdim=True)
        mixing = self.fc2(F.relu(self.fc1_bn(self.fc1(pooled))))
        mixing = mixing.view(x.shape[0], 2, self.filters, 1, 1).softmax(dim=1)
        return first * mixing[:, 0] + second * mixing[:, 1]


class AvgPoolShortcut(nn.Module):
    """ResNet-D's shortcut pooling, as TF computes it.

    Stride 2: pad one zero row/column after, then 2x2 average (zeros count). Stride 1:
    TF's 'SAME' 2x2 average, which pads after and leaves the padding out of the mean.

    Example:
        >>> AvgPoolShortcut(2)(torch.ones(1, 1, 4, 4)).shape
        torch.Size([1, 1, 2, 2])
    """

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (0, 1, 0, 1))
        if self.stride > 1:
            return F.avg_pool2d(padded, 2, self.stride)
        summed = F.avg_pool2d(padded, 2, 1, divisor_override=1)
        ones = F.pad(x.new_ones((1, 1, *x.shape[2:])), (0, 1, 0, 1))
        return summed / F.avg_pool2d(ones, 2, 1, divisor_override=1)


STEM_POOLS = ("torchvision", "tensorflow")


class SamePaddingMaxPool(nn.Module):
    """TF's ``max_pool`` with ``padding='SAME'``: pads ``total = max((out - 1) * stride +
    kernel - size, 0)`` with ``total // 2`` before and the rest after (so one pixel after
    only, on even sizes), padding never winning the max.

    Example:
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> SamePaddingMaxPool(3, 2)(x)[0, 0].tolist()
        [[10.0, 11.0], [14.0, 15.0]]
    """

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def _pads(self, size: int) -> tuple[int, int]:
        out = -(-size // self.stride)
        total = max((out - 1) * self.stride + self.kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pads(x.shape[-2])
        left, right = self._pads(x.shape[-1])
        padded = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(padded, self.kernel, self.stride)


def _downsample(in_ch: int, out_ch: int, stride: int, resnet_d: bool) -> nn.Sequential:
    if resnet_d:
        return nn.Sequential(AvgPoolShortcut(stride), conv(in_ch, out_ch, 1), batch_norm(out_ch))
    return nn.Sequential(conv(in_ch, out_ch, 1, stride), batch_norm(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (depths 18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, filters: int, stride: int, projection: bool, sk_ratio: float):
        super().__init__()
        self.sk = sk_ratio > 0
        if self.sk:
            self.conv1: nn.Module = SelectiveKernelConv(in_ch, filters, stride, sk_ratio)
        else:
            self.conv1 = conv(in_ch, filters, 3, stride)
            self.bn1 = batch_norm(filters)
        self.conv2 = conv(filters, filters, 3)
        self.bn2 = batch_norm(filters, zero_init=True)
        self.downsample = _downsample(in_ch, filters, stride, self.sk) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv1(x) if self.sk else F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1, 3x3 (stride here; SK when enabled), 1x1 to 4x filters."""

    expansion = 4

    def __init__(self, in_ch: int, filters: int, stride: int, projection: bool, sk_ratio: float):
        super().__init__()
        self.sk = sk_ratio > 0
        self.conv1 = conv(in_ch, filters, 1)
        self.bn1 = batch_norm(filters)
        if self.sk:
            self.conv2: nn.Module = SelectiveKernelConv(filters, filters, stride, sk_ratio)
        else:
            self.conv2 = conv(filters, filters, 3, stride)
            self.bn2 = batch_norm(filters)
        self.conv3 = conv(filters, 4 * filters, 1)
        self.bn3 = batch_norm(4 * filters, zero_init=True)
        self.downsample = _downsample(in_ch, 4 * filters, stride, self.sk) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out) if self.sk else F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """A ResNet trunk that returns globally pooled features (no classifier).

    Example:
        >>> net = resnet(18, width_multiplier=0.25, sk_ratio=0.0625, small_images=True)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 128])
    """

    def __init__(
        self,
        depth: int,
        width_multiplier: float,
        sk_ratio: float,
        small_images: bool,
        stem_pool: str = "torchvision",
    ):
        super().__init__()
        if stem_pool not in STEM_POOLS:
            raise ValueError(f"stem_pool must be one of {STEM_POOLS}, not {stem_pool!r}")
        if depth not in _LAYERS:
            raise ValueError(f"depth {depth} not supported; choose one of {sorted(_LAYERS)}")
        if width_multiplier <= 0 or sk_ratio < 0:
            raise ValueError("width_multiplier must be > 0 and sk_ratio >= 0")
        block = BasicBlock if depth < 50 else Bottleneck
        stem = int(64 * width_multiplier)
        if stem < 2:
            raise ValueError(f"width_multiplier {width_multiplier} leaves no channels")
        self.depth, self.width_multiplier, self.sk_ratio = depth, width_multiplier, sk_ratio
        self.small_images, self.stem_pool = small_images, stem_pool
        if small_images:
            self.conv1: nn.Module = conv(3, stem, 3)
        elif sk_ratio > 0:
            self.conv1 = nn.Sequential(
                conv(3, stem // 2, 3, 2), batch_norm(stem // 2), nn.ReLU(inplace=True),
                conv(stem // 2, stem // 2, 3), batch_norm(stem // 2), nn.ReLU(inplace=True),
                conv(stem // 2, stem, 3),
            )  # fmt: skip
        else:
            self.conv1 = conv(3, stem, 7, 2)
        self.bn1 = batch_norm(stem)
        self.relu = nn.ReLU(inplace=True)
        if small_images:
            self.maxpool: nn.Module = nn.Identity()
        elif stem_pool == "tensorflow":
            self.maxpool = SamePaddingMaxPool(3, 2)
        else:
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = stem
        for index, (blocks, stride) in enumerate(zip(_LAYERS[depth], (1, 2, 2, 2), strict=True)):
            filters = int(64 * 2**index * width_multiplier)
            group = []
            for b in range(blocks):
                group.append(block(in_ch, filters, stride if b == 0 else 1, b == 0, sk_ratio))
                in_ch = filters * block.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*group))
        self.num_features = in_ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet(
    depth: int,
    width_multiplier: float = 1,
    sk_ratio: float = 0.0,
    small_images: bool = False,
    device: torch.device | str | None = None,
    stem_pool: str = "torchvision",
) -> ResNet:
    """Build a SimCLRv2 ResNet backbone returning pooled features.

    ``small_images`` selects a 3x3 stride-1 stem without max-pool (inputs of 32 px or
    less). ``device="meta"`` describes the model without allocating memory, e.g. to
    count the parameters of the 795M-parameter R152 3x+SK. ``stem_pool="tensorflow"``
    pads the stem's max-pool as TensorFlow does (imported checkpoints).

    Example:
        >>> big = resnet(152, 3, sk_ratio=0.0625, device="meta")
        >>> round(sum(p.numel() for p in big.parameters()) / 1e6)
        795
    """
    if device is None:
        return ResNet(depth, width_multiplier, sk_ratio, small_images, stem_pool)
    with torch.device(device):
        return ResNet(depth, width_multiplier, sk_ratio, small_images, stem_pool)
