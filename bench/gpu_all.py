#!/usr/bin/env python
"""Every GPU measurement of the project in one run on one GPU, within 10 minutes.

Run from the repository root on a machine with a CUDA GPU (about 3-4 minutes on a
current data-centre GPU with the defaults; ``--compile`` adds the compiled step pair,
a few minutes more):

    .venv/bin/python bench/gpu_all.py

Then copy the printed tables and the last line (one JSON object naming the card) into
BENCHMARKS.md. Without CUDA it stops with a message (exit 2), unless --allow-cpu: a smoke
run with tiny sizes that checks the script end to end (``tests/test_gpu_bench.py`` runs
it; its figures are not GPU figures):

    .venv/bin/python bench/gpu_all.py --allow-cpu --preset tiny --precision fp32 \\
        --image-size 32 --pairs 4 --steps 2 --warmup 1 --repeats 1 \\
        --decode-images 4 --decode-samples 16 --cpu-samples 4 --tests tests/test_device_decode.py

The three parts, in this order, each timed; one that fails is reported and the others
still run (exit status 1 then):

  step    ``bench/gpu_step.py``'s comparison (its code, its flags): the real SimCLR
          ``Trainer._step`` against a supervised ResNet-50 step on the same GPU.
  decode  ``--decode gpu``'s decode: batches of --pairs two-view samples of 500x375
          photo-like JPEGs (--decode-images distinct ones, each drawn with new crops
          under new keys) as the workers ship them (``stream.encode_samples``, pinned as
          the DataLoader pins them), decoded, cropped and resized to --image-size on
          the GPU by ``device_decode.BatchDecoder`` (one batched nvJPEG call per batch);
          two-view samples per second of GPU wall time, between
          ``torch.cuda.synchronize()`` calls, after 2 warm-up batches. Against it, in
          the same run, the CPU path a DataLoader worker runs (``decode.two_views``):
          two-view samples per CPU-second of this process, one core. Also what the
          workers still spend per sample with --decode gpu (header and crop boxes), the
          training process's CPU-seconds per sample while the GPU decodes, and the
          decode's share of a SimCLR step at the same batch (from part 1).
  tests   ``pytest -m gpu`` on --tests (default: the whole suite), in a child process
          after the measurements: the GPU variants of the device-decode tests and a
          stage trained with ``--decode gpu``. Skipped tests (no CUDA) are reported.

The run reports each part's seconds and warns when the whole exceeds 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gpu_step  # bench/gpu_step.py (scripts run from bench/)
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 600
WIDTH, HEIGHT = 500, 375  # a typical ImageNet photo
SMOKE_FLAGS = (
    "--preset tiny --precision fp32 --image-size 32 --pairs 4 --steps 2 --warmup 1 --repeats 1 "
    "--decode-images 4 --decode-samples 16 --cpu-samples 4 --tests tests/test_device_decode.py"
)


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
    if tests:
        print(f"GPU tests: {tests['summary']} (exit {tests['returncode']})")
    print(f"total {total} s" + (f" - OVER the {BUDGET_S} s budget" if total > BUDGET_S else ""))
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
                    "tests": args.tests,
                },
                **report,
            }
        )
    )
    failed = bool(report["errors"]) or (tests is not None and tests["returncode"] != 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
