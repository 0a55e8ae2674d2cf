"""Run a test function under real multi-process ``torchrun`` on the gloo backend.

Why: the distributed parts of ssl-train (DDP wrapping, sharded data per rank,
rank-0-only checkpointing and metrics, collectives in the loss) only show their bugs
when several real processes rendezvous, exchange tensors and disagree.  Mocking
``torch.distributed`` or faking ``world_size`` tests nothing of that, so tests use this
helper instead: it launches ``python -m torch.distributed.run --standalone`` with N CPU
processes, initialises a gloo process group in each, runs one module-level function
and hands back every rank's (JSON) return value.  It never hangs: a run past its
deadline is killed, with every worker, and reported with the tail of its output.

Usage, in a test module (``tests/`` has no ``__init__.py``; the helper puts the repo
root, ``tests/`` and the function's own directory on the workers' ``PYTHONPATH``)::

    import torch
    import torch.distributed as dist

    from distributed import run_under_torchrun

    def summed(offset):  # module level, so the workers can import it
        t = torch.tensor([dist.get_rank() + offset])
        dist.all_reduce(t)
        return t.item()

    def test_sum():
        assert run_under_torchrun(summed, 2, 1) == [3, 3]

This file is also the workers' entry script: torchrun runs it as ``__main__`` with the
path of a JSON call description, so it imports nothing but the standard library at
module level.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
OUTPUT_TAIL_CHARS = 3000
_ERROR_CHARS = 4000  # per rank's traceback in an error message
_DUMP_GRACE_S = 1.0  # after asking hung workers for their stacks, before killing them

__all__ = ["TorchrunError", "TorchrunTimeoutError", "run_under_torchrun"]


class TorchrunError(RuntimeError):
    """torchrun failed: non-zero exit, or a rank wrote no result.

    ``output`` holds the combined stdout/stderr of torchrun and its workers,
    ``rank_errors`` each failing rank's traceback text, ``returncode`` torchrun's exit
    status (``None`` when it was killed on timeout).
    """

    def __init__(
        self,
        message: str,
        *,
        output: str = "",
        rank_errors: Mapping[int, str] | None = None,
        returncode: int | None = None,
    ) -> None:
        super().__init__(message)
        self.output = output
        self.rank_errors = dict(rank_errors or {})
        self.returncode = returncode


class TorchrunTimeoutError(TorchrunError, TimeoutError):
    """torchrun was still running after ``timeout_s``; it and its workers were killed."""


def _resolve(module_name: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _check_importable(fn: Callable[..., Any]) -> tuple[str, str]:
    module_name = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not callable(fn) or not module_name or not qualname:
        raise ValueError(f"run_under_torchrun needs a plain module-level function, got {fn!r}")
    if module_name == "__main__":
        raise ValueError(
            f"{qualname} is defined in __main__, which torchrun's workers cannot import; "
            "move it into an importable module (e.g. the test module itself)"
        )
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(
            f"{module_name}.{qualname} is a local function or lambda, which torchrun's "
            "workers cannot import; define it at module level"
        )
    try:
        found = _resolve(module_name, qualname)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {module_name}.{qualname}: {exc}") from exc
    if found is not fn:
        raise ValueError(
            f"{module_name}.{qualname} does not resolve to the function given "
            "(shadowed, decorated or reassigned?); pass the module-level function itself"
        )
    return module_name, qualname


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pythonpath(module_name: str) -> str:
    entries = [str(REPO_ROOT), str(TESTS_DIR)]
    module_file = getattr(sys.modules.get(module_name), "__file__", None)
    if module_file:
        entries.append(str(Path(module_file).resolve().parent))
    inherited = os.environ.get("PYTHONPATH")
    if inherited:
        entries.extend(inherited.split(os.pathsep))
    return os.pathsep.join(dict.fromkeys(e for e in entries if e))


def _tail(text: str, chars: int = OUTPUT_TAIL_CHARS) -> str:
    return text if len(text) <= chars else "[...]" + text[-chars:]


def _read_rank_errors(workdir: Path) -> dict[int, str]:
    errors = {}
    for path in sorted(workdir.glob("error-*.txt")):
        rank = int(path.stem.split("-", 1)[1])
        errors[rank] = path.read_text(errors="replace")
    return dict(sorted(errors.items()))


def _read_crashes(workdir: Path) -> dict[int, str]:
    """What faulthandler wrote for ranks that died of a fatal signal (SIGABRT, SIGSEGV):
    every thread's Python stack at that moment, which the output tail loses behind
    torchrun's own report."""
    crashes = {}
    for path in sorted(workdir.glob("fault-*.txt")):
        text = path.read_text(errors="replace").strip()
        if text:
            crashes[int(path.stem.split("-", 1)[1])] = text
    return dict(sorted(crashes.items()))


