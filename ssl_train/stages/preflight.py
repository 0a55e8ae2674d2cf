"""``ssl-train STAGE --check-only``: everything a stage needs that no restart can fix,
checked without training.

A TorchX job runs it once per node before torchrun (``ssl_train.jobs``), so a bad flag,
a missing shard set or model, a label subset that names nothing, or a run dir holding
another experiment's checkpoint ends the job after one attempt with one message, instead
of torchrun restarting every rank on it ``max_restarts`` times. It reads what the ranks
are about to read anyway (the manifest, the subset list, the newest checkpoint's small
``state.json``, the configs of the models the stage starts from), never tensors, and
probes the run dir's store for the conditional writes its lease relies on.
"""

from __future__ import annotations

from typing import Any

from shards import storage
from shards.reader import ShardSet
from shards.versioned import check_conditional_writes
from ssl_train.checkpoint import CheckpointStore
from ssl_train.data.stream import StreamState, TrainStream
from ssl_train.stages.config import StageConfig, check_memory_size
from ssl_train.stages.evaluate import check_eval_data
from ssl_train.stages.loop import (
    check_same_experiment,
    data_fingerprint,
    stream_config_of,
)
from ssl_train.stages.runtime import pick_device
from ssl_train.stages.summary import read_summary
from ssl_train.stages.tasks import check_sources, stage_classes


def check_stage(config: StageConfig) -> dict[str, Any]:
    """Check ``config``'s stage before any work; returns what a run would do.

    Example:
        >>> check_stage(StageConfig.for_stage("pretrain", data="s3://b/train", run_dir="s3://b/p"))  # doctest: +SKIP
        {'checked': True, 'stage': 'pretrain', 'samples': 1281167, 'steps_per_epoch': 312, ...}
    """
    # as the ranks will resolve it (--decode gpu too); a GPU asked for and missing, or a
    # driver too old for this torch, ends the job here in one line
    config = config.on_device(pick_device(config.device).type)
    if config.decode == "gpu":  # a torchvision without nvJPEG fails here, once per node
        from ssl_train.data.device_decode import check_device_decoding

        check_device_decoding(config.device or "cuda")
    shard_set = ShardSet(config.data)
    classes = stage_classes(config, shard_set.manifest.classes)
    stream_config = stream_config_of(config)
    stream = TrainStream(stream_config, 0, 1, StreamState(), shard_set)
    plan = stream.plan(0)  # a subset that names nothing, fewer samples than one batch
    check_memory_size(config.memory_size, plan.steps * config.global_batch_size, config.data)
    check_sources(config, classes)
    if config.eval_data:
        check_eval_data(config.eval_data, classes)
    result: dict[str, Any] = {
        "checked": True,
        "stage": config.stage,
        "samples": plan.num_samples,
        "steps_per_epoch": plan.steps,
        "resumes_from_step": None,
    }
    if not config.single_writer_store:  # a store that cannot fence a second job: refused
        check_conditional_writes(config.run_dir)
    summary = read_summary(config.run_dir)
    if summary is not None and summary.get("finished"):
        result["finished_earlier"] = True
    store = CheckpointStore(config.run_dir)
    step = store.latest()
    if step is not None:
        values = store.load_values(step)
        check_same_experiment(values, config, data_fingerprint(shard_set, stream_config.subset))
        result["resumes_from_step"] = step
    result["run_dir"] = storage.redact(config.run_dir)
    return result
