"""``ssl-train eval`` and ``ssl-train export``: what users do with a run's results."""

from __future__ import annotations

import argparse
from typing import Any

from shards import storage
from ssl_train.checkpoint import CheckpointError, CheckpointStore
from ssl_train.export import (
    load_model,
    model_url,
    refuse_another_model,
    save_model,
)
from ssl_train.stages import runtime as rt
from ssl_train.stages.evaluate import evaluate


def evaluate_run(args: argparse.Namespace) -> dict[str, Any]:
    """Top-1/top-5 of RUN_DIR's final model on ``--data``; runs under torchrun too.

    Example:
        >>> evaluate_run(argparse.Namespace(run_dir="s3://b/runs/ft1", data="s3://b/val", eval_batch_size=256, image_size=None, workers=4, device=None))  # doctest: +SKIP
        {'top1': 0.7391, 'top5': 0.9162, 'samples': 50000, 'corrupt': 0}
    """
    runtime = rt.start(args.device)
    try:
        model, config = load_model(model_url(args.run_dir), runtime.device)
        image_size = args.image_size or config.get("image_size", 224)
        return evaluate(
            model,
            args.data,
            image_size,
            args.eval_batch_size,
            runtime,
            args.workers,
            config.get("classes"),
        )
    finally:
        rt.stop(runtime)


def export_run(run_dir: str, out_dir: str, step: int | None = None, force: bool = False) -> str:
    """Write checkpoint ``step`` (default newest) of ``run_dir`` as ``model.safetensors``
    and ``config.json`` in ``out_dir``; returns the step exported. An ``out_dir`` that
    holds another model is refused unless ``force``.

    Example:
        >>> export_run("s3://b/runs/pretrain", "/tmp/r50")  # doctest: +SKIP
    """
    store = CheckpointStore(run_dir)
    if step is None:
        step = store.latest()
        if step is None:
            raise CheckpointError(
                f"{storage.redact(run_dir)} holds no complete checkpoint: train first, or check the path"
            )
    state = store.load(step)
    config = state["config"]
    about = {"stage": config["stage"], "image_size": config["image_size"], "step": step}
    described = {**state["model_config"], **about}
    refuse_another_model(out_dir, described, state["model"], force)
    save_model(state["model"], described, out_dir)
    print(f"exported step {step} of {storage.redact(run_dir)} to {storage.redact(out_dir)}")
    return step
