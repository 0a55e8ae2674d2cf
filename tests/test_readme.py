"""The README's quick start, run verbatim: what a new user types first must work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent


def quick_start() -> str:
    text = README.read_text()
    block = re.search(r"<!-- quickstart -->\n```sh\n(.*?)```\n<!-- /quickstart -->", text, re.S)
    assert block, "README.md lost its quick start block"
    return block.group(1)


@pytest.mark.slow
def test_the_quick_start_runs_as_written(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    script = "set -euo pipefail\n" + quick_start()
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluated = [json.loads(line) for line in result.stdout.splitlines() if '"top1"' in line]
    assert evaluated and evaluated[-1]["samples"] == 1000
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors"]
    assert "Traceback" not in result.stderr
