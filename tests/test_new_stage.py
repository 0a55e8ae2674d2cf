"""A stage is one declaration: a new two-view stage, declared in one place with its own
task, is a subcommand in `ssl-train --help`, a TorchX component that builds a job, a
stage of `ssl-train pipeline`, and two images per sample in the GPU-memory model, with
nothing else edited (ssl_train.stages.registry)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Runs in its own interpreter: it adds the stage to the registry of that process only.
DECLARE_AND_LOOK = """
import contextlib, dataclasses, io, sys, types
from ssl_train.stages import registry

sys.path.insert(0, sys.argv[1])  # where the stage's own task module lies
spec = dataclasses.replace(
    registry.stage("pretrain"),
    name="contrast-lite",
    summary="a lighter contrastive pretraining (declared by a test)",
    task="lite_task:build",
    pipeline_order=5,
    in_pipeline="optional",
    uses_memory=False,
)
registry.STAGES = types.MappingProxyType({**registry.STAGES, spec.name: spec})

from ssl_train import cli, components
from ssl_train.stages import codegen

# `ssl-train --help` and the stage's own --help
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    cli.main(["--help"])
assert "contrast-lite" in out.getvalue() and "a lighter contrastive" in out.getvalue(), out.getvalue()
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    cli.main(["contrast-lite", "--help"])
assert "--temperature" in out.getvalue(), out.getvalue()
print("help: ok")

# the TorchX component, generated from the declarations as `make components` writes it
# (TorchX reads a component's source from its module's file: the module takes the new one)
generated = sys.argv[1] + "/components.py"
with open(generated, "w") as file:
    file.write(codegen.render_components())
components.__file__ = generated
exec(compile(open(generated).read(), generated, "exec"), components.__dict__)
from torchx.runner import get_runner
with get_runner() as runner:
    info = runner.dryrun_component(
        "ssl.contrast_lite", ["--data", "s3://b/t", "--run_dir", "s3://b/r", "-j", "1x2"],
        "local_cwd", cfg={},
    )
role = info._app.roles[0]
assert role.name == "contrast_lite" and "contrast-lite" in " ".join(role.args), role.args
print("component: ok")

# the pipeline, asked for it by name
from ssl_train.pipeline import PipelinePlan, dryrun_pipeline
plan = PipelinePlan("s3://b/t", sys.argv[1] + "/runs", ["1percent"], optional=["contrast-lite"])
planned = dryrun_pipeline(plan, "local_cwd", {})
assert planned[-1] == "contrast-lite", planned
print("pipeline: ok")

# the GPU-memory model: two views per sample, as the declaration says
from ssl_train.models.gpu_memory import per_gpu
lite = per_gpu("contrast-lite", "tiny", 32, 64, 2)
finetune = per_gpu("finetune", "tiny", 32, 64, 2)
assert (lite.images, finetune.images) == (64, 32), (lite.images, finetune.images)
print("gpu memory: ok")
"""

TASK = """
def build(config, runtime):
    raise NotImplementedError("planning never imports a stage's task")
"""


def test_a_stage_declared_in_one_place_is_everywhere(tmp_path: Path) -> None:
    (tmp_path / "lite_task.py").write_text(TASK)
    done = subprocess.run(
        [sys.executable, "-c", DECLARE_AND_LOOK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert [line for line in done.stdout.splitlines() if line.endswith(": ok")] == [
        "help: ok",
        "component: ok",
        "pipeline: ok",
        "gpu memory: ok",
    ], done.stdout
