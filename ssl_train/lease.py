"""Exactly one job writes a run dir: a lease object in the run dir, renewed by the job
that holds it, which is also the run dir's record of what is committed.

On a cluster two writers happen without anyone asking: a pod on a node that lost its
network keeps running while the job restarts elsewhere, or a user submits twice. Their
checkpoints would interleave and pruning would delete the other's. So rank 0 takes
``lease.json`` before its first write and renews it from a background thread; every
change is a compare-and-swap (``shards.versioned``), so two jobs racing cannot both win.

- Another job's lease that is being renewed: refused, naming the holder.
- Another job's lease that stops being renewed (the job died): taken over once it is a
  lease period old by the store's clock (its ``Last-Modified`` against the store's
  "now"), so neither host's clock decides, and a restarted job waits at most one period.
- The same job's lease (torchrun restarted its worker group): taken back at once.
- A lease released by a clean stop (finished, preempted, ``--stop-at-step``): taken at once.
- A holder that cannot renew for half a period, or finds the lease taken, has lost it: it
  stops without writing again.

Fencing. A check of the lease followed by a plain write leaves a gap: a process frozen
between the two (a GC or I/O stall, a partitioned node, a pod the kubelet froze) wakes
after another job took over and writes anyway. So what a resume reads is committed *in
the lease object itself*, by the same compare-and-swap on the version this holder last
wrote: the list of committed checkpoints (``checkpoints``) and the finished stage's
summary (``finished``). A holder whose lease was taken cannot commit: its swap fails
(412), it learns who holds the run dir now, and stops. Each taker's ``generation`` is one
more than the last, and a checkpoint's directory carries it
(``ssl_train.checkpoint``), so a stale writer's files never land where a current
writer's are.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

from shards import storage
from shards.errors import ShardsError
from shards.versioned import check_conditional_writes, read_stamped, read_versioned, write_if
from ssl_train.errors import UserError

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
LEASE_SECONDS_ENV = "SSL_TRAIN_LEASE_SECONDS"
JOB_ID_ENV = "SSL_TRAIN_JOB_ID"
DEFAULT_LEASE_SECONDS = 60.0
# Renewed 6 times a period and lost after half a period without one: a slow store gets
# two renewals' time before the holder gives up, and a job that died is taken over
# after one period at most (a minute by default; a cluster restart takes longer).
RENEWALS_PER_PERIOD = 6


class LeaseHeld(UserError):
    """Another live job holds the run dir."""


class LeaseLost(UserError):
    """This job no longer holds the run dir: it must stop without writing."""


@dataclass(frozen=True)
class Holder:
    """What ``lease.json`` says: who holds the run dir, since when, until when."""

    job: str
    host: str
    pid: int
    token: str  # this process's own: tells its lease from its job's earlier processes'
    since: float
    expires: float
    generation: int
    released: bool = False
    # the run dir's commits, carried from holder to holder: the committed checkpoints'
    # directory names, oldest first (None: never recorded, a run dir of an older
    # version; ssl_train.checkpoint then lists them), and a finished stage's summary
    checkpoints: list[str] | None = None
    finished: dict | None = None
    # the holder's lease period: a taker waits out the holder's, not its own (a shorter
    # one would take a lease renewed at the holder's slower pace); None in leases of
    # older versions, which count as the default period
    seconds: float | None = None
    # a pipeline driver's lease (``pipeline.json`` in the recipe's root, not a run dir's):
    # each stage's job as the drivers recorded it (``ssl_train.pipeline_state``)
    stages: dict | None = None

    def describe(self) -> str:
        return (
            f"job {self.job} on {self.host} (pid {self.pid}), holding it since "
            f"{_iso(self.since)}, lease valid until {_iso(self.expires)}"
        )


def lease_seconds() -> float:
    """The lease period: ``SSL_TRAIN_LEASE_SECONDS`` or 60 s."""
    raw = os.environ.get(LEASE_SECONDS_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_LEASE_SECONDS
    except ValueError:
        raise UserError(f"{LEASE_SECONDS_ENV}={raw!r}: give the lease period in seconds") from None
    if value <= 0:
        raise UserError(f"{LEASE_SECONDS_ENV}={raw!r}: give a positive number of seconds")
    return value


def job_id() -> str:
    """The job this process belongs to, the same for every worker group torchrun starts
    within it: ``SSL_TRAIN_JOB_ID``, else torchrun's run id (TorchX sets it to the app
    id), else this host and process (a plain single-process run)."""
    explicit = os.environ.get(JOB_ID_ENV)
    if explicit:
        return explicit
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":  # torchrun's default id is "none": not a job's own
        return run_id
    return f"{socket.gethostname()}-{os.getpid()}"


class RunDirLease:
    """The run dir's lease, held by this process (rank 0).

    Example:
        >>> lease = RunDirLease("/tmp/ssl-train-lease-doc")
        >>> lease.acquire(); lease.check(); lease.release()
    """

    def __init__(
        self,
        run_dir: str,
        seconds: float | None = None,
        job: str | None = None,
        clock: Callable[[], float] = time.time,
        single_writer_store: bool = False,
        file: str = LEASE_FILE,
    ) -> None:
        self.run_dir = run_dir
        self.single_writer_store = single_writer_store
        self.url = storage.join(run_dir, file)
        self.seconds = lease_seconds() if seconds is None else seconds
        self.job = job_id() if job is None else job
        self.clock = clock
        self.token = uuid.uuid4().hex
        self.version: str | None = None
        self.holder: Holder | None = None
        self.lost: str | None = None
        self._last_renewal = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- taking it ------------------------------------------------------------------

    def acquire(self, patience_s: float | None = None) -> None:
        """Take the lease, or raise :class:`LeaseHeld` if another job keeps renewing it.

        A lease of another job that is not renewed is waited out (at most one period);
        one that changes while we watch belongs to a live job. First the store is checked
        for the conditional writes every step of this relies on (``check_store``).
        """
        self.check_store()
        watched: str | None = None
        began = time.monotonic()
        while True:
            found = read_stamped(self.url)
            if found is None:
                if self._write(None, None):
                    return
                continue
            version = found.version
            holder = _parse(found.data, self.url)
            # expiry by the store's clock: the lease object's age since its last renewal,
            # against the holder's period
            age = found.age_s
            period = holder.seconds or max(self.seconds, DEFAULT_LEASE_SECONDS)
            takeable = (
                holder.released or holder.job == self.job or age > period or self._gone(holder)
            )
            if takeable:
                if self._write(version, holder):
                    if not holder.released and holder.job != self.job:
                        log.warning(
                            "took over the run dir's expired lease from %s", holder.describe()
                        )
                    return
                continue
            if watched is not None and version != watched:
                raise LeaseHeld(self._held_message(holder))
            patience = patience_s if patience_s is not None else 3 * max(period, self.seconds)
            if time.monotonic() - began > patience:
                raise LeaseHeld(self._held_message(holder))
            if watched is None:
                log.info(
                    "the run dir's lease is held by %s: waiting to see whether it is alive",
                    holder.describe(),
                )
            watched = version
            time.sleep(min(max(period - age, 0.0) + 0.05, self.seconds / 8))

    def _gone(self, holder: Holder) -> bool:
        """Whether the holder is known to be dead before its lease expires (a run dir's
        writer never is: its lease is waited out)."""
        return False

    def check_store(self) -> None:
        """Refuse a run dir whose store ignores conditional writes (a second job would
        "win" every compare-and-swap too, unseen), unless the user declared it
        single-writer, which is then said at every start."""
        if self.single_writer_store:
            log.warning(
                "--single-writer-store: %s is not checked for conditional writes; nothing "
                "keeps a second job from writing this run dir",
                storage.redact(self.run_dir),
            )
            return
        check_conditional_writes(self.run_dir)

    def _held_message(self, holder: Holder) -> str:
        return (
            f"{storage.redact(self.url)}: another job is writing this run dir: "
            f"{holder.describe()}. Wait for it to finish or stop it, or use another --run-dir; "
            f"if that job is gone, its lease expires by itself within "
            f"{holder.seconds or self.seconds:g} s"
        )

    def _write(self, expected: str | None, previous: Holder | None) -> bool:
        """Take the lease over ``previous`` (None: there is none yet), carrying its
        commits forward."""
        now = self.clock()
        holder = Holder(
            job=self.job,
            host=socket.gethostname(),
            pid=os.getpid(),
            token=self.token,
            since=now,
            expires=now + self.seconds,
            generation=1 if previous is None else previous.generation + 1,
            checkpoints=None if previous is None else previous.checkpoints,
            finished=None if previous is None else previous.finished,
            seconds=self.seconds,
            stages=None if previous is None else previous.stages,
        )
        version = self._put(holder, expected)
        if version is None:
            return False
        self.version, self.holder, self._last_renewal = version, holder, time.monotonic()
        self._thread = threading.Thread(target=self._renew_forever, name="lease", daemon=True)
        self._thread.start()
        return True

    def _put(self, holder: Holder, expected: str | None) -> str | None:
        fields = asdict(holder)
        if fields["stages"] is None:  # a run dir's lease: as versions before the field wrote it
            del fields["stages"]
        data = json.dumps(fields, indent=2).encode() + b"\n"
        version = write_if(self.url, data, expected)
        if version is None:
            # a retried PUT whose first answer was lost fails its own condition: did we win?
            found = read_versioned(self.url)
            if found is not None and found[0] == data:
                return found[1]
        return version

    # --- keeping it -----------------------------------------------------------------

    def renew(self) -> None:
        """Extend the lease by one period; on finding it taken, mark it lost."""
        with self._lock:
            if self.lost is not None or self.holder is None:
                return
            holder = replace(self.holder, expires=self.clock() + self.seconds)
            try:
                version = self._put(holder, self.version)
            except ShardsError as exc:
                if time.monotonic() - self._last_renewal > self.seconds / 2:
                    self._lose(f"could not renew it for {self.seconds / 2:g} s ({exc})")
                return
            if version is None:
                self._lose(f"it was taken over by {self._current_holder()}")
                return
            self.version, self.holder, self._last_renewal = version, holder, time.monotonic()

    @property
    def generation(self) -> int:
        """This holder's generation: one more than the holder it took the lease from."""
        if self.holder is None:
            raise LeaseLost(f"{storage.redact(self.url)}: this process holds no lease")
        return self.holder.generation

    def checkpoints(self) -> list[str] | None:
        """The committed checkpoints' directory names as this holder last recorded them
        (None: never recorded in this run dir)."""
        if self.holder is None:
            raise LeaseLost(f"{storage.redact(self.url)}: this process holds no lease")
        return None if self.holder.checkpoints is None else list(self.holder.checkpoints)

    def commit(self, **changes: object) -> None:
        """Record ``changes`` (``checkpoints=[...]``, ``finished={...}``) in the lease by
        a compare-and-swap on the version this holder last wrote, renewing it too: the
        commit takes effect only while this job holds the run dir. A job that lost it
        meanwhile (however long it was frozen before this call) gets :class:`LeaseLost`
        naming the job that holds the run dir now, and nothing is recorded.

        Example:
            >>> lease = RunDirLease("/tmp/ssl-train-lease-commit-doc")
            >>> lease.acquire(); lease.commit(checkpoints=["step-000000001-g1"])
            >>> read_head("/tmp/ssl-train-lease-commit-doc").checkpoints
            ['step-000000001-g1']
            >>> lease.release()
        """
        with self._lock:
            self.check()
            holder = replace(self.holder, expires=self.clock() + self.seconds, **changes)
            version = self._put(holder, self.version)
            if version is None:
                self._lose(f"it was taken over by {self._current_holder()}")
                self.check()
            self.version, self.holder, self._last_renewal = version, holder, time.monotonic()

    def _current_holder(self) -> str:
        """Who holds the run dir now, for the message of a job that lost it."""
        try:
            found = read_versioned(self.url)
        except ShardsError as exc:
            return f"another job (the lease could not be read: {exc})"
        return _parse(found[0], self.url).describe() if found else "nobody (deleted)"

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this process still holds the lease; called
        before every write, so a job that lost it writes nothing more."""
        if self.lost is None and time.monotonic() - self._last_renewal > self.seconds / 2:
            self._lose(
                f"not renewed for {self.seconds / 2:g} s; the run dir's lease now names "
                f"{self._current_holder()}"
            )
        if self.lost is not None:
            raise LeaseLost(
                f"{storage.redact(self.url)}: this job lost the run dir's lease ({self.lost}); "
                "it stopped without writing again"
            )

    def is_lost(self) -> bool:
        """Whether this process no longer holds the lease (checked every step)."""
        try:
            self.check()
        except LeaseLost:
            return True
        return False

    def confirm(self) -> None:
        """Renew now and check (commits renew by their own compare-and-swap)."""
        self.renew()
        self.check()

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            log.error("lost the run dir's lease: %s", why)

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.seconds / RENEWALS_PER_PERIOD):
            try:
                self.renew()
            except Exception as exc:  # the step's check() reports it; never kill the thread
                log.warning("lease renewal failed: %s", exc)
            if self.lost is not None:
                return

    # --- giving it back -------------------------------------------------------------

    def release(self) -> None:
        """Give the lease back (a clean stop): the next job takes it without waiting."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.lost is not None or self.holder is None:
                return
            released = replace(self.holder, released=True, expires=self.clock())
            try:
                if self._put(released, self.version) is not None:
                    self.holder = None
            except ShardsError as exc:
                log.warning("could not release the run dir's lease (it expires by itself): %s", exc)


