"""What the package installs is what it uses: every runtime dependency in pyproject.toml is
imported by ``ssl_train`` or ``shards`` (or named below with what loads it for them), so
a tool that only tests or benchmarks use goes into the extra that uses it."""

from __future__ import annotations

import ast
import importlib.metadata
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE_OF = {"pillow": "PIL", "prometheus-client": "prometheus_client"}
# installed for a library the package calls, which imports it by name at run time
LOADED_BY = {"s3fs": "fsspec, for every s3:// URL (shards/storage.py)"}


def _imported_modules() -> set[str]:
    found = set()
    for package in ("ssl_train", "shards"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module.split(".")[0])
    return found


def test_every_runtime_dependency_is_imported_by_the_package() -> None:
    # the installed metadata: pyproject.toml's dependencies, extras marked as such
    declared = [r for r in importlib.metadata.requires("ssl-train") or [] if "extra ==" not in r]
    names = [
        re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in declared
    ]
    imported = _imported_modules()
    unused = [
        name
        for name in names
        if name not in LOADED_BY and MODULE_OF.get(name, name.replace("-", "_")) not in imported
    ]
    assert not unused, f"runtime dependencies nothing in the package imports: {unused}"
