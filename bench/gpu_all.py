#!/usr/bin/env python
"""Every GPU measurement and check of the project in one run on one GPU, within 8 minutes.

Run from the repository root on a machine with a CUDA GPU (one H100 or H200 is enough;
estimated 4-6 minutes on an H100 with the defaults, warned about above 480 s;
``--compile`` adds the compiled step pair, a few minutes more, beyond that budget):

    .venv/bin/python bench/gpu_all.py

Then copy the printed tables, the verdict lines and the last line (one JSON object naming
the card, with every figure) into BENCHMARKS.md. Exit status 0 when every part ran and
every check passed, 1 otherwise. Without CUDA it stops with a message (exit 2), unless
--allow-cpu: a smoke run with tiny sizes that checks the script end to end
(``tests/test_gpu_bench.py`` runs it, about 25 s on two cores; its figures are not GPU
figures):

    .venv/bin/python bench/gpu_all.py --allow-cpu --preset tiny --precision fp32 \\
        --image-size 32 --pairs 4 --steps 2 --warmup 1 --repeats 1 \\
        --decode-images 4 --decode-samples 16 --cpu-samples 4 --ranks-batch 4 \\
        --pretrain-preset tiny --pretrain-image-size 32 --pretrain-batch 8 \\
        --pretrain-memory 24 --pretrain-steps 4 --pretrain-workers 1 --pixels-images 3 \\
        --tests tests/test_device_decode.py

The six parts, in this order, each timed (stderr: ``[part] ...``, ``[part] N s``); one that
fails is reported and the others still run. Times are estimates for an H100 with the
defaults (no GPU had been lent when they were written: the first run replaces them):

  step           (~60-90 s) ``bench/gpu_step.py``'s comparison (its code, its flags): the
                 real SimCLR ``Trainer._step`` (r50_1x_sk0, 128 pairs at 224 px, bf16,
                 channels_last) against a supervised ResNet-50 step on the same GPU.
                 Prints its table: s/step, pairs/s, images/s, ratio, PASS/FAIL on the
                 0.45 target.
  decode         (~20-40 s) ``--decode gpu``'s decode: batches of --pairs two-view samples
                 of 500x375 photo-like JPEGs (--decode-images distinct ones, each drawn with
                 new crops under new keys) as the workers ship them
                 (``stream.encode_samples``, pinned as the DataLoader pins them), decoded,
                 cropped and resized to --image-size on the GPU by
                 ``device_decode.BatchDecoder`` (one batched nvJPEG call per batch);
                 two-view samples per second of GPU wall time, between
                 ``torch.cuda.synchronize()`` calls, after 2 warm-up batches. Against it,
                 in the same run, the CPU path a DataLoader worker runs
                 (``decode.two_views``): two-view samples per CPU-second of this process,
                 one core. Also what the workers still spend per sample with --decode gpu
                 (header and crop boxes), the training process's CPU-seconds per sample
                 while the GPU decodes, and the decode's share of a SimCLR step at the same
                 batch (from part 1). Prints its table.
  ranks          (~20-40 s) the multi-rank code paths, which no single-process part takes:
                 ``bench/gpu_ranks.py`` starts two processes that both use cuda:0, in a
                 gloo process group (NCCL refuses two ranks on one device; gloo takes CUDA
                 tensors; MASTER_ADDR 127.0.0.1, a free port), and compares on CUDA
                 tensors, --ranks-batch samples per rank, with one process on the whole
                 batch: global batch norm (``convert_to_global_bn`` of a BatchNorm2d:
                 output, running statistics, input/weight/bias gradients; float32, and
                 bf16 input under bf16 autocast), ``nt_xent`` over ``gather_with_grad``
                 without and with memory negatives (mean loss over the ranks, gradient / 2
                 as DDP averages it), and ``ContrastiveMemory`` of the tiny model after two
                 pushes of each rank's share (buffer, fill and position; identical on both
                 ranks). Figures: max |difference| / max |one-process value|; tolerances
                 float32 1e-4, bf16 2e-2 (output, input gradient) and 1e-3 (statistics,
                 weight and bias gradients). A tensor on the wrong device fails with its
                 message.
  memory         (~40-90 s) a real pretraining run with SimCLRv2's memory on this device:
                 ``ssl-train pretrain --preset r50_1x_sk0 --memory-size 1024
                 --global-batch-size 64 --image-size 64 --max-steps 20 --precision bf16
                 --workers 8`` in a child process, on a throwaway shard set of 1,280
                 synthetic 64x48 JPEGs (``bench/gpu_step.make_shard_set``: ``shards
                 create``); 20 steps of 128 entries wrap the 1024-entry buffer. PASS when it
                 exits 0 at step 20 with every logged loss finite. Figures: first and last
                 loss, samples/s as the run logs it (whole run, start-up included) and from
                 the log's timestamps after step 5.
  decode-pixels  (~10-20 s) ``--decode gpu``'s pixels: ``BatchDecoder`` on cuda (nvJPEG)
                 against the CPU path (``decode.two_views``) for the same JPEG bytes and
                 crop boxes, --pixels-images 500x375 photo-like JPEGs x 2 views at 224 and
                 32 px, with the rule and tolerances of ``tests/test_device_decode.py``
                 (read from its source): mean absolute difference per view, over the
                 batch, and of each view against a full-resolution PIL decode and box
                 resize, each within the test's tolerance plus its nvJPEG allowance. Also
                 the largest single-pixel difference (no tolerance: reported).
  tests          (~60-120 s) ``pytest -m gpu`` on --tests (default: the whole suite), in a
                 child process after the measurements: the GPU variants of the
                 device-decode tests and a stage trained with ``--decode gpu``. Skipped
                 tests (no CUDA) are reported.

Each of ranks, memory and decode-pixels prints one verdict line after the tables, with
its key figures (an exception in the part is ``FAIL part: Error: message``):

    PASS ranks: 2 ranks on cuda:0 (gloo), 64 samples each: global BN max rel diff fp32 ...
    PASS memory: ssl-train pretrain --preset r50_1x_sk0 --memory-size 1024 on cuda (bf16) ...
    PASS decode-pixels: BatchDecoder on cuda (nvJPEG) against the CPU path, 64 JPEGs ...

Expected on a GPU: the step table (ratio against the 0.45 target), the decode table, the
three lines PASS (on CPU tensors the smoke run measured relative differences of 3e-7 for
float32 batch norm, 4e-3 (one bf16 rounding) for bf16, 2e-7 for NT-Xent and 3e-6 for the
memory's buffer; decode-pixels' means near the tests' measured 0.18 at 224 px and 1.4 at
32 px, plus nvJPEG's chroma difference), ``GPU tests: 7 passed`` and the total, under
480 s.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import io
import json
import math
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gpu_ranks  # bench/gpu_ranks.py (scripts run from bench/)
import gpu_step  # bench/gpu_step.py
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
SSL_TRAIN = Path(sys.executable).with_name("ssl-train")
BUDGET_S = 480  # the whole run on one H100
RANKS_TIMEOUT_S = 180
MEMORY_TIMEOUT_S = 300
WIDTH, HEIGHT = 500, 375  # a typical ImageNet photo
SMOKE_FLAGS = (
    "--preset tiny --precision fp32 --image-size 32 --pairs 4 --steps 2 --warmup 1 --repeats 1 "
    "--decode-images 4 --decode-samples 16 --cpu-samples 4 --ranks-batch 4 "
    "--pretrain-preset tiny --pretrain-image-size 32 --pretrain-batch 8 --pretrain-memory 24 "
    "--pretrain-steps 4 --pretrain-workers 1 --pixels-images 3 --tests tests/test_device_decode.py"
)
NEW_PARTS = ("ranks", "memory", "decode-pixels")  # each prints a PASS/FAIL/SKIP line


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_decode(args: argparse.Namespace, step: dict[str, Any] | None) -> dict[str, Any]:
    """Part 2: the GPU decode path against the CPU path, on the same JPEGs."""
    from shards.images import encode_jpeg
    from shards.reader import Sample
    from shards.synthetic import photo_like
    from ssl_train.data import decode
    from ssl_train.data.device_decode import BatchDecoder
    from ssl_train.data.stream import encode_samples

    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    jpegs = [encode_jpeg(photo_like(rng, WIDTH, HEIGHT)) for _ in range(args.decode_images)]
    samples = [
        Sample(f"n01440764_{n}", 0, jpegs[n % len(jpegs)]) for n in range(args.decode_samples)
    ]
    batch = args.pairs
    chunks = [samples[i : i + batch] for i in range(0, len(samples) - batch + 1, batch)]
    if len(chunks) < 3:
        raise SystemExit(f"--decode-samples must hold at least 3 batches of --pairs ({3 * batch})")

    # what the workers still do with --decode gpu: read headers, draw boxes, pack bytes
    cpu_start = time.process_time()
    encoded = [encode_samples(chunk, 2, seed=0, epoch=0, step=n) for n, chunk in enumerate(chunks)]
    worker_cpu_s = time.process_time() - cpu_start
    if device.type == "cuda":  # the DataLoader pins batches bound for a GPU
        encoded = [b._replace(data=b.data.pin_memory()) for b in encoded]

    decoder = BatchDecoder(device, args.image_size)
    for warm in encoded[:2]:
        decoder(warm)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = encoded[2:]
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for one in timed:
        views = decoder(one).views
    _sync(device)
    wall = time.perf_counter() - wall_start
    main_cpu = time.process_time() - cpu_start
    assert views.shape == (2, batch, 3, args.image_size, args.image_size)
    decoded = len(timed) * batch

    # the CPU path a DataLoader worker runs, on the same JPEGs: CPU-seconds of one core
    cpu_start = time.process_time()
    for sample in samples[: args.cpu_samples]:
        decode.two_views(sample.jpeg, sample.key, args.image_size, seed=0, epoch=0)
    cpu_path_s = time.process_time() - cpu_start

    gpu_rate = decoded / wall
    cpu_rate = args.cpu_samples / cpu_path_s
    result: dict[str, Any] = {
        "jpeg": f"{WIDTH}x{HEIGHT} photo-like, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB",
        "batch": batch,
        "image_size": args.image_size,
        "samples_timed": decoded,
        "gpu_two_view_samples_per_s": round(gpu_rate, 1),
        "gpu_s_per_batch": round(wall / len(timed), 5),
        "training_process_cpu_s_per_sample": round(main_cpu / decoded, 6),
        "cpu_path_two_view_samples_per_cpu_s": round(cpu_rate, 1),
        "cpu_cores_matched": round(gpu_rate / cpu_rate, 1),
        "worker_cpu_s_per_sample_with_decode_gpu": round(worker_cpu_s / (len(chunks) * batch), 6),
    }
    simclr = (step or {}).get("eager", {}).get("simclr")
    if simclr:
        result["decode_share_of_simclr_step"] = round(
            result["gpu_s_per_batch"] / simclr["s_per_step"], 4
        )
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return result


def run_gpu_tests(args: argparse.Namespace) -> dict[str, Any]:
    """Part 3: the tests marked gpu, in a child process (a clean CUDA context)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the child the memory this process cached
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    command += args.tests
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    counts = {
        word: int(number)
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", summary)
    }
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
    return {
        "command": " ".join(["python", *command[1:]]),
        "returncode": proc.returncode,
        "summary": summary.strip("= "),
        "counts": counts,
    }


