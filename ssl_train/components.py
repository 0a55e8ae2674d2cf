"""TorchX components for every ssl-train stage: ``torchx run [-s SCHEDULER] ssl.<stage>``.

GENERATED from the stage declarations (``ssl_train/stages/registry.py``) by
``make components``; do not edit by hand (a test compares it with the declarations).

Every component is TorchX's own ``dist.ddp`` (elastic torchrun, c10d rendezvous on the
first replica) running ``python -m ssl_train.cli <stage>``, built and checked by
``ssl_train.jobs.stage_job``: every stage flag is an argument (unset ones take the
stage's default, the same as on the command line), bad values and an elastic range with
more processes than the global batch has samples (every smaller world size trains it
exactly) are refused before anything is submitted, and each node checks the data,
models and run dir once before torchrun starts. Plus what a
preemptible cluster job needs: torchrun's in-place restarts (``max_restarts``), the
scheduler's retries (``max_retries``), a container port named ``metrics`` that the
PodMonitor in ``k8s/monitoring/`` scrapes, and a fresh rendezvous store per round.

    torchx run -s local_cwd ssl.pretrain -j 1x2 --data s3://b/imagenet/train --run_dir s3://b/runs/p
    torchx run -s kubernetes ssl.finetune -j 2:4x8 --h gpu.8 --pretrained s3://b/runs/p ...
"""

from typing import Dict, List, Optional

import torchx.specs as specs

from ssl_train.jobs import DEFAULT_IMAGE, JobOptions, command_job, stage_job
from ssl_train.metrics import DEFAULT_PORT
from ssl_train.pipeline_job import driver_app
from ssl_train.stages import registry


