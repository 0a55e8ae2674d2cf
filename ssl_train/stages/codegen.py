"""Writes ``ssl_train/components.py``, the TorchX components, from the stage declarations.

TorchX reads a component's arguments from its Python signature and checks the function's
source text (``torchx.specs.file_linter``), so every component must be a literal function
in the module TorchX loads; this generator writes them from ``ssl_train.stages.registry``
(every stage flag an argument, with the declaration's help and default) so that nothing
about a stage is written twice. ``make components`` runs it; a test fails when the file
is out of date.

    .venv/bin/python -m ssl_train.stages.codegen          # rewrite components.py
    .venv/bin/python -m ssl_train.stages.codegen --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ssl_train.jobs import JobOptions
from ssl_train.stages import registry
from ssl_train.stages.config import field_kind, flag_help, flag_text

COMPONENTS_FILE = Path(__file__).resolve().parent.parent / "components.py"

HEADER = '''"""TorchX components for every ssl-train stage: ``torchx run [-s SCHEDULER] ssl.<stage>``.

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
'''

# (argument, annotation, default source text, help); the values are JobOptions' defaults
JOB_ARGUMENTS: tuple[tuple[str, str, str, str], ...] = (
    ("image", "str", "DEFAULT_IMAGE", "container image with ssl-train installed"),
    ("j", "str", repr(JobOptions.j), "nodes x processes per node, elastic as min:max (e.g. 2:4x8)"),
    ("h", "Optional[str]", "None", "a registered named resource (overrides cpu, gpu, memMB)"),
    ("cpu", "int", repr(JobOptions.cpu), "CPUs per node"),
    ("gpu", "int", repr(JobOptions.gpu), "GPUs per node"),
    ("memMB", "int", repr(JobOptions.memMB), "memory per node in MB"),
    (
        "gpu_memory_gb",
        "float",
        repr(JobOptions.gpu_memory_gb),
        "memory of one GPU in GiB; the elastic minimum must hold the global batch",
    ),
    (
        "max_restarts",
        "int",
        repr(JobOptions.max_restarts),
        "times torchrun restarts failed workers in place",
    ),
    (
        "max_retries",
        "int",
        repr(JobOptions.max_retries),
        "times the scheduler reschedules the whole job",
    ),
    (
        "metrics_port",
        "int",
        "DEFAULT_PORT",
        'Prometheus port (container port named "metrics"); 0 disables metrics',
    ),
    (
        "env",
        "Optional[Dict[str, str]]",
        "None",
        "extra environment variables (e.g. AWS_ENDPOINT_URL=...)",
    ),
    (
        "mounts",
        "Optional[List[str]]",
        "None",
        "mounts (type=<bind/volume>,src=...,dst=...[,readonly])",
    ),
)
NOT_ARGUMENTS = frozenset({"metrics_port"})  # a job option: it also names the container port


def _add_flag_arguments(
    spec: registry.StageSpec | registry.CommandSpec,
    flags: list[registry.Flag],
    required: set[str],
    job_defaults: Mapping[str, Any],
    params: list[str],
    docs: list[str],
) -> None:
    """Append each flag's component parameter (required ones plain; the rest unset by
    default, so the command's own default applies) and its docstring line, which names
    the job's own default where a job has one."""
    for flag in flags:
        job_default = job_defaults.get(flag.argument)
        if job_default is None:
            help_text = flag_help(spec, flag)
        else:  # a job's own default, not the command line's
            help_text = f"{flag_text(flag)} (default {job_default})"
        if flag.field in required:
            params.append(f"    {flag.argument}: str,")
        else:
            params.append(
                f"    {flag.argument}: Optional[{field_kind(flag.field).__name__}] = None,"
            )
        docs.append(f"        {flag.argument}: {help_text}")


def _stage_component(spec: registry.StageSpec) -> str:
    function = spec.name.replace("-", "_")
    required = ["data", "run_dir", *sorted(spec.required)]
    flags = [f for f in spec.all_flags if f.field not in NOT_ARGUMENTS]
    by_field = {f.field: f for f in flags}
    ordered = [by_field[r] for r in required] + [f for f in flags if f.field not in required]
    params = ["    *extra_args: str,"]
    docs = [f"        extra_args: more `ssl-train {spec.name}` flags, after `--`"]
    _add_flag_arguments(spec, ordered, set(required), registry.JOB_DEFAULTS, params, docs)
    params.append(f'    name: str = "ssl-{spec.name}",')
    docs.append("        name: job name")
    for argument, annotation, default, help_text in JOB_ARGUMENTS:
        params.append(f"    {argument}: {annotation} = {default},")
        docs.append(f"        {argument}: {help_text}")
    values = ", ".join(f'"{f.argument}": {f.argument}' for f in ordered)
    options = ", ".join(["name=name", *(f"{a}={a}" for a, _, _, _ in JOB_ARGUMENTS)])
    summary = spec.summary[0].upper() + spec.summary[1:]
    return "\n".join(
        [
            f"def {function}(",
            *params,
            ") -> specs.AppDef:",
            f'    """{summary} (resumes from run_dir).',
            "",
            "    Args:",
            *docs,
            '    """',
            f"    values = {{{values}}}",
            f'    return stage_job("{spec.name}", values, extra_args, JobOptions({options}))',
        ]
    )


# the job arguments a command's component takes (it runs once: no restarts, no metrics)
COMMAND_JOB_ARGUMENTS = ("image", "j", "h", "cpu", "gpu", "memMB", "max_retries", "env", "mounts")


def _command_component(spec: registry.CommandSpec) -> str:
    """The component of a command declared like a stage (``eval``): RUN_DIR, its flags
    (unset: the command's defaults, and the job's own for workers), its job settings."""
    params = [f"    {spec.run_dir.argument}: str,"]
    docs = [f"        {spec.run_dir.argument}: {flag_text(spec.run_dir)}"]
    _add_flag_arguments(
        spec, list(spec.flags), set(spec.required), spec.job_flag_defaults, params, docs
    )
    params.append(f'    name: str = "ssl-{spec.name}",')
    docs.append("        name: job name")
    jobs = {
        argument: (annotation, default, text)
        for argument, annotation, default, text in JOB_ARGUMENTS
    }
    for argument in COMMAND_JOB_ARGUMENTS:
        annotation, default, help_text = jobs[argument]
        if argument in spec.job_options:
            default = repr(spec.job_options[argument])
        params.append(f"    {argument}: {annotation} = {default},")
        docs.append(f"        {argument}: {help_text}")
    values = ", ".join(f'"{f.argument}": {f.argument}' for f in spec.flags)
    options = ", ".join(
        [
            "name=name",
            *(f"{a}={a}" for a in COMMAND_JOB_ARGUMENTS),
            "max_restarts=0",
            "metrics_port=0",
        ]
    )
    summary = spec.summary[0].upper() + spec.summary[1:]
    return "\n".join(
        [
            f"def {spec.component}(",
            *params,
            ") -> specs.AppDef:",
            f'    """{summary}.',
            "",
            "    Args:",
            *docs,
            '    """',
            f"    values = {{{values}}}",
            f"    options = JobOptions({options})",
            f"    return command_job(registry.{spec.name.upper()}, {spec.run_dir.argument}, values, options)",
        ]
    )


# The recipe's driver: not a stage, so written here (TorchX reads a component's signature
# from the module's source, so the function itself must be in ssl_train/components.py).
PIPELINE_COMPONENT = '''def pipeline(
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
    return driver_app(pipeline_args, root, name, image, service_account, cpu, memMB, max_retries)'''


def render_components() -> str:
    """The text of ``ssl_train/components.py`` for today's declarations.

    Example:
        >>> "def linear_eval(" in render_components()
        True
    """
    parts = [HEADER.rstrip("\n")]
    parts += [_stage_component(spec) for spec in registry.STAGES.values()]
    parts.append(_command_component(registry.EVAL))
    parts.append(PIPELINE_COMPONENT)
    return "\n\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args()
    text = render_components()
    if args.check:
        if COMPONENTS_FILE.read_text() != text:
            sys.exit(f"{COMPONENTS_FILE} is out of date: run `make components`")
        return
    COMPONENTS_FILE.write_text(text)
    print(f"wrote {COMPONENTS_FILE}")


if __name__ == "__main__":
    main()
