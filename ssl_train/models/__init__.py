"""Backbones, the SimCLRv2 model and named presets."""

from ssl_train.models.presets import PRESETS, Preset, build_model, count_weights, get_preset
from ssl_train.models.resnet import ResNet, resnet
from ssl_train.models.simclr import ModelOutput, ProjectionHead, SimCLRv2

__all__ = [
    "PRESETS",
    "ModelOutput",
    "Preset",
    "ProjectionHead",
    "ResNet",
    "SimCLRv2",
    "build_model",
    "count_weights",
    "get_preset",
    "resnet",
]
