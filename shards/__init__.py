"""Turn image datasets into WebDataset tar shards in object storage, and read them back.

The dataset side of ssl-train. It depends on nothing in ``ssl_train``; the training
side reads shard sets only through :mod:`shards.manifest` and :mod:`shards.reader`.
"""

__version__ = "0.1.0"
