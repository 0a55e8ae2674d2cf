"""The `ssl-train` command. Subcommands grow with the stages (pretrain, finetune, ...)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import time

from ssl_train import __version__
from ssl_train.errors import UserError
from ssl_train.stages.registry import DEFAULT_PRESET, pipeline_stages


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-train", description="SimCLRv2 training at cluster scale."
    )
    parser.add_argument("--version", action="version", version=f"ssl-train {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the recipe on MNIST-5000 with a local S3 server")
    demo.add_argument("--out", default="demo-out", help="folder for results (default demo-out)")
    demo.add_argument("--workers", type=int, default=2, help="sharding processes (default 2)")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of every training stage (default 0)"
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per training process (default 1: two processes fill two cores)",
    )
    demo.add_argument(
        "--memory-size",
        type=int,
        default=None,
        help="negatives in SimCLRv2's memory during pretraining (default: the recipe's "
        "MEMORY_SIZE; 0 pretrains without the memory, as SimCLR v1 did, for comparison)",
    )
    models = sub.add_parser("models", help="list the model presets with their parameter counts")
    models.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    bench = sub.add_parser(
        "data-bench",
        help="measure the input pipeline on your data: CPU and device stages, storage reads",
        description="Run the training stream through a DataLoader for one warm-up batch and "
        "--batches timed ones; print what each stage costs, then one JSON line. First line: "
        "samples per CPU-second of the workers' processes, and the cores of this CPU one "
        "GPU needs at --steps-per-s with its share of the batch (--gpus).",
    )
    bench.add_argument(
        "--data", required=True, help="shard set: a local path or s3://bucket/prefix"
    )
    bench.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    bench.add_argument("--batches", type=int, default=10, help="timed batches (default 10)")
    bench.add_argument("--image-size", type=int, default=224)
    bench.add_argument("--global-batch-size", type=int, default=256)
    bench.add_argument("--mode", choices=("pretrain", "finetune"), default="pretrain")
    bench.add_argument(
        "--partitions",
        type=int,
        help="plan partitions (default 32, or the global batch when 32 does not divide it)",
    )
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--device", help="device of the augmentation stage (default cuda if any)")
    bench.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="GPUs of the training run (default 1): the bench runs as one of them, so each "
        "batch is global-batch-size / GPUS samples, the share one GPU's workers make",
    )
    bench.add_argument(
        "--steps-per-s",
        type=float,
        default=1.0,
        help="training steps per second one GPU runs (default 1.0; take a training run's "
        "steps/s): with the per-GPU batch it gives the CPU cores one GPU needs",
    )
    sub.add_parser("metrics", help="list every Prometheus metric (a Markdown table)")
    pipeline = sub.add_parser(
        "pipeline",
        help="pretrain, finetune on label subsets, distill: each a TorchX job, resumable",
        description="Run the SimCLRv2 recipe stage by stage as TorchX jobs. Stage run dirs "
        "are ROOT/<stage>; finished stages are skipped, an unfinished one resumes.",
    )
    pipeline.add_argument(
        "action",
        nargs="?",
        choices=["status"],
        help="status: print where the recipe in --root stands (each stage, its job, its "
        "state and progress) and submit nothing; from any machine that can read --root",
    )
    pipeline.add_argument(
        "--json", action="store_true", help="with status: the same as one JSON document"
    )
    pipeline.add_argument("-s", "--scheduler", default="local_cwd", help="TorchX scheduler")
    pipeline.add_argument(
        "-cfg",
        "--cfg",
        dest="cfg",
        default="",
        help="scheduler options, as `torchx run -cfg` takes them, e.g. queue=ssl-train",
    )
    pipeline.add_argument(
        "--data", help="training shard set URL (ImageNet: finetuning takes its --subset labels)"
    )
    pipeline.add_argument(
        "--unlabeled-data",
        metavar="URL",
        help="your own data: the unlabeled pool that pretrain and distill train on "
        "(with --labeled-data, instead of --data)",
    )
    pipeline.add_argument(
        "--labeled-data",
        metavar="URL",
        help="your own data: the labelled shard set that finetune trains on",
    )
    pipeline.add_argument(
        "--eval-data", help="shard set the finetuned and distilled models are evaluated on"
    )
    pipeline.add_argument(
        "--root", required=True, help="URL under which every stage's run dir goes"
    )
    pipeline.add_argument(
        "--subset",
        action="append",
        help="label subset (repeatable; default 1percent and 10percent with --data, none "
        "with --labeled-data: all of its labels)",
    )
    pipeline.add_argument("--preset", default=DEFAULT_PRESET, help="model to pretrain and finetune")
    pipeline.add_argument("--student", default=DEFAULT_PRESET, help="distillation student preset")
    pipeline.add_argument(
        "--supervised-baseline",
        action="store_true",
        help="also train the preset from random weights on each subset (the paper's baseline; "
        "the same as --include supervised)",
    )
    pipeline.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="STAGE",
        choices=[s.name for s in pipeline_stages() if s.in_pipeline == "optional"],
        help="also run this optional stage (repeatable): "
        + ", ".join(s.name for s in pipeline_stages() if s.in_pipeline == "optional"),
    )
    pipeline.add_argument(
        "--dryrun",
        action="store_true",
        help="build and check every stage's job and print its torchx run command; submit "
        "nothing (finished stages are still reported as skipped)",
    )
    pipeline.add_argument(
        "--follow",
        action="store_true",
        help="echo each job's progress lines (steps, loss, throughput, final top-1)",
    )
    pipeline.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="component argument or stage flag for every stage that takes it (e.g. j=2x8, "
        "image_size=224, warmup_epochs=1)",
    )
    pipeline.add_argument(
        "--stage-arg",
        action="append",
        default=[],
        metavar="STAGE:KEY=VALUE",
        help="argument for one kind of stage (pretrain, finetune, supervised, distill) or one "
        "stage by name, e.g. pretrain:epochs=100, finetune-10percent:epochs=30",
    )
    add_stage_commands(sub)
    return parser


def add_stage_commands(sub: argparse._SubParsersAction) -> None:
    """The training stages, plus evaluating and exporting their results."""
    from ssl_train.stages.flags import add_stage_parser
    from ssl_train.stages.registry import STAGES

    for stage in STAGES:
        add_stage_parser(sub, stage)
    from ssl_train.stages.flags import add_command_parser
    from ssl_train.stages.registry import EVAL

    add_command_parser(sub, EVAL)
    export = sub.add_parser(
        "export",
        help="write a run's newest checkpoint as model.safetensors + config.json",
        description="Tensors only (safetensors) and a JSON config: loading runs no code.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("out_dir", metavar="OUT_DIR")
    export.add_argument("--step", type=int, help="export this checkpoint step (default newest)")
    export.add_argument(
        "--force", action="store_true", help="replace a model OUT_DIR already holds"
    )
    imports = sub.add_parser(
        "import",
        help="an official SimCLRv2 TensorFlow checkpoint as model.safetensors + config.json",
        description=(
            "SRC: a TF1 checkpoint (folder, model.ckpt-N prefix or .index) or a TF2 "
            "checkpoint or SavedModel of google-research/simclr, local or any URL "
            "(s3://, https://). The architecture is read from its variables; no "
            "TensorFlow needed. OUT_DIR is accepted by finetune --pretrained, distill "
            "--teacher, linear-eval and eval."
        ),
    )
    imports.add_argument("src", metavar="SRC")
    imports.add_argument("out_dir", metavar="OUT_DIR")
    imports.add_argument(
        "--from-proj-layer",
        type=int,
        help="the projection-head layer the checkpoint's classifier reads (default: 0 for a "
        "whole head, as pretrained checkpoints have; the top layer of a cut head)",
    )
    imports.add_argument(
        "--force", action="store_true", help="replace a model OUT_DIR already holds"
    )


def run_pipeline_command(args: argparse.Namespace) -> None:
    """``ssl-train pipeline``: the flags as a PipelinePlan, then run it; or, with
    ``status``, where the recipe in ``--root`` stands."""
    if args.action == "status":
        from ssl_train.pipeline_state import pipeline_status, status_lines

        status = pipeline_status(args.root)
        print(json.dumps(status, indent=1) if args.json else "\n".join(status_lines(status)))
        return
    from ssl_train.pipeline import PipelinePlan, parse_assignments, run_pipeline

    per_stage: dict[str, dict[str, str]] = {}
    for item in args.stage_arg:
        stage, sep, assignment = item.partition(":")
        if not sep:
            raise UserError(f"--stage-arg {item!r}: write STAGE:KEY=VALUE")
        per_stage.setdefault(stage, {}).update(parse_assignments([assignment], "--stage-arg"))
    data, labeled = _pipeline_data(args)
    plan = PipelinePlan(
        data=data,
        labeled_data=labeled,
        root=args.root,
        subsets=args.subset or ([] if labeled else ["1percent", "10percent"]),
        eval_data=args.eval_data,
        preset=args.preset,
        student=args.student,
        common=parse_assignments(args.arg, "--arg"),
        per_stage=per_stage,
        supervised_baseline=args.supervised_baseline,
        optional=args.include,
    )
    cfg = parse_assignments([c for c in args.cfg.split(",") if c], "--cfg")
    if args.dryrun:
        from ssl_train.pipeline import dryrun_pipeline

        dryrun_pipeline(plan, args.scheduler, cfg)
        return
    started = time.monotonic()
    from ssl_train.stages.progress import text_of

    follow = (
        (lambda stage, line: print(f"[{stage}] {text_of(line)}", flush=True))
        if args.follow
        else None
    )
    ran = run_pipeline(plan, args.scheduler, cfg, follow)
    print(
        f"[pipeline] all stages finished ({len(ran)} run now) in {time.monotonic() - started:.0f} s"
    )


def _pipeline_data(args: argparse.Namespace) -> tuple[str, str | None]:
    """(what pretrain and distill train on, the labelled set or None) from the two forms
    the pipeline takes: ImageNet's ``--data`` with label subsets, or your own data's
    unlabeled pool and labelled set."""
    own = args.unlabeled_data or args.labeled_data
    if args.data and own:
        raise UserError(
            "pass either --data (a labelled set and its --subset lists) or "
            "--unlabeled-data with --labeled-data, not both"
        )
    if own and not (args.unlabeled_data and args.labeled_data):
        missing = "--labeled-data" if args.unlabeled_data else "--unlabeled-data"
        raise UserError(
            f"your own data needs both sets: add {missing} (pretrain and distill take the "
            "unlabeled pool, finetune the labelled set)"
        )
    if not args.data and not own:
        raise UserError("pass --data, or --unlabeled-data with --labeled-data")
    return (args.unlabeled_data, args.labeled_data) if own else (args.data, None)


def list_models(as_json: bool) -> None:
    """Print every preset with its backbone size, described on the meta device (no memory).

    Example:
        >>> list_models(as_json=False)  # doctest: +SKIP
        preset          depth width SK  params(M) +BN stats(M) paper(M)
        r50_1x_sk0         50     1 no      23.51        23.56       24
    """
    import json

    from ssl_train.models import PRESETS, count_weights

    if not as_json:
        print(
            f"{'preset':15} {'depth':>5} {'width':>5} {'SK':3} {'params(M)':>10} {'+BN stats(M)':>12} {'paper(M)':>8}"
        )
    for preset in PRESETS.values():
        params, with_stats = count_weights(preset.backbone("meta"))
        row = {
            "preset": preset.name,
            "depth": preset.depth,
            "width_multiplier": preset.width_multiplier,
            "sk": preset.sk,
            "small_images": preset.small_images,
            "backbone_params": params,
            "backbone_params_with_bn_stats": with_stats,
            "paper_millions": preset.paper_millions,
        }
        if as_json:
            print(json.dumps(row))
            continue
        paper = "" if preset.paper_millions is None else str(preset.paper_millions)
        print(
            f"{preset.name:15} {preset.depth:>5} {preset.width_multiplier:>5g} {'yes' if preset.sk else 'no':3} "
            f"{params / 1e6:>10.2f} {with_stats / 1e6:>12.2f} {paper:>8}"
            + (f"  {preset.note}" if preset.note else "")
        )
    if not as_json:
        print(
            "paper(M) is Table 1 of SimCLRv2, which counts BN moving statistics too (Keras count_params)."
        )


def print_result(result: dict) -> None:
    """Print a command's result as one JSON line, once per job.

    Under torchrun every rank finishes with the same result, and all ranks share one
    stdout: only rank 0 prints, and in a single write, so that the line cannot be split
    by another process's output (Python writes a printed text and its newline
    separately when stdout is unbuffered).

    Example:
        >>> print_result({"finished": True})
        {"finished": true}
    """
    if os.environ.get("RANK", "0") != "0":
        return
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def record_error(message: str) -> None:
    """Leave a user error where TorchX and torchrun look for a process's error: the JSON
    file named by ``TORCHELASTIC_ERROR_FILE`` (torchrun sets it per rank, TorchX's
    schedulers per replica). ``torchx status`` then shows this line as the job's error
    instead of an exit code.

    Example:
        >>> record_error("--data s3://b/x: no manifest")  # no-op outside a job
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    body = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as file:
            json.dump(body, file)
    except OSError:
        pass  # the message is on stderr already


