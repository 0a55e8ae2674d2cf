"""What a finished stage leaves in its run dir besides its model: ``summary.json``.

Its presence means the stage is done (the pipeline skips it, ``--check-only`` reports
it, the demo reads its figures from it). Torch-free, so that planning and following
jobs (``ssl-train pipeline``, the demo's driver) never import the training loop.
"""

from __future__ import annotations

import json
from typing import Any

from shards import storage

SUMMARY_FILE = "summary.json"


def summary_url(run_dir: str) -> str:
    """Where a run dir's summary lies.

    Example:
        >>> summary_url("s3://b/runs/pretrain")
        's3://b/runs/pretrain/summary.json'
    """
    return storage.join(run_dir, SUMMARY_FILE)


def read_summary(run_dir: str) -> dict[str, Any] | None:
    """The summary a finished run leaves, or None while it is unfinished.

    Example:
        >>> read_summary("/tmp/no-such-run-dir") is None
        True
    """
    url = summary_url(run_dir)
    if storage.size_or_none(url) is None:
        return None
    return json.loads(storage.read_bytes(url))
