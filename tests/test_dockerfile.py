"""The training image's Dockerfile, checked by parsing it: the CUDA PyTorch base stays
the default, dependencies install before the project, a non-root user, no credentials.
tests/test_image.py builds and runs the image for real."""

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


def test_base_image_is_an_argument_whose_default_is_cuda_pytorch() -> None:
    steps = instructions()
    (base,) = [args for keyword, args in steps if keyword == "FROM"]
    assert base == "${BASE_IMAGE}"
    default = next(a for k, a in steps if k == "ARG" and a.startswith("BASE_IMAGE="))
    image = default.split("=", 1)[1]
    assert image.startswith("pytorch/pytorch:") and "cuda" in image and "runtime" in image
    assert steps.index(("ARG", default)) < steps.index(("FROM", base))


def test_dependencies_are_installed_before_the_project_from_the_wheelhouse_only() -> None:
    steps = instructions()
    deps = next(i for i, (k, a) in enumerate(steps) if "source=build/wheelhouse/deps" in a)
    assert "${DEPS_DIGEST}" in steps[deps][1]  # mounted content is not in the cache key
    copies = [i for i, (k, a) in enumerate(steps) if k in ("COPY", "ADD")]
    assert [steps[i][1] for i in copies] == ["build/wheelhouse/project/ /tmp/project/"]
    project = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "/tmp/project" in a)
    assert deps < copies[0] < project
    for index in (deps, project):
        assert "pip install --no-index" in steps[index][1]  # no network during the build


def test_runs_as_a_non_root_user_and_takes_the_whole_command() -> None:
    steps = instructions()
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_run = max(i for i, (keyword, _) in enumerate(steps) if keyword == "RUN")
    assert steps.index(("USER", users[-1])) > last_run  # nothing runs as root after it
    # an ENTRYPOINT would be prepended to the command TorchX's local_docker gives
    assert not [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    (cmd,) = [args for keyword, args in steps if keyword == "CMD"]
    assert json.loads(cmd) == ["ssl-train", "--help"]
    assert ("EXPOSE", "9732") in steps  # ssl_train.metrics.DEFAULT_PORT


def test_no_credentials_are_baked_in() -> None:
    text = DOCKERFILE.read_text()
    for word in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PASSWORD"):
        assert not re.search(rf"^\s*(ENV|ARG)\b.*{word}", text, re.MULTILINE | re.IGNORECASE)
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    # everything excluded, then only the wheelhouse let back in: no .env, keys or .git
    assert patterns[0] == "*" and all(p.startswith("!build/wheelhouse/") for p in patterns[1:])


def test_the_wheelhouse_can_take_torch_built_for_another_cuda() -> None:
    """PyPI's torch is the CUDA 13 build (driver 580 or newer); TORCH_INDEX points the
    wheelhouse at PyTorch's index for another CUDA, and nothing else changes."""
    import subprocess

    repo = DOCKERFILE.parent.parent

    def wheel_command(*variables: str) -> str:
        dry = subprocess.run(
            ["make", "-n", "wheelhouse", *variables], cwd=repo, capture_output=True, text=True
        )
        assert dry.returncode == 0, dry.stderr
        joined = dry.stdout.replace("\\\n", " ")
        (line,) = [x for x in joined.splitlines() if "--wheel-dir build/wheelhouse/deps" in x]
        return line

    index = "https://download.pytorch.org/whl/cu128"
    assert f"--extra-index-url {index} torch==2.14.1" in wheel_command(f"TORCH_INDEX={index}")
    assert "index-url" not in wheel_command()
    assert "580.65.06" in DOCKERFILE.read_text()  # the driver floor, where the image is built
