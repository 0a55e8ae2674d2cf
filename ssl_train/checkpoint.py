"""Atomic, checksummed, pickle-free checkpoints of training state, local or in object storage.

A run resumes from its newest *complete* checkpoint, so a checkpoint must either be
wholly there or not exist at all, must not run code when loaded (``torch.load`` of a
pickle can), and must say so when its bytes were damaged on the way. Every storage
access goes through :mod:`shards.storage`, so local paths and ``s3://`` URLs behave
alike and errors name the (redacted) URL.

Layout of one checkpoint, ``<run_dir>/checkpoints/step-<9-digit step>-g<generation>/``
(the generation of the run dir's lease that wrote it; without a lease, no ``-g`` part):

- ``tensors.safetensors``: every tensor of the state (safetensors format, written
  with ``safetensors.torch.save_file`` to a local temporary file, then moved into
  place; on S3 large files go up as a multipart upload).
- ``state.json``: ``{"format": 1, "skeleton": ...}``, the state's structure and its
  non-tensor values (see :func:`flatten_state`).
- ``COMPLETE.json``, written last: ``{"format": 1, "step": N, "files": {name:
  {"bytes": size, "sha256": hex}}}`` for the two files above. A step directory
  without it is an unfinished write (a crash). A training job then commits the
  checkpoint in its lease (see :class:`CheckpointStore`); only committed checkpoints are
  seen by :meth:`CheckpointStore.steps`, :meth:`~CheckpointStore.latest` and
  :meth:`~CheckpointStore.load`.

Loading checks each file's size and sha256 against ``COMPLETE.json``, parses tensors
with ``safetensors.torch.load`` and JSON with ``json.loads``, and nothing else: no
pickle, no ``torch.load``. Only one process (rank 0) should save into a run dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import signal
import struct
import tempfile
import threading
import time
from typing import Any, Protocol

import numpy as np
import safetensors.torch
import torch

from shards import storage
from shards.errors import ShardsError
from ssl_train.errors import UserError
from ssl_train.lease import LeaseLost, read_head

FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
COMPLETE_FILE = "COMPLETE.json"
CHECKPOINTS_DIR = "checkpoints"

_STEP_DIR = re.compile(r"step-(\d+)(?:-g(\d+))?")
# a test hook: the process stops itself (SIGSTOP) right before committing this step, the
# worst moment for it to be frozen; tests/test_fencing.py continues it with SIGCONT
FREEZE_BEFORE_COMMIT_ENV = "SSL_TRAIN_TEST_FREEZE_BEFORE_COMMIT"
_HASH_CHUNK = 8 * 1024**2
# safetensors reserves this name for its own metadata.
_RESERVED_NAMES = frozenset({"__metadata__"})

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint cannot be written or read; the message names it and says what to do.

    Example:
        >>> raise CheckpointError("s3://b/run/checkpoints/step-000000005: damaged")
        Traceback (most recent call last):
        ...
        ssl_train.checkpoint.CheckpointError: s3://b/run/checkpoints/step-000000005: damaged
    """


