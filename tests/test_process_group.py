"""How a rank joins its process group (``ssl_train.stages.runtime.start``).

gloo connects every pair of ranks when a group is made unless it is told to connect a
pair on its first use; at 1,024 ranks the eager way sends about 2M requests and 8 GB
through rank 0's store on every restart (bench/rendezvous.py --gloo-ranks). A rank's
sockets show which way its group went: connected on first use, the all-reduce adds the
pair's socket; connected eagerly, it was there before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shards.local_s3 import free_port

JOIN = """
import json, os, time, torch, torch.distributed as dist
from ssl_train.stages import runtime

def sockets():
    fds = os.listdir("/proc/self/fd")
    return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") for fd in fds
               if os.path.exists(f"/proc/self/fd/{fd}"))

state = runtime.start("cpu")
before = sockets()
# neither rank's all-reduce may start before both counted: a peer's first use connects
# the pair from its side too (through the store, which adds no socket)
store = dist.distributed_c10d._get_default_store()
store.add("counted", 1)
while store.add("counted", 0) < 2:
    time.sleep(0.01)
total = torch.tensor([float(state.rank + 1)])
dist.all_reduce(total)
print(json.dumps({"lazy": os.environ.get("TORCH_GLOO_LAZY_INIT"), "before": before,
                  "after": sockets(), "sum": total.item()}))
runtime.stop(state)
"""


def _join_two_ranks(lazy: str | None) -> list[dict]:
    port = free_port()
    ranks = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        }  # fmt: skip
        env.pop("TORCH_GLOO_LAZY_INIT", None)
        if lazy is not None:
            env["TORCH_GLOO_LAZY_INIT"] = lazy
        ranks.append(
            subprocess.Popen(
                [sys.executable, "-c", JOIN], env=env, stdout=subprocess.PIPE, text=True
            )
        )
    results = []
    for process in ranks:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0, out
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize(("asked", "lazy"), [(None, True), ("0", False)])
def test_gloo_pairs_connect_on_first_use_unless_the_user_says_otherwise(
    asked: str | None, lazy: bool
) -> None:
    for rank in _join_two_ranks(asked):
        assert rank["sum"] == 3.0  # the group works either way
        assert rank["lazy"] == ("1" if lazy else "0")
        # the pair's socket comes with the first all-reduce, or was there already
        assert (rank["after"] > rank["before"]) is lazy, rank
