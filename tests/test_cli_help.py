"""Every command's `--help` works: it is the first thing a new user runs, and argparse
only formats a help string (where a bare `%` breaks it) when someone asks for it."""

from __future__ import annotations

import argparse

import pytest

from shards.cli import build_parser as shards_parser
from ssl_train.cli import build_parser as ssl_train_parser


def _every_parser(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _every_parser(sub, (*path, name))


def _cases():
    for tool, build in (("ssl-train", ssl_train_parser), ("shards", shards_parser)):
        for path, _ in _every_parser(build()):
            yield pytest.param(build, path, id=" ".join((tool, *path)))


@pytest.mark.parametrize(("build", "path"), list(_cases()))
def test_help_of_every_command_prints_and_exits_0(build, path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        build().parse_args([*path, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    if not path:  # the top level lists every subcommand with its help line
        (subparsers,) = [a for a in build()._actions if isinstance(a, argparse._SubParsersAction)]
        assert all(name in out for name in subparsers.choices)


def test_the_same_things_have_the_same_names(capsys) -> None:
    """`shards create SRC DEST` and `shards copy SRC DEST`; `--eval-batch-size` in `eval`
    as in the stages (its old `--batch-size` still works)."""
    for command in ("create", "copy"):
        with pytest.raises(SystemExit):
            shards_parser().parse_args([command, "--help"])
        assert "SRC DEST" in capsys.readouterr().out.split("\n\n")[0]
    parser = ssl_train_parser()
    eval_args = ["eval", "r", "--data", "d"]
    assert parser.parse_args([*eval_args, "--eval-batch-size", "8"]).eval_batch_size == 8
    assert parser.parse_args([*eval_args, "--batch-size", "8"]).eval_batch_size == 8
