"""`ssl-train` with the run-dir lease replaced by one that does nothing: the baseline of
``bench/lease_overhead.py``. Not for training anything that matters."""

from __future__ import annotations

from ssl_train.stages import loop


class NoLease:
    """Takes nothing and fences nothing: checkpoints are named and committed as a store
    without a fence does (generation 0, ``COMPLETE.json`` the commit)."""

    lost = None
    holder = None
    generation = 0

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass

    def is_lost(self) -> bool:
        return False

    def check(self) -> None:
        pass

    def checkpoints(self) -> None:
        return None

    def commit(self, **changes: object) -> None:
        pass


if __name__ == "__main__":
    loop.RunDirLease = NoLease  # type: ignore[misc,assignment]
    from ssl_train.cli import main

    main()
