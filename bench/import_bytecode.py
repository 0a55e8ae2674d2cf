#!/usr/bin/env python
"""CPU-seconds of `import torch, torchvision` in a fresh process, with the environment's
compiled bytecode against without it (why `make setup` runs compileall).

With PYTHONDONTWRITEBYTECODE set, as on these machines and CI, Python never caches what it
compiles, so without .pyc files every process compiles torch's modules again. "Without"
points PYTHONPYCACHEPREFIX at an empty folder, so the same environment is measured both
ways, interleaved.

    .venv/bin/python bench/import_bytecode.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import child_cpu_seconds


def cpu_seconds(env: dict[str, str]) -> float:
    """CPU time of one child process importing torch and torchvision."""
    return child_cpu_seconds([sys.executable, "-c", "import torch, torchvision"], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory() as empty:
        without = {**base, "PYTHONPYCACHEPREFIX": empty}
        compiled, source = [], []
        for _ in range(args.repeats):
            compiled.append(cpu_seconds(base))
            source.append(cpu_seconds(without))
    ratios = [s / c for s, c in zip(source, compiled, strict=True)]
    print(f"with .pyc:    median {statistics.median(compiled):.2f} CPU-s  {compiled}")
    print(f"without .pyc: median {statistics.median(source):.2f} CPU-s  {source}")
    print(
        f"without/with: median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})"
    )


if __name__ == "__main__":
    main()