# ---------------------------------------------------------------- flatten / unflatten


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state into named tensors and a JSON-serialisable skeleton.

    safetensors stores only a flat ``name -> tensor`` map, and JSON cannot tell int
    keys from str keys, tuples from lists or keep nan; the skeleton records all of
    that so :func:`unflatten_state` rebuilds the state exactly. Leaves may be tensors,
    None, bool, int, float or str; containers dicts (str or int keys), lists and
    tuples (dict subclasses such as a ``state_dict``'s OrderedDict come back as plain
    dicts, which ``load_state_dict`` accepts). Tensor names follow their path (``"model/conv.weight"``). Tensors come
    back detached and without copies, except that a non-contiguous one is made
    contiguous and one sharing storage with an earlier one is cloned, because
    safetensors stores neither.

    Example:
        >>> tensors, skeleton = flatten_state({"step": 7, "w": torch.zeros(2)})
        >>> list(tensors), skeleton
        (['w'], {'dict': [['step', 7], ['w', {'tensor': 'w'}]]})
    """
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()

    def visit(value: Any, path: list[str]) -> Any:
        if isinstance(value, torch.Tensor):
            name = _unique_name(path, tensors)
            tensors[name] = _storable(value, path, seen_storages)
            return {"tensor": name}
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return _encode_float(float(value))
        if isinstance(value, str):
            return str(value)
        if isinstance(value, dict):
            return {"dict": [[_key(k, path), visit(v, [*path, str(k)])] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            items = [visit(v, [*path, str(i)]) for i, v in enumerate(value)]
            return {"tuple": items} if isinstance(value, tuple) else items
        raise TypeError(
            f"state at '{_path_text(path)}' is a {type(value).__name__}; checkpoints hold "
            "tensors, None, bool, int, float, str, and dicts/lists/tuples of them"
        )

    return tensors, visit(state, [])


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild the state that :func:`flatten_state` split into ``skeleton`` and ``tensors``.

    Example:
        >>> state = {0: (1.5, float("nan")), "w": torch.ones(1)}
        >>> tensors, skeleton = flatten_state(state)
        >>> unflatten_state(skeleton, tensors)
        {0: (1.5, nan), 'w': tensor([1.])}
    """
    if skeleton is None or isinstance(skeleton, (bool, int, str)):
        return skeleton
    if isinstance(skeleton, list):
        return [unflatten_state(item, tensors) for item in skeleton]
    if isinstance(skeleton, dict) and len(skeleton) == 1:
        ((tag, body),) = skeleton.items()
        if tag == "tensor":
            return tensors[body]
        if tag == "dict":
            return {key: unflatten_state(value, tensors) for key, value in body}
        if tag == "tuple":
            return tuple(unflatten_state(item, tensors) for item in body)
        if tag in ("float", "float_bits"):
            return _decode_float(tag, body)
    raise ValueError(f"not a state skeleton node: {skeleton!r:.200}")


def _path_text(path: list[str]) -> str:
    return "/".join(path) or "<root>"


def _unique_name(path: list[str], taken: dict[str, torch.Tensor]) -> str:
    """The path as a tensor name; a suffix keeps it unique (e.g. keys 1 and "1")."""
    base = _path_text(path)
    name, n = base, 0
    while name in taken or name in _RESERVED_NAMES:
        n += 1
        name = f"{base}~{n}"
    return name


def _key(key: Any, path: list[str]) -> str | int:
    """A dict key as JSON keeps it: str and int (bool included) stay distinct."""
    if isinstance(key, bool):
        return key
    if isinstance(key, int):
        return int(key)
    if isinstance(key, str):
        return str(key)
    raise TypeError(
        f"state at '{_path_text(path)}' has a {type(key).__name__} key {key!r}; "
        "checkpoints keep only str and int dict keys"
    )


def _storable(tensor: torch.Tensor, path: list[str], seen_storages: set[int]) -> torch.Tensor:
    """``tensor`` as safetensors can write it: dense, contiguous, owning its storage."""
    if tensor.layout != torch.strided:
        raise TypeError(
            f"state at '{_path_text(path)}' is a {tensor.layout} tensor; "
            "convert it with .to_dense() first"
        )
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    else:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen_storages:
            tensor = tensor.clone()
    seen_storages.add(tensor.untyped_storage().data_ptr())
    return tensor


def _encode_float(value: float) -> dict[str, str]:
    """repr round-trips every non-nan float exactly; nan keeps its sign and payload bits."""
    if math.isnan(value):
        return {"float_bits": struct.pack(">d", value).hex()}
    return {"float": repr(value)}


def _decode_float(tag: str, body: str) -> float:
    if tag == "float_bits":
        return struct.unpack(">d", bytes.fromhex(body))[0]
    return float(body)


# ---------------------------------------------------------------- random number generators