def read_head(run_dir: str, file: str = LEASE_FILE) -> Holder | None:
    """What the run dir's lease records (holder and commits), for a reader that holds
    no lease (a check before training, ``ssl-train eval``); None when it has none.

    Example:
        >>> read_head("/tmp/no-such-run-dir") is None
        True
    """
    url = storage.join(run_dir, file)
    found = read_versioned(url)
    return None if found is None else _parse(found[0], url)


def live_holder(run_dir: str, file: str = LEASE_FILE) -> Holder | None:
    """The job holding the lease now, by the store's clock (renewed within its period
    and not released), or None: how a process that holds no lease tells whether a job
    is still writing the run dir (a pipeline driver following a job it did not start).

    Example:
        >>> live_holder("/tmp/no-such-run-dir") is None
        True
    """
    url = storage.join(run_dir, file)
    found = read_stamped(url)
    if found is None:
        return None
    holder = _parse(found.data, url)
    period = holder.seconds or DEFAULT_LEASE_SECONDS
    return None if holder.released or found.age_s > period else holder


def _parse(data: bytes, url: str) -> Holder:
    try:
        fields = json.loads(data)
        return Holder(**fields)
    except (ValueError, TypeError) as exc:
        raise ShardsError(
            f"{storage.redact(url)}: not a lease this version of ssl-train wrote ({exc}); "
            "if no job is writing this run dir, delete the file"
        ) from None


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
