"""Checkpoints: exact round trips, atomicity under a real SIGKILL, damage detection, no
code execution from a crafted file, pruning, and background saving; locally and on the
session's real S3 server (SeaweedFS, credentials checked)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from shards import storage
from ssl_train.checkpoint import (
    AsyncCheckpointer,
    CheckpointError,
    CheckpointStore,
    flatten_state,
    rng_state,
    set_rng_state,
    unflatten_state,
)
from ssl_train.optim import LARS, lars_param_groups

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["local", "s3"])
def run_dir(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A run directory on local disk, then in a fresh bucket of the S3 server."""
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('s3_bucket').url}/run"


def assert_same(got: Any, want: Any, path: str = "") -> None:
    """Equal down to types, dict key types, dtypes, shapes and float bits."""
    expected = dict if isinstance(want, dict) else type(want)  # OrderedDict comes back a dict
    assert type(got) is expected, f"{path}: {type(got)} != {type(want)}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert torch.equal(got, want), path
    elif isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want), f"{path}: {got} != {want}"
    elif isinstance(want, dict):
        assert [(type(k), k) for k in got] == [(type(k), k) for k in want], path
        for key in want:
            assert_same(got[key], want[key], f"{path}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}/{i}")
    else:
        assert got == want, path


def trained_state() -> dict[str, Any]:
    """What a training loop saves: model, LARS after two steps, RNGs, odd values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5))
    optimizer = LARS(lars_param_groups(model, weight_decay=1e-4), lr=0.3)
    for _ in range(2):
        model(torch.randn(2, 3, 6, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    base = torch.arange(12, dtype=torch.float32)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "step": 2,
        "nested": (1, (2.5, "x", None), [True, False, ()], {}),
        "keys": {1: "int one", "1": "str one", 0: {2: (3,)}},
        "floats": [math.nan, -math.nan, math.inf, -math.inf, -0.0, 5e-324, 0.1],
        "bf16": torch.randn(3, 2).to(torch.bfloat16),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "bytes": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "views": [base[:6], base[6:], base.view(3, 4).t(), base],
    }


def test_flatten_round_trips_a_training_state_exactly() -> None:
    state = trained_state()
    assert isinstance(next(iter(state["optimizer"]["state"])), int)
    tensors, skeleton = flatten_state(state)
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))  # really JSON

    assert "model/0.weight" in tensors and "optimizer/state/0/momentum_buffer" in tensors
    assert len(set(tensors)) == len(tensors)
    assert_same(unflatten_state(skeleton, tensors), state)


def test_flatten_names_unsupported_leaves() -> None:
    with pytest.raises(TypeError, match="'a/1/b' is a set"):
        flatten_state({"a": [0, {"b": {1, 2}}]})
    with pytest.raises(TypeError, match="'x' is a object"):
        flatten_state({"x": object()})
    with pytest.raises(TypeError, match="tuple key"):
        flatten_state({"m": {(1, 2): 3}})


def test_rng_state_restores_every_generator() -> None:
    def draws() -> list[Any]:
        return [torch.rand(4), np.random.rand(3), np.random.randn(), random.random()]

    random.gauss(0, 1)  # leave cached Gaussians behind in both Python and numpy
    np.random.randn()
    tensors, skeleton = flatten_state(rng_state())
    first = draws()
    set_rng_state(unflatten_state(json.loads(json.dumps(skeleton)), tensors))
    again = draws()
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]


def test_save_and_load_round_trip(run_dir: str) -> None:
    store = CheckpointStore(run_dir)
    assert store.steps() == [] and store.latest() is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        store.load()
    state = trained_state()
    url = store.save(7, state)
    assert url == storage.join(run_dir, "checkpoints", "step-000000007")
    store.save(12, {"step": 12})

    assert store.steps() == [7, 12] and store.latest() == 12
    assert_same(store.load(7), state)
    assert store.load() == {"step": 12}
    # A new process (a resume) sees the same through a fresh store.
    assert CheckpointStore(run_dir).latest() == 12
    with pytest.raises(CheckpointError, match="no complete checkpoint at step 8"):
        store.load(8)


def test_resaving_a_step_replaces_it(run_dir: str) -> None:
    store = CheckpointStore(run_dir)
    store.save(3, {"w": torch.ones(100), "old": 1})
    store.save(3, {"w": torch.zeros(2)})
    assert_same(store.load(3), {"w": torch.zeros(2)})


def test_unfinished_checkpoints_are_invisible(run_dir: str) -> None:
    store = CheckpointStore(run_dir)
    store.save(1, {"step": 1})
    store.save(2, {"step": 2})
    fs, _ = storage.filesystem(run_dir)
    fs.rm_file(storage.filesystem(storage.join(store.url(2), "COMPLETE.json"))[1])
    storage.write_bytes_atomic(storage.join(store.url(3), "tensors.safetensors"), b"\x10\x00")
    storage.write_bytes_atomic(storage.join(store.url(3), "state.json"), b'{"form')

    assert store.steps() == [1] and store.latest() == 1
    assert store.load() == {"step": 1}
    with pytest.raises(CheckpointError, match="no complete checkpoint at step 3"):
        store.load(3)


CRASHING_CHILD = textwrap.dedent(
    """
    import sys, torch
    from ssl_train.checkpoint import CheckpointStore
    store = CheckpointStore(sys.argv[1])
    store.save(1, {"w": torch.ones(3)})
    big = {"w": torch.zeros(16 * 1024**2), "v": torch.ones(8 * 1024**2)}
    while True:  # rewriting step 2 over and over: the parent kills one mid-write
        store.save(2, big)
    """
)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    step2 = run / "checkpoints" / "step-000000002"
    child = subprocess.Popen([sys.executable, "-c", CRASHING_CHILD, str(run)], cwd=REPO)
    try:
        killed_mid_write = _kill_mid_write(child, step2)
    finally:
        child.kill()
        child.wait()
    assert killed_mid_write, "never caught the child between its first byte and COMPLETE.json"
    assert os.listdir(step2), "the kill should leave a partial step 2 behind"

    store = CheckpointStore(str(run))
    assert store.steps() == [1] and store.latest() == 1
    assert_same(store.load(), {"w": torch.ones(3)})
    store.save(3, {"w": torch.zeros(1)})  # and the leftover goes
    assert sorted(os.listdir(run / "checkpoints")) == ["step-000000001", "step-000000003"]


def _kill_mid_write(child: subprocess.Popen, step_dir: Path, timeout_s: float = 60) -> bool:
    """Freeze the child once step 2's files have started to appear; if COMPLETE.json is
    not there while it is frozen, it is mid-write: SIGKILL it. Else thaw and try again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and child.poll() is None:
        try:
            names = os.listdir(step_dir)
        except FileNotFoundError:
            names = []
        if names and "COMPLETE.json" not in names:
            os.kill(child.pid, signal.SIGSTOP)
            os.waitpid(child.pid, os.WUNTRACED)
            if "COMPLETE.json" not in os.listdir(step_dir):
                os.kill(child.pid, signal.SIGKILL)
                return True
            os.kill(child.pid, signal.SIGCONT)
        time.sleep(0.001)
    return False