# --- the checks of what the single-process benchmarks skip (issue 29) ----------------------


def check_ranks(args: argparse.Namespace) -> dict[str, Any]:
    """Part ``ranks``: two processes on the one GPU (gloo), ``bench/gpu_ranks.py``."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the two ranks the memory this process cached
    device = "cuda:0" if args.device == "cuda" else "cpu"
    return gpu_ranks.run_ranks(device, args.ranks_batch, timeout_s=RANKS_TIMEOUT_S)


_STEP_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})?.*\[ssl-train pretrain\] step "
    r"(?P<step>\d+)/(?P<total>\d+) .*?loss (?P<loss>\S+) .* (?P<rate>\S+) samples/s"
)


def _step_lines(log: str) -> list[dict[str, Any]]:
    """The progress lines of a pretraining log: step, loss, samples/s, time (if logged)."""
    found = []
    for line in log.splitlines():
        match = _STEP_LINE.search(line)
        if match:
            stamp = match["time"]
            found.append(
                {
                    "step": int(match["step"]),
                    "total": int(match["total"]),
                    "loss": float(match["loss"]),
                    "rate": float(match["rate"]),
                    "time": stamp
                    and datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp(),
                }
            )
    return found


def check_memory_run(args: argparse.Namespace) -> dict[str, Any]:
    """Part ``memory``: ``ssl-train pretrain`` with SimCLRv2's memory on, on this device,
    in a child process, on a throwaway shard set; PASS when it exits 0 at its last step
    with every logged loss finite."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    batch, steps, entries = args.pretrain_batch, args.pretrain_steps, args.pretrain_memory
    with tempfile.TemporaryDirectory(prefix="gpu-memory-") as tmp:
        root = Path(tmp)
        # an epoch must hold more samples than the memory (the trainer refuses otherwise)
        samples = max(steps * batch, entries + 2 * batch)
        data = gpu_step.make_shard_set(root, samples)
        run_dir = root / "run"
        command = [
            str(SSL_TRAIN), "pretrain", "--data", data, "--run-dir", str(run_dir),
            "--preset", args.pretrain_preset, "--memory-size", str(entries),
            "--global-batch-size", str(batch), "--image-size", str(args.pretrain_image_size),
            "--max-steps", str(steps), "--log-every-steps", "1",
            "--workers", str(args.pretrain_workers), "--device", args.device,
            "--precision", args.precision, "--metrics-port", "0",
        ]  # fmt: skip
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                command, cwd=root, capture_output=True, text=True, timeout=MEMORY_TIMEOUT_S
            )
            returncode, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            returncode = None
            log = "".join(
                part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                for part in (exc.stdout, exc.stderr)
            )
        wall = time.perf_counter() - started
        config_path = run_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
    lines = _step_lines(log)
    last = lines[-1] if lines else None
    losses = [line["loss"] for line in lines]
    problems = []
    if returncode != 0:
        tail = gpu_ranks._last_error_line(log)
        if returncode is None:
            problems.append(f"killed after {MEMORY_TIMEOUT_S} s")
        else:
            problems.append(f"exit {returncode}: {tail}")
        print(log[-6000:], file=sys.stderr)
    if last is None or last["step"] != steps:
        problems.append(f"reached step {last['step'] if last else 0} of {steps}")
    if not all(math.isfinite(loss) for loss in losses):
        problems.append(f"a loss is not finite: {losses}")
    if config and config.get("memory_size") != entries:
        problems.append(f"the run's memory_size is {config.get('memory_size')}, not {entries}")
    # steady rate from the log's timestamps, after the first steps (start-up, autotuning)
    steady = None
    first = next((line for line in lines if line["step"] >= min(5, steps // 2)), None)
    if first and last and first["time"] and last["time"] and last["time"] > first["time"]:
        steady = (last["step"] - first["step"]) * batch / (last["time"] - first["time"])
    result: dict[str, Any] = {
        "verdict": "FAIL" if problems else "PASS",
        "command": " ".join(["ssl-train", *command[1:]]),
        "returncode": returncode,
        "steps": last["step"] if last else 0,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "samples_per_s_logged": last["rate"] if last else None,
        "samples_per_s_after_start": round(steady, 1) if steady else None,
        "wall_s": round(wall, 1),
        "memory_wraps": steps * 2 * batch > entries,
    }
    summary = (
        f"ssl-train pretrain --preset {args.pretrain_preset} --memory-size {entries} on "
        f"{args.device} ({args.precision}), {batch} x {args.pretrain_image_size} px: "
        f"step {result['steps']}/{steps}, loss {result['first_loss']} -> {result['last_loss']}, "
        f"{result['samples_per_s_logged']} samples/s as logged (whole run)"
    )
    if steady:
        summary += f", {steady:.1f} from step {first['step']}"
    summary += f", {wall:.0f} s with start-up"
    if problems:
        summary += " -- " + "; ".join(problems)
    result["summary"] = summary
    return result


def _test_tolerances() -> dict[str, Any]:
    """The pixel tolerances ``tests/test_device_decode.py`` compares the two paths with,
    read from its source (one definition: they follow the tests when the tests change)."""
    wanted = {"BATCH_TOLERANCE", "VIEW_TOLERANCE", "EXACT_TOLERANCE", "NVJPEG_ALLOWANCE"}
    tree = ast.parse((REPO / "tests" / "test_device_decode.py").read_text())
    found = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in wanted
    }
    if set(found) != wanted:
        raise LookupError(f"tests/test_device_decode.py no longer defines {wanted - set(found)}")
    return found


def check_decode_pixels(args: argparse.Namespace) -> dict[str, Any]:
    """Part ``decode-pixels``: ``BatchDecoder`` on this device against the CPU path
    (``decode.two_views``) and a full-resolution PIL decode and box resize, on the same
    JPEG bytes and crop boxes, with the rule and tolerances of the tests."""
    from PIL import Image

    from shards.images import encode_jpeg
    from shards.reader import Sample
    from shards.synthetic import photo_like
    from ssl_train.data import decode
    from ssl_train.data.device_decode import BatchDecoder
    from ssl_train.data.stream import encode_samples

    tolerances = _test_tolerances()
    rng = np.random.default_rng(1)
    samples = [
        Sample(f"n01440764_{n}", n % 3, encode_jpeg(photo_like(rng, WIDTH, HEIGHT)))
        for n in range(args.pixels_images)
    ]
    on_gpu = args.device == "cuda"
    sizes: dict[str, Any] = {}
    problems: list[str] = []
    for size in (224, 32):  # the two sizes the tests have tolerances for
        slack = tolerances["NVJPEG_ALLOWANCE"][size] if on_gpu else 0.0
        view_tolerance = tolerances["VIEW_TOLERANCE"][size] + slack
        batch_tolerance = tolerances["BATCH_TOLERANCE"][size] + slack
        exact_tolerance = tolerances["EXACT_TOLERANCE"] + slack
        encoded = encode_samples(samples, 2, seed=0, epoch=0, step=0)
        local = BatchDecoder(args.device, size)(encoded)
        if local.corrupt or local.keys != [s.key for s in samples]:
            problems.append(f"{size} px: samples lost or reordered ({local.corrupt})")
            continue
        ours_all = local.views.permute(1, 0, 3, 4, 2).cpu().numpy().astype(np.float32)
        means, exact, largest = [], [], 0.0
        for slot, sample in enumerate(samples):
            ours = ours_all[slot]  # (2, S, S, 3)
            theirs = decode.two_views(sample.jpeg, sample.key, size, seed=0, epoch=0)
            difference = np.abs(ours - theirs.astype(np.float32))
            means += [float(view.mean()) for view in difference]
            largest = max(largest, float(difference.max()))
            full = Image.open(io.BytesIO(sample.jpeg)).convert("RGB")
            boxes = decode.crop_boxes(decode.image_size(sample.jpeg), sample.key, 0, 0, 2)
            for view, (left, top, w, h) in enumerate(boxes):
                box = (left, top, left + w, top + h)
                reference = np.asarray(full.resize((size, size), Image.BILINEAR, box=box))
                exact.append(float(np.abs(ours[view] - reference.astype(np.float32)).mean()))
        figures = {
            "batch_mean_abs": round(float(np.mean(means)), 4),
            "worst_view_mean_abs": round(max(means), 4),
            "max_abs_pixel": largest,
            "worst_view_vs_full_decode": round(max(exact), 4),
            "tolerance_batch": batch_tolerance,
            "tolerance_view": view_tolerance,
            "tolerance_full_decode": exact_tolerance,
        }
        sizes[str(size)] = figures
        if figures["batch_mean_abs"] > batch_tolerance:
            problems.append(f"{size} px batch mean {figures['batch_mean_abs']} > {batch_tolerance}")
        if figures["worst_view_mean_abs"] > view_tolerance:
            problems.append(
                f"{size} px worst view {figures['worst_view_mean_abs']} > {view_tolerance}"
            )
        if figures["worst_view_vs_full_decode"] > exact_tolerance:
            problems.append(
                f"{size} px worst view against the full decode "
                f"{figures['worst_view_vs_full_decode']} > {exact_tolerance}"
            )
    decoder = "nvJPEG" if on_gpu else "libjpeg-turbo: CPU smoke run"
    parts = [
        f"{size} px: mean {f['batch_mean_abs']} (tol {f['tolerance_batch']:g}), worst view "
        f"{f['worst_view_mean_abs']} (tol {f['tolerance_view']:g}), max pixel "
        f"{f['max_abs_pixel']:.0f}/255, vs full decode {f['worst_view_vs_full_decode']} "
        f"(tol {f['tolerance_full_decode']:g})"
        for size, f in sizes.items()
    ]
    summary = (
        f"BatchDecoder on {args.device} ({decoder}) against the CPU path, {len(samples)} "
        f"JPEGs x 2 views, mean abs difference on 0-255: " + "; ".join(parts)
    )
    if problems:
        summary += " -- " + "; ".join(problems)
    return {
        "verdict": "FAIL" if problems else "PASS",
        "summary": summary,
        "images": len(samples),
        "decoder": decoder,
        "sizes": sizes,
    }


def timed_part(name: str, run: Callable[[], Any], report: dict[str, Any]) -> Any:
    """Run one part; record its seconds and result, or its error (the others still run)."""
    print(f"[{name}] ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        result = run()
    except Exception as exc:  # any failure: report it and go on to the next part
        traceback.print_exc()
        result = None
        report["errors"][name] = f"{type(exc).__name__}: {exc}"
    report["seconds"][name] = round(time.perf_counter() - start, 1)
    report["results"][name] = result
    print(f"[{name}] {report['seconds'][name]} s", file=sys.stderr, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu_step.add_arguments(parser)
    parser.add_argument("--decode-images", type=int, default=256, help="distinct JPEGs")
    parser.add_argument(
        "--decode-samples", type=int, default=4096, help="two-view samples decoded on the GPU"
    )
    parser.add_argument(
        "--cpu-samples", type=int, default=300, help="two-view samples through the CPU path"
    )
    parser.add_argument(
        "--ranks-batch", type=int, default=64, help="ranks: samples per rank of each check"
    )
    parser.add_argument("--pretrain-preset", default="r50_1x_sk0", help="memory: the preset")
    parser.add_argument("--pretrain-image-size", type=int, default=64, help="memory: crop side")
    parser.add_argument("--pretrain-batch", type=int, default=64, help="memory: global batch")
    parser.add_argument(
        "--pretrain-memory", type=int, default=1024, help="memory: --memory-size of the run"
    )
    parser.add_argument("--pretrain-steps", type=int, default=20, help="memory: --max-steps")
    parser.add_argument("--pretrain-workers", type=int, default=8, help="memory: --workers")
    parser.add_argument(
        "--pixels-images", type=int, default=64, help="decode-pixels: 500x375 JPEGs compared"
    )
    parser.add_argument(
        "--tests", nargs="+", default=["tests"], help="test paths for pytest -m gpu"
    )
    args = parser.parse_args()
    device_name = gpu_step.choose_device(args, "gpu_all.py", SMOKE_FLAGS)
    if device_name is None:
        return 2

    began = time.perf_counter()
    report: dict[str, Any] = {"seconds": {}, "results": {}, "errors": {}}
    step = timed_part("step", lambda: gpu_step.run_steps(args), report)
    decode_result = timed_part("decode", lambda: measure_decode(args, step), report)
    timed_part("ranks", lambda: check_ranks(args), report)
    timed_part("memory", lambda: check_memory_run(args), report)
    timed_part("decode-pixels", lambda: check_decode_pixels(args), report)
    tests = timed_part("tests", lambda: run_gpu_tests(args), report)
    total = round(time.perf_counter() - began, 1)
    report["seconds"]["total"] = total

    print()
    if step:
        gpu_step.print_table(args, device_name, step)
        print()
    if decode_result:
        d = decode_result
        print(
            f"decode on {device_name}: {d['jpeg']}, batches of {d['batch']} two-view samples "
            f"at {d['image_size']} px"
        )
        print("| path | two-view samples/s | per | other CPU per sample |")
        print("|---|---:|---|---|")
        decoder = "nvJPEG" if args.device == "cuda" else "libjpeg on the CPU: smoke run"
        print(
            f"| --decode gpu ({decoder}, batched) | {d['gpu_two_view_samples_per_s']} | second "
            f"of device wall time ({d['gpu_s_per_batch']} s/batch) | workers "
            f"{d['worker_cpu_s_per_sample_with_decode_gpu'] * 1e3:.3f} ms, training process "
            f"{d['training_process_cpu_s_per_sample'] * 1e3:.3f} ms |"
        )
        print(
            f"| --decode cpu (PIL, reduced DCT scale) | "
            f"{d['cpu_path_two_view_samples_per_cpu_s']} | CPU-second (one worker core) | - |"
        )
        share = d.get("decode_share_of_simclr_step")
        print(
            f"one GPU decodes as fast as {d['cpu_cores_matched']} worker cores"
            + (f"; the decode adds {share:.1%} to a SimCLR step of the same batch" if share else "")
        )
        print()
    report["verdicts"] = {}
    for name in NEW_PARTS:
        result = report["results"][name]
        if result is None:  # it raised: the error is its figure
            line = f"FAIL {name}: {report['errors'][name]}"
        else:
            line = f"{result['verdict']} {name}: {result['summary']}"
        report["verdicts"][name] = line.split(" ", 1)[0]
        print(line)
    print()
    if tests:
        print(f"GPU tests: {tests['summary']} (exit {tests['returncode']})")
    print(f"total {total} s" + (f" - OVER the {BUDGET_S} s budget" if total > BUDGET_S else ""))
    if total > BUDGET_S:
        print(f"warning: the run took {total} s, over its {BUDGET_S} s budget", file=sys.stderr)
    print(
        json.dumps(
            {
                "bench": "gpu_all",
                "machine": gpu_step.machine(device_name),
                "settings": {
                    **gpu_step.settings_of(args),
                    "decode_images": args.decode_images,
                    "decode_samples": args.decode_samples,
                    "cpu_samples": args.cpu_samples,
                    "ranks_batch": args.ranks_batch,
                    "pretrain_preset": args.pretrain_preset,
                    "pretrain_image_size": args.pretrain_image_size,
                    "pretrain_batch": args.pretrain_batch,
                    "pretrain_memory": args.pretrain_memory,
                    "pretrain_steps": args.pretrain_steps,
                    "pretrain_workers": args.pretrain_workers,
                    "pixels_images": args.pixels_images,
                    "tests": args.tests,
                },
                **report,
            }
        )
    )
    failed = bool(report["errors"]) or (tests is not None and tests["returncode"] != 0)
    failed = failed or "FAIL" in report["verdicts"].values()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