def pretrain(
    *extra_args: str,
    data: str,
    run_dir: str,
    preset: Optional[str] = None,
    temperature: Optional[float] = None,
    memory_size: Optional[int] = None,
    memory_momentum: Optional[float] = None,
    global_batch_size: Optional[int] = None,
    epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    image_size: Optional[int] = None,
    seed: Optional[int] = None,
    learning_rate: Optional[float] = None,
    lr_scaling: Optional[str] = None,
    warmup_epochs: Optional[float] = None,
    weight_decay: Optional[float] = None,
    momentum: Optional[float] = None,
    head_layers: Optional[int] = None,
    proj_dim: Optional[int] = None,
    partitions: Optional[int] = None,
    precision: Optional[str] = None,
    channels_last: Optional[bool] = None,
    compile: Optional[bool] = None,
    device: Optional[str] = None,
    workers: Optional[int] = None,
    decode: Optional[str] = None,
    checkpoint_every_steps: Optional[int] = None,
    checkpoint_every_minutes: Optional[float] = None,
    keep_checkpoints: Optional[int] = None,
    trace_samples: Optional[str] = None,
    stop_at_step: Optional[int] = None,
    allow_config_change: Optional[bool] = None,
    single_writer_store: Optional[bool] = None,
    eval_data: Optional[str] = None,
    eval_batch_size: Optional[int] = None,
    log_every_steps: Optional[int] = None,
    name: str = "ssl-pretrain",
    image: str = DEFAULT_IMAGE,
    j: str = '1x1',
    h: Optional[str] = None,
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    gpu_memory_gb: float = 80.0,
    max_restarts: int = 3,
    max_retries: int = 3,
    metrics_port: int = DEFAULT_PORT,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """SimCLRv2 contrastive pretraining on unlabelled images (resumes from run_dir).

    Args:
        extra_args: more `ssl-train pretrain` flags, after `--`
        data: training shard set: a local path or s3://bucket/prefix
        run_dir: where checkpoints and the final model go (local or s3://); running the same command again resumes from it
        preset: model preset (see `ssl-train models`) (default r50_1x_sk0)
        temperature: NT-Xent temperature (default 0.1)
        memory_size: negatives kept from earlier steps by SimCLRv2's memory (the paper's 64K, MoCo's queue of 65,536); 0 turns the memory off (default 65536 for the Table-1 presets, 0 for tiny)
        memory_momentum: moving-average coefficient of the memory network (SimCLRv2 and MoCo: 0.999) (default 0.999)
        global_batch_size: samples per step over all processes (default 4096)
        epochs: training length in epochs (default 800)
        max_steps: training length in steps (overrides --epochs)
        image_size: side of the training crops in pixels (default 224)
        seed: fixes the initial weights, data order and augmentation (default 0)
        learning_rate: base learning rate, scaled by --lr-scaling (default 0.075)
        lr_scaling: sqrt: lr*sqrt(B); linear: lr*B/256 (default sqrt)
        warmup_epochs: linear warmup, then cosine decay (default 10)
        weight_decay: L2 weight decay (not on BN or biases) (default 0.0001)
        momentum: optimizer momentum (default 0.9)
        head_layers: projection head depth (default 3)
        proj_dim: projection output width (default 128)
        partitions: data-plan partitions, part of the run's configuration like the seed (default 32, or the global batch when 32 does not divide it)
        precision: fp32, or bf16 autocast (default: bf16 on a GPU, fp32 on CPUs)
        channels_last: channels-last memory format (default: on for a GPU, off on CPUs)
        compile: torch.compile the model
        device: cpu, cuda or cuda:N (default: cuda when a GPU is visible)
        workers: data-loading processes per rank (default 8)
        decode: where training JPEGs are decoded and cropped: cpu (the data workers) or gpu (nvJPEG on the training GPU, batched; the workers then only read and ship the bytes). gpu takes GPU time from the step: use it when the workers cannot keep up (default cpu)
        checkpoint_every_steps: also checkpoint every N steps
        checkpoint_every_minutes: checkpoint every M minutes (default 10)
        keep_checkpoints: how many recent checkpoints to keep (default 3)
        trace_samples: append one JSON line per rank and step with the sample keys
        stop_at_step: checkpoint and stop at this global step (run again to continue)
        allow_config_change: resume even if training settings differ from the checkpoint's
        single_writer_store: the run dir's store does not honour conditional writes and only ever one job writes there: skip the check that refuses such a store (said at every start)
        eval_data: shard set to report top-1/top-5 on at the end (checked at the start)
        eval_batch_size: evaluation batch per process (default 256)
        log_every_steps: progress line every N steps (default 10)
        name: job name
        image: container image with ssl-train installed
        j: nodes x processes per node, elastic as min:max (e.g. 2:4x8)
        h: a registered named resource (overrides cpu, gpu, memMB)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        gpu_memory_gb: memory of one GPU in GiB; the elastic minimum must hold the global batch
        max_restarts: times torchrun restarts failed workers in place
        max_retries: times the scheduler reschedules the whole job
        metrics_port: Prometheus port (container port named "metrics"); 0 disables metrics
        env: extra environment variables (e.g. AWS_ENDPOINT_URL=...)
        mounts: mounts (type=<bind/volume>,src=...,dst=...[,readonly])
    """
    values = {"data": data, "run_dir": run_dir, "preset": preset, "temperature": temperature, "memory_size": memory_size, "memory_momentum": memory_momentum, "global_batch_size": global_batch_size, "epochs": epochs, "max_steps": max_steps, "image_size": image_size, "seed": seed, "learning_rate": learning_rate, "lr_scaling": lr_scaling, "warmup_epochs": warmup_epochs, "weight_decay": weight_decay, "momentum": momentum, "head_layers": head_layers, "proj_dim": proj_dim, "partitions": partitions, "precision": precision, "channels_last": channels_last, "compile": compile, "device": device, "workers": workers, "decode": decode, "checkpoint_every_steps": checkpoint_every_steps, "checkpoint_every_minutes": checkpoint_every_minutes, "keep_checkpoints": keep_checkpoints, "trace_samples": trace_samples, "stop_at_step": stop_at_step, "allow_config_change": allow_config_change, "single_writer_store": single_writer_store, "eval_data": eval_data, "eval_batch_size": eval_batch_size, "log_every_steps": log_every_steps}
    return stage_job("pretrain", values, extra_args, JobOptions(name=name, image=image, j=j, h=h, cpu=cpu, gpu=gpu, memMB=memMB, gpu_memory_gb=gpu_memory_gb, max_restarts=max_restarts, max_retries=max_retries, metrics_port=metrics_port, env=env, mounts=mounts))


def finetune(
    *extra_args: str,
    data: str,
    run_dir: str,
    pretrained: str,
    subset: Optional[str] = None,
    from_proj_layer: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    image_size: Optional[int] = None,
    seed: Optional[int] = None,
    learning_rate: Optional[float] = None,
    lr_scaling: Optional[str] = None,
    warmup_epochs: Optional[float] = None,
    weight_decay: Optional[float] = None,
    momentum: Optional[float] = None,
    head_layers: Optional[int] = None,
    proj_dim: Optional[int] = None,
    partitions: Optional[int] = None,
    precision: Optional[str] = None,
    channels_last: Optional[bool] = None,
    compile: Optional[bool] = None,
    device: Optional[str] = None,
    workers: Optional[int] = None,
    decode: Optional[str] = None,
    checkpoint_every_steps: Optional[int] = None,
    checkpoint_every_minutes: Optional[float] = None,
    keep_checkpoints: Optional[int] = None,
    trace_samples: Optional[str] = None,
    stop_at_step: Optional[int] = None,
    allow_config_change: Optional[bool] = None,
    single_writer_store: Optional[bool] = None,
    eval_data: Optional[str] = None,
    eval_batch_size: Optional[int] = None,
    log_every_steps: Optional[int] = None,
    name: str = "ssl-finetune",
    image: str = DEFAULT_IMAGE,
    j: str = '1x1',
    h: Optional[str] = None,
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    gpu_memory_gb: float = 80.0,
    max_restarts: int = 3,
    max_retries: int = 3,
    metrics_port: int = DEFAULT_PORT,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Finetune a pretrained network on labelled images (e.g. 1% or 10% of them) (resumes from run_dir).

    Args:
        extra_args: more `ssl-train finetune` flags, after `--`
        data: training shard set: a local path or s3://bucket/prefix
        run_dir: where checkpoints and the final model go (local or s3://); running the same command again resumes from it
        pretrained: run dir of a finished pretrain run
        subset: labelled subset: 1percent, 10percent or a list file (default: every label)
        from_proj_layer: head layer the classifier reads (default 1)
        global_batch_size: samples per step over all processes (default 1024)
        epochs: training length in epochs (default 60 on the 1percent subset, 30 otherwise)
        max_steps: training length in steps (overrides --epochs)
        image_size: side of the training crops in pixels (default 224)
        seed: fixes the initial weights, data order and augmentation (default 0)
        learning_rate: base learning rate, scaled by --lr-scaling (default 0.005)
        lr_scaling: sqrt: lr*sqrt(B); linear: lr*B/256 (default sqrt)
        warmup_epochs: linear warmup, then cosine decay (default 0)
        weight_decay: L2 weight decay (not on BN or biases) (default 0)
        momentum: optimizer momentum (default 0.9)
        head_layers: projection head depth (default 3)
        proj_dim: projection output width (default 128)
        partitions: data-plan partitions, part of the run's configuration like the seed (default 32, or the global batch when 32 does not divide it)
        precision: fp32, or bf16 autocast (default: bf16 on a GPU, fp32 on CPUs)
        channels_last: channels-last memory format (default: on for a GPU, off on CPUs)
        compile: torch.compile the model
        device: cpu, cuda or cuda:N (default: cuda when a GPU is visible)
        workers: data-loading processes per rank (default 8)
        decode: where training JPEGs are decoded and cropped: cpu (the data workers) or gpu (nvJPEG on the training GPU, batched; the workers then only read and ship the bytes). gpu takes GPU time from the step: use it when the workers cannot keep up (default cpu)
        checkpoint_every_steps: also checkpoint every N steps
        checkpoint_every_minutes: checkpoint every M minutes (default 10)
        keep_checkpoints: how many recent checkpoints to keep (default 3)
        trace_samples: append one JSON line per rank and step with the sample keys
        stop_at_step: checkpoint and stop at this global step (run again to continue)
        allow_config_change: resume even if training settings differ from the checkpoint's
        single_writer_store: the run dir's store does not honour conditional writes and only ever one job writes there: skip the check that refuses such a store (said at every start)
        eval_data: shard set to report top-1/top-5 on at the end (checked at the start)
        eval_batch_size: evaluation batch per process (default 256)
        log_every_steps: progress line every N steps (default 10)
        name: job name
        image: container image with ssl-train installed
        j: nodes x processes per node, elastic as min:max (e.g. 2:4x8)
        h: a registered named resource (overrides cpu, gpu, memMB)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        gpu_memory_gb: memory of one GPU in GiB; the elastic minimum must hold the global batch
        max_restarts: times torchrun restarts failed workers in place
        max_retries: times the scheduler reschedules the whole job
        metrics_port: Prometheus port (container port named "metrics"); 0 disables metrics
        env: extra environment variables (e.g. AWS_ENDPOINT_URL=...)
        mounts: mounts (type=<bind/volume>,src=...,dst=...[,readonly])
    """
    values = {"data": data, "run_dir": run_dir, "pretrained": pretrained, "subset": subset, "from_proj_layer": from_proj_layer, "global_batch_size": global_batch_size, "epochs": epochs, "max_steps": max_steps, "image_size": image_size, "seed": seed, "learning_rate": learning_rate, "lr_scaling": lr_scaling, "warmup_epochs": warmup_epochs, "weight_decay": weight_decay, "momentum": momentum, "head_layers": head_layers, "proj_dim": proj_dim, "partitions": partitions, "precision": precision, "channels_last": channels_last, "compile": compile, "device": device, "workers": workers, "decode": decode, "checkpoint_every_steps": checkpoint_every_steps, "checkpoint_every_minutes": checkpoint_every_minutes, "keep_checkpoints": keep_checkpoints, "trace_samples": trace_samples, "stop_at_step": stop_at_step, "allow_config_change": allow_config_change, "single_writer_store": single_writer_store, "eval_data": eval_data, "eval_batch_size": eval_batch_size, "log_every_steps": log_every_steps}
    return stage_job("finetune", values, extra_args, JobOptions(name=name, image=image, j=j, h=h, cpu=cpu, gpu=gpu, memMB=memMB, gpu_memory_gb=gpu_memory_gb, max_restarts=max_restarts, max_retries=max_retries, metrics_port=metrics_port, env=env, mounts=mounts))


def supervised(
    *extra_args: str,
    data: str,
    run_dir: str,
    preset: Optional[str] = None,
    subset: Optional[str] = None,
    from_proj_layer: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    image_size: Optional[int] = None,
    seed: Optional[int] = None,
    learning_rate: Optional[float] = None,
    lr_scaling: Optional[str] = None,
    warmup_epochs: Optional[float] = None,
    weight_decay: Optional[float] = None,
    momentum: Optional[float] = None,
    head_layers: Optional[int] = None,
    proj_dim: Optional[int] = None,
    partitions: Optional[int] = None,
    precision: Optional[str] = None,
    channels_last: Optional[bool] = None,
    compile: Optional[bool] = None,
    device: Optional[str] = None,
    workers: Optional[int] = None,
    decode: Optional[str] = None,
    checkpoint_every_steps: Optional[int] = None,
    checkpoint_every_minutes: Optional[float] = None,
    keep_checkpoints: Optional[int] = None,
    trace_samples: Optional[str] = None,
    stop_at_step: Optional[int] = None,
    allow_config_change: Optional[bool] = None,
    single_writer_store: Optional[bool] = None,
    eval_data: Optional[str] = None,
    eval_batch_size: Optional[int] = None,
    log_every_steps: Optional[int] = None,
    name: str = "ssl-supervised",
    image: str = DEFAULT_IMAGE,
    j: str = '1x1',
    h: Optional[str] = None,
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    gpu_memory_gb: float = 80.0,
    max_restarts: int = 3,
    max_retries: int = 3,
    metrics_port: int = DEFAULT_PORT,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """The baseline: finetuning's network trained from random weights on labels only (resumes from run_dir).

    Args:
        extra_args: more `ssl-train supervised` flags, after `--`
        data: training shard set: a local path or s3://bucket/prefix
        run_dir: where checkpoints and the final model go (local or s3://); running the same command again resumes from it
        preset: model preset (see `ssl-train models`) (default r50_1x_sk0)
        subset: labelled subset: 1percent, 10percent or a list file (default: every label)
        from_proj_layer: head layers kept under the classifier (default 1)
        global_batch_size: samples per step over all processes (default 1024)
        epochs: training length in epochs (default 100)
        max_steps: training length in steps (overrides --epochs)
        image_size: side of the training crops in pixels (default 224)
        seed: fixes the initial weights, data order and augmentation (default 0)
        learning_rate: base learning rate, scaled by --lr-scaling (default 0.005)
        lr_scaling: sqrt: lr*sqrt(B); linear: lr*B/256 (default sqrt)
        warmup_epochs: linear warmup, then cosine decay (default 0)
        weight_decay: L2 weight decay (not on BN or biases) (default 0.0001)
        momentum: optimizer momentum (default 0.9)
        head_layers: projection head depth (default 3)
        proj_dim: projection output width (default 128)
        partitions: data-plan partitions, part of the run's configuration like the seed (default 32, or the global batch when 32 does not divide it)
        precision: fp32, or bf16 autocast (default: bf16 on a GPU, fp32 on CPUs)
        channels_last: channels-last memory format (default: on for a GPU, off on CPUs)
        compile: torch.compile the model
        device: cpu, cuda or cuda:N (default: cuda when a GPU is visible)
        workers: data-loading processes per rank (default 8)
        decode: where training JPEGs are decoded and cropped: cpu (the data workers) or gpu (nvJPEG on the training GPU, batched; the workers then only read and ship the bytes). gpu takes GPU time from the step: use it when the workers cannot keep up (default cpu)
        checkpoint_every_steps: also checkpoint every N steps
        checkpoint_every_minutes: checkpoint every M minutes (default 10)
        keep_checkpoints: how many recent checkpoints to keep (default 3)
        trace_samples: append one JSON line per rank and step with the sample keys
        stop_at_step: checkpoint and stop at this global step (run again to continue)
        allow_config_change: resume even if training settings differ from the checkpoint's
        single_writer_store: the run dir's store does not honour conditional writes and only ever one job writes there: skip the check that refuses such a store (said at every start)
        eval_data: shard set to report top-1/top-5 on at the end (checked at the start)
        eval_batch_size: evaluation batch per process (default 256)
        log_every_steps: progress line every N steps (default 10)
        name: job name
        image: container image with ssl-train installed
        j: nodes x processes per node, elastic as min:max (e.g. 2:4x8)
        h: a registered named resource (overrides cpu, gpu, memMB)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        gpu_memory_gb: memory of one GPU in GiB; the elastic minimum must hold the global batch
        max_restarts: times torchrun restarts failed workers in place
        max_retries: times the scheduler reschedules the whole job
        metrics_port: Prometheus port (container port named "metrics"); 0 disables metrics
        env: extra environment variables (e.g. AWS_ENDPOINT_URL=...)
        mounts: mounts (type=<bind/volume>,src=...,dst=...[,readonly])
    """
    values = {"data": data, "run_dir": run_dir, "preset": preset, "subset": subset, "from_proj_layer": from_proj_layer, "global_batch_size": global_batch_size, "epochs": epochs, "max_steps": max_steps, "image_size": image_size, "seed": seed, "learning_rate": learning_rate, "lr_scaling": lr_scaling, "warmup_epochs": warmup_epochs, "weight_decay": weight_decay, "momentum": momentum, "head_layers": head_layers, "proj_dim": proj_dim, "partitions": partitions, "precision": precision, "channels_last": channels_last, "compile": compile, "device": device, "workers": workers, "decode": decode, "checkpoint_every_steps": checkpoint_every_steps, "checkpoint_every_minutes": checkpoint_every_minutes, "keep_checkpoints": keep_checkpoints, "trace_samples": trace_samples, "stop_at_step": stop_at_step, "allow_config_change": allow_config_change, "single_writer_store": single_writer_store, "eval_data": eval_data, "eval_batch_size": eval_batch_size, "log_every_steps": log_every_steps}
    return stage_job("supervised", values, extra_args, JobOptions(name=name, image=image, j=j, h=h, cpu=cpu, gpu=gpu, memMB=memMB, gpu_memory_gb=gpu_memory_gb, max_restarts=max_restarts, max_retries=max_retries, metrics_port=metrics_port, env=env, mounts=mounts))


def distill(
    *extra_args: str,
    data: str,
    run_dir: str,
    teacher: str,
    student: Optional[str] = None,
    temperature: Optional[float] = None,
    labeled_weight: Optional[float] = None,
    global_batch_size: Optional[int] = None,
    epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    image_size: Optional[int] = None,
    seed: Optional[int] = None,
    learning_rate: Optional[float] = None,
    lr_scaling: Optional[str] = None,
    warmup_epochs: Optional[float] = None,
    weight_decay: Optional[float] = None,
    momentum: Optional[float] = None,
    head_layers: Optional[int] = None,
    proj_dim: Optional[int] = None,
    partitions: Optional[int] = None,
    precision: Optional[str] = None,
    channels_last: Optional[bool] = None,
    compile: Optional[bool] = None,
    device: Optional[str] = None,
    workers: Optional[int] = None,
    decode: Optional[str] = None,
    checkpoint_every_steps: Optional[int] = None,
    checkpoint_every_minutes: Optional[float] = None,
    keep_checkpoints: Optional[int] = None,
    trace_samples: Optional[str] = None,
    stop_at_step: Optional[int] = None,
    allow_config_change: Optional[bool] = None,
    single_writer_store: Optional[bool] = None,
    eval_data: Optional[str] = None,
    eval_batch_size: Optional[int] = None,
    log_every_steps: Optional[int] = None,
    name: str = "ssl-distill",
    image: str = DEFAULT_IMAGE,
    j: str = '1x1',
    h: Optional[str] = None,
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    gpu_memory_gb: float = 80.0,
    max_restarts: int = 3,
    max_retries: int = 3,
    metrics_port: int = DEFAULT_PORT,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Distill a finetuned teacher into a student on unlabelled images (resumes from run_dir).

    Args:
        extra_args: more `ssl-train distill` flags, after `--`
        data: training shard set: a local path or s3://bucket/prefix
        run_dir: where checkpoints and the final model go (local or s3://); running the same command again resumes from it
        teacher: run dir of a finished finetune run
        student: student preset (same size as the teacher or smaller) (default r50_1x_sk0)
        temperature: distillation temperature (default 1)
        labeled_weight: weight of a cross-entropy term on the true labels (0 = unlabelled only) (default 0)
        global_batch_size: samples per step over all processes (default 4096)
        epochs: training length in epochs (default 400)
        max_steps: training length in steps (overrides --epochs)
        image_size: side of the training crops in pixels (default 224)
        seed: fixes the initial weights, data order and augmentation (default 0)
        learning_rate: base learning rate, scaled by --lr-scaling (default 0.075)
        lr_scaling: sqrt: lr*sqrt(B); linear: lr*B/256 (default sqrt)
        warmup_epochs: linear warmup, then cosine decay (default 10)
        weight_decay: L2 weight decay (not on BN or biases) (default 0.0001)
        momentum: optimizer momentum (default 0.9)
        head_layers: projection head depth (default 3)
        proj_dim: projection output width (default 128)
        partitions: data-plan partitions, part of the run's configuration like the seed (default 32, or the global batch when 32 does not divide it)
        precision: fp32, or bf16 autocast (default: bf16 on a GPU, fp32 on CPUs)
        channels_last: channels-last memory format (default: on for a GPU, off on CPUs)
        compile: torch.compile the model
        device: cpu, cuda or cuda:N (default: cuda when a GPU is visible)
        workers: data-loading processes per rank (default 8)
        decode: where training JPEGs are decoded and cropped: cpu (the data workers) or gpu (nvJPEG on the training GPU, batched; the workers then only read and ship the bytes). gpu takes GPU time from the step: use it when the workers cannot keep up (default cpu)
        checkpoint_every_steps: also checkpoint every N steps
        checkpoint_every_minutes: checkpoint every M minutes (default 10)
        keep_checkpoints: how many recent checkpoints to keep (default 3)
        trace_samples: append one JSON line per rank and step with the sample keys
        stop_at_step: checkpoint and stop at this global step (run again to continue)
        allow_config_change: resume even if training settings differ from the checkpoint's
        single_writer_store: the run dir's store does not honour conditional writes and only ever one job writes there: skip the check that refuses such a store (said at every start)
        eval_data: shard set to report top-1/top-5 on at the end (checked at the start)
        eval_batch_size: evaluation batch per process (default 256)
        log_every_steps: progress line every N steps (default 10)
        name: job name
        image: container image with ssl-train installed
        j: nodes x processes per node, elastic as min:max (e.g. 2:4x8)
        h: a registered named resource (overrides cpu, gpu, memMB)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        gpu_memory_gb: memory of one GPU in GiB; the elastic minimum must hold the global batch
        max_restarts: times torchrun restarts failed workers in place
        max_retries: times the scheduler reschedules the whole job
        metrics_port: Prometheus port (container port named "metrics"); 0 disables metrics
        env: extra environment variables (e.g. AWS_ENDPOINT_URL=...)
        mounts: mounts (type=<bind/volume>,src=...,dst=...[,readonly])
    """
    values = {"data": data, "run_dir": run_dir, "teacher": teacher, "student": student, "temperature": temperature, "labeled_weight": labeled_weight, "global_batch_size": global_batch_size, "epochs": epochs, "max_steps": max_steps, "image_size": image_size, "seed": seed, "learning_rate": learning_rate, "lr_scaling": lr_scaling, "warmup_epochs": warmup_epochs, "weight_decay": weight_decay, "momentum": momentum, "head_layers": head_layers, "proj_dim": proj_dim, "partitions": partitions, "precision": precision, "channels_last": channels_last, "compile": compile, "device": device, "workers": workers, "decode": decode, "checkpoint_every_steps": checkpoint_every_steps, "checkpoint_every_minutes": checkpoint_every_minutes, "keep_checkpoints": keep_checkpoints, "trace_samples": trace_samples, "stop_at_step": stop_at_step, "allow_config_change": allow_config_change, "single_writer_store": single_writer_store, "eval_data": eval_data, "eval_batch_size": eval_batch_size, "log_every_steps": log_every_steps}
    return stage_job("distill", values, extra_args, JobOptions(name=name, image=image, j=j, h=h, cpu=cpu, gpu=gpu, memMB=memMB, gpu_memory_gb=gpu_memory_gb, max_restarts=max_restarts, max_retries=max_retries, metrics_port=metrics_port, env=env, mounts=mounts))


def linear_eval(
    *extra_args: str,
    data: str,
    run_dir: str,
    pretrained: str,
    subset: Optional[str] = None,
    from_proj_layer: Optional[int] = None,
    global_batch_size: Optional[int] = None,
    epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    image_size: Optional[int] = None,
    seed: Optional[int] = None,
    learning_rate: Optional[float] = None,
    lr_scaling: Optional[str] = None,
    warmup_epochs: Optional[float] = None,
    weight_decay: Optional[float] = None,
    momentum: Optional[float] = None,
    head_layers: Optional[int] = None,
    proj_dim: Optional[int] = None,
    partitions: Optional[int] = None,
    precision: Optional[str] = None,
    channels_last: Optional[bool] = None,
    compile: Optional[bool] = None,
    device: Optional[str] = None,
    workers: Optional[int] = None,
    decode: Optional[str] = None,
    checkpoint_every_steps: Optional[int] = None,
    checkpoint_every_minutes: Optional[float] = None,
    keep_checkpoints: Optional[int] = None,
    trace_samples: Optional[str] = None,
    stop_at_step: Optional[int] = None,
    allow_config_change: Optional[bool] = None,
    single_writer_store: Optional[bool] = None,
    eval_data: Optional[str] = None,
    eval_batch_size: Optional[int] = None,
    log_every_steps: Optional[int] = None,
    name: str = "ssl-linear-eval",
    image: str = DEFAULT_IMAGE,
    j: str = '1x1',
    h: Optional[str] = None,
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    gpu_memory_gb: float = 80.0,
    max_restarts: int = 3,
    max_retries: int = 3,
    metrics_port: int = DEFAULT_PORT,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Train a linear classifier on a frozen pretrained backbone (resumes from run_dir).

    Args:
        extra_args: more `ssl-train linear-eval` flags, after `--`
        data: training shard set: a local path or s3://bucket/prefix
        run_dir: where checkpoints and the final model go (local or s3://); running the same command again resumes from it
        pretrained: run dir of a finished pretrain run
        subset: labelled subset: 1percent, 10percent or a list file (default: every label)
        from_proj_layer: head layer the classifier reads (default 0)
        global_batch_size: samples per step over all processes (default 4096)
        epochs: training length in epochs (default 90)
        max_steps: training length in steps (overrides --epochs)
        image_size: side of the training crops in pixels (default 224)
        seed: fixes the initial weights, data order and augmentation (default 0)
        learning_rate: base learning rate, scaled by --lr-scaling (default 0.1)
        lr_scaling: sqrt: lr*sqrt(B); linear: lr*B/256 (default linear)
        warmup_epochs: linear warmup, then cosine decay (default 0)
        weight_decay: L2 weight decay (not on BN or biases) (default 0)
        momentum: optimizer momentum (default 0.9)
        head_layers: projection head depth (default 3)
        proj_dim: projection output width (default 128)
        partitions: data-plan partitions, part of the run's configuration like the seed (default 32, or the global batch when 32 does not divide it)
        precision: fp32, or bf16 autocast (default: bf16 on a GPU, fp32 on CPUs)
        channels_last: channels-last memory format (default: on for a GPU, off on CPUs)
        compile: torch.compile the model
        device: cpu, cuda or cuda:N (default: cuda when a GPU is visible)
        workers: data-loading processes per rank (default 8)
        decode: where training JPEGs are decoded and cropped: cpu (the data workers) or gpu (nvJPEG on the training GPU, batched; the workers then only read and ship the bytes). gpu takes GPU time from the step: use it when the workers cannot keep up (default cpu)
        checkpoint_every_steps: also checkpoint every N steps
        checkpoint_every_minutes: checkpoint every M minutes (default 10)
        keep_checkpoints: how many recent checkpoints to keep (default 3)
        trace_samples: append one JSON line per rank and step with the sample keys
        stop_at_step: checkpoint and stop at this global step (run again to continue)
        allow_config_change: resume even if training settings differ from the checkpoint's
        single_writer_store: the run dir's store does not honour conditional writes and only ever one job writes there: skip the check that refuses such a store (said at every start)
        eval_data: shard set to report top-1/top-5 on at the end (checked at the start)
        eval_batch_size: evaluation batch per process (default 256)
        log_every_steps: progress line every N steps (default 10)
        name: job name
        image: container image with ssl-train installed
        j: nodes x processes per node, elastic as min:max (e.g. 2:4x8)
        h: a registered named resource (overrides cpu, gpu, memMB)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        gpu_memory_gb: memory of one GPU in GiB; the elastic minimum must hold the global batch
        max_restarts: times torchrun restarts failed workers in place
        max_retries: times the scheduler reschedules the whole job
        metrics_port: Prometheus port (container port named "metrics"); 0 disables metrics
        env: extra environment variables (e.g. AWS_ENDPOINT_URL=...)
        mounts: mounts (type=<bind/volume>,src=...,dst=...[,readonly])
    """
    values = {"data": data, "run_dir": run_dir, "pretrained": pretrained, "subset": subset, "from_proj_layer": from_proj_layer, "global_batch_size": global_batch_size, "epochs": epochs, "max_steps": max_steps, "image_size": image_size, "seed": seed, "learning_rate": learning_rate, "lr_scaling": lr_scaling, "warmup_epochs": warmup_epochs, "weight_decay": weight_decay, "momentum": momentum, "head_layers": head_layers, "proj_dim": proj_dim, "partitions": partitions, "precision": precision, "channels_last": channels_last, "compile": compile, "device": device, "workers": workers, "decode": decode, "checkpoint_every_steps": checkpoint_every_steps, "checkpoint_every_minutes": checkpoint_every_minutes, "keep_checkpoints": keep_checkpoints, "trace_samples": trace_samples, "stop_at_step": stop_at_step, "allow_config_change": allow_config_change, "single_writer_store": single_writer_store, "eval_data": eval_data, "eval_batch_size": eval_batch_size, "log_every_steps": log_every_steps}
    return stage_job("linear-eval", values, extra_args, JobOptions(name=name, image=image, j=j, h=h, cpu=cpu, gpu=gpu, memMB=memMB, gpu_memory_gb=gpu_memory_gb, max_restarts=max_restarts, max_retries=max_retries, metrics_port=metrics_port, env=env, mounts=mounts))


def eval(
    run_dir: str,
    data: str,
    eval_batch_size: Optional[int] = None,
    image_size: Optional[int] = None,
    workers: Optional[int] = None,
    device: Optional[str] = None,
    name: str = "ssl-eval",
    image: str = DEFAULT_IMAGE,
    j: str = '1x1',
    h: Optional[str] = None,
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 16384,
    max_retries: int = 1,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Top-1/top-5 of a finished run's model on a shard set.

    Args:
        run_dir: run dir of a finished finetune, distill or linear-eval run
        data: shard set to evaluate on (e.g. s3://b/imagenet/val)
        eval_batch_size: images per process and batch, as the stages' flag (default 256)
        image_size: evaluation size (default: what the model trained at)
        workers: data-loading processes per rank (default 8)
        device: cpu, cuda or cuda:N (default: cuda when a GPU is visible)
        name: job name
        image: container image with ssl-train installed
        j: nodes x processes per node, elastic as min:max (e.g. 2:4x8)
        h: a registered named resource (overrides cpu, gpu, memMB)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        max_retries: times the scheduler reschedules the whole job
        env: extra environment variables (e.g. AWS_ENDPOINT_URL=...)
        mounts: mounts (type=<bind/volume>,src=...,dst=...[,readonly])
    """
    values = {"data": data, "eval_batch_size": eval_batch_size, "image_size": image_size, "workers": workers, "device": device}
    options = JobOptions(name=name, image=image, j=j, h=h, cpu=cpu, gpu=gpu, memMB=memMB, max_retries=max_retries, env=env, mounts=mounts, max_restarts=0, metrics_port=0)
    return command_job(registry.EVAL, run_dir, values, options)


def pipeline(
    *pipeline_args: str,
    root: str,
    name: str = "ssl-pipeline",
    image: str = DEFAULT_IMAGE,
    service_account: str = "ssl-train-pipeline",
    cpu: int = 1,
    memMB: int = 2048,
    max_retries: int = 100,
) -> specs.AppDef:
    """The SimCLRv2 recipe's driver in the cluster: ``ssl-train pipeline -s kubernetes
    --root ROOT PIPELINE_ARGS`` in one small CPU pod, as a ServiceAccount allowed to
    submit and follow the stage jobs (k8s/pipeline-rbac.yaml); it outlives the machine
    that submitted it, and a restarted driver follows the stage jobs already running.

    Args:
        pipeline_args: the pipeline's own flags, after ``--`` (--data, --subset, --arg,
            and -cfg with the stage jobs' queue, namespace and secret)
        root: URL under which every stage's run dir goes (and pipeline.json)
        name: job name
        image: container image with ssl-train installed
        service_account: the driver pod's ServiceAccount (k8s/pipeline-rbac.yaml's)
        cpu: CPUs of the driver's pod
        memMB: memory of the driver's pod in MB
        max_retries: times the scheduler restarts a lost or preempted driver
    """
    return driver_app(pipeline_args, root, name, image, service_account, cpu, memMB, max_retries)
