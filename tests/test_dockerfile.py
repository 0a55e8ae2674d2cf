"""The training image's Dockerfile, checked by parsing it (no container engine here):
CUDA PyTorch base, dependencies before source, a non-root user, no credentials."""

from __future__ import annotations

import json
import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_base_image_is_cuda_pytorch() -> None:
    (base,) = [args for keyword, args in instructions() if keyword == "FROM"]
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and "runtime" in base


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    steps = instructions()
    copies = [(i, args) for i, (keyword, args) in enumerate(steps) if keyword == "COPY"]
    pyproject = next(i for i, args in copies if "pyproject.toml" in args)
    sources = [i for i, args in copies if args.startswith(("shards", "ssl_train"))]
    dependency_install = next(
        i for i, (k, a) in enumerate(steps) if k == "RUN" and "pip install ." in a
    )
    assert pyproject < dependency_install < min(sources)


def test_runs_as_a_non_root_user_with_the_cli_as_entrypoint() -> None:
    steps = instructions()
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_run = max(i for i, (keyword, _) in enumerate(steps) if keyword == "RUN")
    assert steps.index(("USER", users[-1])) > last_run  # nothing runs as root after it
    (entrypoint,) = [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["ssl-train"]
    assert ("EXPOSE", "9732") in steps  # ssl_train.metrics.DEFAULT_PORT


def test_no_credentials_are_baked_in() -> None:
    text = DOCKERFILE.read_text()
    for word in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PASSWORD"):
        assert not re.search(rf"^\s*(ENV|ARG)\b.*{word}", text, re.MULTILINE | re.IGNORECASE)
    ignored = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
