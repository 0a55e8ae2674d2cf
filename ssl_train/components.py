"""TorchX components for every ssl-train stage: ``torchx run [-s SCHEDULER] ssl.<stage>``.

Each component is TorchX's own ``dist.ddp`` (elastic torchrun, c10d rendezvous on the
first replica) running ``python -m ssl_train.cli <stage>``, plus what a preemptible
cluster job needs: torchrun's in-place restarts (``max_restarts``), the scheduler's
retries (``max_retries``), a container port named ``metrics`` that the PodMonitor in
``k8s/monitoring/`` scrapes, and a fresh rendezvous store per round so restarted workers
never read their predecessors' addresses.

    torchx run -s local_cwd ssl.pretrain -j 1x2 --data s3://b/imagenet/train --run_dir s3://b/runs/p
    torchx run -s kubernetes ssl.finetune -j 2:4x8 --h gpu.8 --pretrained s3://b/runs/p ...
"""

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp, parse_nnodes

from ssl_train.metrics import DEFAULT_PORT
from ssl_train.preemption import MIN_GRACE_PERIOD_S, SHUTDOWN_TIMEOUT_ENV, shutdown_timeout_s

DEFAULT_IMAGE = "ssl-train:latest"
CLI_MODULE = "ssl_train.cli"
PRESET_METADATA = "ssl_train.preset"  # the network whose checkpoint the grace period must fit


def _flag(name: str, value: object) -> list[str]:
    """``--flag value`` for a set option; nothing for an unset one."""
    if value is None or value is False:
        return []
    if value is True:
        return [f"--{name}"]
    return [f"--{name}", str(value)]


def _check_gpu_memory(
    stage: str,
    preset: str,
    image_size: int,
    global_batch_size: int,
    precision: str,
    j: str,
    h: Optional[str],
    gpu: int,
    gpu_memory_gb: float,
) -> None:
    """Refuse a GPU job whose elastic minimum cannot hold its global batch: the batch
    stays fixed as the job shrinks, so the fewest GPUs carry the largest share."""
    if specs.resource(cpu=1, gpu=gpu, memMB=1, h=h).gpu <= 0:
        return  # CPU processes: host memory, not a GPU's, is the limit
    from ssl_train.models.memory import check_fits  # torch: only for GPU jobs

    min_nodes, _, nproc_per_node, _ = parse_nnodes(j)
    check_fits(
        stage, preset, image_size, global_batch_size, min_nodes * nproc_per_node,
        gpu_memory_gb, precision,
    )  # fmt: skip


def _stage(
    stage: str,
    stage_args: list[str],
    extra_args: tuple[str, ...],
    name: str,
    image: str,
    j: str,
    h: Optional[str],
    cpu: int,
    gpu: int,
    memMB: int,
    max_restarts: int,
    max_retries: int,
    metrics_port: int,
    env: Optional[Dict[str, str]],
    mounts: Optional[List[str]],
    preset: Optional[str] = None,
) -> specs.AppDef:
    """One stage as an elastic torchrun job (TorchX's ``dist.ddp``) with ssl-train's needs.

    torchrun's shutdown window (how long workers get for the preemption checkpoint after
    a SIGTERM, 30 s by default) is the default grace period's less torchrun's own exit;
    the ``kubernetes`` scheduler sets it again from the grace period it gives the pods,
    which it sizes from the checkpoint of ``preset`` (kept in the app's metadata)."""
    job_env = {
        "PET_MAX_RESTARTS": str(max_restarts),  # torchrun reads its flags from PET_* too
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # a fresh store per rendezvous round
        "LOGLEVEL": "INFO",
        SHUTDOWN_TIMEOUT_ENV: str(shutdown_timeout_s(MIN_GRACE_PERIOD_S)),
        **(env or {}),
    }
    metrics = _flag("metrics-port", metrics_port) if stage != "eval" else []
    args = [stage, *stage_args, *metrics, *extra_args]
    app = ddp(
        *args,
        m=CLI_MODULE,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=job_env,
        max_retries=max_retries,
        mounts=mounts,
    )
    if preset:
        app.metadata[PRESET_METADATA] = preset
    role = app.roles[0]
    role.name = stage.replace("-", "_")
    if metrics_port:
        role.port_map["metrics"] = metrics_port
    return app


