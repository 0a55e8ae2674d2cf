"""The oldest s3fs, fsspec and botocore pyproject.toml accepts still send the conditional
headers the run dir's lease and commits rely on (issue 34): against the real S3 server,
with those versions (``make floor-env``, tests/floor_env.txt) ahead of .venv's packages in
a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOOR_SITE = ROOT / ".venv-floor" / "site"
FLOOR_FILE = ROOT / "tests" / "floor_env.txt"

needs_floor_env = pytest.mark.skipif(
    not (ROOT / ".venv-floor" / ".installed").exists(),
    reason=f"{FLOOR_SITE} is missing: run `make floor-env` (the oldest storage stack) first",
)

# In the child: the floor's versions, then the store's conditional writes as the lease
# uses them; any failure is an exception and a non-zero exit.
CHILD = r"""
import sys
import botocore, fsspec, s3fs
from shards.versioned import check_conditional_writes, read_stamped, write_if
from ssl_train.lease import LeaseLost, RunDirLease, read_head

print("versions", s3fs.__version__, fsspec.__version__, botocore.__version__)
run_dir = sys.argv[1]
check_conditional_writes(run_dir)
first = write_if(run_dir + "/object", b"1", None)
assert first is not None and write_if(run_dir + "/object", b"2", None) is None
assert write_if(run_dir + "/object", b"3", first) is not None
assert write_if(run_dir + "/object", b"4", first) is None, "If-Match was not sent"
assert read_stamped(run_dir + "/object").data == b"3"
lease = RunDirLease(run_dir, seconds=30, job="job-a")
lease.acquire()
lease.commit(checkpoints=["step-000000001-g1"])
taker = RunDirLease(run_dir, seconds=30, job="job-a")  # the same job: taken back at once
taker.acquire()
try:
    lease.commit(checkpoints=["step-000000002-g1"])
    raise SystemExit("a stale holder committed")
except LeaseLost:
    pass
assert read_head(run_dir).checkpoints == ["step-000000001-g1"]
taker.release()
print("ok")
"""


def _pins() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in FLOOR_FILE.read_text().splitlines()]
    return dict(line.split("==") for line in lines if line)


@needs_floor_env
def test_the_floor_versions_send_the_conditional_headers(s3_bucket) -> None:
    pins = _pins()
    env = {
        **os.environ,
        **s3_bucket.env,
        "PYTHONPATH": os.pathsep.join([str(FLOOR_SITE), str(ROOT)]),
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD, f"{s3_bucket.url}/runs/floor"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    versions = done.stdout.split("versions ", 1)[1].split("\n", 1)[0].split()
    assert versions == [pins["s3fs"], pins["fsspec"], pins["botocore"]]
    assert done.stdout.strip().endswith("ok")


def test_the_floor_is_what_pyproject_declares() -> None:
    """tests/floor_env.txt installs exactly the lower bounds pyproject.toml gives, or
    the lowest installable release above one (botocore, whose first releases with
    IfMatch no aiobotocore accepts)."""
    import tomllib

    declared = {}
    for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, _, floor = spec.partition(">=")
        declared[name.strip()] = floor.split(",")[0].strip()
    pins = _pins()
    assert pins["s3fs"] == declared["s3fs"] and pins["fsspec"] == declared["fsspec"]
    botocore = [int(part) for part in pins["botocore"].split(".")]
    assert [int(part) for part in declared["botocore"].split(".")] <= botocore
    # and the client check before the first write (shards.versioned) refuses below it
    from shards.versioned import CLIENT_FLOOR

    for name in ("s3fs", "botocore"):
        assert ".".join(map(str, CLIENT_FLOOR[name])) == declared[name]