def rng_state() -> dict:
    """State of every RNG a training process draws from, as tensors and plain values.

    torch's CPU generator, every CUDA device's (when CUDA is available), numpy's
    global RandomState and Python's ``random``: restoring all of them makes a resumed
    run draw what the uninterrupted run would have drawn.

    Example:
        >>> sorted(rng_state())
        ['cuda', 'numpy', 'python', 'torch']
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured, so the next draws repeat exactly.

    CUDA states are restored for the devices present (a run resumed on a machine
    with fewer GPUs restores the first ones).

    Example:
        >>> saved = rng_state()
        >>> first = torch.rand(2)
        >>> set_rng_state(saved)
        >>> torch.equal(torch.rand(2), first)
        True
    """
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.to("cpu", torch.uint8), device)
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    python = state["python"]
    internal = tuple(int(x) for x in python["internal"].tolist())
    random.setstate((python["version"], internal, python["gauss_next"]))


# ---------------------------------------------------------------- store


class Fence(Protocol):
    """What keeps a job that lost the run dir from committing (the run dir's lease,
    :class:`ssl_train.lease.RunDirLease`): a generation to name new checkpoints with, a
    check before writing, and the commit itself, a compare-and-swap that records the
    committed checkpoints and fails for a generation that is no longer current."""

    @property
    def generation(self) -> int: ...

    def check(self) -> None: ...

    def checkpoints(self) -> list[str] | None: ...

    def commit(self, **changes: Any) -> None: ...


