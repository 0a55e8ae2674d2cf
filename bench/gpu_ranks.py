#!/usr/bin/env python
"""Two ranks on one GPU: the multi-rank code paths against one process on the whole batch.

The single-process benchmarks never take the branches that only several ranks take:
global batch norm's all-reduces, the all-gather with gradient under NT-Xent, SimCLRv2's
memory filled from every rank's share. On a machine with one GPU this runs two processes
that both use ``cuda:0``, in a process group on the gloo backend (NCCL refuses two ranks
on one device; gloo takes CUDA tensors), and checks on CUDA tensors:

  bn      ``ssl_train.dist.GlobalBatchNorm`` (``convert_to_global_bn`` of an
          ``nn.BatchNorm2d``) on a (2 x B, 64, 16, 16) global batch split over the two
          ranks, one training step: forward output, running mean and variance, and the
          input, weight and bias gradients, against ``nn.BatchNorm2d`` in training mode
          on the whole batch in one process. In float32, then under
          ``torch.autocast(device, dtype=torch.bfloat16)`` with bf16 input.
  nt_xent ``ssl_train.losses.nt_xent`` (its all-gather is ``gather_with_grad``), without
          and with 4 x B memory negatives: each rank's loss is the mean over its B pairs,
          so the mean of the two ranks' losses is the one-process loss on the 2 x B
          pairs, and each rank's gradient divided by the world size (what DDP's average
          makes of it) is the one-process gradient of its rows.
  memory  ``ssl_train.contrastive_memory.ContrastiveMemory`` of ``build_model("tiny", None, 3, 8)``
          on the device, its network converted with ``convert_to_global_bn`` (as the
          training loop does): after two ``push`` calls of each rank's share
          ([view 1; view 2] of its B samples, 32 px), the buffer (which wraps on the
          second push), fill and write position of both ranks are identical and equal
          those of one process pushing [view 1 of all samples; view 2 of all samples].

Each figure is the largest absolute difference divided by the largest absolute value of
the one-process result (its scale). Tolerances: float32 1e-4; bf16 output and input
gradient 2e-2 (each value is rounded to bf16, 8 significant bits, 2^-8 = 3.9e-3 of its
size: a few roundings apart at the top of the range), bf16 running statistics and
weight/bias gradients 1e-3 (both paths accumulate them in float32 or wider from the
same bf16 values). TF32 is off in both processes: the check is about the code paths,
not about TF32's 10-bit rounding of convolutions. Any exception, such as a tensor on the
wrong device, fails the check with its message.

With a ``BnStep`` (``bench/gpu_all.py``'s part ``global-bn`` gives one), the ranks then
also time global batch norm's cost in a training step: forward and backward of the
preset's SimCLRv2 model on each rank's 2 x B images, with ``convert_to_global_bn``
against the same model with its plain batch norms, interleaved, each timed between a
barrier and ``torch.cuda.synchronize()``; the slowest rank's time per step. On one GPU
this counts GlobalBatchNorm's own kernels and two gloo all-reduces per batch-norm layer
(a copy of CUDA tensors to the host and back, each a wait of the CPU for the GPU), with
the two processes sharing the GPU; it leaves out NCCL and the links between GPUs, so it
is not what global batch norm costs across GPUs. (With one process GlobalBatchNorm *is*
``F.batch_norm``: one GPU alone pays nothing for it, by construction.)

The reference is computed in each rank's process before it joins the group (with no
process group, every function here is the plain single-process computation). Run alone:

    .venv/bin/python bench/gpu_ranks.py               # on a GPU machine, ~20-40 s
    .venv/bin/python bench/gpu_ranks.py --allow-cpu --batch 4   # CPU tensors, gloo

``bench/gpu_all.py`` runs it as its part ``ranks``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

WORLD = 2
CHANNELS, SPATIAL = 64, 16  # global batch norm's input: (B, 64, 16, 16) per rank
PROJECTION_DIM = 128
GLOO_TIMEOUT_S = 60  # a collective one rank never joins fails after this
TOLERANCE = {
    "fp32": 1e-4,
    "bf16": 2e-2,  # output and input gradient: values rounded to bf16 (2^-8 = 3.9e-3)
    "bf16_stats": 1e-3,  # running statistics, weight and bias gradients: float32 sums
}

BN_STEP_WARMUP = 2  # untimed steps per case (cuDNN's first calls, the allocator's growth)


class BnStep(NamedTuple):
    """The model step that times global batch norm against plain batch norm."""

    preset: str
    image_size: int
    batch: int  # samples per rank: 2 x batch images per step
    precision: str  # "bf16" (autocast) or "fp32"
    repeats: int


# --- the rank processes -------------------------------------------------------------------


def _relative(ours: Any, reference: Any) -> float:
    """max |ours - reference| / max |reference| (the reference's scale), in float64."""
    ours, reference = ours.detach().double().cpu(), reference.detach().double().cpu()
    if ours.shape != reference.shape:
        raise ValueError(f"shape {tuple(ours.shape)} against {tuple(reference.shape)}")
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    difference = float((ours - reference).abs().max()) if reference.numel() else 0.0
    return difference / scale if scale > 0 else difference


def _batch_norm_case(device: Any, batch: int, bf16: bool) -> dict[str, Any]:
    """Inputs, initial module and the one-process results of one batch-norm check."""
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(1 if bf16 else 0)
    shape = (WORLD * batch, CHANNELS, SPATIAL, SPATIAL)
    # per-channel offsets and scales: a mean far from 0 is where a naive sum cancels
    offset = torch.randn(1, CHANNELS, 1, 1, generator=generator) * 3
    spread = torch.rand(1, CHANNELS, 1, 1, generator=generator) * 2 + 0.5
    x = (torch.randn(shape, generator=generator) * spread + offset).to(device)
    dy = torch.randn(shape, generator=generator).to(device)
    module = nn.BatchNorm2d(CHANNELS).to(device)
    with torch.no_grad():  # not ones and zeros, so that their gradients mean something
        module.weight.copy_(torch.rand(CHANNELS, generator=generator) + 0.5)
        module.bias.copy_(torch.randn(CHANNELS, generator=generator))
    if bf16:
        x, dy = x.bfloat16(), dy.bfloat16()
    case = {"x": x, "dy": dy, "initial": copy.deepcopy(module)}
    case["reference"] = _batch_norm_step(module, x, dy, bf16)
    return case


def _batch_norm_step(module: Any, x: Any, dy: Any, bf16: bool) -> dict[str, Any]:
    """One training-mode forward and backward; what each check compares."""
    import torch

    x = x.detach().clone().requires_grad_(True)
    module.train()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        y = module(x)
    y.backward(dy.to(y.dtype))
    return {
        "output": y.detach(),
        "running_mean": module.running_mean.detach().clone(),
        "running_var": module.running_var.detach().clone(),
        "grad_input": x.grad.detach(),
        "grad_weight": module.weight.grad.detach().clone(),
        "grad_bias": module.bias.grad.detach().clone(),
    }


def _nt_xent_case(device: Any, batch: int, with_memory: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from ssl_train.losses import nt_xent

    generator = torch.Generator().manual_seed(2 + with_memory)
    z1, z2 = (
        torch.randn(WORLD * batch, PROJECTION_DIM, generator=generator).to(device) for _ in range(2)
    )
    bank = None
    if with_memory:
        entries = torch.randn(4 * batch, PROJECTION_DIM, generator=generator)
        bank = F.normalize(entries, dim=1).to(device)
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss = nt_xent(a, b, 0.1, bank)
    loss.backward()
    return {
        "z1": z1,
        "z2": z2,
        "bank": bank,
        "reference": {"loss": loss.detach(), "grad_z1": a.grad, "grad_z2": b.grad},
    }


def _memory_case(device: Any, batch: int) -> dict[str, Any]:
    import torch

    from ssl_train.contrastive_memory import ContrastiveMemory
    from ssl_train.models import build_model

    torch.manual_seed(4)
    model = build_model("tiny", None, 3, 8, device=device)
    generator = torch.Generator().manual_seed(5)
    samples = WORLD * batch
    # two steps of (view 1, view 2) images of every sample
    steps = [
        [torch.rand(samples, 3, 32, 32, generator=generator).to(device) for _ in range(2)]
        for _ in range(2)
    ]
    size = 3 * samples  # 2 x samples entries a push: the second one wraps
    reference = ContrastiveMemory(model, size=size, momentum=0.9, dim=8)
    for view1, view2 in steps:
        reference.push(torch.cat([view1, view2]))
    return {
        "model": model,
        "steps": steps,
        "size": size,
        "reference": {
            "buffer": reference.buffer.detach().clone(),
            "filled": int(reference.filled),
            "position": int(reference.position),
            "device": str(reference.buffer.device),
        },
    }


def _bn_step_seconds(model: Any, images: Any, bf16: bool) -> float:
    """One forward and backward of ``model`` on ``images``, every rank starting together;
    this rank's seconds, synchronised with its device at both ends."""
    import torch
    import torch.distributed as dist

    model.zero_grad(set_to_none=True)
    dist.barrier()
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    start = time.perf_counter()
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        projection = model(images).projection
    projection.float().square().mean().backward()
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    return time.perf_counter() - start


def bn_step_times(device: Any, step: BnStep) -> dict[str, Any]:
    """In the group: per interleaved repeat, the slowest rank's seconds for a step of the
    preset's model with plain batch norm and with ``convert_to_global_bn``."""
    import torch
    import torch.distributed as dist

    from ssl_train.dist import GlobalBatchNorm, convert_to_global_bn
    from ssl_train.models import build_model

    torch.manual_seed(6)
    plain = build_model(step.preset, None, device=device).to(memory_format=torch.channels_last)
    models = {
        "plain": plain.train(),
        "global": convert_to_global_bn(copy.deepcopy(plain)).train(),
    }
    layers = sum(isinstance(m, GlobalBatchNorm) for m in models["global"].modules())
    generator = torch.Generator().manual_seed(7 + dist.get_rank())
    shape = (2 * step.batch, 3, step.image_size, step.image_size)
    images = torch.rand(shape, generator=generator).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    bf16 = step.precision == "bf16"
    for model in models.values():
        for _ in range(BN_STEP_WARMUP):
            _bn_step_seconds(model, images, bf16)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(step.repeats):
        for name, model in models.items():
            slowest = torch.tensor([_bn_step_seconds(model, images, bf16)], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a CPU tensor: gloo
            times[name].append(float(slowest))
    return {"batch_norm_layers": layers, "seconds": times}


def summarise_bn_step(step: BnStep, device: str, measured: dict[str, Any]) -> dict[str, Any]:
    """Medians of the slowest rank's step times, the ratio per repeat (median, range) and
    what global batch norm adds per step and per layer (forward and backward).

    Example:
        >>> s = summarise_bn_step(BnStep("tiny", 32, 4, "fp32", 3), "cpu",
        ...     {"batch_norm_layers": 10, "seconds": {"plain": [1.0, 1.0, 2.0], "global": [1.5, 1.2, 2.0]}})
        >>> s["ratio_median"], s["ratio_range"], s["extra_ms_per_step"], s["extra_ms_per_layer"]
        (1.2, [1.0, 1.5], 500.0, 50.0)
    """
    plain, global_ = measured["seconds"]["plain"], measured["seconds"]["global"]
    ratios = [g / p for g, p in zip(global_, plain, strict=True)]
    extra = statistics.median(global_) - statistics.median(plain)
    layers = measured["batch_norm_layers"]
    return {
        **step._asdict(),
        "device": device,
        "world": WORLD,
        "images_per_rank": 2 * step.batch,
        "batch_norm_layers": layers,
        "plain_s_per_step": round(statistics.median(plain), 5),
        "global_s_per_step": round(statistics.median(global_), 5),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "extra_ms_per_step": round(1e3 * extra, 3),
        "extra_ms_per_layer": round(1e3 * extra / layers, 4) if layers else None,
        "seconds_plain": plain,
        "seconds_global": global_,
    }


def rank_main(
    rank: int, device_name: str, batch: int, out: Path, bn_step: BnStep | None = None
) -> None:
    """One rank: the references alone, then the same computations in the group."""
    import torch
    import torch.distributed as dist

    from ssl_train.contrastive_memory import ContrastiveMemory
    from ssl_train.dist import GlobalBatchNorm, convert_to_global_bn, world_size
    from ssl_train.losses import nt_xent

    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the two ranks share the cores: one thread each, no OpenMP spinning against the other
        torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    mine = slice(rank * batch, (rank + 1) * batch)
    figures: dict[str, float] = {}
    failures: list[str] = []

    def compare(name: str, ours: Any, reference: Any, tolerance: float) -> None:
        figures[name] = value = _relative(ours, reference)
        if not value <= tolerance:  # NaN fails too
            failures.append(f"rank {rank} {name} {value:.3g} > {tolerance:g}")

    def guarded(check: str, run: Any) -> Any:
        """Run one check; an exception is its failure, with its message, and the next
        check still runs (both ranks run the same code on the same shapes, so an error
        is normally raised by both at the same point and no collective is left waiting)."""
        try:
            return run()
        except Exception as exc:
            traceback.print_exc()
            message = " ".join(str(exc).split())[:300]
            failures.append(f"rank {rank} {check}: {type(exc).__name__}: {message}")
            return None

    # the one-process references, before this process joins the group
    assert world_size() == 1
    bn_cases = {
        precision: guarded(
            f"bn {precision} (one process)",
            lambda precision=precision: _batch_norm_case(device, batch, precision == "bf16"),
        )
        for precision in ("fp32", "bf16")
    }
    nt_cases = {
        memory: guarded(
            "nt_xent (one process)", lambda memory=memory: _nt_xent_case(device, batch, memory)
        )
        for memory in (False, True)
    }
    memory_case = guarded("memory (one process)", lambda: _memory_case(device, batch))

    def batch_norm(precision: str, case: dict[str, Any]) -> None:
        """(a) global batch norm against BatchNorm2d on the whole batch."""
        module = convert_to_global_bn(case["initial"])
        if not isinstance(module, GlobalBatchNorm):
            raise TypeError(f"convert_to_global_bn gave {type(module).__name__}")
        ours = _batch_norm_step(module, case["x"][mine], case["dy"][mine], precision == "bf16")
        for name in ("grad_weight", "grad_bias"):  # each rank's share: DDP adds them up
            dist.all_reduce(ours[name])
        reference = case["reference"]
        for name, value in ours.items():
            tolerance = TOLERANCE[precision]
            if precision == "bf16" and name not in ("output", "grad_input"):
                tolerance = TOLERANCE["bf16_stats"]
            whole = reference[name]
            if name in ("output", "grad_input"):
                whole = whole[mine]
            compare(f"bn_{precision}_{name}", value, whole, tolerance)
        if ours["output"].device != device:
            failures.append(f"rank {rank} bn output on {ours['output'].device}")

    def contrastive(with_memory: bool, case: dict[str, Any]) -> None:
        """(b) NT-Xent over the gathered batch against one process on the whole batch."""
        tag = "nt_xent_memory" if with_memory else "nt_xent"
        z1 = case["z1"][mine].clone().requires_grad_(True)
        z2 = case["z2"][mine].clone().requires_grad_(True)
        loss = nt_xent(z1, z2, 0.1, case["bank"])
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= WORLD
        reference = case["reference"]
        compare(f"{tag}_loss", mean_loss, reference["loss"], TOLERANCE["fp32"])
        compare(f"{tag}_grad_z1", z1.grad / WORLD, reference["grad_z1"][mine], 1e-4)
        compare(f"{tag}_grad_z2", z2.grad / WORLD, reference["grad_z2"][mine], 1e-4)

    def memory_fill(case: dict[str, Any]) -> None:
        """(c) the memory, filled from both ranks' shares in canonical order."""
        memory = ContrastiveMemory(case["model"], case["size"], 0.9, 8)
        memory.network = convert_to_global_bn(memory.network)  # as the training loop does
        if memory.buffer.device != device:
            failures.append(
                f"rank {rank} memory buffer on {memory.buffer.device}, its network on {device}"
            )
        for view1, view2 in case["steps"]:
            memory.push(torch.cat([view1[mine], view2[mine]]))
        reference = case["reference"]
        compare("memory_buffer", memory.buffer, reference["buffer"], TOLERANCE["fp32"])
        counters = (int(memory.filled), int(memory.position))
        if counters != (reference["filled"], reference["position"]):
            failures.append(
                f"rank {rank} memory (filled, position) {counters} against one process's "
                f"{(reference['filled'], reference['position'])}"
            )
        buffers = [torch.empty_like(memory.buffer) for _ in range(WORLD)]
        dist.all_gather(buffers, memory.buffer.contiguous())
        between = float((buffers[0].double() - buffers[1].double()).abs().max())
        figures["memory_buffer_between_ranks"] = between
        if between != 0.0:
            failures.append(f"the ranks' memory buffers differ by {between:.3g}")
        # the buffer as the loss uses it, beside projections on the device
        z = reference["buffer"][: 2 * batch].to(device)
        nt_xent(z[:batch], z[batch:], 0.1, memory.negatives())

    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S)
    )
    timing = None
    try:
        for precision, case in bn_cases.items():
            if case is not None:
                guarded(f"bn {precision}", lambda p=precision, c=case: batch_norm(p, c))
        for with_memory, case in nt_cases.items():
            if case is not None:
                guarded("nt_xent", lambda m=with_memory, c=case: contrastive(m, c))
        if memory_case is not None:
            guarded("memory", lambda: memory_fill(memory_case))
        dist.barrier()
        timing = bn_step and guarded("global-bn step", lambda: bn_step_times(device, bn_step))
    finally:
        dist.destroy_process_group()
    result = {"rank": rank, "figures": figures, "failures": failures, "bn_step": timing or None}
    out.write_text(json.dumps(result))


# --- the launcher ------------------------------------------------------------------------


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_error_line(text: str) -> str:
    """The exception line of a traceback (its last line naming an error), else the tail."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]:
            return line[:400]
    return (lines[-1] if lines else "no output")[:400]


def run_ranks(
    device: str, batch: int, timeout_s: float = 180.0, bn_step: BnStep | None = None
) -> dict[str, Any]:
    """Start the two ranks (this script, ``--rank R``), wait for both, gather their
    figures (and with ``bn_step`` the step timing, under ``"bn_step"``); a verdict and a
    one-line summary. Never waits past ``timeout_s``."""
    started = time.perf_counter()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="gpu-ranks-") as tmp:
        outs = [Path(tmp) / f"rank{r}.json" for r in range(WORLD)]
        logs = [(Path(tmp) / f"rank{r}.log").open("w+") for r in range(WORLD)]
        common = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--device",
            device,
            "--batch",
            str(batch),
        ]
        if bn_step is not None:
            common += ["--bn-step", json.dumps(bn_step._asdict())]
        procs = [
            subprocess.Popen(
                [*common, "--rank", str(r), "--out", str(outs[r])],
                env=env,
                stdout=logs[r],
                stderr=subprocess.STDOUT,
            )
            for r in range(WORLD)
        ]
        deadline = started + timeout_s
        timed_out = False
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        results, failures = [], []
        for r, (proc, log) in enumerate(zip(procs, logs, strict=True)):
            log.seek(0)
            text = log.read()
            log.close()
            if outs[r].exists():
                results.append(json.loads(outs[r].read_text()))
            elif timed_out and proc.returncode in (-9, None):
                failures.append(f"rank {r} killed after {timeout_s:.0f} s")
            else:
                print(f"--- rank {r} (exit {proc.returncode}) ---\n{text[-4000:]}", file=sys.stderr)
                failures.append(f"rank {r} exit {proc.returncode}: {_last_error_line(text)}")
    figures: dict[str, float] = {}
    for result in results:
        failures += result["failures"]
        for name, value in result["figures"].items():
            figures[name] = max(figures.get(name, 0.0), value)  # the worse rank
    verdict = "FAIL" if failures or len(results) < WORLD else "PASS"

    def worst(prefix: str) -> str:
        values = [v for k, v in figures.items() if k.startswith(prefix) and "between" not in k]
        return f"{max(values):.1e}" if values else "n/a"

    between = figures.get("memory_buffer_between_ranks")
    same = "n/a" if between is None else "identical" if between == 0.0 else "DIFFER"
    summary = (
        f"{WORLD} ranks on {device} (gloo), {batch} samples each: global BN max rel diff "
        f"fp32 {worst('bn_fp32')} (tol {TOLERANCE['fp32']:g}), bf16 {worst('bn_bf16')} "
        f"(tol {TOLERANCE['bf16']:g}, statistics {TOLERANCE['bf16_stats']:g}); nt_xent loss {worst('nt_xent_loss')}, grad "
        f"{worst('nt_xent_grad')}, with memory {worst('nt_xent_memory')} (tol 1e-4); "
        f"memory buffer {worst('memory_buffer')} vs one process, ranks {same}"
    )
    if failures:
        summary += " -- " + "; ".join(failures[:4])
    timing = results[0].get("bn_step") if bn_step is not None and results else None
    return {
        "verdict": verdict,
        "summary": summary,
        "device": device,
        "batch_per_rank": batch,
        "figures": figures,
        "failures": failures,
        "bn_step": timing and summarise_bn_step(bn_step, device, timing),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="samples per rank")
    parser.add_argument("--allow-cpu", action="store_true", help="CPU tensors without a GPU")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # a rank process
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bn-step", type=json.loads, help=argparse.SUPPRESS)  # a BnStep
    args = parser.parse_args()
    if args.rank is not None:
        bn_step = BnStep(**args.bn_step) if args.bn_step else None
        rank_main(args.rank, args.device, args.batch, args.out, bn_step)
        return 0
    import torch

    if torch.cuda.is_available():
        device = "cuda:0"
    elif args.allow_cpu:
        device = "cpu"
    else:
        print("no CUDA device is visible; add --allow-cpu to check on CPU tensors", file=sys.stderr)
        return 2
    result = run_ranks(device, args.batch, args.timeout)
    print(f"{result['verdict']} ranks: {result['summary']}")
    print(json.dumps(result))
    return 0 if result["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
