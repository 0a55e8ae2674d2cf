"""`shards` progress for Prometheus: scraped while a command runs, or pushed to a real
Pushgateway (Debian package prometheus-pushgateway) that keeps the final figures."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from shards.local_s3 import free_port
from shards.synthetic import make_imagenet_train

from conftest import run_cli


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def value(text: str, name: str, command: str) -> float:
    prefix = f'{name}{{command="{command}"'
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert lines, f"{name} for {command} not in:\n{text[:2000]}"
    return float(lines[0].rsplit(" ", 1)[1])


def test_progress_is_served_while_a_command_runs() -> None:
    from shards import progress_metrics
    from shards.progress import Progress

    port = free_port()
    progress_metrics.configure(port, None)
    try:
        progress = Progress("shards copy", total=3)
        progress.advance(samples=10, nbytes=4096)
        text = get(f"http://127.0.0.1:{port}/metrics")
        assert value(text, "shards_progress_shards_done", "copy") == 1
        assert value(text, "shards_progress_shards", "copy") == 3
        assert value(text, "shards_progress_bytes", "copy") == 4096
        progress.close()
    finally:
        progress_metrics.configure(None, None)


@pytest.mark.skipif(
    shutil.which("prometheus-pushgateway") is None,
    reason="needs prometheus-pushgateway (Debian package; .ci/run installs it)",
)
def test_shards_create_pushes_its_final_progress(tmp_path: Path) -> None:
    port = free_port()
    gateway = subprocess.Popen(
        ["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                get(f"http://127.0.0.1:{port}/-/ready")
                break
            except OSError:
                assert time.monotonic() < deadline, "pushgateway did not start"
                time.sleep(0.2)
        make_imagenet_train(str(tmp_path / "src"), classes=2, per_class=6, size=(32, 24))
        result = run_cli(
            "create", tmp_path / "src", tmp_path / "out", "--shard-samples", "4",
            "--workers", "1", "--pushgateway", f"http://127.0.0.1:{port}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        text = get(f"http://127.0.0.1:{port}/metrics")
        assert value(text, "shards_progress_shards_done", "create") == 3
        assert value(text, "shards_progress_shards", "create") == 3
        assert value(text, "shards_progress_samples", "create") == 12
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)
