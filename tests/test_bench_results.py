"""``bench/results.py``: benchmark rows kept as JSON lines, BENCHMARKS.md's tables made from them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import results  # noqa: E402


def test_rows_carry_run_commit_and_machine_and_the_newest_run_is_read(tmp_path: Path) -> None:
    results.record("b", [{"x": 1}], {"cpu": "old"}, directory=tmp_path)
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert first["commit"] == head and first["machine"] == {"cpu": "old"} and first["bench"] == "b"
    # a second run, stamped a second later at least, replaces the first as the newest
    (tmp_path / "b.jsonl").write_text(lines[0].replace(first["run"], "19990101T000000Z") + "\n")
    results.record("b", [{"x": 2}, {"x": 3}], {"cpu": "new"}, directory=tmp_path)
    newest = results.latest_run("b", directory=tmp_path)
    assert [row["row"]["x"] for row in newest] == [2, 3]
    assert {row["machine"]["cpu"] for row in newest} == {"new"}


def test_a_section_needs_exactly_one_pair_of_markers() -> None:
    with pytest.raises(ValueError, match="results:x"):
        results.replace_section("no markers", "x", "body")
    with pytest.raises(ValueError, match="exactly one"):
        results.replace_section("<!-- /results:x -->\n<!-- results:x -->", "x", "body")


def test_benchmarks_md_is_what_the_committed_results_render() -> None:
    """Every generated table in BENCHMARKS.md equals its bench's render of its newest run."""
    text = (REPO / "BENCHMARKS.md").read_text()
    assert results.render_all(text) == text, "run .venv/bin/python bench/results.py"
    for bench in results.GENERATED:
        assert f"<!-- results:{bench} -->" in text and results.latest_run(bench)
