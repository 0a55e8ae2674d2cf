"""The run dir's store must honour conditional writes (issue 34): probed before the
first write; a store that ignores them is refused in one line."""

from __future__ import annotations

import pytest
from stripping_proxy import StrippingProxy

from shards.versioned import ConditionalWritesIgnored, check_conditional_writes


def test_the_s3_server_and_local_folders_pass_the_probe_and_leave_nothing(
    s3_bucket, tmp_path
) -> None:
    from shards import storage

    check_conditional_writes(f"{s3_bucket.url}/run")
    check_conditional_writes(str(tmp_path / "run"))
    assert storage.list_files(str(tmp_path / "run")) == []
    # no object left (SeaweedFS may keep the emptied folder, as its filer does)
    assert storage.list_files(f"{s3_bucket.url}/run") == []


def test_a_store_that_drops_the_conditional_headers_is_refused(
    s3_bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    server = s3_bucket.server
    region = server.env.get("AWS_DEFAULT_REGION", "us-east-1")
    with StrippingProxy(server.endpoint, server.access_key, server.secret_key, region) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(ConditionalWritesIgnored) as refused:
            check_conditional_writes(f"{s3_bucket.url}/run")
    assert proxy.dropped >= 2
    message = str(refused.value)
    assert "wrote over an existing object despite If-None-Match: *" in message
    assert "--single-writer-store" in message and "\n" not in message
