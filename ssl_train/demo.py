"""`ssl-train demo`: the SimCLRv2 recipe in miniature on one machine.

Today it runs the part of the pipeline that exists: start a local S3 server in its own
process, shard the embedded MNIST-5000 digits into it (4,000 train / 1,000 test), verify
both shard sets, and print where they are. The server keeps its objects in memory, so the
demo also copies both sets into the output folder, where they outlive it. Later stages
extend this same command.
"""

from __future__ import annotations

import os
import time

from shards.copy import copy
from shards.create import CreateOptions, create
from shards.errors import ShardsError
from shards.local_s3 import LocalS3Server
from shards.verify import verify

DEMO_BUCKET = "ssl-train-demo"


def run_demo(out_dir: str, workers: int = 2) -> dict[str, str]:
    """Shard MNIST-5000 into a fresh local S3 server; return the shard-set URLs.

    Example:
        >>> run_demo("demo-out")  # doctest: +SKIP
        {'train': 's3://ssl-train-demo/mnist5k/train', 'test': 's3://ssl-train-demo/mnist5k/test'}
    """
    started = time.monotonic()
    os.makedirs(out_dir, exist_ok=True)
    urls = {split: f"s3://{DEMO_BUCKET}/mnist5k/{split}" for split in ("train", "test")}
    with LocalS3Server() as s3:
        os.environ.update(s3.env)
        s3.create_bucket(DEMO_BUCKET)
        print(
            f"[demo] local S3 server at {s3.endpoint} (moto, stopped when the demo ends)",
            flush=True,
        )
        for split, url in urls.items():
            print(f"[demo] sharding MNIST-5000 {split} split into {url}", flush=True)
            create(
                CreateOptions(src=f"mnist5k:{split}", dest=url, shard_samples=1000, workers=workers)
            )
            if verify(url):
                raise ShardsError(f"{url} failed verification")
            copy(url, os.path.join(out_dir, "mnist5k", split))
        print(f"[demo] done in {time.monotonic() - started:.1f}s; shard sets:", flush=True)
        for split, url in urls.items():
            local = os.path.join(out_dir, "mnist5k", split)
            print(f"[demo]   {split}: {url} on {s3.endpoint}, copied to {local}", flush=True)
        print(f"[demo] the local S3 server stops now; try: shards info {local}", flush=True)
    return urls
