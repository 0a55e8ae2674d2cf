"""The house is one-way: no module of ``ssl_train`` or ``shards`` imports, however
indirectly, a module that imports it back (function-level imports count: they are a
dependency too, only a later one), and planning jobs does not load the training loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("ssl_train", "shards"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    modules = _modules()

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                # `from ssl_train import cli, jobs` imports those modules; `from
                # ssl_train.jobs import stage_job` the module jobs
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                found = owner(target)
                if found is not None and found != name:
                    graph[name].add(found)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_module_imports_itself_back() -> None:
    graph = import_graph()
    assert "ssl_train.stages.registry" in graph and graph["ssl_train.cli"]  # it read them
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(
        " <-> ".join(group)
        + ": "
        + "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(group)))}" for m in group)
        for group in found
    )


# README's "Layout": the rooms of the house, in order; a module imports only modules of
# its own room or of rooms before it. The longest prefix that matches places a module.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("shards", ("shards",)),
    (
        "foundations",
        (
            "ssl_train.errors",
            "ssl_train.shares",
            "ssl_train.crc32c",
            "ssl_train.preset_names",
            "ssl_train.metrics",
            "ssl_train.preemption",
            "ssl_train.machine",
        ),
    ),
    ("declarations", ("ssl_train.stages.registry",)),
    (
        "configuration",
        (
            "ssl_train.stages.config",
            "ssl_train.stages.flags",
            "ssl_train.stages.summary",
            "ssl_train.stages.progress",
        ),
    ),
    (
        "training parts",
        (
            "ssl_train.models",
            "ssl_train.losses",
            "ssl_train.optim",
            "ssl_train.dist",
            "ssl_train.contrastive_memory",
            "ssl_train.data",
            "ssl_train.checkpoint",
            "ssl_train.lease",
            "ssl_train.export",
            "ssl_train.state_broadcast",
            "ssl_train.checkpoint_import",
        ),
    ),
    ("stages", ("ssl_train.stages",)),
    (
        "jobs",
        (
            "ssl_train.jobs",
            "ssl_train.components",
            "ssl_train.torchx_run",
            "ssl_train.k8s_scheduler",
            "ssl_train.docker_scheduler",
            "ssl_train.stages.codegen",
            "ssl_train.pipeline_job",
        ),
    ),
    (
        "drivers",
        (
            "ssl_train.pipeline",
            "ssl_train.pipeline_state",
            "ssl_train.demo",
            "ssl_train.local_prometheus",
        ),
    ),
    ("cli", ("ssl_train.cli",)),
]


def room_of(module: str) -> int:
    if module == "ssl_train":  # the package itself: its version
        return 1
    matches = [
        (len(prefix), number)
        for number, (_, prefixes) in enumerate(ROOMS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    if not matches:
        raise AssertionError(f"{module} is in no room: add it to ROOMS and to README's Layout")
    return max(matches)[1]  # the most specific prefix


def test_every_import_goes_down_the_house() -> None:
    graph = import_graph()
    upward = [
        f"{module} ({ROOMS[room_of(module)][0]}) imports {target} ({ROOMS[room_of(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if room_of(target) > room_of(module)
    ]
    assert not upward, "imports against README's Layout:\n" + "\n".join(upward)


def test_the_check_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


PLAN_JOBS = """
import sys
from torchx.specs.builders import materialize_appdef
from ssl_train import components
from ssl_train.pipeline import PipelinePlan

plan = PipelinePlan("s3://b/train", "s3://b/runs", ["1percent"], eval_data="s3://b/val",
                    preset="tiny", supervised_baseline=True)
for stage in plan.stages():
    materialize_appdef(getattr(components, stage.component), plan.component_args(stage))
print(sorted(m for m in sys.modules if m.startswith(("ssl_train.stages.loop", "ssl_train.data"))))
"""


def test_planning_every_stage_of_a_pipeline_does_not_load_the_training_loop() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PLAN_JOBS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout
