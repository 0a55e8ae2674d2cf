"""A resume reads the checkpoint once (rank 0) and every rank ends with identical state,
over real gloo ranks; a checkpoint rank 0 cannot read fails every rank, without a hang."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distributed import run_under_torchrun

pytestmark = pytest.mark.slow  # every test here starts real torchrun workers


def _fingerprint(value) -> str:
    from ssl_train.checkpoint import flatten_state

    tensors, skeleton = flatten_state(value)
    digest = hashlib.sha256(repr(skeleton).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}{tensor.dtype}{list(tensor.shape)}".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resume_and_count(run_dir: str, chunk_bytes: int) -> dict:
    from shards import storage
    from ssl_train import state_broadcast
    from ssl_train.checkpoint import CheckpointStore

    reads: list[int] = []
    storage.add_listener(lambda event, n: reads.append(n) if event == "read_bytes" else None)
    state_broadcast.CHUNK_BYTES = chunk_bytes  # several chunks, tensors split across them
    loaded = state_broadcast.load_latest_once(CheckpointStore(run_dir), torch.device("cpu"))
    step, state = loaded if loaded is not None else (None, None)
    return {
        "rank": dist.get_rank(),
        "step": step,
        "bytes_read": sum(reads),
        "state": _fingerprint(state),
    }


def resume_damaged(run_dir: str) -> str:
    from ssl_train import state_broadcast
    from ssl_train.checkpoint import CheckpointError, CheckpointStore

    try:
        state_broadcast.load_latest_once(CheckpointStore(run_dir), torch.device("cpu"))
    except CheckpointError as exc:
        return str(exc)
    return "loaded"


def _state() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "step": 7,
        "model": {
            "w": torch.randn(300, 7, generator=generator),
            "b": torch.randn(5, generator=generator).to(torch.bfloat16),
            "n": torch.tensor(12, dtype=torch.int64),
            "empty": torch.zeros(0, 3),
            "mask": torch.tensor([True, False, True]),
        },
        "schedule": {"lr": 0.1, "ids": (1, 2), "nan": float("nan")},
    }


def resume_three_run_dirs(fresh: str, saved: str, damaged: str) -> dict:
    return {
        "fresh": resume_and_count(fresh, 1000),
        "saved": resume_and_count(saved, 1000),
        "damaged": resume_damaged(damaged),
    }


def test_rank_0_reads_the_checkpoint_and_every_rank_gets_it_bit_for_bit(tmp_path: Path) -> None:
    """One torchrun, three resumes: a fresh run dir, a saved checkpoint (sent in chunks of
    1,000 bytes, tensors split across them) and a damaged one."""
    from ssl_train.checkpoint import TENSORS_FILE, CheckpointStore

    saved = CheckpointStore(str(tmp_path / "saved"))
    saved.save(7, _state())
    damaged = CheckpointStore(str(tmp_path / "damaged"))
    (Path(damaged.save(3, _state())) / TENSORS_FILE).write_bytes(b"damaged")
    dirs = [str(tmp_path / name) for name in ("fresh", "saved", "damaged")]
    results = run_under_torchrun(resume_three_run_dirs, 3, *dirs, timeout_s=120)

    assert [r["fresh"]["step"] for r in results] == [None] * 3
    loaded = [r["saved"] for r in results]
    assert {r["step"] for r in loaded} == {7}
    assert {r["state"] for r in loaded} == {_fingerprint(saved.load(7))}
    by_rank = {r["rank"]: r["bytes_read"] for r in loaded}
    assert by_rank[0] > 8400 and by_rank[1] == by_rank[2] == 0  # only rank 0 touched storage
    messages = {r["damaged"] for r in results}  # the same error everywhere, nobody waits
    assert len(messages) == 1 and TENSORS_FILE in messages.pop()
