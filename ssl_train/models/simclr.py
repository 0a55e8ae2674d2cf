"""The SimCLRv2 model: backbone, 3-layer projection head, optional classifier.

As in the official `tf2/model.py`: every head layer is Linear (no bias) + BN; the middle
layers keep BN's beta and add ReLU, the last maps to 128 with BN without beta. Finetuning
feeds the classifier from a chosen head layer (``from_proj_layer``; SimCLRv2 uses 1, the
output of the first head layer after its ReLU; 0 is the backbone output).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ssl_train.models.resnet import BN_EPS, BN_MOMENTUM, ResNet


def _linear(in_dim: int, out_dim: int, bias: bool) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    nn.init.normal_(layer.weight, std=0.01)  # official LinearLayer: RandomNormal(0.01)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def _head_bn(dim: int, center: bool) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(dim, eps=BN_EPS, momentum=BN_MOMENTUM)
    if not center:  # no beta: the output stays centred for the contrastive loss
        bn.register_parameter("bias", None)
    return bn


class ProjectionHead(nn.Module):
    """``num_layers`` of Linear+BN(+ReLU); returns the output and every layer's activation.

    Example:
        >>> head = ProjectionHead(64, num_layers=3, out_dim=128)
        >>> out, hiddens = head(torch.randn(4, 64))
        >>> out.shape, [h.shape[1] for h in hiddens]
        (torch.Size([4, 128]), [64, 64, 64, 128])
    """

    def __init__(self, in_dim: int, num_layers: int = 3, out_dim: int = 128) -> None:
        super().__init__()
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        for j in range(num_layers):
            last = j == num_layers - 1
            self.linears.append(_linear(in_dim, out_dim if last else in_dim, bias=False))
            self.norms.append(_head_bn(out_dim if last else in_dim, center=not last))
        self.out_dim = out_dim if num_layers else in_dim

    def layer_dim(self, layer: int) -> int:
        """Width of ``hiddens[layer]`` (0 = the head's input)."""
        return self.linears[layer - 1].out_features if layer else self.linears[0].in_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hiddens = [x]
        for j, (linear, norm) in enumerate(zip(self.linears, self.norms, strict=True)):
            x = norm(linear(x))
            if j != len(self.linears) - 1:
                x = F.relu(x)
            hiddens.append(x)
        return x, hiddens


class ModelOutput(NamedTuple):
    """What one forward pass gives: the projection (for the contrastive loss), the
    backbone features, and the class logits when the model has a classifier.

    A NamedTuple, so DDP and torch.compile see its tensors."""

    projection: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor | None


class SimCLRv2(nn.Module):
    """Backbone + projection head (+ classifier fed from head layer ``from_proj_layer``).

    Example:
        >>> from ssl_train.models.resnet import resnet
        >>> model = SimCLRv2(resnet(18, 0.25, small_images=True), num_classes=10)
        >>> out = model(torch.randn(4, 3, 32, 32))
        >>> out.projection.shape, out.logits.shape
        (torch.Size([4, 128]), torch.Size([4, 10]))
    """

    def __init__(
        self,
        backbone: ResNet,
        head_layers: int = 3,
        proj_dim: int = 128,
        num_classes: int | None = None,
        from_proj_layer: int = 1,
    ) -> None:
        super().__init__()
        if not 0 <= from_proj_layer <= head_layers:
            raise ValueError(f"from_proj_layer must be between 0 and head_layers ({head_layers})")
        self.backbone = backbone
        self.head = ProjectionHead(backbone.num_features, head_layers, proj_dim)
        self.from_proj_layer = from_proj_layer
        self.classifier = (
            _linear(self.head.layer_dim(from_proj_layer), num_classes, bias=True)
            if num_classes
            else None
        )

    def zero_init_classifier(self) -> None:
        """Finetuning starts from a zero classifier, as the paper does."""
        if self.classifier is not None:
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        features = self.backbone(images)
        projection, hiddens = self.head(features)
        logits = None if self.classifier is None else self.classifier(hiddens[self.from_proj_layer])
        return ModelOutput(projection, features, logits)
