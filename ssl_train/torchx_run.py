"""``torchx run`` for ssl-train's components: their help, and one line for a mistyped
argument, before TorchX parses them.

TorchX builds each component's argument parser from the function's signature: a
one-letter parameter takes the short option (``h``, the named resource, is ``-h``, so
``-h`` asks for a value instead of help), every default is appended to the help (the
stages' own defaults are ``None`` there, "unset: the stage's default", so the help said
"(default 0.9) (default: None)"), the ``--`` passthrough is a required positional, and a
misspelled argument ends in the whole usage text. ssl-train registers this command as
``torchx run`` (entry point ``torchx.cli.cmds``); for components other than ``ssl.*`` it
is TorchX's own, unchanged. For ``ssl.*``:

- ``--help``, or ``-h`` with no value after it: each argument once, with its default and
  the ``ssl-train`` flag it sets;
- ``--image-size`` (ssl-train's spelling) says to write ``--image_size``; an argument
  the component does not have, or a required one missing, is named, with where to
  look, in one line (status 2).

    torchx run -s local_cwd ssl.pretrain --help
"""

from __future__ import annotations

import argparse
import inspect
import sys
import textwrap
from collections.abc import Callable, Collection, Sequence
from typing import Any

from torchx.cli.cmd_run import CmdRun as TorchXCmdRun
from torchx.runner.config import load_sections
from torchx.specs.file_linter import get_fn_docstring

from ssl_train.stages import registry

USAGE_EXIT_CODE = 2  # argparse's, for a mistyped command line
HELP_COLUMNS = 100


class ComponentUsage(Exception):
    """What ``torchx run ssl.X ...`` is answered with instead of running: its help
    (``code`` 0, on stdout) or one line about a mistyped argument (``code`` 2)."""

    def __init__(self, text: str, code: int) -> None:
        super().__init__(text)
        self.text, self.code = text, code


def component_function(name: str) -> Callable[..., Any] | None:
    """The function behind component ``name`` if it is one of ssl-train's, else None.

    Example:
        >>> component_function("ssl.linear_eval").__name__, component_function("dist.ddp")
        ('linear_eval', None)
    """
    prefix, _, function = name.partition(".")
    if prefix != "ssl" or not function or function.startswith("_"):
        return None
    from ssl_train import components

    found = getattr(components, function, None)
    return found if inspect.isfunction(found) and found.__module__ == components.__name__ else None


def _stage_of(function: Callable[..., Any]) -> registry.StageSpec | None:
    return registry.STAGES.get(function.__name__.replace("_", "-"))


def _value_name(parameter: inspect.Parameter) -> str:
    annotation = str(parameter.annotation)
    for kind in ("bool", "int", "float", "Dict", "List"):
        if kind in annotation:
            names = {"bool": "True|False", "Dict": "KEY=VALUE,...", "List": "VALUE,..."}
            return names.get(kind, kind.upper())
    return "TEXT"


def _option_names(name: str) -> str:
    return f"-{name}, --{name}" if len(name) == 1 else f"--{name}"


def component_help(name: str, function: Callable[..., Any]) -> str:
    """The help of an ssl-train component: each argument once, with its default.

    Stage arguments also name the ``ssl-train`` flag they set; their defaults are the
    stage's (what ``ssl-train STAGE --help`` shows), the job's are the function's own.

    Example:
        >>> from ssl_train.components import pretrain
        >>> text = component_help("ssl.pretrain", pretrain)
        >>> [line.split()[0] for line in text.splitlines() if "--temperature" in line]
        ['--temperature']
    """
    description, described = get_fn_docstring(function)
    stage = _stage_of(function)
    flags = {flag.argument: flag.flag for flag in stage.all_flags} if stage else {}
    parameters = inspect.signature(function).parameters.values()
    rows: dict[str, list[tuple[str, str]]] = {"stage": [], "job": []}
    required = []
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        option = f"{_option_names(parameter.name)} {_value_name(parameter)}"
        text = described.get(parameter.name, "").strip()
        if parameter.default is inspect.Parameter.empty:
            required.append(f"--{parameter.name} {_value_name(parameter)}")
            text += " (required)"
        elif parameter.default is not None and "(default" not in text:
            text += f" (default {parameter.default})"
        if parameter.name in flags:
            text += f" [ssl-train {flags[parameter.name]}]"
        rows["stage" if parameter.name in flags or stage is None else "job"].append((option, text))
    width = max(len(option) for group in rows.values() for option, _ in group) + 2
    lines = [f"usage: torchx run [-s SCHEDULER] {name} {' '.join(required)} [ARGUMENT VALUE ...]"]
    if stage is not None:
        lines[0] += " [-- SSL-TRAIN FLAGS ...]"
    lines += ["", description.strip(), ""]
    headings = {
        "stage": (
            f"stage arguments (the `ssl-train {stage.name}` flag in brackets; unset ones take "
            "its default):"
            if stage
            else "arguments:"
        ),
        "job": "job arguments:",
    }
    for group, heading in headings.items():
        if rows[group]:
            lines.append(heading)
            for option, text in rows[group]:
                lines += textwrap.wrap(
                    text,
                    HELP_COLUMNS,
                    initial_indent=f"  {option.ljust(width)}",
                    subsequent_indent=" " * (width + 2),
                    break_on_hyphens=False,
                )
            lines.append("")
    if stage is not None:
        lines.append(
            f"after `--` (optional): more `ssl-train {stage.name}` flags, as ssl-train spells "
            "them (e.g. -- --trace-samples /tmp/keys.jsonl)"
        )
    return "\n".join(lines).rstrip() + "\n"