def _before_torchrun_report(output: str) -> str:
    """The output up to torchrun's first failure report: where a worker's own last
    words (a C++ ``terminate called after ...``, a gloo error) are."""
    cut = output.find("failed (exitcode")
    return output if cut == -1 else output[: output.rfind("\n", 0, cut) + 1]


def _signal_workers(workdir: Path, sig: signal.Signals) -> None:
    """Signal every worker that recorded its pid; each leads its own process group."""
    for path in workdir.glob("pid-*"):
        try:
            pid = int(path.read_text())
        except ValueError:  # being written right now; caught by a later sweep
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)


def _kill_all(proc: subprocess.Popen[bytes], workdir: Path, dump_stacks: bool) -> None:
    """Kill torchrun and its workers (torchrun starts each worker in a new session)."""
    if dump_stacks and proc.poll() is None:
        _signal_workers(workdir, signal.SIGUSR1)  # faulthandler: where is each rank stuck?
        time.sleep(_DUMP_GRACE_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    _signal_workers(workdir, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    time.sleep(0.2)  # a worker that was starting up may have written its pid just now
    _signal_workers(workdir, signal.SIGKILL)


def run_under_torchrun(
    fn: Callable[..., Any],
    nprocs: int = 2,
    *args: Any,
    timeout_s: float = 120,
    env: Mapping[str, str | None] | None = None,
    nnodes_standalone: bool = True,
) -> list[Any]:
    """Run module-level ``fn(*args)`` once in each of ``nprocs`` torchrun workers.

    The workers are started by ``python -m torch.distributed.run --nnodes 1
    --nproc-per-node nprocs``; each initialises ``torch.distributed`` with the gloo
    backend before calling ``fn`` and destroys the process group afterwards.  ``fn`` is
    found in the workers by ``fn.__module__`` and ``fn.__qualname__``, so it must be a
    module-level function of an importable module (a test module is fine); ``args`` and
    the return values must be JSON-serialisable (tuples come back as lists).

    Returns the return values, indexed by global rank.

    ``env`` entries override the workers' environment (inherited from this process,
    with ``OMP_NUM_THREADS=1``); a ``None`` value removes a variable.  With
    ``nnodes_standalone`` (the default) torchrun's ``--standalone`` rendezvous picks its
    own free port; without it, a static rendezvous on ``127.0.0.1`` and a free port
    chosen here is used instead.

    Raises ``ValueError`` when ``fn`` cannot be imported by the workers,
    ``TorchrunTimeoutError`` when the run takes longer than ``timeout_s`` (torchrun and
    every worker are killed first, after the workers dump their stacks), and
    ``TorchrunError`` when torchrun exits non-zero or a rank returns nothing; the
    message holds each failing rank's traceback and the tail of the combined output.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be at least 1, got {nprocs}")
    module_name, qualname = _check_importable(fn)
    call = {"module": module_name, "qualname": qualname, "args": list(args)}
    try:
        call_json = json.dumps(call)
    except TypeError as exc:
        raise ValueError(f"arguments for {qualname} are not JSON-serialisable: {exc}") from exc

    child_env = dict(os.environ)
    child_env["OMP_NUM_THREADS"] = "1"
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env["PYTHONPATH"] = _pythonpath(module_name)
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = str(value)

    if nnodes_standalone:
        rendezvous = ["--standalone"]
    else:
        rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]

    with tempfile.TemporaryDirectory(prefix="torchrun-test-") as tmp:
        workdir = Path(tmp)
        call_path = workdir / "call.json"
        call_path.write_text(call_json)
        log_path = workdir / "output.log"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *rendezvous,
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(nprocs),
            "--max-restarts",
            "0",
            str(Path(__file__).resolve()),
            str(call_path),
        ]
        started = time.monotonic()
        timed_out = False
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=str(REPO_ROOT),
                start_new_session=True,
                # If this process is killed outright (SIGKILL, pytest-timeout's thread
                # method), the kernel kills torchrun, whose death kills the workers.
                preexec_fn=_pdeathsig_setter(),
            )
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_all(proc, workdir, dump_stacks=True)
            finally:
                if proc.poll() is None:  # interrupted (Ctrl-C, pytest-timeout): no leaks
                    _kill_all(proc, workdir, dump_stacks=False)
        elapsed = time.monotonic() - started
        output = log_path.read_text(errors="replace")
        rank_errors = _read_rank_errors(workdir)
        errors_text = "".join(
            f"\n--- rank {rank} raised ---\n{_tail(text, _ERROR_CHARS)}"
            for rank, text in rank_errors.items()
        )
        errors_text += "".join(
            f"\n--- rank {rank} died of a signal; its threads then ---\n{_tail(text, _ERROR_CHARS)}"
            for rank, text in _read_crashes(workdir).items()
        )
        where = f"{module_name}.{qualname} on {nprocs} process(es)"
        if timed_out:
            raise TorchrunTimeoutError(
                f"torchrun running {where} timed out after {timeout_s:g} s and was killed"
                f"{errors_text}\n--- output tail ---\n{_tail(output)}",
                output=output,
                rank_errors=rank_errors,
            )
        if proc.returncode != 0:
            before = _before_torchrun_report(output)
            if before != output:
                errors_text += f"\n--- output before torchrun's report ---\n{_tail(before)}"
            raise TorchrunError(
                f"torchrun running {where} exited with status {proc.returncode} "
                f"after {elapsed:.1f} s{errors_text}\n--- output tail ---\n{_tail(output)}",
                output=output,
                rank_errors=rank_errors,
                returncode=proc.returncode,
            )
        results = []
        for rank in range(nprocs):
            result_path = workdir / f"result-{rank}.json"
            if not result_path.exists():
                raise TorchrunError(
                    f"torchrun running {where} exited 0 but rank {rank} wrote no result"
                    f"\n--- output tail ---\n{_tail(output)}",
                    output=output,
                    returncode=proc.returncode,
                )
            results.append(json.loads(result_path.read_text()))
        return results


def _pdeathsig_setter() -> Callable[[], None] | None:
    """Linux: a callable asking the kernel to SIGKILL the caller when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_pdeathsig() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)

    return set_pdeathsig


def _die_with_parent() -> None:
    """Have the kernel kill this worker if torchrun dies (e.g. SIGKILLed)."""
    parent = os.getppid()
    set_pdeathsig = _pdeathsig_setter()
    if set_pdeathsig is not None:
        set_pdeathsig()
    if os.getppid() != parent:  # torchrun died before prctl took effect
        os._exit(1)


def _worker_main(call_path: str) -> None:
    """Entry point of each torchrun worker: init gloo, call, write result, tear down."""
    import faulthandler
    import traceback

    workdir = Path(call_path).parent
    rank = int(os.environ["RANK"])
    (workdir / f"pid-{rank}").write_text(str(os.getpid()))
    _die_with_parent()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # a fatal signal (SIGABRT from a C++ abort, SIGSEGV) leaves every thread's stack in a
    # file of its own, which the parent puts in its error (kept open until exit)
    faulthandler.enable(open(workdir / f"fault-{rank}.txt", "w"), all_threads=True)  # noqa: SIM115

    call = json.loads(Path(call_path).read_text())
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo")
        fn = _resolve(call["module"], call["qualname"])
        result = fn(*call["args"])
        payload = json.dumps(result)
    except BaseException:
        (workdir / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    tmp = workdir / f"result-{rank}.json.tmp"
    tmp.write_text(payload)
    tmp.replace(workdir / f"result-{rank}.json")


if __name__ == "__main__":
    _worker_main(sys.argv[1])
