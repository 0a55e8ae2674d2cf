"""Storage faults on reads: transient errors are retried with backoff until every sample
is read once; an object that stays unreadable ends the read with an error naming it
within the configured deadline, never a hang.

The faults are real: a proxy between s3fs and the moto S3 server answers 500s and
resets connections (tests/flaky_proxy.py); neither client nor server is mocked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import aiohttp
import botocore.exceptions
import pytest
import s3fs
from flaky_proxy import FlakyProxy

from shards import storage
from shards.errors import ShardsError
from shards.reader import ShardSet

from conftest import S3Bucket, make_tree, run_cli

ProxyFactory = Callable[..., FlakyProxy]


@pytest.fixture(scope="module")
def shard_set_url(tmp_path_factory: pytest.TempPathFactory, s3_server) -> str:
    """3 classes x 30 small JPEGs in 6 shards of 15, on the session's S3 server."""
    bucket = "faults-set"
    s3_server.create_bucket(bucket)
    tree = make_tree(
        tmp_path_factory.mktemp("faults"), classes=3, per_class=30, awkward=False, val_count=1
    )
    url = f"s3://{bucket}/train"
    env = {**S3Bucket(s3_server, bucket).env}
    result = run_cli("create", tree.train, url, "--shard-samples", "15", env=env)
    assert result.returncode == 0, result.stderr
    return url


@pytest.fixture
def direct(s3_bucket: S3Bucket) -> S3Bucket:
    """This process pointed straight at the S3 server (no proxy)."""
    return s3_bucket


@pytest.fixture
def flaky(direct: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyFactory]:
    """Start a :class:`FlakyProxy` in front of the S3 server and point this process at it."""
    started: list[FlakyProxy] = []

    def start(**options: object) -> FlakyProxy:
        proxy = FlakyProxy(direct.server.endpoint, **options).__enter__()
        started.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        # Each fsspec class caches its own instances: the S3 one must forget the old endpoint.
        s3fs.S3FileSystem.clear_instance_cache()
        return proxy

    yield start
    for proxy in started:
        proxy.__exit__(None, None, None)
    s3fs.S3FileSystem.clear_instance_cache()


def _read_all(shard_set: ShardSet, run: int = 5) -> list[tuple[str, bytes]]:
    samples = []
    for shard, size in enumerate(shard_set.shard_sizes):
        for start in range(0, size, run):
            samples += shard_set.read(shard, start, min(start + run, size))
    return [(s.key, s.jpeg) for s in samples]