def main(argv: list[str] | None = None) -> None:
    """Console entry point.

    Example:
        >>> main(["demo", "--out", "demo-out"])  # doctest: +SKIP
    """
    from ssl_train.errors import USER_ERRORS
    from ssl_train.stages.loop import Preempted
    from ssl_train.stages.registry import STAGES

    args = build_parser().parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: where is this rank stuck?
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for chatty in ("botocore", "aiobotocore"):  # "found credentials in ..." on every client
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        if args.command in STAGES:
            from ssl_train.stages.flags import config_from_args
            from ssl_train.stages.loop import run_stage
            from ssl_train.stages.preflight import check_stage

            config = config_from_args(args.command, args)
            print_result(check_stage(config) if args.check_only else run_stage(config))
        elif args.command == "eval":
            from ssl_train.stages.commands import evaluate_run

            print_result(evaluate_run(args))
        elif args.command == "import":
            from ssl_train.checkpoint_import.importer import import_checkpoint

            print_result(
                import_checkpoint(args.src, args.out_dir, args.from_proj_layer, args.force)
            )
        elif args.command == "export":
            from ssl_train.stages.commands import export_run

            export_run(args.run_dir, args.out_dir, args.step, args.force)
        elif args.command == "demo":
            from ssl_train.demo import run_demo

            sys.exit(run_demo(args.out, args.workers, args.seed, args.threads, args.memory_size))
        elif args.command == "pipeline":
            run_pipeline_command(args)
        elif args.command == "metrics":
            from ssl_train.metrics import markdown_table

            print(markdown_table())
        elif args.command == "models":
            list_models(args.json)
        elif args.command == "data-bench":
            from ssl_train.data.bench import main as data_bench

            data_bench(args)
    except Preempted as exc:
        print(f"ssl-train: {exc}; the checkpoint is saved, run again to resume", file=sys.stderr)
        sys.exit(exc.exit_code)
    except USER_ERRORS as exc:  # anything else is a bug: its traceback stays
        print(f"ssl-train: error: {exc}", file=sys.stderr)
        record_error(str(exc))
        sys.exit(2)
    except KeyboardInterrupt:
        print("ssl-train: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `ssl-train metrics | head`
        from shards.cli import stdout_closed

        stdout_closed()


if __name__ == "__main__":
    main()
