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
        self.in_dim = in_dim
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        for j in range(num_layers):
            last = j == num_layers - 1
            self.linears.append(_linear(in_dim, out_dim if last else in_dim, bias=False))
            self.norms.append(_head_bn(out_dim if last else in_dim, center=not last))
        self.out_dim = out_dim if num_layers else in_dim
        # ReLU follows every layer but the projection's last, also after keep_layers.
        self.activate = [j != num_layers - 1 for j in range(num_layers)]

    def keep_layers(self, layers: int) -> None:
        """Drop the layers above ``layers``: finetuning from layer 1 needs nothing above
        it, and DDP refuses parameters that get no gradient. Kept layers compute exactly
        what they did in the full head (ReLU included).

        Example:
            >>> head = ProjectionHead(8, num_layers=3, out_dim=4)
            >>> x = torch.randn(2, 8)
            >>> full = head(x)[1][1]
            >>> head.keep_layers(1)
            >>> torch.equal(head(x)[0], full)
            True
        """
        if not 0 <= layers <= len(self.linears):
            raise ValueError(f"can keep 0 to {len(self.linears)} head layers, not {layers}")
        del self.linears[layers:]
        del self.norms[layers:]
        self.activate = self.activate[:layers]
        self.out_dim = self.linears[-1].out_features if layers else self.layer_dim(0)

    def layer_dim(self, layer: int) -> int:
        """Width of ``hiddens[layer]`` (0 = the head's input)."""
        return self.linears[layer - 1].out_features if layer else self.in_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hiddens = [x]
        for linear, norm, activate in zip(self.linears, self.norms, self.activate, strict=True):
            x = norm(linear(x))
            if activate:
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

    def keep_head_layers(self, layers: int) -> None:
        """Keep the head up to layer ``layers`` (at least ``from_proj_layer``): what
        finetuning, linear evaluation and distillation train. The projection output then
        is the last kept layer's activation.

        Example:
            >>> from ssl_train.models.resnet import resnet
            >>> model = SimCLRv2(resnet(18, 0.25, small_images=True), num_classes=10)
            >>> model.keep_head_layers(1)
            >>> len(model.head.linears), model(torch.randn(2, 3, 32, 32)).logits.shape
            (1, torch.Size([2, 10]))
        """
        if layers < self.from_proj_layer:
            raise ValueError(
                f"the classifier reads head layer {self.from_proj_layer}: keep at least that many"
            )
        self.head.keep_layers(layers)

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
