"""Trained models as files anyone can load: ``model.safetensors`` (tensors only, so
loading runs no code) plus ``config.json`` (how to rebuild the module around them).

Every finished stage writes one to ``<run dir>/final/``; the next stage reads it from
there (finetune from pretrain, distill from finetune). ``ssl-train export`` writes the
same pair from a run's newest checkpoint. Backbone keys follow torchvision's names, so
an R50 1x without SK loads into ``torchvision.models.resnet50`` (with ``fc`` replaced
by ``nn.Identity()``, or strict=False) after stripping the ``backbone.`` prefix.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import safetensors.torch
import torch

from shards import storage
from shards.errors import ShardsError
from ssl_train.errors import UserError
from ssl_train.models import SimCLRv2, build_model
from ssl_train.state_broadcast import read_bytes_once, transfer_device

FINAL = "final"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


class ExportError(UserError):
    """A model folder that is missing, unfinished or not ours; the message says which."""


def model_config(
    preset: str,
    num_classes: int | None,
    head_layers: int,
    proj_dim: int,
    from_proj_layer: int,
    kept_head_layers: int,
    stem_pool: str = "torchvision",
    **about: Any,
) -> dict[str, Any]:
    """What rebuilds the module: the preset, head shape, classifier and the stem's
    max-pool padding (``"tensorflow"`` for imported checkpoints); ``about`` adds facts
    for people (stage, image size, class names).

    Example:
        >>> model_config("tiny", 10, 3, 128, 1, 1, stage="finetune")["kept_head_layers"]
        1
    """
    return {
        "format_version": FORMAT_VERSION,
        "preset": preset,
        "num_classes": num_classes,
        "head_layers": head_layers,
        "proj_dim": proj_dim,
        "from_proj_layer": from_proj_layer,
        "kept_head_layers": kept_head_layers,
        "stem_pool": stem_pool,
        **about,
    }


def build_from_config(config: dict[str, Any], device: torch.device | str | None = None) -> SimCLRv2:
    """An untrained module shaped as ``config`` describes.

    Example:
        >>> model = build_from_config(model_config("tiny", 10, 3, 128, 1, 1))
        >>> len(model.head.linears), model.classifier.out_features
        (1, 10)
    """
    model = build_model(
        config["preset"],
        num_classes=config["num_classes"],
        head_layers=config["head_layers"],
        proj_dim=config["proj_dim"],
        from_proj_layer=config["from_proj_layer"],
        device=device,
        stem_pool=config.get("stem_pool", "torchvision"),  # absent: written before it existed
    )
    model.keep_head_layers(config["kept_head_layers"])
    return model


def weights_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """``state`` as the bytes of a ``model.safetensors`` (the same tensors, the same bytes).

    Example:
        >>> weights_bytes({"w": torch.zeros(2)}) == weights_bytes({"w": torch.zeros(2)})
        True
    """
    return safetensors.torch.save({n: t.detach().to("cpu").contiguous() for n, t in state.items()})


def save_model(state: dict[str, torch.Tensor], config: dict[str, Any], out_url: str) -> None:
    """Write ``model.safetensors`` then ``config.json`` (last: its presence means done).

    Example:
        >>> model = build_from_config(model_config("tiny", None, 3, 128, 0, 3))
        >>> save_model(model.state_dict(), model_config("tiny", None, 3, 128, 0, 3), "/tmp/ssl-train-export")
        >>> sorted(__import__("os").listdir("/tmp/ssl-train-export"))
        ['config.json', 'model.safetensors']
    """
    config_url = storage.join(out_url, CONFIG_FILE)
    if storage.size_or_none(config_url) is not None:
        storage.filesystem(config_url)[0].rm(storage.filesystem(config_url)[1])
    storage.write_bytes_atomic(storage.join(out_url, MODEL_FILE), weights_bytes(state))
    storage.write_bytes_atomic(config_url, json.dumps(config, indent=2).encode() + b"\n")


def refuse_another_model(
    out_dir: str, config: dict[str, Any], state: dict[str, torch.Tensor] | None, force: bool
) -> None:
    """Stop before writing the model (``config``, weights ``state``) to ``out_dir`` when
    that folder already holds a different one, unless ``force``: the same model again is
    no loss, but two runs of one configuration (another seed, another step count) differ
    only in their weights, so those are compared too. ``state`` None compares the
    configs alone: a cheap first look before the weights are built (an import).

    Example:
        >>> refuse_another_model("/tmp/empty-model-dir", model_config("tiny", 10, 3, 128, 1, 1), {}, False)
    """
    if force or storage.size_or_none(storage.join(out_dir, CONFIG_FILE)) is None:
        return
    there = read_config(out_dir)
    same_config = there == json.loads(json.dumps(config))
    if same_config and (
        state is None or _same_bytes(storage.join(out_dir, MODEL_FILE), weights_bytes(state))
    ):
        return
    step = f", step {there['step']}" if "step" in there else ""
    raise ExportError(
        f"{storage.redact(out_dir)} already holds a model (a {there.get('stage')} "
        f"{there.get('preset')}{step}{', with other weights' if same_config else ''}): "
        "choose another OUT_DIR, or pass --force to replace it"
    )


def _same_bytes(url: str, data: bytes, chunk: int = 64 << 20) -> bool:
    """Whether the object at ``url`` holds exactly ``data``: the sizes first, then the
    SHA-256 of its chunks (a few GB for the largest models: never held twice)."""
    size = storage.size_or_none(url)
    if size != len(data):
        return False
    digest = hashlib.sha256()
    for start in range(0, size, chunk):
        digest.update(storage.read_range(url, start, min(start + chunk, size)))
    return digest.digest() == hashlib.sha256(data).digest()


def read_config(url: str) -> dict[str, Any]:
    """The ``config.json`` of a model folder; a clear error when the folder is unfinished."""
    config_url = storage.join(url, CONFIG_FILE)
    if storage.size_or_none(config_url) is None:
        raise ExportError(
            f"{storage.redact(url)} holds no finished model ({CONFIG_FILE} missing): "
            "let the stage that writes it finish, or point at another run"
        )
    try:
        config = json.loads(storage.read_bytes(config_url))
    except ValueError as exc:
        raise ExportError(f"{storage.redact(config_url)} is not JSON ({exc})") from None
    if config.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{storage.redact(config_url)}: format version {config.get('format_version')!r} "
            f"unknown (this ssl-train reads {FORMAT_VERSION})"
        )
    return config


def load_model(url: str, device: torch.device | str = "cpu") -> tuple[SimCLRv2, dict[str, Any]]:
    """The module and its config from a model folder (a run's ``final/`` or an export).

    Example:
        >>> config = model_config("tiny", None, 3, 128, 0, 3)
        >>> save_model(build_from_config(config).state_dict(), config, "/tmp/ssl-train-load")
        >>> model, config = load_model("/tmp/ssl-train-load")
        >>> config["preset"], model.classifier is None
        ('tiny', True)
    """
    config = read_config(url)
    model_url = storage.join(url, MODEL_FILE)
    try:
        tensors = safetensors.torch.load(read_bytes_once(model_url, transfer_device(device)))
    except Exception as exc:  # safetensors raises its own error types for foreign bytes
        if isinstance(exc, ShardsError):
            raise
        raise ExportError(
            f"{storage.redact(model_url)} is not a safetensors file ({exc}); "
            "ssl-train never unpickles models: re-export it with `ssl-train export`"
        ) from None
    model = build_from_config(config, device)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"{storage.redact(model_url)} does not match its {CONFIG_FILE}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model, config


def final_url(run_dir: str) -> str:
    """Where a finished stage run keeps its model."""
    return storage.join(run_dir, FINAL)


def model_url(path: str) -> str:
    """The model folder that ``path`` names: ``path`` itself when it holds a
    ``model.safetensors`` (an export, an ``ssl-train import``), else the run dir's
    ``final/`` (a run dir's own config.json is its training configuration). What
    --pretrained, --teacher and ``eval`` accept.

    Example:
        >>> model_url("s3://b/runs/pretrain")  # doctest: +SKIP
        's3://b/runs/pretrain/final'
    """
    if storage.size_or_none(storage.join(path, MODEL_FILE)) is not None:
        return path
    return final_url(path)
