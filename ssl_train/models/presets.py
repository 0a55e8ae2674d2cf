"""Named model sizes: every row of the paper's Table 1, plus tiny ones for CPUs.

Parameter counts follow the paper's convention: Table 1 reports what Keras'
``count_params`` gives, which includes each BN's moving mean and variance. With those
counted, every backbone here rounds to the paper's figure; ``count_weights`` reports both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_train.errors import UserError
from ssl_train.models.resnet import ResNet, resnet
from ssl_train.models.simclr import SimCLRv2
from ssl_train.preset_names import PRESET_NAMES, TABLE1

SK_RATIO = 0.0625


@dataclass(frozen=True)
class Preset:
    """A backbone configuration; ``paper_millions`` is Table 1's "Param (M)"."""

    name: str
    depth: int
    width_multiplier: float
    sk: bool
    small_images: bool = False
    paper_millions: int | None = None
    note: str = ""

    def backbone(
        self, device: torch.device | str | None = None, stem_pool: str = "torchvision"
    ) -> ResNet:
        return resnet(
            self.depth,
            self.width_multiplier,
            SK_RATIO if self.sk else 0.0,
            self.small_images,
            device,
            stem_pool,
        )


PRESETS: dict[str, Preset] = {
    f"r{depth}_{width}x_sk{int(sk)}": Preset(
        f"r{depth}_{width}x_sk{int(sk)}", depth, width, sk, False, m
    )
    for (depth, width, sk), m in TABLE1.items()
}
PRESETS["tiny"] = Preset(
    "tiny", 18, 0.25, True, True, note="SK ResNet-18 at width 1/4 for 32 px images; tests, demo"
)
PRESETS["tiny_student"] = Preset(
    "tiny_student", 18, 0.125, False, True, note="half of tiny's width, no SK: distillation demo"
)
assert tuple(PRESETS) == PRESET_NAMES, "ssl_train/preset_names.py lists the presets in order"


def get_preset(name: str) -> Preset:
    """Look a preset up by name; the error lists the names that exist.

    Example:
        >>> get_preset("r50_1x_sk0").depth
        50
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def count_weights(module: nn.Module) -> tuple[int, int]:
    """(trainable parameters, parameters + BN moving statistics), as Keras counts them.

    Example:
        >>> params, with_stats = count_weights(get_preset("r50_1x_sk0").backbone("meta"))
        >>> round(params / 1e6), round(with_stats / 1e6)
        (24, 24)
    """
    params = sum(p.numel() for p in module.parameters())
    stats = sum(
        b.numel() for n, b in module.named_buffers() if n.rsplit(".", 1)[-1].startswith("running_")
    )
    return params, params + stats


def build_model(
    name: str,
    num_classes: int | None = None,
    head_layers: int = 3,
    proj_dim: int = 128,
    from_proj_layer: int = 1,
    device: torch.device | str | None = None,
    stem_pool: str = "torchvision",
) -> SimCLRv2:
    """The SimCLRv2 model (backbone + head [+ classifier]) of a preset; ``stem_pool`` as
    in ``resnet``.

    Example:
        >>> build_model("tiny", num_classes=10).classifier.out_features
        10
    """
    preset = get_preset(name)
    backbone = preset.backbone(device, stem_pool)
    if device is None:
        return SimCLRv2(backbone, head_layers, proj_dim, num_classes, from_proj_layer)
    with torch.device(device):
        return SimCLRv2(backbone, head_layers, proj_dim, num_classes, from_proj_layer)
