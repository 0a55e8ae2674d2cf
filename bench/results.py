#!/usr/bin/env python
"""Benchmark results kept in the repository, and the BENCHMARKS.md tables made from them.

Why: a figure in BENCHMARKS.md must lead back to the run that produced it. A benchmark
appends its rows to ``bench/results/<bench>.jsonl`` (committed), each row stamped with
the run, the commit (and whether the tree had uncommitted changes) and the machine; the
tables between ``<!-- results:<bench> -->`` and ``<!-- /results:<bench> -->`` in
BENCHMARKS.md are then rewritten from the newest run of that file by the bench's own
``render(rows)``, so no table is typed by hand and none can drift from its raw rows.

    .venv/bin/python bench/results.py            # rewrite the generated tables
    .venv/bin/python bench/results.py --check    # exit 1 if any is out of date
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BENCHMARKS = REPO / "BENCHMARKS.md"
# The benches whose tables BENCHMARKS.md generates: each module (in bench/) has
# ``render(rows: list[dict]) -> str`` taking the rows of one run.
GENERATED: tuple[str, ...] = ("cpu_stage", "gpu_all", "object_store", "scale")


def provenance() -> dict[str, Any]:
    """The commit this checkout is at, and whether tracked files differ from it.

    Example:
        >>> sorted(provenance())
        ['commit', 'dirty']
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain", "-uno")),
    }


def record(
    bench: str,
    rows: Iterable[dict[str, Any]],
    machine: dict[str, Any],
    *,
    directory: Path = RESULTS,
) -> Path:
    """Append one run's rows to ``<directory>/<bench>.jsonl``; every line carries the run's
    id, time, commit and machine, so a line read alone still says where it came from.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> path = record("demo", [{"x": 1}, {"x": 2}], {"cpu": "c"}, directory=d)
        >>> [row["row"]["x"] for row in latest_run("demo", directory=d)]
        [1, 2]
    """
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    stamp = {"bench": bench, "run": now.strftime("%Y%m%dT%H%M%SZ"), "recorded": now.isoformat()}
    stamp.update(provenance())
    stamp["machine"] = machine
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{bench}.jsonl"
    with path.open("a") as out:
        for row in rows:
            out.write(json.dumps({**stamp, "row": row}, sort_keys=True) + "\n")
    return path


def latest_run(bench: str, *, directory: Path = RESULTS) -> list[dict[str, Any]]:
    """The lines of the newest run in ``<directory>/<bench>.jsonl``, in the order written.

    Example:
        >>> latest_run("no-such-bench", directory=Path("/nonexistent"))
        []
    """
    path = directory / f"{bench}.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return []
    newest = max(line["run"] for line in lines)
    return [line for line in lines if line["run"] == newest]


def replace_section(text: str, bench: str, body: str) -> str:
    """``text`` with what stands between the bench's two markers replaced by ``body``.

    Example:
        >>> replace_section("a\\n<!-- results:x -->\\nold\\n<!-- /results:x -->\\nb", "x", "new")
        'a\\n<!-- results:x -->\\nnew\\n<!-- /results:x -->\\nb'
    """
    start, end = f"<!-- results:{bench} -->", f"<!-- /results:{bench} -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"BENCHMARKS.md needs exactly one {start} ... {end} pair for {bench}")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{body.strip()}\n{end}{tail}"


def render_all(text: str, benches: Iterable[str] = GENERATED, *, directory: Path = RESULTS) -> str:
    """BENCHMARKS.md's text with every generated section rewritten from its newest run."""
    sys.path.insert(0, str(REPO / "bench"))
    for bench in benches:
        rows = latest_run(bench, directory=directory)
        if not rows:
            raise SystemExit(f"bench/results/{bench}.jsonl has no run: run bench/{bench}.py first")
        body = importlib.import_module(bench).render(rows)
        text = replace_section(text, bench, body)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a generated table is out of date"
    )
    args = parser.parse_args(argv)
    text = BENCHMARKS.read_text()
    new = render_all(text)
    if args.check:
        if new != text:
            print(
                "BENCHMARKS.md's generated tables differ from bench/results/: run bench/results.py",
                file=sys.stderr,
            )
            return 1
        return 0
    BENCHMARKS.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
