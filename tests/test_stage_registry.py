"""One declaration per stage: the CLI, the configuration, the TorchX components, the
pipeline and the help all derive from ``ssl_train.stages.registry``."""

from __future__ import annotations

import argparse
import dataclasses
from types import MappingProxyType

import pytest

from ssl_train import cli, jobs
from ssl_train.stages import codegen, registry
from ssl_train.stages.config import OPERATIONAL, StageConfig, field_kind, stage_default


def stage_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_components_file_is_generated_from_the_declarations() -> None:
    assert codegen.COMPONENTS_FILE.read_text() == codegen.render_components(), (
        "ssl_train/components.py is out of date: run `make components`"
    )


def test_every_configuration_field_is_a_flag_of_some_stage() -> None:
    fields = {f.name for f in dataclasses.fields(StageConfig)} - {"stage"}
    flagged = {f.field for spec in registry.STAGES.values() for f in spec.all_flags}
    assert flagged == fields
    assert fields >= OPERATIONAL


def test_a_field_is_declared_once_with_its_help_check_and_resume_rule() -> None:
    """The field's declaration (stages.config.setting) is where its help, its check and
    whether a resume may change it live: the flag, the component and validate read it."""
    from ssl_train.errors import UserError

    declared = {f.name: f for f in dataclasses.fields(StageConfig)}
    for name, field in declared.items():
        if name != "stage":
            assert field.metadata["help"], f"{name} has no help"
    assert {n for n, f in declared.items() if f.metadata.get("operational")} == OPERATIONAL
    checked = [n for n, f in declared.items() if f.metadata.get("check")]
    assert len(checked) >= 20
    for name in checked:  # each check refuses a bad value with a message naming the flag
        bad = {"preset": "r9000", "lr_scaling": "cube", "precision": "fp8", "decode": "tpu"}
        value = bad.get(name, -1)
        try:
            StageConfig.for_stage("pretrain", data="d", run_dir="r", **{name: value})
        except UserError as refused:
            assert name.replace("_", "-") in str(refused) or name == "preset", str(refused)
        else:
            raise AssertionError(f"--{name} {value} was accepted")


@pytest.mark.parametrize("stage", list(registry.STAGES))
def test_help_shows_the_declarations_defaults(stage: str) -> None:
    spec = registry.stage(stage)
    actions = {a.dest: a for a in stage_parsers()[stage]._actions}
    for flag in spec.all_flags:
        value = stage_default(spec, flag.field)
        shown = actions[flag.field].help.replace("%%", "%")
        if flag.field in spec.default_notes:
            assert f"(default {spec.default_notes[flag.field]})" in shown
        elif (
            value is not None
            and value is not dataclasses.MISSING
            and field_kind(flag.field) is not bool
        ):
            text = f"{value:g}" if isinstance(value, float) else str(value)
            assert shown.endswith(f"(default {text})"), (flag.flag, shown)


@pytest.mark.parametrize("stage", list(registry.STAGES))
def test_a_job_and_the_command_run_the_same_configuration(stage: str) -> None:
    """Components and the CLI used to disagree (precision, channels-last, workers, the
    finetune subset): now a job differs only where JOB_DEFAULTS says so."""
    spec = registry.stage(stage)
    needed = {"data": "s3://b/train", "run_dir": "s3://b/run"}
    needed.update({field: "s3://b/other" for field in spec.required})
    flags = {f.field: f for f in spec.all_flags}
    argv = [stage]
    for field, value in needed.items():
        argv += [flags[field].flag, value]
    command = StageConfig.for_stage(stage, **needed)
    job = jobs.parse_stage(
        jobs.stage_argv(stage, {flags[f].argument: v for f, v in needed.items()})
    )
    differ = {
        f.name
        for f in dataclasses.fields(StageConfig)
        if getattr(command, f.name) != getattr(job, f.name)
    }
    assert differ == set(registry.JOB_DEFAULTS)
    assert (job.precision, job.channels_last) == (None, None)  # they follow the device
    assert job.on_device("cuda").precision == "bf16" and job.on_device("cpu").precision == "fp32"


def test_adding_a_stage_is_one_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new declaration alone gives a subcommand with its flags and defaults, a
    configuration, a TorchX component, a place in the pipeline and a task builder."""
    probe = dataclasses.replace(
        registry.STAGES["supervised"],
        name="probe",
        summary="a probe stage",
        defaults={**registry.STAGES["supervised"].defaults, "learning_rate": 0.25},
        pipeline_order=9,
    )
    monkeypatch.setattr(registry, "STAGES", MappingProxyType({**registry.STAGES, "probe": probe}))
    parser = stage_parsers()["probe"]
    assert "(default 0.25)" in next(a.help for a in parser._actions if a.dest == "learning_rate")
    args = cli.build_parser().parse_args(["probe", "--data", "d", "--run-dir", "r"])
    from ssl_train.stages.flags import config_from_args

    config = config_from_args("probe", args)
    assert (config.stage, config.learning_rate, config.preset) == ("probe", 0.25, "r50_1x_sk0")
    assert "def probe(" in codegen.render_components()
    assert registry.stage("probe").build_task().__name__ == "build_supervised"
    app = jobs.stage_job("probe", {"data": "d", "run_dir": "r"}, (), jobs.JobOptions("p"))
    assert app.roles[0].name == "probe" and "ssl-train probe --data d" in app.roles[0].args[1]


def test_an_unknown_stage_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown stage 'pretrian'; use one of pretrain"):
        StageConfig.for_stage("pretrian", data="d", run_dir="r")


def test_component_arguments_have_their_types() -> None:
    """`ssl.eval` took image_size as a string; numbers are numbers now."""
    import inspect
    from typing import Optional

    from ssl_train import components

    parameters = inspect.signature(components.eval).parameters
    assert parameters["image_size"].annotation == Optional[int]  # noqa: UP045 (TorchX's)
    assert parameters["eval_batch_size"].annotation == Optional[int]  # noqa: UP045


def test_eval_is_declared_once_for_its_command_and_its_component() -> None:
    """`ssl-train eval` and `ssl.eval` both come from `registry.EVAL` (the component was a
    hand-written string inside codegen, with its own defaults)."""
    import inspect

    from ssl_train import components

    evaluate = stage_parsers()["eval"]
    options = {o for a in evaluate._actions for o in a.option_strings} - {"-h", "--help"}
    declared = {flag.flag for flag in registry.EVAL.flags}
    assert options == declared | {"--batch-size"}  # an older spelling, still accepted
    parameters = inspect.signature(components.eval).parameters
    assert {f.argument for f in registry.EVAL.flags} | {"run_dir"} <= set(parameters)
    assert parameters["memMB"].default == registry.EVAL.job_options["memMB"]
    app = components.eval(run_dir="s3://b/f", data="s3://b/v", eval_batch_size=64)
    assert " ".join(app.roles[0].args).split("ssl_train.cli ")[1] == (
        "eval s3://b/f --data s3://b/v --eval-batch-size 64 --workers 8"
    )
