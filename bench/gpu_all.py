#!/usr/bin/env python
"""Every GPU measurement and check of the project in one run on one GPU, within 8 minutes.

Run from the repository root on a machine with a CUDA GPU (one H100 or H200 is enough):

    .venv/bin/python bench/gpu_all.py        # then: .venv/bin/python bench/results.py

It prints each part's table or verdict line, then one JSON line with every figure, and
appends one row per part to ``bench/results/gpu_all.jsonl`` (``bench/results.py``:
stamped with the run, the commit and the machine, the card's name under
``machine.device``), from which ``bench/results.py`` renders BENCHMARKS.md's section.
Exit status 0 when every part ran and every check passed, 1 otherwise.

Without CUDA (and without --allow-cpu) it prints one line on stdout, saying so and how to
run the CPU smoke run, and exits 0: there is nothing to measure. The smoke run is the
same code at tiny sizes (``tests/test_gpu_bench.py`` runs it in the fast tier, so the
script cannot rot); its figures are not GPU figures, it records nothing unless given
--results-dir, and its rows say "smoke run, not a GPU figure":

    .venv/bin/python bench/gpu_all.py --allow-cpu <SMOKE_FLAGS>

The parts, in this order, each timed (stderr: ``[part] ...``, ``[part] N s``); one that
fails is reported and the others still run. Budget: the whole run has BUDGET_S = 480 s
(--budget). A part starts only if its estimate (PART_ESTIMATES_S, upper estimates for
one H100 with the defaults, written before any GPU run: the first run corrects them)
fits in what is left, else it is skipped and reported as such; the parts run in child
processes (ranks, memory, tests) are also killed at the budget. The estimates add up to
465 s, so a run that goes as planned runs every part; a slower one skips, from then on,
each part whose estimate no longer fits (the measurements come first, the tests last).

  step          (~90 s) ``bench/gpu_step.py``'s comparison (its code, its flags): the real
                SimCLR ``Trainer._step`` (r50_1x_sk0, 128 pairs at 224 px, bf16,
                channels_last, SimCLRv2's memory off) against a supervised torchvision
                ResNet-50 step on 256 images, 10 warm-up steps, 3 rounds of 20 steps
                round-robin, medians of GPU wall time between synchronizes: s/step,
                pairs/s, images/s, ratio, PASS/FAIL on the 0.45 target. Synthetic crops
                already on the GPU: the input pipeline is left out.
  augment       (~15 s) the device stage of augmentation as training runs it
                (``SimCLRAugment``: what ``PretrainTask.device_views`` calls, less its
                ``torch.cat`` of the two views), timed by ``bench/augment.py``'s own code:
                both views' parameters drawn on the CPU, then applied on the GPU to two
                uint8 batches of --pairs crops at --image-size; --augment-repeats runs
                after a warm-up, each between synchronizes; two-view samples per second
                of wall time (draw and apply apart too), and the share of a SimCLR step
                (from ``step``, whose step includes this stage).
  peak-memory   (~30 s) ``torch.cuda.max_memory_allocated`` of the real SimCLR step
                (``gpu_step.simclr_step``: same preset, --pairs, --image-size,
                --precision, --memory-size) over 3 steps after 2 warm-up steps (LARS's
                momentum exists by then), against ``ssl_train.models.gpu_memory.per_gpu``
                for the same stage, preset, batch and precision on one GPU. Two ratios:
                the allocator's peak against the model's state + activations x 1.1, and
                the process's peak on the device (the allocator's reserved peak plus what
                lies outside it: the CUDA context and libraries, read from
                ``torch.cuda.mem_get_info``) against the model's total with its 3 GiB
                reserve. PASS when the model does not under-estimate the process. On the
                CPU there is no allocator peak: the steps run, the figure is the model's
                alone and says so.
  decode        (~40 s) ``--decode gpu``'s decode: batches of --pairs two-view samples of
                500x375 photo-like JPEGs (--decode-images distinct ones) as the workers
                ship them (``stream.encode_samples``, pinned), decoded by one batched
                nvJPEG call per batch, cropped and resized to --image-size on the GPU
                (``device_decode.BatchDecoder``); two-view samples per second of GPU wall
                time between synchronizes, after 2 warm-up batches. Against it, the CPU
                path a DataLoader worker runs (``decode.two_views``): samples per
                CPU-second of this process. Also the workers' remaining CPU per sample
                (headers, boxes), the training process's CPU per sample and the decode's
                share of a SimCLR step.
  ranks         (~60 s) ``bench/gpu_ranks.py``: two processes on cuda:0 in a gloo group
                (NCCL refuses two ranks on one device) check the multi-rank code paths
                against one process on the whole batch (global batch norm in float32 and
                bf16, ``nt_xent`` over ``gather_with_grad`` with and without memory
                negatives, ``ContrastiveMemory``'s buffer), tolerances float32 1e-4, bf16
                2e-2 / 1e-3; then they time global batch norm's cost (row ``global-bn``):
                forward and backward of the preset's model on --bn-step-batch samples
                (two views) per rank, ``convert_to_global_bn`` against plain batch norm,
                --bn-step-repeats interleaved repeats, the slowest rank per repeat. On one
                GPU this counts GlobalBatchNorm's kernels and its two gloo all-reduces per
                layer (device-to-host copies, each a wait for the GPU), with the GPU
                shared by two processes; it leaves out NCCL and the links between GPUs.
                (With one process GlobalBatchNorm is ``F.batch_norm``: free by
                construction, so there is no single-process figure to take.)
  memory        (~90 s) a real pretraining run with SimCLRv2's memory on this device:
                ``ssl-train pretrain --preset r50_1x_sk0 --memory-size 1024
                --global-batch-size 64 --image-size 64 --max-steps 20 --precision bf16
                --workers 8`` in a child process, on a throwaway shard set; 20 steps of
                128 entries wrap the buffer. PASS when it exits 0 at step 20 with every
                logged loss finite. Figures: first and last loss, samples/s as logged.
  decode-pixels (~20 s) ``BatchDecoder`` on cuda (nvJPEG) against the CPU path for the
                same JPEG bytes and crop boxes, --pixels-images JPEGs x 2 views at 224
                and 32 px, with the tolerances of ``tests/test_device_decode.py`` (read
                from its source) plus its nvJPEG allowance.
  tests         (~120 s) ``pytest -m gpu`` on --tests (default: the test files that
                mark tests gpu, now ``tests/test_device_decode.py`` alone) in a child
                process: the GPU variants of the device-decode tests and a stage trained
                with ``--decode gpu``.

Expected on a GPU: the step table, the augment, peak-memory and decode figures, the
lines PASS peak-memory / ranks / memory / decode-pixels, the global-bn timing, ``GPU
tests: 7 passed`` and the total, under 480 s.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import gc
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import augment  # bench/augment.py (scripts run from bench/)
import gpu_ranks  # bench/gpu_ranks.py
import gpu_step  # bench/gpu_step.py
import numpy as np
import results  # bench/results.py
import torch
from machine import machine_info  # bench/machine.py

REPO = Path(__file__).resolve().parent.parent
SSL_TRAIN = Path(sys.executable).with_name("ssl-train")
BENCH = "gpu_all"
BUDGET_S = 480  # the whole run on one H100
# upper estimates on one H100 with the defaults (no GPU run yet: the first run corrects
# them); a part starts only when its estimate fits in what is left of the budget
PART_ESTIMATES_S = {
    "step": 90,
    "augment": 15,
    "peak-memory": 30,
    "decode": 40,
    "ranks": 60,
    "memory": 90,
    "decode-pixels": 20,
    "tests": 120,
}
RANKS_TIMEOUT_S = 180
MEMORY_TIMEOUT_S = 300
PEAK_WARMUP_STEPS, PEAK_STEPS = 2, 3
WIDTH, HEIGHT = 500, 375  # a typical ImageNet photo
SMOKE_FLAGS = (
    "--preset tiny --precision fp32 --image-size 32 --pairs 4 --steps 2 --warmup 1 --repeats 1 "
    "--augment-repeats 2 --decode-images 4 --decode-samples 16 --cpu-samples 4 "
    "--ranks-batch 4 --bn-step-batch 4 --bn-step-repeats 2 "
    "--pretrain-preset tiny --pretrain-image-size 32 --pretrain-batch 8 --pretrain-memory 24 "
    "--pretrain-steps 4 --pretrain-workers 1 --pixels-images 3"
)
CHECKS = ("peak-memory", "ranks", "memory", "decode-pixels")  # each prints a verdict line
SMOKE_MARK = "smoke run, not a GPU figure"  # in machine.device of a CPU run (gpu_step)


@dataclass
class Budget:
    """The run's time budget: what is left of it, and whether a part still fits."""

    total_s: float
    started: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - self.started)

    def fits(self, part: str) -> bool:
        return PART_ESTIMATES_S[part] <= self.left()

    def timeout(self, own_s: float) -> float:
        """A child process's limit: its own, cut to what is left (at least 1 s)."""
        return max(1.0, min(own_s, self.left()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_decode(args: argparse.Namespace, step: dict[str, Any] | None) -> dict[str, Any]:
    """Part ``decode``: the GPU decode path against the CPU path, on the same JPEGs."""
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


def run_gpu_tests(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """Part ``tests``: the tests marked gpu, in a child process (a clean CUDA context),
    killed at the end of the budget."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the child the memory this process cached
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    command += args.tests
    limit = budget.timeout(float("inf"))
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(command, -9, "", f"killed at the budget ({limit:.0f} s)")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    counts = {
        word: int(number)
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", summary)
    }
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
    return {
        "verdict": "PASS" if proc.returncode == 0 else "FAIL",
        "command": " ".join(["python", *command[1:]]),
        "returncode": proc.returncode,
        "summary": summary.strip("= "),
        "counts": counts,
    }


# --- the checks of what the single-process benchmarks skip (issue 29) ----------------------


def check_ranks(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """Part ``ranks``: two processes on the one GPU (gloo), ``bench/gpu_ranks.py``: its
    checks, then global batch norm's cost in a step of the preset's model."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the two ranks the memory this process cached
    device = "cuda:0" if args.device == "cuda" else "cpu"
    bn_step = gpu_ranks.BnStep(
        args.preset, args.image_size, args.bn_step_batch, args.precision, args.bn_step_repeats
    )
    return gpu_ranks.run_ranks(
        device, args.ranks_batch, timeout_s=budget.timeout(RANKS_TIMEOUT_S), bn_step=bn_step
    )


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


def check_memory_run(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
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
        limit = budget.timeout(MEMORY_TIMEOUT_S)
        try:
            proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=limit)
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
            problems.append(f"killed after {limit:.0f} s")
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


def measure_augment(args: argparse.Namespace, step: dict[str, Any] | None) -> dict[str, Any]:
    """Part ``augment``: the device stage of augmentation, timed by ``bench/augment.py``'s
    own code on two uint8 batches of --pairs crops on this device."""
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    size = (2, args.pairs, 3, args.image_size, args.image_size)
    views = torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)
    keys = [f"n{i // 1300:08d}_{i}" for i in range(args.pairs)]
    cases = augment._run_device(device, views, keys, args.augment_repeats, baseline=False)
    total = cases["total"]["median_s"]
    result: dict[str, Any] = {
        "batch": args.pairs,
        "image_size": args.image_size,
        "blur_kernel": augment.blur_kernel_size(args.image_size),
        "repeats": args.augment_repeats,
        "draw_s": cases["draw"]["median_s"],
        "apply_s": cases["apply"]["median_s"],
        "total_s": total,
        "total_range_s": [cases["total"]["min_s"], cases["total"]["max_s"]],
        "two_view_samples_per_s": round(args.pairs / total, 1) if total > 0 else None,
    }
    simclr = (step or {}).get("eager", {}).get("simclr")
    if simclr:
        result["share_of_simclr_step"] = round(total / simclr["s_per_step"], 4)
    return result


def _device_peak(device: torch.device, allocated_before: int) -> dict[str, float]:
    """The allocator's peaks since its last reset (GiB; allocated above what was already
    held before the part), and what the process holds on the device outside the
    allocator (the CUDA context, cuBLAS/cuDNN handles), read now."""
    free, total = torch.cuda.mem_get_info(device)
    outside = (total - free) - torch.cuda.memory_reserved(device)
    peak_reserved = torch.cuda.max_memory_reserved(device)
    return {
        "peak_allocated_gib": round(
            (torch.cuda.max_memory_allocated(device) - allocated_before) / 2**30, 3
        ),
        "peak_reserved_gib": round(peak_reserved / 2**30, 3),
        "outside_allocator_gib": round(outside / 2**30, 3),
        "process_peak_gib": round((peak_reserved + outside) / 2**30, 3),
    }


def measure_peak_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Part ``peak-memory``: the real SimCLR step's peak device memory against
    ``ssl_train.models.gpu_memory``'s prediction for the same stage, preset, batch and
    precision on one GPU (on the CPU: the steps run, the prediction stands alone)."""
    from ssl_train.models import gpu_memory

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    model = gpu_memory.per_gpu(
        "pretrain",
        args.preset,
        args.image_size,
        args.pairs,
        1,
        args.precision,
        memory_size=args.memory_size,
    )
    allocator_model = model.state + model.activations * (1 + gpu_memory.BACKWARD_MARGIN)
    with tempfile.TemporaryDirectory(prefix="gpu-peak-") as tmp:
        root = Path(tmp)
        data = gpu_step.make_shard_set(root, args.pairs + args.memory_size)
        gc.collect()  # what the earlier parts left
        before = 0
        if on_gpu:
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
        step = gpu_step.simclr_step(args, data, str(root / "run"), compile=False)
        for _ in range(PEAK_WARMUP_STEPS):  # LARS's momentum and cuDNN's choices exist
            step()
        _sync(device)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(PEAK_STEPS):
            step()
        _sync(device)
        measured = _device_peak(device, before) if on_gpu else None
        del step
    gc.collect()
    result: dict[str, Any] = {
        "stage": "pretrain",
        "preset": args.preset,
        "image_size": args.image_size,
        "pairs": args.pairs,
        "images": model.images,
        "precision": args.precision,
        "memory_size": args.memory_size,
        "steps": PEAK_STEPS,
        "model_state_gib": round(model.state / 2**30, 3),
        "model_activations_gib": round(model.activations / 2**30, 3),
        "model_allocator_gib": round(allocator_model / 2**30, 3),
        "model_total_gib": round(model.total / 2**30, 3),
        "measured": measured,
    }
    if measured is None:
        result["verdict"] = "N/A"
        result["summary"] = (
            f"not measurable on {args.device} (torch keeps no peak for CPU memory): the "
            f"steps ran; the model alone predicts {result['model_total_gib']} GiB for "
            f"{args.preset} at {args.image_size} px, {model.images} images, {args.precision}"
        )
        return result
    allocated_ratio = measured["peak_allocated_gib"] / result["model_allocator_gib"]
    process_ratio = measured["process_peak_gib"] / result["model_total_gib"]
    result["allocated_over_model"] = round(allocated_ratio, 3)
    result["process_over_model_total"] = round(process_ratio, 3)
    result["verdict"] = "PASS" if process_ratio <= 1.0 else "FAIL"  # never under-estimated
    result["summary"] = (
        f"{args.preset} at {args.image_size} px, {model.images} images, {args.precision}: "
        f"allocator peak {measured['peak_allocated_gib']} GiB against the model's "
        f"{result['model_allocator_gib']} (state + activations x "
        f"{1 + gpu_memory.BACKWARD_MARGIN:g}): {allocated_ratio:.2f}; process peak "
        f"{measured['process_peak_gib']} GiB (reserved {measured['peak_reserved_gib']} + "
        f"outside the allocator {measured['outside_allocator_gib']}) against the model's "
        f"total {result['model_total_gib']}: {process_ratio:.2f}"
    )
    if process_ratio > 1.0:
        result["summary"] += " -- the model under-estimates this step"
    return result


def timed_part(name: str, run: Callable[[], Any], report: dict[str, Any], budget: Budget) -> Any:
    """Run one part if its estimate fits in what is left of the budget (else record why
    it was skipped); record its seconds and result, or its error (the others still run)."""
    report["results"][name] = None
    if not budget.fits(name):
        report["skipped"][name] = (
            f"{max(0.0, budget.left()):.0f} s of the {budget.total_s:.0f} s budget left, "
            f"the part needs about {PART_ESTIMATES_S[name]} s"
        )
        print(f"[{name}] skipped: {report['skipped'][name]}", file=sys.stderr, flush=True)
        return None
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


# --- rows for bench/results.py, and BENCHMARKS.md's section made from them ----------------


def part_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per part (and ``global-bn``, timed inside ``ranks``): status, seconds,
    estimate, verdict and the part's whole result."""
    rows = []
    for name in PART_ESTIMATES_S:
        result = report["results"].get(name)
        if name not in report["results"]:
            status = "not run"
        elif name in report["skipped"]:
            status = "skipped"
        elif name in report["errors"]:
            status = "failed"
        else:
            status = "ran"
        rows.append(
            {
                "part": name,
                "status": status,
                "seconds": report["seconds"].get(name),
                "estimate_s": PART_ESTIMATES_S[name],
                "verdict": result.get("verdict") if result else None,
                "note": report["skipped"].get(name) or report["errors"].get(name),
                "result": result,
            }
        )
        if name == "ranks":
            timing = (result or {}).get("bn_step")
            rows.append(
                {
                    "part": "global-bn",
                    "status": status if timing or status != "ran" else "failed",
                    "seconds": None,  # inside ranks
                    "estimate_s": None,
                    "verdict": None,
                    "note": rows[-1]["note"] or (None if timing else "no timing came back"),
                    "result": timing,
                }
            )
    return rows


def _step_text(r: dict[str, Any]) -> str:
    e = r["eager"]
    s, sup, ratio = e["simclr"], e["supervised"], e["ratio"]
    return (
        f"SimCLR {s['s_per_step']:.4f} s/step, {s['pairs_per_s']} pairs/s; supervised "
        f"{sup['s_per_step']:.4f} s/step, {sup['images_per_s']} images/s; ratio "
        f"{ratio['value']:.3f} (target >= {gpu_step.TARGET}: {ratio['verdict']})"
    )


def _augment_text(r: dict[str, Any]) -> str:
    share = r.get("share_of_simclr_step")
    return (
        f"{r['batch']} two-view samples at {r['image_size']} px: "
        f"{r['two_view_samples_per_s']} samples/s ({1e3 * r['total_s']:.2f} ms: draw on the "
        f"CPU {1e3 * r['draw_s']:.2f}, apply {1e3 * r['apply_s']:.2f}; median of "
        f"{r['repeats']})" + (f"; {share:.1%} of a SimCLR step" if share else "")
    )


def _decode_text(r: dict[str, Any]) -> str:
    share = r.get("decode_share_of_simclr_step")
    return (
        f"{r['jpeg']}, batches of {r['batch']} at {r['image_size']} px: batched decode "
        f"{r['gpu_two_view_samples_per_s']} two-view samples/s of wall time, CPU path "
        f"{r['cpu_path_two_view_samples_per_cpu_s']} per CPU-second: "
        f"{r['cpu_cores_matched']} worker cores"
        + (f"; {share:.1%} of a SimCLR step" if share else "")
    )


def _global_bn_text(r: dict[str, Any]) -> str:
    lo, hi = r["ratio_range"]
    return (
        f"{r['preset']}, {r['images_per_rank']} images of {r['image_size']} px per rank, "
        f"{r['precision']}, {r['world']} ranks over gloo on {r['device']}: forward + backward "
        f"{1e3 * r['plain_s_per_step']:.1f} ms plain, {1e3 * r['global_s_per_step']:.1f} ms "
        f"global (slowest rank, median of {r['repeats']}); ratio {r['ratio_median']} "
        f"({lo}-{hi}); +{r['extra_ms_per_step']} ms per step, +{r['extra_ms_per_layer']} ms "
        f"per layer ({r['batch_norm_layers']} layers)"
    )


def _tests_text(r: dict[str, Any]) -> str:
    return f"`{r['command']}`: {r['summary']} (exit {r['returncode']})"


_FIGURES: dict[str, Callable[[dict[str, Any]], str]] = {
    "step": _step_text,
    "augment": _augment_text,
    "decode": _decode_text,
    "global-bn": _global_bn_text,
    "tests": _tests_text,
}


def _figures(row: dict[str, Any]) -> str:
    result = row["result"]
    if row["status"] != "ran" or not result:
        return f"{row['status']}: {row['note']}"
    text = _FIGURES[row["part"]](result) if row["part"] in _FIGURES else result["summary"]
    return text.replace("|", "/")


def render(rows: list[dict[str, Any]]) -> str:
    """BENCHMARKS.md's table of one run (``bench/results.py``), saying first whether its
    figures are a GPU's or a CPU smoke run's."""
    first = rows[0]
    machine = first["machine"]
    data = [line["row"] for line in rows]
    parts = [row for row in data if row["part"] != "total"]
    total = next(row for row in data if row["part"] == "total")
    dirty = " (uncommitted changes)" if first["dirty"] else ""
    where = f"run {first['run']}, commit {first['commit'][:10]}{dirty}"
    if SMOKE_MARK in machine["device"]:
        head = (
            f"**CPU smoke run: not GPU figures.** No GPU has run this script yet. These rows "
            f"are `--allow-cpu` with the smoke sizes (`SMOKE_FLAGS`: tiny preset, 32 px, 4 "
            f"pairs) on {machine['cpu']} ({machine['nproc']} cores), {where}: they show that "
            f"every part runs end to end, and their times and rates say nothing about a GPU. "
            f"The first GPU run replaces them."
        )
    else:
        head = (
            f"On {machine['device']} (CUDA {machine['cuda']}, torch {machine['torch']}, "
            f"{machine['nproc']} CPU cores), {where}, with the default sizes."
        )
    lines = [
        head,
        "",
        f"Total {total['seconds']} s of the {total['budget_s']} s budget; exit status "
        f"{total['exit_status']}.",
        "",
        "| part | status | s (estimate) | figures |",
        "|---|---|---:|---|",
    ]
    for row in parts:
        seconds = "in ranks" if row["part"] == "global-bn" else f"{row['seconds']}"
        if row["estimate_s"] is not None:
            seconds += f" ({row['estimate_s']})"
        verdict = f", {row['verdict']}" if row["verdict"] else ""
        lines.append(f"| {row['part']} | {row['status']}{verdict} | {seconds} | {_figures(row)} |")
    return "\n".join(lines)


# --- the printed report -------------------------------------------------------------------


def print_decode(args: argparse.Namespace, device_name: str, d: dict[str, Any]) -> None:
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


def print_report(
    args: argparse.Namespace, device_name: str, report: dict[str, Any], rows: list[dict]
) -> None:
    """The tables, one line per measurement, one verdict line per check."""
    results_ = report["results"]
    print()
    if results_.get("step"):
        gpu_step.print_table(args, device_name, results_["step"])
        print()
    if results_.get("decode"):
        print_decode(args, device_name, results_["decode"])
        print()
    by_part = {row["part"]: row for row in rows}
    for name in ("augment", "global-bn"):
        print(f"{name}: {_figures(by_part[name])}")
    report["verdicts"] = {}
    for name in CHECKS:
        row = by_part[name]
        if row["status"] == "ran":
            line = f"{row['verdict']} {name}: {row['result']['summary']}"
        else:  # it raised (its error is its figure) or was skipped
            line = f"{'SKIPPED' if row['status'] == 'skipped' else 'FAIL'} {name}: {row['note']}"
        report["verdicts"][name] = line.split(" ", 1)[0]
        print(line)
    print()
    tests = results_.get("tests")
    if tests:
        print(f"GPU tests: {tests['summary']} (exit {tests['returncode']})")
    for name, why in report["skipped"].items():
        print(f"SKIPPED {name}: {why}")


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **gpu_step.settings_of(args),
        "augment_repeats": args.augment_repeats,
        "decode_images": args.decode_images,
        "decode_samples": args.decode_samples,
        "cpu_samples": args.cpu_samples,
        "ranks_batch": args.ranks_batch,
        "bn_step_batch": args.bn_step_batch,
        "bn_step_repeats": args.bn_step_repeats,
        "pretrain_preset": args.pretrain_preset,
        "pretrain_image_size": args.pretrain_image_size,
        "pretrain_batch": args.pretrain_batch,
        "pretrain_memory": args.pretrain_memory,
        "pretrain_steps": args.pretrain_steps,
        "pretrain_workers": args.pretrain_workers,
        "pixels_images": args.pixels_images,
        "tests": args.tests,
        "budget_s": args.budget,
    }


def gpu_test_files() -> list[str]:
    """The test files that mark tests gpu. Collecting only these keeps the part from
    importing the whole suite and its dependencies (TorchX, Kubernetes' client,
    WebDataset, ...), which a GPU machine's image may lack, and from its collection time.

    Example:
        >>> "tests/test_device_decode.py" in gpu_test_files()
        True
    """
    return sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "tests").glob("test_*.py")
        if "mark.gpu" in path.read_text()
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu_step.add_arguments(parser)
    parser.add_argument("--augment-repeats", type=int, default=10, help="augment: timed runs")
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
    parser.add_argument(
        "--bn-step-batch", type=int, default=32, help="global-bn: samples (2 views) per rank"
    )
    parser.add_argument(
        "--bn-step-repeats", type=int, default=10, help="global-bn: interleaved timed repeats"
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
        "--tests",
        nargs="+",
        help="test paths for pytest -m gpu (default: the test files that hold gpu-marked tests)",
    )
    parser.add_argument(
        "--budget", type=float, default=BUDGET_S, help="seconds for the whole run (parts "
        "whose estimate no longer fits are skipped)",
    )  # fmt: skip
    parser.add_argument(
        "--results-dir", type=Path, help="where gpu_all.jsonl gets this run's rows (default: "
        "bench/results on a GPU; a CPU smoke run records nothing without it)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.tests = args.tests or gpu_test_files()
    return args


def run_parts(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """Every part in order, within the budget."""
    report: dict[str, Any] = {"seconds": {}, "results": {}, "errors": {}, "skipped": {}}
    step = timed_part("step", lambda: gpu_step.run_steps(args), report, budget)
    timed_part("augment", lambda: measure_augment(args, step), report, budget)
    timed_part("peak-memory", lambda: measure_peak_memory(args), report, budget)
    timed_part("decode", lambda: measure_decode(args, step), report, budget)
    timed_part("ranks", lambda: check_ranks(args, budget), report, budget)
    timed_part("memory", lambda: check_memory_run(args, budget), report, budget)
    timed_part("decode-pixels", lambda: check_decode_pixels(args), report, budget)
    timed_part("tests", lambda: run_gpu_tests(args, budget), report, budget)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (torch.cuda.is_available() or args.allow_cpu):
        print(
            "gpu_all.py: no CUDA device is visible, so nothing is measured (exit 0); for the "
            f"CPU smoke run (tiny sizes, not GPU figures): .venv/bin/python bench/gpu_all.py "
            f"--allow-cpu {SMOKE_FLAGS}"
        )
        return 0
    device_name = gpu_step.choose_device(args, "gpu_all.py", SMOKE_FLAGS)
    assert device_name is not None  # CUDA, or --allow-cpu
    budget = Budget(args.budget)
    report = run_parts(args, budget)
    total = round(time.perf_counter() - budget.started, 1)
    report["seconds"]["total"] = total
    rows = part_rows(report)
    print_report(args, device_name, report, rows)
    tests = report["results"]["tests"]
    failed = bool(report["errors"] or report["skipped"])
    failed = failed or (tests is not None and tests["returncode"] != 0)
    failed = failed or "FAIL" in report["verdicts"].values()
    exit_status = 1 if failed else 0
    over = f" - OVER the {args.budget:.0f} s budget" if total > args.budget else ""
    print(f"total {total} s{over}")
    machine = {**machine_info(), **gpu_step.machine(device_name)}
    rows.append(
        {
            "part": "total",
            "seconds": total,
            "budget_s": args.budget,
            "exit_status": exit_status,
            "settings": settings_of(args),
        }
    )
    directory = args.results_dir or (results.RESULTS if args.device == "cuda" else None)
    if directory is not None:
        path = results.record(BENCH, rows, machine, directory=directory)
        print(f"recorded {len(rows)} rows in {path}", file=sys.stderr)
    else:
        print("a CPU smoke run: not recorded (give --results-dir to record it)", file=sys.stderr)
    print(json.dumps({"bench": BENCH, "machine": machine, "settings": settings_of(args), **report}))
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
