"""`torchx run ssl.<stage>`: the components' help and mistyped arguments
(ssl_train.torchx_run, registered as TorchX's `run` command)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_train import components
from ssl_train.stages import registry
from ssl_train.stages.config import field_kind, stage_default
from ssl_train.torchx_run import ComponentUsage, check_component_args, component_help

BIN = Path(sys.executable).parent
COMPONENTS = {
    f"ssl.{name}": function
    for name, function in inspect.getmembers(components, inspect.isfunction)
    if function.__module__ == components.__name__
}


def _torchx_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "torchx"), "run", "-s", "local_cwd", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_the_help_shows_each_argument_once_with_its_default_and_flag(name: str) -> None:
    function = COMPONENTS[name]
    text = component_help(name, function)
    stage = registry.STAGES.get(function.__name__.replace("_", "-"))
    flags = {flag.argument: flag for flag in stage.all_flags} if stage else {}
    rows = {}
    for line in text.splitlines():
        found = re.match(r"  (?:-\w, )?--(\w+) ", line)
        if found:
            assert found.group(1) not in rows, f"--{found.group(1)} listed twice"
            rows[found.group(1)] = line
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        assert parameter.name in rows, f"--{parameter.name} missing from the help"
    assert "(default: None)" not in text and "(default None)" not in text
    # each argument's text (wrapped lines joined) holds at most one default
    entries = re.split(r"\n  (?=-)", text.split("\n\n", 2)[2])
    for entry in entries:
        assert entry.count("(default") <= 1, entry
    for argument, flag in flags.items():
        default = stage_default(stage, flag.field)
        entry = next(e for e in entries if re.match(rf"(?:-\w, )?--{argument} ", e.strip()))
        entry = " ".join(entry.split())  # its wrapped lines as one
        assert f"[ssl-train {flag.flag}]" in entry, entry
        if default in (None, False, dataclasses.MISSING) or field_kind(flag.field) is bool:
            continue
        if flag.field not in stage.default_notes and argument not in registry.JOB_DEFAULTS:
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            assert f"(default {shown})" in entry, entry
    if stage is not None:
        assert "after `--` (optional)" in text and "(required)" not in text.split("after `--`")[1]
        assert "--workers INT" in text and "(default 8)" in rows["workers"]  # a job's default


def test_a_dashed_spelling_names_the_right_one_in_one_line() -> None:
    pretrain = COMPONENTS["ssl.pretrain"]
    with pytest.raises(ComponentUsage) as stage_flag:
        check_component_args("ssl.pretrain", pretrain, ["--data", "d", "--image-size", "16"])
    assert stage_flag.value.code == 2 and "\n" not in stage_flag.value.text
    assert "--image-size: write --image_size" in stage_flag.value.text
    assert "ssl-train's --image-size" in stage_flag.value.text
    with pytest.raises(ComponentUsage) as job_option:
        check_component_args("ssl.pretrain", pretrain, ["--max-restarts=2"])
    assert "--max-restarts: write --max_restarts" in job_option.value.text
    with pytest.raises(ComponentUsage) as unknown:
        check_component_args("ssl.pretrain", pretrain, ["--run_dir", "r", "--nonsense", "1"])
    assert "--nonsense: no such argument; `torchx run ssl.pretrain --help` lists them" in (
        unknown.value.text
    )
    # values are not options; the named resource takes -h's value; after -- is ssl-train's
    check_component_args(
        "ssl.pretrain", pretrain, ["-h", "gpu.8", "--data", "-x", "--run_dir", "r", "--", "--y"]
    )
    check_component_args(
        "ssl.pretrain", pretrain, ["--image_size=16", "--", "--image-size"], {"data", "run_dir"}
    )
    with pytest.raises(ComponentUsage) as missing:  # .torchxconfig gives the data
        check_component_args("ssl.finetune", COMPONENTS["ssl.finetune"], [], {"data"})
    assert missing.value.text == (
        "torchx run ssl.finetune: needs --run_dir and --pretrained "
        "(`torchx run ssl.finetune --help` lists every argument)"
    )


@pytest.mark.parametrize("asked", [["--help"], ["-h"], ["--data", "d", "-h", "--run_dir", "r"]])
def test_help_is_help_and_h_with_a_value_is_the_named_resource(asked: list[str]) -> None:
    with pytest.raises(ComponentUsage) as answer:
        check_component_args("ssl.finetune", COMPONENTS["ssl.finetune"], asked)
    assert answer.value.code == 0 and answer.value.text.startswith("usage: torchx run ")


def test_torchx_run_answers_help_and_misspellings_itself() -> None:
    """Through the real `torchx` command: ssl-train's `run` is the one TorchX loads."""
    misspelled = _torchx_run("ssl.pretrain", "--data", "d", "--run_dir", "r", "--image-size", "16")
    assert misspelled.returncode == 2, misspelled.stderr
    lines = [line for line in misspelled.stderr.splitlines() if line.strip()]
    assert lines == [
        "torchx run ssl.pretrain: --image-size: write --image_size (components spell "
        "arguments with underscores; it sets ssl-train's --image-size)"
    ], misspelled.stderr
    for asked in ("-h", "--help"):
        helped = _torchx_run("ssl.distill", asked)
        assert helped.returncode == 0, helped.stderr
        assert helped.stdout.startswith("usage: torchx run [-s SCHEDULER] ssl.distill ")
        assert "[ssl-train --teacher]" in " ".join(helped.stdout.split())  # lines wrap
    # other components are TorchX's own business
    builtin = _torchx_run("utils.echo", "--help")
    assert builtin.returncode == 0 and "(default: hello world)" in builtin.stdout
