"""Command-line flags of the training stages, derived from their declarations
(``ssl_train.stages.registry``): one flag per ``StageConfig`` field, its help ending with
the stage's default, so ``ssl-train pretrain --help`` documents the recipe."""

from __future__ import annotations

import argparse
from typing import Any

from ssl_train.stages import registry
from ssl_train.stages.config import StageConfig, field_kind, flag_help, flag_text, stage_default


def add_stage_parser(sub: argparse._SubParsersAction, stage: str) -> argparse.ArgumentParser:
    """One subcommand whose flags fill a ``StageConfig``.

    Example:
        >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers(dest="command")
        >>> _ = add_stage_parser(sub, "pretrain")
        >>> parser.parse_args(["pretrain", "--data", "d", "--run-dir", "r", "--no-compile"]).compile
        False
    """
    spec = registry.stage(stage)
    # argparse %-formats help strings (not descriptions): "1% or 10%" must be escaped there
    parser = sub.add_parser(stage, help=spec.summary.replace("%", "%%"), description=spec.summary)
    required = spec.required | {"data", "run_dir"}
    for flag in spec.all_flags:
        _add_flag(parser, spec, flag, flag.field in required)
    parser.add_argument(
        "--check-only",
        action="store_true",
        help="check the flags, data, models it starts from and run dir, then exit without "
        "training (what a TorchX job runs once per node before torchrun, so that an error "
        "no restart can fix is reported once)",
    )
    return parser


def config_from_args(stage: str, args: argparse.Namespace) -> StageConfig:
    """The run's configuration from parsed flags (unset flags take the stage's defaults).

    Example:
        >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers(dest="command")
        >>> _ = add_stage_parser(sub, "finetune")
        >>> args = parser.parse_args(["finetune", "--data", "d", "--run-dir", "r", "--pretrained", "p"])
        >>> config_from_args("finetune", args).learning_rate
        0.005
    """
    spec = registry.stage(stage)
    values = {flag.field: getattr(args, flag.field) for flag in spec.all_flags}
    return StageConfig.for_stage(stage, **values)


def parse_stage_argv(argv: list[str]) -> StageConfig:
    """``ssl-train STAGE FLAGS...`` as the configuration the command would run, parsed
    by that stage's own parser (a job's arguments are checked this way before it is
    submitted, without the rest of the CLI).

    Example:
        >>> parse_stage_argv(["pretrain", "--data", "d", "--run-dir", "r"]).temperature
        0.1
    """
    parser = argparse.ArgumentParser(prog="ssl-train")
    add_stage_parser(parser.add_subparsers(dest="command", required=True), argv[0])
    return config_from_args(argv[0], parser.parse_args(argv))


def add_command_parser(
    sub: argparse._SubParsersAction, spec: registry.CommandSpec
) -> argparse.ArgumentParser:
    """The subcommand of a command declared like a stage (``eval``): RUN_DIR, then its
    flags, each with its field's kind and help and the command's default.

    Example:
        >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers(dest="command")
        >>> _ = add_command_parser(sub, registry.EVAL)
        >>> args = parser.parse_args(["eval", "runs/ft", "--data", "d"])
        >>> args.run_dir, args.eval_batch_size, args.image_size, args.workers
        ('runs/ft', 256, None, 4)
    """
    parser = sub.add_parser(spec.name, help=spec.summary, description=spec.description)
    parser.add_argument(spec.run_dir.field, metavar="RUN_DIR", help=flag_text(spec.run_dir))
    for flag in spec.flags:
        _add_flag(parser, spec, flag, flag.field in spec.required, stage_default(spec, flag.field))
    return parser


def _add_flag(
    parser: argparse.ArgumentParser,
    spec: registry.StageSpec | registry.CommandSpec,
    flag: registry.Flag,
    required: bool,
    default: Any = None,
) -> None:
    """One flag as its field declares it: its kind (a bool is a --x/--no-x switch) and
    its help ending with the default; older spellings too."""
    # argparse %-formats help strings (not descriptions): "1% or 10%" must be escaped there
    text = flag_help(spec, flag).replace("%", "%%")
    names = (flag.flag, *flag.aliases)
    kind = field_kind(flag.field)
    if kind is bool:
        parser.add_argument(
            *names, dest=flag.field, action=argparse.BooleanOptionalAction, default=default,
            help=text,
        )  # fmt: skip
    else:
        parser.add_argument(
            *names, dest=flag.field, type=kind, required=required, default=default, help=text
        )
