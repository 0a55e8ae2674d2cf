"""What every TorchX component does with its arguments: one stage as an elastic torchrun
job (TorchX's own ``dist.ddp``), checked before anything is submitted.

The components in ``ssl_train/components.py`` are generated from the stage declarations
(``ssl_train.stages.registry``); each hands its arguments here. When ``torchx run`` builds
the job (before submitting it):

- the stage's flags are parsed and validated by the stage's own command-line parser, so a
  bad value fails the same way as ``ssl-train STAGE`` would, as one line;
- every world size of the elastic range (``-j MIN:MAXxN``) must hold at least one sample
  of the global batch (ranks take shares that differ by at most one, so any size up to
  the global batch trains the same batches), and on GPUs the smallest one must hold its
  largest share in memory.

On every node the job first runs ``ssl-train STAGE --check-only`` (the data, the models
it starts from, the run dir), then starts torchrun in its place (``exec``: signals reach
torchrun as before). A check that fails exits with status 2 and its one-line message,
which the ``kubernetes`` scheduler turns into the end of the job (no retry can fix it),
and which ``torchx status`` shows as the replica's error.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torchx.specs as specs
from torchx.components.dist import ddp, parse_nnodes
from torchx.specs.finder import ComponentValidationException

from ssl_train.errors import UserError
from ssl_train.metrics import DEFAULT_PORT
from ssl_train.preemption import (
    COLLECTIVE_TIMEOUT_ENV,
    GLOO_TIMEOUT_S,
    SHUTDOWN_TIMEOUT_ENV,
    TORCH_COLLECTIVE_TIMEOUT_S,
    collective_timeout_s,
    grace_period_s,
    shutdown_timeout_s,
)
from ssl_train.shares import Shares
from ssl_train.stages import registry
from ssl_train.stages.config import field_kind

DEFAULT_IMAGE = "ssl-train:latest"
CLI_MODULE = "ssl_train.cli"
PRESET_METADATA = "ssl_train.preset"  # the network the job trains
CHECKPOINT_BYTES_METADATA = "ssl_train.checkpoint_bytes"  # what the grace period must fit
CHECK_FAILED_EXIT_CODE = 2  # `ssl-train` on a user error: the job ends, no retry
# torchrun's c10d rendezvous (its --rdzv-conf, which torchrun reads from PET_RDZV_CONF;
# TorchX's dist.ddp passes none). A lost node is dropped after 3 missed heartbeats 2 s
# apart instead of 5 s apart, and a round that has its minimum of nodes waits 10 s for
# more instead of 30. With 128 agents on one store (1,024 GPUs) that takes the
# rendezvous after a lost node from about 44 s to about 19 s, with all 127 survivors in
# one round even on 2 shared cores; heartbeats 1 s apart or a 5 s last call left some
# survivors out of it there, to be fetched by another restart (bench/rendezvous.py;
# BENCHMARKS.md). A node taken for dead by a late heartbeat keeps training: the round in
# progress does not change, the node is only left out of the next one if it stays silent.
RDZV_CONF = "keep_alive_interval=2,keep_alive_max_attempt=3,last_call_timeout=10"


class JobRefused(ComponentValidationException, UserError):
    """A job that cannot run as asked; ``torchx run`` prints it as one message and
    submits nothing (and Python callers may catch it as a ``ValueError``)."""


@dataclass(frozen=True)
class JobOptions:
    """How a stage runs on the cluster (the components' arguments that are not flags)."""

    name: str
    image: str = DEFAULT_IMAGE
    j: str = "1x1"
    h: str | None = None
    cpu: int = 8
    gpu: int = 0
    memMB: int = 32768
    gpu_memory_gb: float = 80.0
    max_restarts: int = 3
    max_retries: int = 3
    metrics_port: int = DEFAULT_PORT
    env: Mapping[str, str] | None = None
    mounts: Sequence[str] | None = None


def stage_argv(stage: str, values: Mapping[str, Any], extra_args: Sequence[str] = ()) -> list[str]:
    """``ssl-train STAGE`` flags for component argument ``values`` (unset ones left out:
    the stage's declaration decides them) and the job's defaults.

    Example:
        >>> stage_argv("pretrain", {"data": "s3://b/t", "run_dir": "s3://b/p", "channels_last": "False"})
        ['pretrain', '--data', 's3://b/t', '--run-dir', 's3://b/p', '--no-channels-last', '--workers', '8']
    """
    spec = registry.stage(stage)
    flags = _flags_argv(spec.all_flags, values, registry.JOB_DEFAULTS, spec.component)
    return [stage, *flags, *extra_args]


def _flags_argv(
    flags: Sequence[registry.Flag],
    values: Mapping[str, Any],
    job_defaults: Mapping[str, Any],
    component: str,
) -> list[str]:
    """The command-line flags for component argument ``values`` (unset ones left out),
    with the job's own defaults; a bool is the switch or its ``--no-`` form."""
    by_argument = {flag.argument: flag for flag in flags}
    unknown = sorted(set(values) - set(by_argument))
    if unknown:
        raise UserError(f"ssl.{component} has no argument {', '.join(unknown)}")
    given = {k: v for k, v in values.items() if v is not None}
    for argument, value in job_defaults.items():
        given.setdefault(argument, value)
    argv = []
    for argument, value in given.items():
        flag = by_argument[argument]
        if field_kind(flag.field) is bool:
            on = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            argv.append(flag.flag if on else "--no-" + flag.flag[2:])
        else:
            argv += [flag.flag, str(value)]
    return argv


def parse_stage(argv: Sequence[str]) -> Any:
    """The ``StageConfig`` that ``ssl-train`` would run for ``argv``, validated; a user
    error as TorchX reports a component's (one message, nothing submitted)."""
    from ssl_train.stages.flags import parse_stage_argv

    try:
        return parse_stage_argv(list(argv))
    except UserError as exc:
        raise JobRefused(str(exc)) from None


def check_world_sizes(stage: str, global_batch_size: int, j: str) -> None:
    """Every world size the elastic range allows must hold at least one sample of each
    global batch (which stays fixed as the job shrinks or grows; ranks take shares that
    differ by at most one sample, so any size up to the global batch trains it exactly).

    Example:
        >>> check_world_sizes("pretrain", 4096, "2:4x8")  # 16 to 32 processes: fine
        >>> check_world_sizes("pretrain", 12, "1:2x8")
        Traceback (most recent call last):
        ...
        ssl_train.jobs.JobRefused: -j 1:2x8 allows up to 16 processes, more than the 12 samples of each global batch (--global_batch_size): every process needs at least one; use -j 1x8 or a global batch of at least 16
    """
    min_nodes, max_nodes, nproc, _ = parse_nnodes(j)
    largest = max_nodes * nproc
    try:
        Shares(global_batch_size, largest)  # the rule the ranks apply
    except UserError:  # said again in the job's terms: -j and the component's argument
        fits = global_batch_size // nproc
        advice = f"-j {min_nodes}:{fits}x{nproc} or " if fits > min_nodes else ""
        advice = f"-j {fits}x{nproc} or " if fits == min_nodes else advice
        raise JobRefused(
            f"-j {j} allows up to {largest} processes, more than the {global_batch_size} "
            "samples of each global batch (--global_batch_size): every process needs at "
            f"least one; use {advice}a global batch of at least {largest}"
        ) from None


def check_decode(config: Any, options: JobOptions) -> None:
    """Refuse ``--decode gpu`` on a job without GPUs: its ranks would all fail at start.

    Example:
        >>> config = parse_stage(stage_argv("pretrain", {"data": "d", "run_dir": "r", "decode": "gpu"}))
        >>> check_decode(config, JobOptions("p", gpu=0))
        Traceback (most recent call last):
        ...
        ssl_train.jobs.JobRefused: --decode gpu decodes on the job's GPUs and this job has none: give it --gpu N (or a GPU resource with -h), or leave decode out to decode in the data workers
    """
    if config.decode != "gpu":
        return
    if _gpus(options) <= 0:
        raise JobRefused(
            "--decode gpu decodes on the job's GPUs and this job has none: give it --gpu N "
            "(or a GPU resource with -h), or leave decode out to decode in the data workers"
        )


def check_gpu_memory(config: Any, options: JobOptions) -> None:
    """Refuse a GPU job whose elastic minimum cannot hold its global batch: the batch
    stays fixed as the job shrinks, so the fewest GPUs carry the largest share."""
    spec = registry.stage(config.stage)
    if spec.model_field is None:
        return  # a network built from another run's: sized by that run's job
    if _gpus(options) <= 0:
        return  # CPU processes: host memory, not a GPU's, is the limit
    from ssl_train.models.gpu_memory import check_fits  # torch: only for GPU jobs

    min_nodes, _, nproc_per_node, _ = parse_nnodes(options.j)
    try:
        check_fits(
            config.stage, getattr(config, spec.model_field), config.image_size,
            config.global_batch_size, min_nodes * nproc_per_node, options.gpu_memory_gb,
            config.precision or "bf16", None, config.memory_size or 0,
        )  # fmt: skip
    except UserError as exc:
        raise JobRefused(str(exc)) from None


def stage_job(
    stage: str, values: Mapping[str, Any], extra_args: Sequence[str], options: JobOptions
) -> specs.AppDef:
    """The TorchX app of one stage (what every generated component returns).

    Example:
        >>> app = stage_job("pretrain", {"data": "s3://b/t", "run_dir": "s3://b/p", "preset": "tiny"}, (), JobOptions("p", j="1x2"))
        >>> app.roles[0].name, app.roles[0].args[1].startswith("ssl-train pretrain --data s3://b/t")
        ('pretrain', True)
    """
    if _gpus(options) > 0 and values.get("device") is None:
        # a GPU job trains on its GPUs or stops: without --device a rank whose torch
        # cannot use the GPU would fall back to the CPU
        values = {**values, "device": "cuda"}
    argv = stage_argv(stage, values, extra_args)
    config = parse_stage(argv)
    check_decode(config, options)
    check_gpu_memory(config, options)
    check_world_sizes(stage, config.global_batch_size, options.j)
    metrics = ["--metrics-port", str(options.metrics_port)]
    from ssl_train.stages.sizing import stage_checkpoint_bytes  # torch, on the meta device

    size = stage_checkpoint_bytes(config)
    app = _torchrun_app([*argv, *metrics], options, checkpoint_bytes=size)
    spec = registry.stage(stage)
    if spec.model_field is not None:
        app.metadata[PRESET_METADATA] = getattr(config, spec.model_field)
    if size is not None:
        app.metadata[CHECKPOINT_BYTES_METADATA] = str(size)
    if options.metrics_port:
        app.roles[0].port_map["metrics"] = options.metrics_port
    return app


def command_job(
    spec: registry.CommandSpec, run_dir: str, values: Mapping[str, Any], options: JobOptions
) -> specs.AppDef:
    """A command declared like a stage (``eval``) as a torchrun job: every node runs its
    share of the command on RUN_DIR.

    Example:
        >>> app = command_job(registry.EVAL, "s3://b/f", {"data": "s3://b/v"}, JobOptions(name="e"))
        >>> " ".join(app.roles[0].args).split("ssl_train.cli ")[1]
        'eval s3://b/f --data s3://b/v --workers 8'
    """
    flags = _flags_argv(spec.all_flags, values, spec.job_flag_defaults, spec.component)
    return _torchrun_app([spec.name, run_dir, *flags], options, check=False)


def _gpus(options: JobOptions) -> int:
    return specs.resource(cpu=1, gpu=options.gpu, memMB=1, h=options.h).gpu


def _torchrun_app(
    argv: Sequence[str],
    options: JobOptions,
    check: bool = True,
    checkpoint_bytes: int | None = None,
) -> specs.AppDef:
    """TorchX's ``dist.ddp`` running ``python -m ssl_train.cli ARGV``, with a fresh
    rendezvous store per round, the rendezvous settings of ``RDZV_CONF``, torchrun's
    restarts, and the check before torchrun; the shutdown window and the collectives'
    timeout are sized for a checkpoint of ``checkpoint_bytes`` (the ``kubernetes``
    scheduler sets the pod's grace period to match, and a ``-cfg grace_period_s`` there
    overrides the window).

    An elastic range (``-j MIN:MAXxN``) replaces only a failed node's pod and leaves the
    others training (TorchX's ``REPLICA`` retry policy): torchrun's rendezvous carries
    the job on the nodes left. TorchX's default, kept for a fixed size, restarts every
    pod of the job when one fails (Volcano's ``RestartJob``), which at 1,024 GPUs would
    turn one lost node into a new job."""
    backend_floor = TORCH_COLLECTIVE_TIMEOUT_S if _gpus(options) > 0 else GLOO_TIMEOUT_S
    job_env = {
        "PET_MAX_RESTARTS": str(options.max_restarts),  # torchrun reads its flags from PET_*
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # a fresh store per rendezvous round
        "PET_RDZV_CONF": RDZV_CONF,
        "LOGLEVEL": "INFO",
        SHUTDOWN_TIMEOUT_ENV: str(shutdown_timeout_s(grace_period_s(checkpoint_bytes))),
        COLLECTIVE_TIMEOUT_ENV: str(collective_timeout_s(checkpoint_bytes, backend_floor)),
        **(options.env or {}),
    }
    app = ddp(
        *argv,
        m=CLI_MODULE,
        image=options.image,
        name=options.name,
        h=options.h,
        cpu=options.cpu,
        gpu=options.gpu,
        memMB=options.memMB,
        j=options.j,
        env=job_env,
        max_retries=options.max_retries,
        mounts=list(options.mounts) if options.mounts else None,
    )
    role = app.roles[0]
    role.name = argv[0].replace("-", "_")
    min_nodes, max_nodes, _, _ = parse_nnodes(options.j)
    if min_nodes < max_nodes:
        role.retry_policy = specs.RetryPolicy.REPLICA
    if check:
        command = shlex.join(["ssl-train", *argv, "--check-only"])
        role.args = ["-c", f"{command} && exec {role.args[1]}"]
    return app