def pretrain(
    *extra_args: str,
    data: str,
    run_dir: str,
    preset: str = "r50_1x_sk0",
    global_batch_size: int = 4096,
    epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    image_size: int = 224,
    learning_rate: Optional[float] = None,
    temperature: Optional[float] = None,
    precision: str = "bf16",
    channels_last: bool = True,
    workers: int = 8,
    name: str = "ssl-pretrain",
    image: str = DEFAULT_IMAGE,
    j: str = "1x1",
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
        extra_args: more `ssl-train pretrain` flags, after `--` (e.g. -- --warmup-epochs 5)
        data: training shard set URL (s3://bucket/prefix or a path in the image)
        run_dir: where checkpoints and the final model go; rerunning resumes from it
        preset: model preset (`ssl-train models` lists them)
        global_batch_size: samples per step over all processes (stays fixed when the job shrinks)
        epochs: training length in epochs (default: the paper's 800)
        max_steps: training length in steps (overrides epochs)
        image_size: crop side in pixels
        learning_rate: base learning rate before sqrt(B) scaling (default 0.075)
        temperature: NT-Xent temperature (default 0.1)
        precision: bf16 (autocast on GPUs) or fp32
        channels_last: channels-last memory format
        workers: data-loading processes per training process
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
    stage_args = [
        *_flag("data", data), *_flag("run-dir", run_dir), *_flag("preset", preset),
        *_flag("global-batch-size", global_batch_size), *_flag("epochs", epochs),
        *_flag("max-steps", max_steps), *_flag("image-size", image_size),
        *_flag("learning-rate", learning_rate), *_flag("temperature", temperature),
        *_flag("precision", precision), *_flag("channels-last", channels_last),
        *_flag("workers", workers),
    ]  # fmt: skip
    _check_gpu_memory(
        "pretrain", preset, image_size, global_batch_size, precision, j, h, gpu, gpu_memory_gb
    )
    return _stage(
        "pretrain", stage_args, extra_args, name, image, j, h, cpu, gpu, memMB,
        max_restarts, max_retries, metrics_port, env, mounts, preset,
    )  # fmt: skip


def finetune(
    *extra_args: str,
    data: str,
    run_dir: str,
    pretrained: str,
    subset: str = "1percent",
    eval_data: Optional[str] = None,
    global_batch_size: int = 1024,
    epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    image_size: int = 224,
    learning_rate: Optional[float] = None,
    from_proj_layer: int = 1,
    precision: str = "bf16",
    workers: int = 8,
    name: str = "ssl-finetune",
    image: str = DEFAULT_IMAGE,
    j: str = "1x1",
    h: Optional[str] = None,
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    max_restarts: int = 3,
    max_retries: int = 3,
    metrics_port: int = DEFAULT_PORT,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Finetune a pretrained network from a projection-head layer on labelled images.

    Args:
        extra_args: more `ssl-train finetune` flags, after `--`
        data: training shard set URL
        run_dir: where this run's checkpoints and final model go
        pretrained: run dir of a finished pretrain run
        subset: labels to use: 1percent, 10percent or a list file
        eval_data: shard set to report top-1/top-5 on at the end
        global_batch_size: samples per step over all processes
        epochs: training length (default: 60 for 1percent, 30 otherwise)
        max_steps: training length in steps (overrides epochs)
        image_size: crop side in pixels
        learning_rate: base learning rate before sqrt(B) scaling (default 0.005)
        from_proj_layer: projection-head layer the classifier reads
        precision: bf16 or fp32
        workers: data-loading processes per training process
        name: job name
        image: container image with ssl-train installed
        j: nodes x processes per node, elastic as min:max
        h: a registered named resource (overrides cpu, gpu, memMB)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        max_restarts: times torchrun restarts failed workers in place
        max_retries: times the scheduler reschedules the whole job
        metrics_port: Prometheus port (container port named "metrics"); 0 disables metrics
        env: extra environment variables
        mounts: mounts (type=<bind/volume>,src=...,dst=...[,readonly])
    """
    stage_args = [
        *_flag("data", data), *_flag("run-dir", run_dir), *_flag("pretrained", pretrained),
        *_flag("subset", subset), *_flag("eval-data", eval_data),
        *_flag("global-batch-size", global_batch_size), *_flag("epochs", epochs),
        *_flag("max-steps", max_steps), *_flag("image-size", image_size),
        *_flag("learning-rate", learning_rate), *_flag("from-proj-layer", from_proj_layer),
        *_flag("precision", precision), *_flag("workers", workers),
    ]  # fmt: skip
    return _stage(
        "finetune", stage_args, extra_args, name, image, j, h, cpu, gpu, memMB,
        max_restarts, max_retries, metrics_port, env, mounts,
    )  # fmt: skip


def distill(
    *extra_args: str,
    data: str,
    run_dir: str,
    teacher: str,
    student: str = "r50_1x_sk0",
    eval_data: Optional[str] = None,
    global_batch_size: int = 4096,
    epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    image_size: int = 224,
    learning_rate: Optional[float] = None,
    temperature: Optional[float] = None,
    labeled_weight: Optional[float] = None,
    precision: str = "bf16",
    workers: int = 8,
    name: str = "ssl-distill",
    image: str = DEFAULT_IMAGE,
    j: str = "1x1",
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
    """Distill a finetuned teacher into a student on unlabelled images.

    Args:
        extra_args: more `ssl-train distill` flags, after `--`
        data: training shard set URL (labels unused unless labeled_weight > 0)
        run_dir: where this run's checkpoints and final model go
        teacher: run dir of a finished finetune run
        student: student preset (same size as the teacher or smaller)
        eval_data: shard set to report top-1/top-5 on at the end
        global_batch_size: samples per step over all processes
        epochs: training length (default 400)
        max_steps: training length in steps (overrides epochs)
        image_size: crop side in pixels
        learning_rate: base learning rate before sqrt(B) scaling (default 0.075)
        temperature: distillation temperature (default 1.0)
        labeled_weight: weight of a cross-entropy term on true labels (default 0)
        precision: bf16 or fp32
        workers: data-loading processes per training process
        name: job name
        image: container image with ssl-train installed
        j: nodes x processes per node, elastic as min:max
        h: a registered named resource (overrides cpu, gpu, memMB)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        gpu_memory_gb: memory of one GPU in GiB; the elastic minimum must hold the global batch
        max_restarts: times torchrun restarts failed workers in place
        max_retries: times the scheduler reschedules the whole job
        metrics_port: Prometheus port (container port named "metrics"); 0 disables metrics
        env: extra environment variables
        mounts: mounts (type=<bind/volume>,src=...,dst=...[,readonly])
    """
    stage_args = [
        *_flag("data", data), *_flag("run-dir", run_dir), *_flag("teacher", teacher),
        *_flag("student", student), *_flag("eval-data", eval_data),
        *_flag("global-batch-size", global_batch_size), *_flag("epochs", epochs),
        *_flag("max-steps", max_steps), *_flag("image-size", image_size),
        *_flag("learning-rate", learning_rate), *_flag("temperature", temperature),
        *_flag("labeled-weight", labeled_weight),
        *_flag("precision", precision), *_flag("workers", workers),
    ]  # fmt: skip
    _check_gpu_memory(
        "distill", student, image_size, global_batch_size, precision, j, h, gpu, gpu_memory_gb
    )
    return _stage(
        "distill", stage_args, extra_args, name, image, j, h, cpu, gpu, memMB,
        max_restarts, max_retries, metrics_port, env, mounts, student,
    )  # fmt: skip


def supervised(
    *extra_args: str,
    data: str,
    run_dir: str,
    preset: str = "r50_1x_sk0",
    subset: str = "1percent",
    eval_data: Optional[str] = None,
    global_batch_size: int = 1024,
    epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    image_size: int = 224,
    learning_rate: Optional[float] = None,
    from_proj_layer: int = 1,
    precision: str = "bf16",
    workers: int = 8,
    name: str = "ssl-supervised",
    image: str = DEFAULT_IMAGE,
    j: str = "1x1",
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
    """The supervised-only baseline: finetuning's network from random weights, labels only.

    Args:
        extra_args: more `ssl-train supervised` flags, after `--`
        data: training shard set URL
        run_dir: where this run's checkpoints and final model go
        preset: model preset (the one pretrained, for a like-for-like comparison)
        subset: labels to use: 1percent, 10percent or a list file
        eval_data: shard set to report top-1/top-5 on at the end
        global_batch_size: samples per step over all processes
        epochs: training length (default 100)
        max_steps: training length in steps (overrides epochs)
        image_size: crop side in pixels
        learning_rate: base learning rate before sqrt(B) scaling (default 0.005)
        from_proj_layer: projection-head layers kept under the classifier
        precision: bf16 or fp32
        workers: data-loading processes per training process
        name: job name
        image: container image with ssl-train installed
        j: nodes x processes per node, elastic as min:max
        h: a registered named resource (overrides cpu, gpu, memMB)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        gpu_memory_gb: memory of one GPU in GiB; the elastic minimum must hold the global batch
        max_restarts: times torchrun restarts failed workers in place
        max_retries: times the scheduler reschedules the whole job
        metrics_port: Prometheus port (container port named "metrics"); 0 disables metrics
        env: extra environment variables
        mounts: mounts (type=<bind/volume>,src=...,dst=...[,readonly])
    """
    stage_args = [
        *_flag("data", data), *_flag("run-dir", run_dir), *_flag("preset", preset),
        *_flag("subset", subset), *_flag("eval-data", eval_data),
        *_flag("global-batch-size", global_batch_size), *_flag("epochs", epochs),
        *_flag("max-steps", max_steps), *_flag("image-size", image_size),
        *_flag("learning-rate", learning_rate), *_flag("from-proj-layer", from_proj_layer),
        *_flag("precision", precision), *_flag("workers", workers),
    ]  # fmt: skip
    _check_gpu_memory(
        "supervised", preset, image_size, global_batch_size, precision, j, h, gpu, gpu_memory_gb
    )
    return _stage(
        "supervised", stage_args, extra_args, name, image, j, h, cpu, gpu, memMB,
        max_restarts, max_retries, metrics_port, env, mounts, preset,
    )  # fmt: skip


def linear_eval(
    *extra_args: str,
    data: str,
    run_dir: str,
    pretrained: str,
    eval_data: Optional[str] = None,
    global_batch_size: int = 4096,
    epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    image_size: int = 224,
    workers: int = 8,
    name: str = "ssl-linear-eval",
    image: str = DEFAULT_IMAGE,
    j: str = "1x1",
    h: Optional[str] = None,
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    max_restarts: int = 3,
    max_retries: int = 3,
    metrics_port: int = DEFAULT_PORT,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Train a linear classifier on a frozen pretrained backbone (the paper's Table 1 protocol).

    Args:
        extra_args: more `ssl-train linear-eval` flags, after `--`
        data: training shard set URL
        run_dir: where this run's checkpoints and final model go
        pretrained: run dir of a finished pretrain run
        eval_data: shard set to report top-1/top-5 on at the end
        global_batch_size: samples per step over all processes
        epochs: training length (default 90)
        max_steps: training length in steps (overrides epochs)
        image_size: crop side in pixels
        workers: data-loading processes per training process
        name: job name
        image: container image with ssl-train installed
        j: nodes x processes per node, elastic as min:max
        h: a registered named resource (overrides cpu, gpu, memMB)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        max_restarts: times torchrun restarts failed workers in place
        max_retries: times the scheduler reschedules the whole job
        metrics_port: Prometheus port (container port named "metrics"); 0 disables metrics
        env: extra environment variables
        mounts: mounts (type=<bind/volume>,src=...,dst=...[,readonly])
    """
    stage_args = [
        *_flag("data", data), *_flag("run-dir", run_dir), *_flag("pretrained", pretrained),
        *_flag("eval-data", eval_data), *_flag("global-batch-size", global_batch_size),
        *_flag("epochs", epochs), *_flag("max-steps", max_steps),
        *_flag("image-size", image_size), *_flag("workers", workers),
    ]  # fmt: skip
    return _stage(
        "linear-eval", stage_args, extra_args, name, image, j, h, cpu, gpu, memMB,
        max_restarts, max_retries, metrics_port, env, mounts,
    )  # fmt: skip


def eval(
    run_dir: str,
    data: str,
    batch_size: int = 256,
    image_size: Optional[int] = None,
    workers: int = 8,
    name: str = "ssl-eval",
    image: str = DEFAULT_IMAGE,
    j: str = "1x1",
    h: Optional[str] = None,
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 16384,
    max_retries: int = 1,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Top-1/top-5 of a finished run's model on every sample of a shard set, in order.

    Args:
        run_dir: run dir of a finished finetune, distill or linear-eval run
        data: shard set to evaluate on (e.g. s3://b/imagenet/val)
        batch_size: images per process and batch
        image_size: evaluation size (default: what the model trained at)
        workers: data-loading processes per process
        name: job name
        image: container image with ssl-train installed
        j: nodes x processes per node
        h: a registered named resource (overrides cpu, gpu, memMB)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        max_retries: times the scheduler reschedules the job
        env: extra environment variables
        mounts: mounts (type=<bind/volume>,src=...,dst=...[,readonly])
    """
    stage_args = [
        run_dir, *_flag("data", data), *_flag("batch-size", batch_size),
        *_flag("image-size", image_size), *_flag("workers", workers),
    ]  # fmt: skip
    return _stage(
        "eval", stage_args, (), name, image, j, h, cpu, gpu, memMB, 0, max_retries, 0, env,
        mounts,
    )  # fmt: skip