def test_reads_through_500s_and_resets_return_every_sample_once(
    shard_set_url: str, direct: S3Bucket, flaky: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _read_all(ShardSet(shard_set_url))
    assert len(expected) == 90

    monkeypatch.setattr(storage, "READ_DEADLINE_S", 60.0)
    proxy = flaky(fail_rate=0.1, reset_rate=0.05, seed=7)
    got = _read_all(ShardSet(shard_set_url))

    keys = [key for key, _ in got]
    assert len(keys) == len(set(keys)) == 90
    assert got == expected
    assert proxy.failures > 0 and proxy.resets > 0, (proxy.requests, proxy.failures)


def test_when_the_client_library_gives_up_our_backoff_carries_on(
    shard_set_url: str, direct: S3Bucket, flaky: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore and s3fs retry a little themselves; past that, ``with_retries`` must."""
    shard_set = ShardSet(shard_set_url)
    expected = [(s.key, s.jpeg) for s in shard_set.read(0, 0, 15)]
    for shard in range(len(shard_set.shard_sizes)):
        shard_set.index(shard)
    waits: list[float] = []
    sleep = time.sleep
    monkeypatch.setattr(storage.time, "sleep", lambda s: (waits.append(s), sleep(s)))
    monkeypatch.setattr(storage, "READ_DEADLINE_S", 60.0)

    flaky(fail_rate=0.6, reset_rate=0.1, seed=3)
    got = [(s.key, s.jpeg) for start in (0, 5, 10) for s in shard_set.read(0, start, start + 5)]
    assert got == expected
    assert waits, "every read succeeded inside botocore's own retries"


def test_a_shard_that_always_fails_is_named_within_the_deadline(
    shard_set_url: str, direct: S3Bucket, flaky: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard_set = ShardSet(shard_set_url)
    bad = shard_set.manifest.shards[1].name
    for shard in range(len(shard_set.shard_sizes)):
        shard_set.index(shard)  # indexes up front: only the shard reads go through faults

    deadline = 3.0
    monkeypatch.setenv(storage.READ_DEADLINE_ENV, str(deadline))
    proxy = flaky(always_fail={bad})
    started = time.monotonic()
    with pytest.raises(ShardsError) as caught:
        shard_set.read(1, 0, 5)
    elapsed = time.monotonic() - started

    message = str(caught.value)
    assert bad in message and "still unreadable" in message, message
    assert elapsed < deadline + 5, f"took {elapsed:.1f}s"
    assert proxy.failures >= 2  # retried, not given up at the first 500
    assert [s.key for s in shard_set.read(0, 0, 5)] == [
        r.key for r in shard_set.index(0).samples[:5]
    ]


def test_the_read_deadline_setting_is_checked() -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(storage.READ_DEADLINE_ENV, "soon")
        with pytest.raises(ShardsError, match=storage.READ_DEADLINE_ENV):
            storage.read_deadline_s()
        patch.setenv(storage.READ_DEADLINE_ENV, "2.5")
        assert storage.read_deadline_s() == 2.5


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {}}
    response["ResponseMetadata"]["HTTPStatusCode"] = status
    return botocore.exceptions.ClientError(response, "GetObject")


def _wrapped(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause  # how s3fs's translate_boto_error hands errors on
    return outer


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_wrapped(OSError(121, "internal error"), _client_error("InternalError", 500)), True),
        (_client_error("ServiceUnavailable", 503), True),
        (_client_error("SlowDown", 503), True),
        (_wrapped(OSError(22, "bad range"), _client_error("InvalidRange", 416)), False),
        (_client_error("AccessDenied", 403), False),
        (FileNotFoundError("no such key"), False),
        (PermissionError("InvalidAccessKeyId"), False),
        (aiohttp.ClientPayloadError("Response payload is not completed"), True),
        (aiohttp.ServerDisconnectedError(), True),
        (botocore.exceptions.ResponseStreamingError(error="reset"), True),
        (
            botocore.exceptions.EndpointConnectionError(
                endpoint_url="http://x", error=aiohttp.ClientOSError(104, "reset by peer")
            ),
            True,
        ),
        (ConnectionResetError("reset"), True),
        (TimeoutError("slow"), True),
        (ConnectionRefusedError("nothing listens"), False),
        (ShardsError("already explained"), False),
        (ValueError("a bug"), False),
    ],
)
def test_transient_errors_are_told_from_permanent_ones(exc: BaseException, transient: bool) -> None:
    assert storage._is_transient(exc) is transient


def test_a_training_epoch_through_a_flaky_store_uses_every_key_once(
    shard_set_url: str, flaky: ProxyFactory
) -> None:
    """The issue's acceptance at the stream level: 10% 500s and some resets, DataLoader
    workers reading through them, and the epoch still holds every key exactly once."""
    import itertools

    from torch.utils.data import DataLoader

    from ssl_train.data.stream import StreamConfig, StreamState, TrainStream

    proxy = flaky(fail_rate=0.1, reset_rate=0.05, seed=11)
    config = StreamConfig(shard_set_url, global_batch_size=18, image_size=8, partitions=3)
    loader = DataLoader(TrainStream(config, 0, 1, StreamState()), batch_size=None, num_workers=2)
    batches = list(itertools.islice(loader, 5))  # 90 samples / 18 = 5 steps: one epoch
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == len(set(keys)) == 90
    assert proxy.failures + proxy.resets > 0
