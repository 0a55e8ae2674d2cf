"""Where a demo job's time goes: one tiny stage on 2 gloo processes, taken apart.

Runs the demo's pretrain and finetune-10pct settings (from ``ssl_train.demo``) under
``torchrun --nproc-per-node 2`` on local shards of MNIST-5000, with rank 0's collectives,
forward/loss, optimizer step and the time between steps (data wait and bookkeeping)
timed, and reports per step: wall time, CPU time of the training thread, time inside
all_reduce (global BN, DDP's gradient bucket, the loop's agreement and loss averaging),
and the rest. It also times a bare 65-value gloo all_reduce (the latency floor of every
global-BN layer) and a stage's fixed cost (launch to first step, last step to exit).

    .venv/bin/python bench/demo_step.py                 # about 2 minutes on 2 cores
    .venv/bin/python bench/demo_step.py --image-size 28 --nchw   # the issue-8 settings

The same script is torchrun's worker when RANK is set (``--worker``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(tempfile.gettempdir()) / "ssl-train-bench"
HERE = Path(__file__).resolve()


def worker(argv: list[str]) -> None:
    """Run one stage with rank 0's phases timed; rank 0 writes them as JSON at exit."""
    import torch.distributed as dist

    from ssl_train.cli import main
    from ssl_train.stages import loop

    totals: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - wall
                totals[name + "_cpu"] += time.thread_time() - cpu
                counts[name] += 1

        return wrapper

    dist.all_reduce = timed("all_reduce", dist.all_reduce)
    marks: dict[str, float] = {"launch": float(os.environ["BENCH_LAUNCH"])}
    original_step = loop.Trainer._step

    def step(self, batch):
        task = self.task
        if not hasattr(task, "_timed"):
            task._timed = True
            task.loss = timed("forward_loss", task.loss)
            task.optimizer.step = timed("optimizer_step", task.optimizer.step)
            marks["first_step"] = time.time()
        elif "previous_end" in marks:
            totals["between_steps"] += time.time() - marks["previous_end"]
        result = timed("step", original_step)(self, batch)
        marks["previous_end"] = time.time()
        return result

    loop.Trainer._step = step
    output = os.environ["BENCH_OUTPUT"]
    try:
        main(["ssl-train", *argv][1:])
    except SystemExit as stop:
        if stop.code:
            raise
    if os.environ.get("RANK") == "0":
        marks["exit"] = time.time()
        Path(output).write_text(json.dumps({"totals": totals, "counts": counts, "marks": marks}))


LATENCY_SCRIPT = """
import statistics, time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.zeros(65, dtype=torch.float64)
times = []
for _ in range(300):
    began = time.perf_counter()
    dist.all_reduce(x)
    times.append(time.perf_counter() - began)
if dist.get_rank() == 0:
    print(statistics.median(times[50:]) * 1e3)
dist.destroy_process_group()
"""


def gloo_latency() -> float:
    """Median ms of an all_reduce of 65 float64 values between two gloo processes."""
    script = BENCH_DIR / "gloo_latency.py"
    script.write_text(LATENCY_SCRIPT)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def shards() -> Path:
    from shards.create import CreateOptions, create

    target = BENCH_DIR / "demo-step"
    for split in ("train", "test"):
        if not (target / split / "manifest.json").exists():
            create(
                CreateOptions(src=f"mnist5k:{split}", dest=str(target / split), shard_samples=500)
            )
    return target


