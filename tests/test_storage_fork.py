"""A forked child (a DataLoader worker) and the S3 clients it inherits from its parent.

A rank opens S3 (the plan, the lease, the checkpoint) and then forks its data workers.
The clients it had live on its event loop, whose thread does not come across the fork;
in the child they must neither be closed on the child's loop (asyncio's "Task exception
was never retrieved ... attached to a different loop", two tracebacks per worker in
every run with data and run dir in S3) nor be left to aiohttp's "Unclosed client
session" (shards.storage._detach_inherited_loop).
"""

from __future__ import annotations

import subprocess
import sys

from conftest import S3Bucket

# The child drops every reference to the parent's client and then collects garbage
# inside fsspec's own loop thread: that is where a DataLoader worker's collector often
# runs (the thread that allocates most, parsing responses), and where s3fs's finaliser
# of a parent's client schedules the close on the child's loop.
FORK_AND_COLLECT = """
import gc, multiprocessing, sys
import fsspec.asyn
from shards import storage

def child(url):
    global parents
    del parents
    fs, path = storage.filesystem(url)
    assert fs.cat(path + "/one") == b"1"
    async def collect():
        gc.collect()
    for _ in range(2):
        fsspec.asyn.sync(fsspec.asyn.get_loop(), collect)
    gc.collect()
    print("child read", flush=True)

url = sys.argv[1]
parents, path = storage.filesystem(url)
parents.pipe(path + "/one", b"1")  # the parent's client is open, with a pooled connection
worker = multiprocessing.get_context("fork").Process(target=child, args=(url,))
worker.start()
worker.join(60)
assert worker.exitcode == 0, worker.exitcode
assert parents.cat(path + "/one") == b"1"  # and the parent's own client still works
print("parent read", flush=True)
"""


def test_a_forked_child_never_closes_nor_reports_its_parents_s3_clients(
    s3_bucket: S3Bucket,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FORK_AND_COLLECT, f"{s3_bucket.url}/fork"],
        env=s3_bucket.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["child", "read", "parent", "read"]
    assert done.stderr == "", done.stderr[-3000:]