def check_component_args(
    name: str,
    function: Callable[..., Any],
    args: Sequence[str],
    configured: Collection[str] = (),
) -> None:
    """Answer ``--help`` and catch a mistyped or missing argument of component ``name``
    before TorchX parses ``args`` (its own parser would print the whole usage text).
    ``configured``: arguments ``.torchxconfig`` gives values (its ``[component:NAME]``).

    Raises ``ComponentUsage``: the help, or one line naming the argument.

    Example:
        >>> from ssl_train.components import pretrain
        >>> check_component_args("ssl.pretrain", pretrain, ["--data", "d", "--image-size", "32"])
        Traceback (most recent call last):
        ...
        ssl_train.torchx_run.ComponentUsage: torchx run ssl.pretrain: --image-size: write --image_size (components spell arguments with underscores; it sets ssl-train's --image-size)
    """
    parameters = inspect.signature(function).parameters
    takes = {
        p for p, spec in parameters.items() if spec.kind is not inspect.Parameter.VAR_POSITIONAL
    }
    stage = _stage_of(function)
    flags = {flag.argument: flag.flag for flag in stage.all_flags} if stage else {}
    tokens = list(args)
    given = set(configured)
    position = 0
    while position < len(tokens):
        token = tokens[position]
        position += 1
        if token == "--":
            break  # the rest is ssl-train's own flags, checked by its parser
        follows = tokens[position] if position < len(tokens) else None
        if token == "--help" or (token == "-h" and (follows is None or follows.startswith("-"))):
            raise ComponentUsage(component_help(name, function), 0)
        if not token.startswith("-"):
            continue  # a value
        option, has_value, _ = token.lstrip("-").partition("=")
        if option in takes:
            given.add(option)
            if not has_value:
                position += 1  # its value
            continue
        spelled, typed = option.replace("-", "_"), token.partition("=")[0]
        if spelled in takes:
            sets = f"; it sets ssl-train's {flags[spelled]}" if spelled in flags else ""
            raise ComponentUsage(
                f"torchx run {name}: {typed}: write --{spelled} (components spell arguments "
                f"with underscores{sets})",
                USAGE_EXIT_CODE,
            )
        raise ComponentUsage(
            f"torchx run {name}: {typed}: no such argument; `torchx run {name} --help` "
            "lists them" + (" (ssl-train's own flags go after `--`)" if stage else ""),
            USAGE_EXIT_CODE,
        )
    required = [
        p
        for p, spec in parameters.items()
        if spec.default is inspect.Parameter.empty and p in takes and p not in given
    ]
    if required:
        raise ComponentUsage(
            f"torchx run {name}: needs {' and '.join('--' + p for p in required)} "
            f"(`torchx run {name} --help` lists every argument)",
            USAGE_EXIT_CODE,
        )


class CmdRun(TorchXCmdRun):
    """TorchX's ``torchx run``, which first answers ``--help`` and mistyped arguments of
    ssl-train's components itself (see the module's docstring)."""

    def run(self, args: argparse.Namespace) -> None:
        words = list(args.component_name_and_args)
        if words and words[0] == "--":
            words = words[1:]
        function = component_function(words[0]) if words else None
        if function is not None:
            configured = load_sections(prefix="component").get(words[0], {})
            try:
                check_component_args(words[0], function, words[1:], configured)
            except ComponentUsage as answer:
                print(answer.text, file=sys.stdout if answer.code == 0 else sys.stderr)
                sys.exit(answer.code)
        super().run(args)
