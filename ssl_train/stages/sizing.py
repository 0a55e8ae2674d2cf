"""What a stage's training checkpoint weighs, before anything is trained.

The grace period of a preemptible pod and the timeout of the job's collectives are both
set from it (``ssl_train.preemption``): by the TorchX components, which show them in
the job spec, and by a worker started by hand.
"""

from __future__ import annotations

from typing import Any

from ssl_train.stages import registry


def stage_checkpoint_bytes(config: Any) -> int | None:
    """Bytes of tensors in a checkpoint of ``config``'s stage (a ``StageConfig``), from
    the network it declares (with SimCLRv2's memory when on); None where the network
    comes from another run (finetuning, linear evaluation) and is not known at launch.

    Example:
        >>> from ssl_train.stages.config import StageConfig
        >>> config = StageConfig.for_stage("pretrain", data="d", run_dir="r", preset="r50_1x_sk0")
        >>> round(stage_checkpoint_bytes(config) / 2**20)
        401
    """
    field = registry.stage(config.stage).model_field
    if field is None:
        return None
    from ssl_train.models.gpu_memory import checkpoint_bytes  # torch, on the meta device

    return checkpoint_bytes(
        getattr(config, field),
        None,
        config.head_layers,
        config.proj_dim,
        getattr(config, "memory_size", 0) or 0,
    )
