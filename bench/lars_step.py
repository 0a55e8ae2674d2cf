#!/usr/bin/env python
"""CPU-seconds per LARS step: the old per-parameter loop against the foreach step (issue 29).

Run from the repository root:

    .venv/bin/python bench/lars_step.py [--model r50_1x_sk0] [--repeats 7] [--steps 5]
        [--cpu-chunk-bytes 4194304] [--malloc both]

``torch.set_num_threads(1)``, float32, on the CPU. The parameters are those of a
SimCLRv2 model of the preset (``build_model(model, None, 3, 128)``: backbone and 3-layer
head, no classifier), split by ``lars_param_groups`` into the LARS group and the
excluded one, with fixed random gradients. Two optimizers on the same parameters, each
with its own momentum buffers:

  a. loop      ``_LoopLARS``: LARS.step as it was before issue 29, a copy kept here
  b. foreach   ``LARS.step``: multi-tensor ops per group, device and dtype, on the CPU
               in chunks of about --cpu-chunk-bytes (``optim._CPU_CHUNK_BYTES``; 0: one
               chunk per group, as on a GPU)

Each takes two untimed steps first (the first allocates the momentum buffers), so what
is timed is the marginal cost of a step. Then --repeats rounds, each timing --steps steps
of a, then --steps steps of b, in process CPU time (``time.process_time``: the machine
is a shared VM, so CPU-seconds and not wall time), with the page faults they took. This
runs in a fresh child process per glibc malloc policy (``--malloc``, see
MALLOC_POLICIES). Reported: CPU ms per step of each run, the median of the per-round
ratios loop/foreach with their range, and, for information, the aten ops one step
dispatches (counted under a TorchDispatchMode: on a GPU each of the loop's is about one
kernel launch; a foreach op is one launch or a few, except the multiplication by the
per-tensor trust ratios, one per LARS tensor) and the step temporaries alive at once.
After the timing, each child checks that one step of each gives bitwise the same weights
and buffers. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from machine import machine_info  # bench/machine.py (scripts run from bench/)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ssl_train import optim
from ssl_train.models import build_model
from ssl_train.optim import LARS, lars_param_groups

WEIGHT_DECAY = 1e-4  # ssl-train pretrain's default
LR = 0.3  # its value does not change the cost of a step


class _LoopLARS(LARS):
    """LARS with its step as it was before issue 29 (ssl_train/optim.py at d41fe88), the
    baseline: a loop over the parameters, several small ops each. A subclass, so that
    both steps go through torch.optim.Optimizer's step wrapper alike."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, eeta = group["lr"], group["momentum"], group["eeta"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                if group["lars_exclude"]:
                    scaled_lr: torch.Tensor | float = lr
                else:
                    w_norm = torch.linalg.vector_norm(param)
                    g_norm = torch.linalg.vector_norm(grad)
                    # tensors, not Python floats: no host sync per parameter on CUDA
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), eeta * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    scaled_lr = lr * trust
                state = self.state[param]
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = torch.zeros_like(param)
                step = grad * scaled_lr
                buffer.mul_(momentum).add_(step)
                param.sub_(buffer * momentum + step if group["nesterov"] else buffer)
        return loss


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (a foreach op counts once)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _make(model_name: str) -> tuple[nn.Module, _LoopLARS, LARS]:
    torch.manual_seed(0)
    model = build_model(model_name, None, 3, 128)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    loop = _LoopLARS(lars_param_groups(model, WEIGHT_DECAY), lr=LR)
    foreach = LARS(lars_param_groups(model, WEIGHT_DECAY), lr=LR)
    return model, loop, foreach


def _same_result(model: nn.Module) -> bool:
    """One step of each on copies of the model: bitwise the same weights and buffers."""
    a, b = copy.deepcopy(model), copy.deepcopy(model)  # deepcopy leaves .grad behind
    for p, pa, pb in zip(model.parameters(), a.parameters(), b.parameters(), strict=True):
        pa.grad, pb.grad = p.grad.clone(), p.grad.clone()
    opt_a = _LoopLARS(lars_param_groups(a, WEIGHT_DECAY), lr=LR)
    opt_b = LARS(lars_param_groups(b, WEIGHT_DECAY), lr=LR)
    opt_a.step()
    opt_b.step()
    return all(
        torch.equal(pa, pb)
        and torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
    )


