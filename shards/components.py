"""TorchX component for sharding a dataset on several machines at once:
``torchx run [-s SCHEDULER] shards.create -j N --src SRC --dest DEST``.

Each of the N replicas runs ``python -m shards.cli create SRC DEST --nodes N
--node-rank <its replica id>``: the same global plan, every N-th shard written by each
(``shards.create``), the manifest by the last to finish. A failed replica is replaced
alone (TorchX's ``REPLICA`` retry policy) and its rerun writes only its missing shards,
so one lost machine costs its unfinished shards, not the job.

    torchx run -s kubernetes -cfg queue=default shards.create -j 16 \\
        --src s3://raw/winter21_whole.tar --dest s3://bucket/imagenet21k/train
    torchx run -s local_cwd shards.create -j 2 --src /data/train.tar --dest /data/shards
"""

from typing import Dict, List, Optional

import torchx.specs as specs

DEFAULT_IMAGE = "ssl-train:latest"  # the project's image holds both `shards` and `ssl-train`


def create(
    src: str,
    dest: str,
    layout: Optional[str] = None,
    labels: Optional[str] = None,
    synsets: Optional[str] = None,
    classes: Optional[str] = None,
    subset: Optional[str] = None,
    shard_bytes: Optional[str] = None,
    shard_samples: Optional[int] = None,
    prefix: Optional[str] = None,
    seed: int = 0,
    strict: bool = False,
    full_decode: bool = False,
    workers: int = 8,
    metrics_port: Optional[int] = None,
    name: str = "shards-create",
    image: str = DEFAULT_IMAGE,
    j: str = "1",
    cpu: int = 8,
    memMB: int = 16384,
    max_retries: int = 3,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Shard SRC into DEST on ``j`` machines, each writing its share of one plan.

    Args:
        src: dataset: a folder, an s3:// prefix or an ImageNet archive (.tar)
        dest: where the shard set goes (e.g. s3://b/imagenet/train)
        layout: source layout (default: detected)
        labels: labels file (your own images, or ImageNet val's ground truth)
        synsets: the devkit's meta.mat, with its ground truth as --labels
        classes: class order: imagenet1k, a shard set's URL, or a file
        subset: keep only 1percent, 10percent, or the names in a file
        shard_bytes: target shard size (e.g. 256MiB)
        shard_samples: samples per shard instead of a size
        prefix: shard file name prefix
        seed: seed of the global shuffle
        strict: stop at the first unusable file
        full_decode: decode every image while checking
        workers: sharding processes per machine
        metrics_port: serve each machine's progress to Prometheus on this port
        name: job name
        image: container image with ssl-train installed
        j: number of machines (N, or Nx1)
        cpu: CPUs per machine
        memMB: memory per machine in MB
        max_retries: times a failed machine is replaced
        env: extra environment variables (e.g. AWS_ENDPOINT_URL=...)
        mounts: mounts (type=<bind/volume>,src=...,dst=...[,readonly])
    """
    nodes = _nodes(j)
    args = ["-m", "shards.cli", "create", src, dest]
    for flag, value in (
        ("--layout", layout),
        ("--labels", labels),
        ("--synsets", synsets),
        ("--classes", classes),
        ("--subset", subset),
        ("--shard-bytes", shard_bytes),
        ("--shard-samples", shard_samples),
        ("--prefix", prefix),
        ("--metrics-port", metrics_port),
    ):
        if value is not None:
            args += [flag, str(value)]
    args += ["--seed", str(seed), "--workers", str(workers)]
    args += ["--strict"] * strict + ["--full-decode"] * full_decode
    args += ["--nodes", str(nodes), "--node-rank", specs.macros.replica_id]
    role = specs.Role(
        name="shards",
        image=image,
        entrypoint="python",
        args=args,
        num_replicas=nodes,
        resource=specs.resource(cpu=cpu, gpu=0, memMB=memMB),
        env=dict(env or {}),
        max_retries=max_retries,
        retry_policy=specs.RetryPolicy.REPLICA,
        mounts=specs.parse_mounts(mounts) if mounts else [],
        port_map={"metrics": metrics_port} if metrics_port else {},
    )
    return specs.AppDef(name=name, roles=[role])


def _nodes(j: str) -> int:
    """The machine count of ``-j``: ``N`` or ``Nx1`` (one process per machine: each
    machine's parallelism is ``--workers``).

    Example:
        >>> _nodes("8"), _nodes("8x1")
        (8, 8)
    """
    count, _, per_node = j.partition("x")
    if not count.isdigit() or int(count) < 1 or per_node not in ("", "1"):
        raise ValueError(
            f"-j {j}: give the number of machines, N or Nx1 (each machine's parallelism "
            "is --workers)"
        )
    return int(count)