class CheckpointStore:
    """Checkpoints under ``<run_dir>/checkpoints/step-<9-digit step>[-g<generation>]/``.

    ``save`` writes the files, then ``COMPLETE.json``, then commits, then deletes all
    but the newest ``keep`` committed checkpoints and leftovers older than the one just
    written, so storage holds a bounded number of checkpoints and a resume never picks
    a half-written one.

    With a ``fence`` (a training job's lease) a checkpoint's directory carries the
    lease's generation, and its commit is the fence's compare-and-swap recording the
    committed directories: a job that lost the run dir cannot commit, and its files lie
    in directories no current writer uses. Resume reads only what was recorded
    (:func:`ssl_train.lease.read_head` for a reader without a lease). Without a fence, or
    in a run dir whose lease never recorded any (older versions), ``COMPLETE.json`` is
    the commit and directories without a generation are the checkpoints.

    Example:
        >>> import tempfile
        >>> store = CheckpointStore(tempfile.mkdtemp(), keep=2)
        >>> for step in (10, 20, 30):
        ...     _ = store.save(step, {"w": torch.full((2,), float(step))})
        >>> store.steps(), store.latest()
        ([20, 30], 30)
        >>> store.load()["w"]
        tensor([30., 30.])
    """

    def __init__(self, run_dir: str, keep: int = 3, fence: Fence | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}: keep at least 1 checkpoint, or resuming is impossible")
        self.run_dir = run_dir
        self.keep = keep
        self.root = storage.join(run_dir, CHECKPOINTS_DIR)
        self.fence = fence

    def url(self, step: int) -> str:
        """Where the committed checkpoint of ``step`` lives, or where a save of it would
        go when there is none.

        Example:
            >>> CheckpointStore("/tmp/no-such-run").url(42)
            '/tmp/no-such-run/checkpoints/step-000000042'
        """
        step = _check_step(step)
        name = self._committed().get(step) or self._new_name(step)
        return storage.join(self.root, name)

    def _new_name(self, step: int) -> str:
        generation = 0 if self.fence is None else self.fence.generation
        return _dir_name(step, generation)

    def save(self, step: int, state: dict) -> str:
        """Write ``state`` as the checkpoint of ``step`` and return its URL; blocks until done.

        Example:
            >>> import tempfile
            >>> url = CheckpointStore(tempfile.mkdtemp()).save(1, {"epoch": 0})
            >>> url.endswith("checkpoints/step-000000001")
            True
        """
        if not isinstance(state, dict):
            raise TypeError(f"state is a {type(state).__name__}; give a dict")
        tensors, skeleton = flatten_state(state)
        return self._save_flat(_check_step(step), tensors, skeleton)[0]

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first.

        Example:
            >>> import tempfile
            >>> CheckpointStore(tempfile.mkdtemp()).steps()
            []
        """
        return sorted(self._committed())

    def latest(self) -> int | None:
        """Step of the newest complete checkpoint; None when there is none (a fresh run).

        Example:
            >>> import tempfile
            >>> CheckpointStore(tempfile.mkdtemp()).latest() is None
            True
        """
        steps = self.steps()
        return steps[-1] if steps else None

    def load(self, step: int | None = None) -> dict:
        """Read, verify and return the state saved at ``step`` (default: the newest).

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> _ = store.save(3, {"lr": 0.1, "ids": (1, 2)})
            >>> store.load(3)
            {'lr': 0.1, 'ids': (1, 2)}
        """
        if step is None:
            step = self.latest()
            if step is None:
                raise CheckpointError(
                    f"{storage.redact(self.root)}: no complete checkpoint; start the run "
                    "from scratch or check the run directory"
                )
        url = self.url(step)
        complete = self._read_complete(url, step)
        data = {name: self._read_verified(url, name, complete[name]) for name in complete}
        skeleton = _parse_state_json(url, data[STATE_FILE])
        tensors = _parse_tensors(url, data[TENSORS_FILE])
        try:
            return unflatten_state(skeleton, tensors)
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{storage.redact(url)}: {STATE_FILE} does not match {TENSORS_FILE} ({exc!r}); "
                f"the checkpoint is damaged: delete {storage.redact(url)} to resume from an "
                "older one"
            ) from None

    def load_values(self, step: int) -> dict[str, Any]:
        """The entries of checkpoint ``step``'s top-level state that hold no tensors (its
        configuration, data fingerprint, step...), read from its small ``state.json``
        alone: what a check before training needs, without the tensors' gigabytes.

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> _ = store.save(3, {"step": 3, "w": torch.zeros(2)})
            >>> store.load_values(3)
            {'step': 3}
        """
        url = self.url(step)
        complete = self._read_complete(url, step)
        skeleton = _parse_state_json(
            url, self._read_verified(url, STATE_FILE, complete[STATE_FILE])
        )
        values = {}
        for key, value in skeleton.get("dict", []) if isinstance(skeleton, dict) else []:
            try:
                values[key] = unflatten_state(value, {})
            except KeyError:  # a tensor in it
                continue
        return values

    # -- writing

    def _save_flat(
        self, step: int, tensors: dict[str, torch.Tensor], skeleton: Any
    ) -> tuple[str, int]:
        """Write one flattened state and commit it; returns its URL and the bytes written."""
        name = self._new_name(step)
        url = storage.join(self.root, name)
        started = time.monotonic()
        if self.fence is not None:
            self.fence.check()
        try:
            recorded = self._committed()
            self._delete(url)  # leftovers of an earlier try at this step, this generation
            files = {
                TENSORS_FILE: self._write_tensors(url, tensors),
                STATE_FILE: self._write_state(url, skeleton),
            }
            complete = {"format": FORMAT_VERSION, "step": step, "files": files}
            storage.write_bytes_atomic(
                storage.join(url, COMPLETE_FILE), json.dumps(complete, indent=1).encode()
            )
            kept = sorted({**recorded, step: name}.items())[-self.keep :]
            retained = [kept_name for _, kept_name in kept]
            if self.fence is not None:
                _freeze_for_test(step)
                # the commit: takes effect only while this job holds the run dir
                self.fence.commit(checkpoints=retained)
        except Exception as exc:
            if self.fence is not None and not isinstance(exc, LeaseLost):
                # the job that took the run dir over may have deleted this stale write's
                # directory: then that, not the storage error, is what stops this job
                self.fence.commit()
            if isinstance(exc, ShardsError):
                raise CheckpointError(
                    f"{storage.redact(url)}: saving the checkpoint failed: {exc}"
                ) from exc
            if isinstance(exc, OSError):
                raise CheckpointError(
                    f"{storage.redact(url)}: saving the checkpoint failed ({exc}); check that "
                    "the run directory is writable and has free space"
                ) from exc
            raise
        nbytes = sum(f["bytes"] for f in files.values())
        log.info(
            "saved checkpoint %s (%.1f MB in %.1f s)",
            storage.redact(url),
            nbytes / 1e6,
            time.monotonic() - started,
        )
        self._prune(name, set(retained))
        return url, nbytes

    def _write_tensors(self, url: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Stage the safetensors file locally (beside its destination when local), hash
        it, then move it into place: a rename locally, a multipart upload on S3."""
        target = storage.join(url, TENSORS_FILE)
        if storage.is_local(url):
            folder = storage.filesystem(url)[1]
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{TENSORS_FILE}.", suffix=".tmp", dir=folder)
        else:
            fd, tmp = tempfile.mkstemp(prefix="ssl-train-ckpt-", suffix=".safetensors")
        os.close(fd)
        try:
            safetensors.torch.save_file(tensors, tmp, metadata={"format": str(FORMAT_VERSION)})
            entry = _hash_file(tmp)
            storage.put_file_atomic(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return entry

    def _write_state(self, url: str, skeleton: Any) -> dict[str, Any]:
        data = json.dumps(
            {"format": FORMAT_VERSION, "skeleton": skeleton}, allow_nan=False
        ).encode()
        storage.write_bytes_atomic(storage.join(url, STATE_FILE), data)
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    # -- listing and deleting

    def _list(self) -> dict[str, set[str]]:
        """Every ``step-*`` directory and the names inside it, freshly listed."""
        try:
            fs, root = storage.filesystem(self.root)
            fs.invalidate_cache(root)  # s3fs caches listings; a resume must see the truth
            paths = storage.with_retries(
                lambda: fs.find(root, withdirs=True, detail=False), self.root
            )
        except ShardsError as exc:
            raise CheckpointError(f"cannot list the checkpoints: {exc}") from exc
        found: dict[str, set[str]] = {}
        prefix = root.rstrip("/") + "/"
        for path in paths:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            if _STEP_DIR.fullmatch(parts[0]):
                names = found.setdefault(parts[0], set())
                if len(parts) == 2:
                    names.add(parts[1])
        return found

    def _committed(self) -> dict[int, str]:
        """Step to directory name of every committed checkpoint: those the lease
        recorded; where none were ever recorded, the complete ones without a generation
        (run dirs of older versions, stores without a fence)."""
        if self.fence is not None:
            recorded = self.fence.checkpoints()
        else:
            head = read_head(self.run_dir)
            recorded = None if head is None else head.checkpoints
        if recorded is not None:
            return {_step_and_generation(name)[0]: name for name in recorded}
        return {
            _step_and_generation(name)[0]: name
            for name, names in self._list().items()
            if COMPLETE_FILE in names and _step_and_generation(name)[1] == 0
        }

    def _prune(self, just_written: str, retained: set[str]) -> None:
        """Delete every checkpoint directory not retained that is older than the one just
        written, counting generation first: what the commit dropped, and leftovers of
        crashes and of jobs that lost the run dir. Never a newer generation's: safe even
        for a job that lost the run dir since its commit, as everything the current holder
        records is either retained here or of its own, newer, generation. A failure here
        only warns: the new checkpoint is safe either way."""
        try:
            listing = self._list()
        except CheckpointError as exc:
            log.warning("could not list checkpoints to delete old ones: %s", exc)
            return
        newest = _step_and_generation(just_written)[::-1]
        doomed = [
            name
            for name in listing
            if name not in retained
            and name != just_written
            and _step_and_generation(name)[::-1] < newest
        ]
        for name in sorted(doomed):
            try:
                self._delete(storage.join(self.root, name))
            except (ShardsError, OSError) as exc:
                log.warning("could not delete old checkpoint: %s", exc)

    def _delete(self, url: str) -> None:
        """Remove a checkpoint directory, ``COMPLETE.json`` first so that a delete cut
        short leaves an incomplete checkpoint, never a damaged complete one."""
        fs, path = storage.filesystem(url)
        _remove_missing_ok(fs, storage.filesystem(storage.join(url, COMPLETE_FILE))[1], url)
        _remove_missing_ok(fs, path, url, recursive=True)
        fs.invalidate_cache(path)

    # -- reading

    def _read_complete(self, url: str, step: int) -> dict[str, dict[str, Any]]:
        """The file table of ``COMPLETE.json``; errors say what to do next."""
        complete_url = storage.join(url, COMPLETE_FILE)
        try:
            raw = storage.read_bytes(complete_url)
        except ShardsError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                raise CheckpointError(
                    f"{storage.redact(url)}: no complete checkpoint at step {step} "
                    f"(complete: {self.steps()}); pick one of those or load the newest"
                ) from None
            raise CheckpointError(f"{storage.redact(url)}: cannot read it: {exc}") from exc
        complete = _parse_json(complete_url, url, raw)
        _check_format(complete_url, complete)
        files = complete.get("files")
        if (
            complete.get("step") != step
            or not isinstance(files, dict)
            or set(files) != {TENSORS_FILE, STATE_FILE}
        ):
            raise _damaged(complete_url, url, "does not describe this checkpoint")
        return files

    def _read_verified(self, url: str, name: str, expected: dict[str, Any]) -> bytes:
        """Read one file and check its size and sha256 against ``COMPLETE.json``."""
        file_url = storage.join(url, name)
        try:
            data = storage.read_bytes(file_url)
        except ShardsError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                raise _damaged(file_url, url, "is missing") from None
            raise CheckpointError(f"{storage.redact(file_url)}: cannot read it: {exc}") from exc
        if len(data) != expected.get("bytes"):
            raise _damaged(
                file_url, url, f"has {len(data)} bytes, COMPLETE.json says {expected.get('bytes')}"
            )
        if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
            raise _damaged(file_url, url, "does not match the sha256 in COMPLETE.json")
        return data


# ---------------------------------------------------------------- asynchronous saving


class AsyncCheckpointer:
    """Writes checkpoints in a background thread so training does not wait for storage.

    ``save`` copies every tensor to host memory (so later in-place updates cannot
    change what is written) and returns; one thread writes through the store. At most
    one write is in flight: the next ``save`` first waits for it and raises its error.
    Call ``close`` (or use ``with``) before exiting, or the last write may be lost.

    Example:
        >>> import tempfile
        >>> store = CheckpointStore(tempfile.mkdtemp())
        >>> with AsyncCheckpointer(store) as saver:
        ...     w = torch.zeros(2)
        ...     saver.save(1, {"w": w})
        ...     _ = w.add_(5)  # training goes on; the checkpoint keeps the zeros
        >>> store.load(1)["w"], saver.last_step
        (tensor([0., 0.]), 1)
    """

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self.last_step: int | None = None
        self.last_duration_s: float | None = None
        self.last_bytes: int | None = None
        self._jobs: queue.Queue[tuple[int, dict[str, torch.Tensor], Any] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def save(self, step: int, state: dict) -> None:
        """Snapshot ``state`` to host memory and hand it to the writer thread."""
        if self._closed:
            raise RuntimeError("AsyncCheckpointer.save after close()")
        if not isinstance(state, dict):
            raise TypeError(f"state is a {type(state).__name__}; give a dict")
        step = _check_step(step)
        self.wait()
        tensors, skeleton = flatten_state(state)
        snapshot = {name: t.to(device="cpu", copy=True) for name, t in tensors.items()}
        self._idle.clear()
        self._jobs.put((step, snapshot, skeleton))

    def wait(self) -> None:
        """Block until no write is in flight; raise :class:`CheckpointError` if it failed."""
        self._idle.wait()
        error, self._error = self._error, None
        if isinstance(error, LeaseLost):  # not a storage failure: the job must stop
            raise error
        if isinstance(error, CheckpointError):
            raise CheckpointError(str(error)) from error
        if error is not None:
            raise CheckpointError(
                f"{storage.redact(self.store.root)}: writing a checkpoint failed "
                f"({type(error).__name__}: {error})"
            ) from error

    def close(self) -> None:
        """Wait for the last write, then stop the writer thread."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._jobs.put(None)
            self._thread.join()

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            step, tensors, skeleton = job
            started = time.monotonic()
            try:
                _, nbytes = self.store._save_flat(step, tensors, skeleton)
            except BaseException as exc:
                self._error = exc
            else:
                self.last_step, self.last_bytes = step, nbytes
                self.last_duration_s = time.monotonic() - started
            finally:
                del job, tensors  # free the host copy before idling
                self._idle.set()


# ---------------------------------------------------------------- helpers


def _dir_name(step: int, generation: int) -> str:
    """A checkpoint directory's name: the step, and the writer's lease generation.

    Example:
        >>> _dir_name(42, 3), _dir_name(42, 0)
        ('step-000000042-g3', 'step-000000042')
    """
    return f"step-{step:09d}" + (f"-g{generation}" if generation else "")


def _step_and_generation(name: str) -> tuple[int, int]:
    """A checkpoint directory's step and generation (0: written without a fence).

    Example:
        >>> _step_and_generation("step-000000042-g3"), _step_and_generation("step-000000042")
        ((42, 3), (42, 0))
    """
    match = _STEP_DIR.fullmatch(name)
    if match is None:
        raise CheckpointError(f"{name!r} is not a checkpoint directory's name")
    return int(match.group(1)), int(match.group(2) or 0)


def _freeze_for_test(step: int) -> None:
    if os.environ.get(FREEZE_BEFORE_COMMIT_ENV) == str(step):
        log.warning(
            "%s=%d: stopping this process before the commit", FREEZE_BEFORE_COMMIT_ENV, step
        )
        os.kill(os.getpid(), signal.SIGSTOP)


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r}: give a non-negative integer")
    return int(step)


def _hash_file(path: str) -> dict[str, Any]:
    """Size and sha256 of a local file, flushed to disk first so a power cut after
    the rename cannot leave a file whose contents never reached the disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _remove_missing_ok(fs: Any, path: str, url: str, recursive: bool = False) -> None:
    def remove() -> None:
        try:
            if recursive:
                fs.rm(path, recursive=True)
            else:
                fs.rm_file(path)
        except FileNotFoundError:
            pass

    storage.with_retries(remove, url)


def _damaged(file_url: str, url: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{storage.redact(file_url)} {what}: the checkpoint is damaged; delete "
        f"{storage.redact(url)} to resume from the previous checkpoint"
    )


def _parse_json(file_url: str, url: str, data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(file_url, url, f"is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _damaged(file_url, url, "is not a JSON object")
    return value


def _check_format(file_url: str, document: dict[str, Any]) -> None:
    version = document.get("format")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{storage.redact(file_url)}: checkpoint format {version!r}, but this ssl-train "
            f"reads format {FORMAT_VERSION}; use the ssl-train version that wrote it, "
            "or start a new run directory"
        )


def _parse_state_json(url: str, data: bytes) -> Any:
    file_url = storage.join(url, STATE_FILE)
    document = _parse_json(file_url, url, data)
    _check_format(file_url, document)
    if "skeleton" not in document:
        raise _damaged(file_url, url, "has no skeleton")
    return document["skeleton"]


def _parse_tensors(url: str, data: bytes) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes; parsing them runs no code, unlike a pickle."""
    try:
        return safetensors.torch.load(data)
    except Exception as exc:
        raise _damaged(
            storage.join(url, TENSORS_FILE), url, f"is not a safetensors file ({exc})"
        ) from None
