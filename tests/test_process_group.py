"""How a rank joins its process group (``ssl_train.stages.runtime.start``).

gloo connects every pair of ranks when a group is made unless it is told to connect a
pair on its first use; at 1,024 ranks the eager way sends about 2M requests and 8 GB
through rank 0's store on every restart (bench/rendezvous.py --gloo-ranks). A rank's
connections to its peer (TCP, not to the store) show which way its group went:
connected on first use, none before the first all-reduce; connected eagerly, there
already. The store's own sockets are left out: rank 0 hosts the store, and its clients'
connections come and go.
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

def peer_sockets():
    # connected TCP sockets of this process that are not the store's: gloo's pairs
    store_port = int(os.environ["MASTER_PORT"])
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[len("socket:["):-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                established = fields[3] == "01"
                if established and fields[9] in mine and store_port not in (local_port, remote_port):
                    count += 1
    return count

state = runtime.start("cpu")
before = peer_sockets()
# neither rank's all-reduce may start before both counted: a peer's first use connects
# the pair from its side too (through the store, which adds no socket)
store = dist.distributed_c10d._get_default_store()
store.add("counted", 1)
while store.add("counted", 0) < 2:
    time.sleep(0.01)
total = torch.tensor([float(state.rank + 1)])
dist.all_reduce(total)
print(json.dumps({"lazy": os.environ.get("TORCH_GLOO_LAZY_INIT"), "before": before,
                  "after": peer_sockets(), "sum": total.item()}))
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
        # the pair's connection comes with the first all-reduce, or was there already
        assert rank["after"] >= 1, rank
        assert (rank["before"] == 0) is lazy, rank