def test_flipped_byte_is_reported_as_damage(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    store.save(1, {"w": torch.arange(100)})
    path = Path(store.url(1)) / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors does not match the sha256"):
        store.load(1)
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(CheckpointError, match=r"1/tensors\.safetensors has \d+ bytes, COMPLETE"):
        store.load()


class _CreatesFile:
    """Unpickling this runs ``open(path, "w")``: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def _craft_checkpoint(run: Path, tensors: bytes, state: bytes, fmt: int = 1) -> CheckpointStore:
    """A step-1 checkpoint whose COMPLETE.json vouches for whatever bytes it holds."""
    folder = run / "checkpoints" / "step-000000001"
    folder.mkdir(parents=True)
    files = {"tensors.safetensors": tensors, "state.json": state}
    table = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        table[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    complete = {"format": fmt, "step": 1, "files": table}
    (folder / "COMPLETE.json").write_text(json.dumps(complete))
    return CheckpointStore(str(run))


def test_a_pickle_in_a_checkpoint_is_refused_unrun(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_CreatesFile(probe)))  # the payload is live
    assert probe.exists()

    marker = tmp_path / "marker"
    state = json.dumps({"format": 1, "skeleton": {"dict": []}}).encode()
    store = _craft_checkpoint(tmp_path / "run", pickle.dumps(_CreatesFile(marker)), state)
    assert store.latest() == 1
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors is not a safetensors file"):
        store.load()
    assert not marker.exists()


def test_bad_state_json_and_unknown_format_are_refused(tmp_path: Path) -> None:
    tensors = CheckpointStore(str(tmp_path / "ok"))
    tensors.save(1, {})
    good = (Path(tensors.url(1)) / "tensors.safetensors").read_bytes()

    store = _craft_checkpoint(tmp_path / "a", good, b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match=r"state\.json is not valid JSON"):
        store.load()
    state = json.dumps({"format": 1, "skeleton": {"dict": []}}).encode()
    store = _craft_checkpoint(tmp_path / "b", good, state, fmt=99)
    with pytest.raises(CheckpointError, match=r"checkpoint format 99, but this ssl-train reads"):
        store.load()
    state = json.dumps({"format": 1, "skeleton": {"tensor": "missing"}}).encode()
    store = _craft_checkpoint(tmp_path / "c", good, state)
    with pytest.raises(CheckpointError, match=r"state\.json does not match"):
        store.load()


def _step_dirs(run_dir: str) -> list[str]:
    """The step folders that still hold objects. From the objects, not a folder listing:
    SeaweedFS lists a prefix whose objects are all deleted for a few seconds more (its
    empty-folder cleanup is delayed), which AWS S3 never does."""
    fs, path = storage.filesystem(storage.join(run_dir, "checkpoints"))
    fs.invalidate_cache(path)
    return sorted({p[len(path) :].strip("/").split("/")[0] for p in fs.find(path)})


def test_keep_prunes_old_and_leftover_checkpoints(run_dir: str) -> None:
    with pytest.raises(ValueError, match="keep=0"):
        CheckpointStore(run_dir, keep=0)
    store = CheckpointStore(run_dir, keep=2)
    for step in range(1, 5):
        store.save(step, {"step": step, "w": torch.full((3,), step)})
    assert store.steps() == [3, 4]
    for leftover in (1, 9):  # a crash below the newest, and a write perhaps under way
        storage.write_bytes_atomic(storage.join(store.url(leftover), "state.json"), b"{")

    store.save(5, {"step": 5})
    assert store.steps() == [4, 5]
    assert _step_dirs(run_dir) == ["step-000000004", "step-000000005", "step-000000009"]
    assert store.load(4)["step"] == 4


def test_async_saves_a_snapshot_in_the_background(run_dir: str) -> None:
    store = CheckpointStore(run_dir)
    before = set(threading.enumerate())
    saver = AsyncCheckpointer(store)
    writers = set(threading.enumerate()) - before
    weights = torch.zeros(1000)
    state = {"w": weights, "epoch": 0}
    saver.save(1, state)
    weights.add_(1)  # the next training step, while the write may still run
    state["epoch"] = 1
    saver.save(2, state)
    saver.wait()

    assert_same(store.load(1), {"w": torch.zeros(1000), "epoch": 0})
    assert_same(store.load(2), {"w": torch.ones(1000), "epoch": 1})
    assert saver.last_step == 2 and saver.last_duration_s is not None
    assert saver.last_duration_s > 0
    files = ("tensors.safetensors", "state.json")
    sizes = [storage.size_or_none(storage.join(store.url(2), name)) for name in files]
    assert saver.last_bytes == sum(sizes)

    saver.close()
    assert writers and not any(t.is_alive() for t in writers)
    with pytest.raises(RuntimeError, match="after close"):
        saver.save(3, state)


def test_async_write_errors_surface_on_wait_and_next_save(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    saver = AsyncCheckpointer(CheckpointStore(str(blocker / "run")))
    saver.save(1, {"w": torch.ones(2)})  # returns: the failure happens in the thread
    with pytest.raises(CheckpointError, match="a-file/run/checkpoints/step-000000001"):
        saver.wait()
    saver.wait()  # reported once

    saver.save(2, {"w": torch.ones(2)})
    with pytest.raises(CheckpointError, match="step-000000002: saving the checkpoint failed"):
        saver.save(3, {"w": torch.ones(2)})
    saver.close()
    assert saver.last_step is None and saver.last_bytes is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_async_copies_cuda_tensors_to_the_host(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path))
    weights = torch.arange(1000, device="cuda", dtype=torch.float32)
    state = {"w": weights, "rng": rng_state()}
    with AsyncCheckpointer(store) as saver:
        saver.save(1, state)
        weights.mul_(0)
    loaded = store.load(1)
    assert loaded["w"].device.type == "cpu"
    assert torch.equal(loaded["w"], torch.arange(1000, dtype=torch.float32))
    assert len(loaded["rng"]["cuda"]) == torch.cuda.device_count()
    first = torch.rand(3, device="cuda")
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3, device="cuda"), first)


def test_a_fence_that_refuses_leaves_the_save_uncommitted(tmp_path: Path) -> None:
    """The run dir's lease fences every save: a check before writing, and the commit is
    the fence's own (a compare-and-swap). Refused there, the checkpoint stays uncommitted
    (a resume never picks it, although its COMPLETE.json was written), and the
    background writer raises the refusal itself rather than a storage error."""
    from ssl_train.lease import LeaseLost

    class Fence:
        generation = 4

        def __init__(self) -> None:
            self.recorded: list[str] | None = None
            self.calls: list[str] = []

        def check(self) -> None:
            self.calls.append("check")

        def checkpoints(self) -> list[str] | None:
            return self.recorded

        def commit(self, checkpoints: list[str]) -> None:
            self.calls.append("commit")
            if self.recorded is not None:
                raise LeaseLost("taken over")
            self.recorded = checkpoints

    fence = Fence()
    store = CheckpointStore(str(tmp_path), fence=fence)
    store.save(1, {"w": torch.zeros(2)})
    assert fence.calls == ["check", "commit"] and fence.recorded == ["step-000000001-g4"]
    with AsyncCheckpointer(store) as saver:
        saver.save(2, {"w": torch.ones(2)})
        with pytest.raises(LeaseLost, match="taken over"):
            saver.wait()
    assert store.steps() == [1] and fence.recorded == ["step-000000001-g4"]
    assert (tmp_path / "checkpoints" / "step-000000002-g4" / "COMPLETE.json").exists()
    assert CheckpointStore(str(tmp_path), fence=fence).load()["w"].tolist() == [0.0, 0.0]


def test_a_large_checkpoint_goes_up_in_parallel_parts(
    s3_bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preemption save has a fixed window: its tensors go up as a multipart upload
    with several parts in flight at once, so a slow store costs one part's time per
    batch of parts, not per part."""
    import s3fs
    from flaky_proxy import FlakyProxy

    monkeypatch.setattr(storage, "MULTIPART_PART_BYTES", 5 * 1024**2)  # S3's smallest part
    with FlakyProxy(
        s3_bucket.server.env["AWS_ENDPOINT_URL"], slow_writes={"partNumber="}, write_seconds=1
    ) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        store = CheckpointStore(f"{s3_bucket.url}/run")
        state = {"w": torch.arange(6 * 1024**2, dtype=torch.float32)}  # 24 MiB: 5 parts
        store.save(1, state)
        assert torch.equal(store.load(1)["w"], state["w"])
    parts = [path for method, path, _, _ in proxy.served if "partNumber=" in path]
    assert len(parts) == 5
    assert proxy.most_slow_in_flight >= 3, proxy.most_slow_in_flight