def _cpu_seconds_per_step(step: Callable[[], None], steps: int) -> float:
    start = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - start) / steps


def _ops_per_step(step: Callable[[], None]) -> dict[str, Any]:
    with _OpCounter() as counter:
        step()
    return {"total": sum(counter.ops.values()), "by_op": dict(counter.ops.most_common())}


def _one_chunk_ops(step: Callable[[], None]) -> dict[str, Any]:
    """The ops of a step without the CPU's chunks: what it dispatches on a GPU."""
    saved, optim._CPU_CHUNK_BYTES = optim._CPU_CHUNK_BYTES, 2**62
    try:
        return _ops_per_step(step)
    finally:
        optim._CPU_CHUNK_BYTES = saved


# glibc hands each fresh tensor either from its heap or from a new mmap, by a threshold it
# adjusts as the process frees memory, and gives the top of its heap back to the kernel
# past a trim threshold; memory it gave back costs a page fault per 4 KiB page when next
# touched. The foreach step holds the temporaries of a chunk at once (of a whole group
# with --cpu-chunk-bytes 0: 122 MiB for R50, see _temporaries), the loop one tensor's,
# so how often each step page-faults depends on glibc's state, not on the kernels. Hence
# both policies, as in global_bn.py: glibc's defaults in a fresh process, and freed
# memory kept in the heap, as a long-running training process's heap ends up doing.
MALLOC_POLICIES: dict[str, dict[str, str]] = {
    "default": {},
    "steady-heap": {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**31)},
}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _temporaries(opt: LARS) -> dict[str, int]:
    """Bytes of step temporaries alive at once, from the code of each step (Nesterov off,
    as here): the loop holds the decayed gradient and the step of one tensor, the foreach
    step one list for a chunk (the steps, scaled in place of the decayed gradients)."""
    loop, foreach = 0, 0
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        sizes = [p.numel() * p.element_size() for p in params]
        loop = max(loop, (2 if group["weight_decay"] else 1) * max(sizes, default=0))
        for chunk, _, _ in optim._chunks(params, params, params):
            foreach = max(foreach, sum(p.numel() * p.element_size() for p in chunk))
    return {"loop": loop, "foreach": foreach}


