"""A file as an S3 request body that goes from the page cache to the socket.

Why: a shard's PUT streamed by aiohttp reads the staged file into Python in pieces and
writes each to the socket, two copies of every byte plus a thread-pool round trip per
piece; on a plain-HTTP connection the kernel can send the file itself (``sendfile``),
and the client then spends about nothing per byte (BENCHMARKS.md, issue 37). Over TLS
the bytes must pass through Python to be encrypted, so the body is sent as aiohttp
sends any file.

botocore sees a file-like object (``read``, ``seek``, ``tell``: it measures the length
and rewinds for a retry); aiohttp sees a ready ``Payload`` and calls its
``write_with_length``.
"""

from __future__ import annotations

import asyncio
import os
from typing import BinaryIO

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import BufferedReaderPayload, Payload


class FileBody(Payload):
    """``file`` (open for reading in binary mode) as a PUT's body.

    Example:
        >>> with open("/etc/hostname", "rb") as f:
        ...     FileBody(f).size == os.path.getsize("/etc/hostname")
        True
    """

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, content_type="application/octet-stream")
        self._file = file
        self._size = os.fstat(file.fileno()).st_size

    # what botocore asks of a body
    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    @staticmethod
    def _plain_transport(writer: AbstractStreamWriter) -> asyncio.Transport | None:
        """The connection's transport where the kernel may send the file itself: a plain
        TCP connection (not TLS) of an aiohttp writer that can flush its headers."""
        transport = getattr(writer, "transport", None)
        if transport is None or not hasattr(writer, "send_headers"):
            return None
        if transport.get_extra_info("sslcontext") is not None:
            return None
        return transport

    # what aiohttp asks of a payload
    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a file body is bytes, not text")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        """Send the file from its current position (botocore rewinds it for a retry)."""
        transport = self._plain_transport(writer)
        if transport is None:
            await BufferedReaderPayload(self._file).write_with_length(writer, content_length)
            return
        offset = self._file.tell()
        count = self._size - offset
        if content_length is not None:
            count = min(count, content_length)
        writer.send_headers()  # aiohttp keeps them to go out with the first piece of body
        await writer.drain()
        await asyncio.get_running_loop().sendfile(transport, self._file, offset, count)
