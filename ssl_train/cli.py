"""The `ssl-train` command. Subcommands grow with the stages (pretrain, finetune, ...)."""

from __future__ import annotations

import argparse
import sys

from ssl_train import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-train", description="SimCLRv2 training at cluster scale."
    )
    parser.add_argument("--version", action="version", version=f"ssl-train {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the recipe on MNIST-5000 with a local S3 server")
    demo.add_argument("--out", default="demo-out", help="folder for results (default demo-out)")
    demo.add_argument("--workers", type=int, default=2)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Console entry point.

    Example:
        >>> main(["demo", "--out", "demo-out"])  # doctest: +SKIP
    """
    from shards.errors import ShardsError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from ssl_train.demo import run_demo

            run_demo(args.out, workers=args.workers)
    except ShardsError as exc:
        print(f"ssl-train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("ssl-train: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