def _measure(model_name: str, repeats: int, steps: int, chunk_bytes: int) -> dict[str, Any]:
    """The timed rounds, in this process (started with the malloc policy's environment)."""
    torch.set_num_threads(1)
    optim._CPU_CHUNK_BYTES = chunk_bytes or 2**62  # 0: one chunk per group, as on a GPU
    model, loop_opt, foreach_opt = _make(model_name)

    def loop() -> None:
        loop_opt.step()

    def foreach() -> None:
        foreach_opt.step()

    for _ in range(2):  # untimed: the first step allocates the momentum buffers
        loop(), foreach()
    runs: dict[str, list[float]] = {"loop": [], "foreach": []}
    faults: dict[str, list[float]] = {"loop": [], "foreach": []}
    for _ in range(repeats):
        for name, step in (("loop", loop), ("foreach", foreach)):
            before = _minor_faults()
            runs[name].append(_cpu_seconds_per_step(step, steps))
            faults[name].append((_minor_faults() - before) / steps)
    return {
        "threads": torch.get_num_threads(),
        "cpu_s_per_step": {k: [round(t, 6) for t in v] for k, v in runs.items()},
        "page_faults_per_step": faults,
        "aten_ops_per_step": {
            "loop": _ops_per_step(loop),
            "foreach": _ops_per_step(foreach),
            "foreach_one_chunk_per_group": _one_chunk_ops(foreach),
        },
        "cpu_chunk_bytes": chunk_bytes,
        "temporaries_bytes": _temporaries(foreach_opt),
        "tensors": [len(g["params"]) for g in foreach_opt.param_groups],
        "parameters": sum(p.numel() for p in model.parameters()),
        "bitwise_equal": _same_result(model),  # after the timing: it churns the heap
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="r50_1x_sk0")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--malloc", choices=[*MALLOC_POLICIES, "both"], default="both")
    parser.add_argument(
        "--cpu-chunk-bytes",
        type=int,
        default=optim._CPU_CHUNK_BYTES,
        help="the foreach step's chunk on the CPU; 0: one chunk per group, as on a GPU",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one policy, in the process glibc was started for
        result = _measure(args.model, args.repeats, args.steps, args.cpu_chunk_bytes)
        print(json.dumps(result))
        return 0

    torch.set_num_threads(1)  # as in the children, so that machine_info records it
    policies = list(MALLOC_POLICIES) if args.malloc == "both" else [args.malloc]
    results: dict[str, dict[str, Any]] = {}
    for policy in policies:
        cmd = [sys.executable, __file__, "--child", "--model", args.model]
        cmd += ["--repeats", str(args.repeats), "--steps", str(args.steps)]
        cmd += ["--cpu-chunk-bytes", str(args.cpu_chunk_bytes)]
        env = {**os.environ, **MALLOC_POLICIES[policy], "OMP_NUM_THREADS": "1"}
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results[policy] = json.loads(out.strip().splitlines()[-1])

    first = results[policies[0]]
    groups, ops = first["tensors"], first["aten_ops_per_step"]
    temps = first["temporaries_bytes"]
    chunk = f"{args.cpu_chunk_bytes / 2**20:g} MiB" if args.cpu_chunk_bytes else "a group"
    print(
        f"{args.model}: {sum(groups)} tensors ({groups[0]} LARS, {groups[1]} excluded), "
        f"{first['parameters'] / 1e6:.1f} M parameters, float32; torch threads "
        f"{first['threads']}; {args.repeats} rounds of {args.steps} steps each; "
        f"foreach chunk on the CPU: {chunk}"
    )
    print(
        f"aten ops dispatched per step: loop {ops['loop']['total']}, foreach "
        f"{ops['foreach']['total']} ({ops['foreach_one_chunk_per_group']['total']} with one "
        f"chunk per group, as on a GPU); step temporaries alive at once: loop "
        f"{temps['loop'] / 2**20:.0f} MiB, foreach {temps['foreach'] / 2**20:.0f} MiB"
    )
    print("| glibc malloc | step | CPU ms/step (median) | runs (ms) | page faults/step |")
    print("|---|---|---:|---|---:|")
    summary: dict[str, Any] = {}
    for policy, result in results.items():
        runs = result["cpu_s_per_step"]
        for name, times in runs.items():
            print(
                f"| {policy} | {name} | {1e3 * statistics.median(times):.1f} | "
                + ", ".join(f"{1e3 * t:.1f}" for t in times)
                + f" | {statistics.median(result['page_faults_per_step'][name]):.0f} |"
            )
        ratios = [a / b for a, b in zip(runs["loop"], runs["foreach"], strict=True)]
        summary[policy] = {
            "median_ratio": round(statistics.median(ratios), 4),
            "ratios": [round(r, 4) for r in ratios],
        }
    for policy in results:
        ratios = summary[policy]["ratios"]
        print(
            f"ratio loop/foreach (CPU time), {policy} malloc: median "
            f"{statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}"
        )
    same = all(r["bitwise_equal"] for r in results.values())
    if not same:
        print("the foreach step does not give the loop's weights bitwise")
    print(
        json.dumps(
            {
                "bench": "lars_step",
                "machine": machine_info(),
                "settings": {
                    "model": args.model,
                    "repeats": args.repeats,
                    "steps": args.steps,
                    "cpu_chunk_bytes": args.cpu_chunk_bytes,
                },
                "policies": results,
                "summary": summary,
            }
        )
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
