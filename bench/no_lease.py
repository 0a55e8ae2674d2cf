"""`ssl-train` with the run-dir lease replaced by one that does nothing: the baseline of
``bench/lease_overhead.py``. Not for training anything that matters."""

from __future__ import annotations

from ssl_train.stages import loop


class NoLease:
    lost = None

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

    def confirm(self) -> None:
        pass

    def guard(self, commit: bool) -> None:
        pass


if __name__ == "__main__":
    loop.RunDirLease = NoLease  # type: ignore[misc,assignment]
    from ssl_train.cli import main

    main()
