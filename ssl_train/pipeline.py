"""`ssl-train pipeline`: the whole SimCLRv2 recipe as TorchX jobs, one stage after another.

pretrain -> finetune on each label subset -> distill each finetuned teacher, every stage
a job on the chosen scheduler (``local_cwd`` or ``kubernetes``) whose run dir is
``<root>/<stage name>``. A stage whose run dir holds a finished summary is skipped; an
unfinished one is submitted again and resumes from its newest checkpoint. So restarting
the pipeline after a crash, Ctrl-C or preemption redoes no finished work.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field

from shards import storage
from ssl_train import components
from ssl_train.stages.loop import read_summary


class PipelineError(RuntimeError):
    """A stage's job did not succeed; the message says how to look and to resume."""


@dataclass
class Stage:
    name: str  # run dir name and what progress lines call it
    component: str  # ssl.<function>
    args: dict[str, str]  # component arguments (without the common ones)


@dataclass
class PipelinePlan:
    """Which stages, where, and with what; ``stages()`` orders them."""

    data: str
    root: str
    subsets: list[str]
    eval_data: str | None = None
    preset: str = "r50_1x_sk0"
    student: str = "r50_1x_sk0"
    common: dict[str, str] = field(default_factory=dict)  # every component that takes them
    per_stage: dict[str, dict[str, str]] = field(default_factory=dict)  # by stage kind

    def run_dir(self, name: str) -> str:
        return storage.join(self.root, name)

    def stages(self) -> list[Stage]:
        pretrain = self.run_dir("pretrain")
        plan = [Stage("pretrain", "pretrain", {"preset": self.preset})]
        for subset in self.subsets:
            label = subset_label(subset)
            teacher = self.run_dir(f"finetune-{label}")
            plan.append(
                Stage(f"finetune-{label}", "finetune", {"pretrained": pretrain, "subset": subset})
            )
            plan.append(
                Stage(f"distill-{label}", "distill", {"teacher": teacher, "student": self.student})
            )
        order = {"pretrain": 0, "finetune": 1, "distill": 2}
        return sorted(plan, key=lambda s: order[s.component])  # every finetune before distills

    def component_args(self, stage: Stage) -> list[str]:
        """``--name value`` pairs for the component: its stage's arguments, the common ones it
        accepts, and the per-stage overrides."""
        accepted = inspect.signature(getattr(components, stage.component)).parameters
        values = {"data": self.data, "run_dir": self.run_dir(stage.name), **stage.args}
        if self.eval_data and "eval_data" in accepted:
            values["eval_data"] = self.eval_data
        values.update({k: v for k, v in self.common.items() if k in accepted})
        values.update(self.per_stage.get(stage.component, {}))
        unknown = sorted(set(values) - set(accepted))
        if unknown:
            raise ValueError(f"ssl.{stage.component} has no argument {', '.join(unknown)}")
        values.setdefault("name", f"ssl-{stage.name}")
        args: list[str] = []
        for key, value in values.items():
            args += ["-j" if key == "j" else f"--{key}", str(value)]
        return args


def subset_label(subset: str) -> str:
    """A run-dir-friendly name for a subset: ``1percent`` or a list file's stem.

    Example:
        >>> subset_label("/data/lists/my-100-labels.txt"), subset_label("10percent")
        ('my-100-labels', '10percent')
    """
    return os.path.splitext(os.path.basename(subset))[0]


def parse_assignments(items: list[str], what: str) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; errors name the flag."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r}: write KEY=VALUE")
        values[key.replace("-", "_")] = value
    return values


def run_pipeline(plan: PipelinePlan, scheduler: str, cfg: dict[str, str]) -> list[str]:
    """Run every unfinished stage as a TorchX job, in order; returns the stages that ran.

    Example:
        >>> plan = PipelinePlan("s3://b/train", "s3://b/runs/r50", ["1percent", "10percent"])
        >>> [s.name for s in plan.stages()]
        ['pretrain', 'finetune-1percent', 'finetune-10percent', 'distill-1percent', 'distill-10percent']
    """
    from torchx.runner import get_runner
    from torchx.specs import AppState

    started, ran = time.monotonic(), []
    with get_runner("ssl-train") as runner:
        for stage in plan.stages():
            run_dir = plan.run_dir(stage.name)
            summary = read_summary(run_dir)
            if summary is not None and summary.get("finished"):
                print(
                    f"[pipeline] {stage.name}: finished earlier ({storage.redact(run_dir)}), skipped",
                    flush=True,
                )
                continue
            args = plan.component_args(stage)
            handle = runner.run_component(f"ssl.{stage.component}", args, scheduler, cfg)
            print(f"[pipeline] {stage.name}: submitted {handle}", flush=True)
            print(
                f"[pipeline]   follow it: torchx status {handle}; torchx log {handle}", flush=True
            )
            status = runner.wait(handle, wait_interval=2)
            state = status.state if status is not None else AppState.UNKNOWN
            if state != AppState.SUCCEEDED:
                raise PipelineError(
                    f"{stage.name} ended {state}: see `torchx log {handle}`; run the pipeline "
                    "again to resume it"
                )
            print(
                f"[pipeline] {stage.name}: done ({time.monotonic() - started:.0f} s so far)",
                flush=True,
            )
            ran.append(stage.name)
    return ran