def stage_args(
    stage: str, data: Path, run_dir: Path, image_size: int, steps: int, nchw: bool
) -> list[str]:
    """The demo's flags for this stage (its RECIPE and COMMON_ARGS), shortened to ``steps``."""
    from ssl_train.demo import COMMON_ARGS, RECIPE

    values = {k: v for k, v in COMMON_ARGS.items() if k not in ("j", "checkpoint_every_minutes")}
    kind = stage.split("-")[0]
    values.update(RECIPE.get(kind, {}))
    values.update(RECIPE.get(stage, {}))
    for launcher_only in ("j", "env"):  # torchrun's shape is this script's: 2 processes
        values.pop(launcher_only, None)
    values.update(image_size=str(image_size), max_steps=str(steps), metrics_port="0")
    values.update(log_every_steps="1000", workers="1")
    if nchw:
        values["channels_last"] = "False"
    args = [kind, "--data", str(data / "train"), "--run-dir", str(run_dir)]
    if kind == "pretrain":
        args += ["--preset", "tiny"]
    else:
        lists = data / "10pct.txt"
        from ssl_train.demo import subset_lists

        lists.write_text("".join(f"{k}\n" for k in subset_lists(40)))
        args += ["--subset", str(lists), "--eval-data", str(data / "test")]
        if kind == "finetune":
            args += ["--pretrained", str(run_dir.parent / "pretrain")]
        else:
            args += ["--preset", "tiny"]
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value in ("True", "False"):
            args += [flag] if value == "True" else []
        else:
            args += [flag, value]
    return args


def measure(stage: str, data: Path, root: Path, image_size: int, steps: int, nchw: bool) -> dict:
    run_dir = root / stage
    output = root / f"{stage}.json"
    launch = time.time()
    env = {**os.environ, "BENCH_LAUNCH": str(launch), "BENCH_OUTPUT": str(output)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(HERE)]
    cmd += ["--worker", *stage_args(stage, data, run_dir, image_size, steps, nchw)]
    before = os.times()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    after = os.times()
    if done.returncode:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    timing = json.loads(output.read_text())
    totals, counts, marks = timing["totals"], timing["counts"], timing["marks"]
    n = counts["step"]
    per = {k: round(v / n * 1000, 1) for k, v in totals.items()}
    cpu = (after.children_user + after.children_system) - (
        before.children_user + before.children_system
    )
    return {
        "stage": stage,
        "steps": n,
        "ms_per_step": {
            "step_wall": per["step"],
            "step_cpu_rank0_thread": per["step_cpu"],
            "all_reduce_wall": per["all_reduce"],
            "all_reduce_calls": round(counts["all_reduce"] / n, 1),
            "forward_loss_wall": per["forward_loss"],
            "optimizer_step": per["optimizer_step"],
            "between_steps_data_wait": round(
                totals.get("between_steps", 0) / max(n - 1, 1) * 1000, 1
            ),
        },
        "startup_s": round(marks["first_step"] - marks["launch"], 1),
        "after_last_step_s": round(marks["exit"] - marks["previous_end"], 1),
        "job_wall_s": round(time.time() - launch, 1),
        "job_cpu_s": round(cpu, 1),
    }


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=None, help="default: the demo's")
    parser.add_argument("--nchw", action="store_true", help="without channels-last")
    parser.add_argument("--pretrain-steps", type=int, default=20)
    parser.add_argument("--finetune-steps", type=int, default=60)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from machine import machine_info

    from ssl_train.demo import COMMON_ARGS

    size = args.image_size or int(COMMON_ARGS["image_size"])
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    data = shards()
    results = {"bench": "demo_step", "machine": machine_info(), "image_size": size}
    results["channels_last"] = not args.nchw
    results["gloo_all_reduce_65_ms"] = round(gloo_latency(), 3)
    with tempfile.TemporaryDirectory() as root:
        results["stages"] = [
            measure("pretrain", data, Path(root), size, args.pretrain_steps, args.nchw),
            measure("finetune-10pct", data, Path(root), size, args.finetune_steps, args.nchw),
        ]
    for stage in results["stages"]:
        print(stage["stage"], json.dumps(stage["ms_per_step"]))
        print(
            f"  start-up {stage['startup_s']} s, after the last step {stage['after_last_step_s']} s"
        )
    print(f"gloo all_reduce of 65 float64: {results['gloo_all_reduce_65_ms']} ms")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
