"""``bench/cpu_stage.py``: its code path runs at smoke size, and its report says what it
measured (the sides, which work each does, the ratios, the cores one GPU needs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import cpu_stage  # noqa: E402
import results  # noqa: E402


def _line(row: dict[str, Any], run: str = "20260101T000000Z") -> dict[str, Any]:
    machine = {"cpu": "cpu", "nproc": 2, "torch": "t", "loadavg_before": 0.1}
    return {"run": run, "commit": "c" * 40, "dirty": False, "machine": machine, "row": row}


def _settings(**extra: Any) -> dict[str, Any]:
    return {
        "kind": "settings",
        "samples": 10,
        "jpeg_bytes_mean": 1000,
        "repeats": 2,
        "smoke": False,
        "device_threads": 2,
        "global_batch_size": 5,
        "gpu_samples_per_s": 600.0,
        "gpu_source": "a stated figure",
        **extra,
    }


def test_render_derives_the_whole_pipeline_ratios_and_cores_from_the_rows() -> None:
    """whole = 1 / (1/stream + 1/device stage) per repeat; ratios are per repeat, then
    the median; cores = the GPU's samples/s over the stream's median."""
    rates = {  # two repeats
        "torchvision": [50.0, 40.0],
        "bare": [1000.0, 800.0],
        "stream": [600.0, 300.0],
        "device_1": [200.0, 100.0],
        "device_n": [150.0, 60.0],
    }
    rows = [
        _line(cpu_stage.side_row(side, repeat, 10, 10 / rate, 0.0, 1))
        for repeat in range(2)
        for side, values in rates.items()
        for rate in [values[repeat]]
    ]
    rows.append(_line(_settings()))
    figures = cpu_stage.summary([line["row"] for line in rows])
    assert figures["runs"]["whole_1"] == pytest.approx([150.0, 75.0])
    assert figures["runs"]["whole_n"] == pytest.approx([120.0, 50.0])
    same_work = "/ torchvision (the same work, all on the CPU)**"
    one, two = (
        f"**whole, device stage 1 thread {same_work}",
        f"**whole, device stage 2 threads {same_work}",
    )
    assert figures["ratios"][one] == pytest.approx([3.0, 1.875])
    assert figures["ratios"][two] == pytest.approx([2.4, 1.25])
    assert figures["cores_per_gpu"] == pytest.approx(600.0 / 450.0)

    text = cpu_stage.render(rows)
    assert f"| {one} | 2.44x | 1.88 | 3.00 |" in text
    assert f"| {two} | 1.82x | 1.25 | 2.40 |" in text
    assert "| ssl-train device stage (`SimCLRAugment`) on the CPU, 2 threads | 105.0 |" in text
    assert (
        "| stream / torchvision (CPU side only; not the same work) | 9.75x | 7.50 | 12.00 |" in text
    )
    assert "= **1.33 cores**. GPU rate: a stated figure." in text
    assert "SMOKE" not in text


def test_smoke_run_records_every_side_and_reports_ratios_and_cores(tmp_path: Path) -> None:
    """The script end to end at smoke size: rows under --results-dir (never bench/results),
    every side timed on the same samples, the printed report is the render of the rows."""
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench")])}
    command = [sys.executable, str(REPO / "bench" / "cpu_stage.py"), "--smoke", "--repeats", "1"]
    command += ["--quiet-wait", "0", "--work", str(tmp_path), "--results-dir", str(out)]
    command += ["--gpu-samples-per-s", "500", "--gpu-source", "the test's figure"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    lines = results.latest_run("cpu_stage", directory=out)
    rows = [line["row"] for line in lines]
    sides = {row["side"]: row for row in rows if row["kind"] == "side"}
    assert set(sides) == {"torchvision", "bare", "stream", "device_1", "device_n"}
    settings = next(row for row in rows if row["kind"] == "settings")
    assert settings["smoke"] and settings["samples"] == 32  # 2 timed batches of 16
    for row in sides.values():
        assert row["samples"] == 32 and row["cpu_s"] > 0, row
    assert sides["device_1"]["torch_threads"] == 1
    assert sides["device_n"]["torch_threads"] == settings["device_threads"] >= 1
    assert {row["part"] for row in rows if row["kind"] == "profile"} >= {"two_views_whole"}

    report = cpu_stage.render(lines)
    assert report in proc.stdout
    threads = settings["device_threads"]
    for label in [*cpu_stage.SIDES.values(), "SMOKE SIZE"]:
        assert label.format(threads=threads) in report
    figures = cpu_stage.summary(rows)
    assert len(figures["ratios"]) == 4
    for name, values in figures["ratios"].items():
        assert f"| {name} | {values[0]:.2f}x |" in report
    cores = 500 / sides["stream"]["samples_per_cpu_s"]
    assert f"= **{cores:.2f} cores**. GPU rate: the test's figure." in report
    assert not (REPO / "bench" / "results" / "cpu_stage.jsonl").exists() or all(
        line["run"] != lines[0]["run"] for line in results.latest_run("cpu_stage")
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats", "3"], "at least 5"),
        (["--smoke", "--repeats", "1"], "--smoke needs --results-dir"),
    ],
)
def test_too_few_repeats_and_smoke_into_bench_results_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cpu_stage.parse(argv)
    assert message in capsys.readouterr().err
