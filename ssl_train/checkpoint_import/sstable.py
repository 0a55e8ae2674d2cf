"""The sorted table of a TensorFlow checkpoint's ``.index`` file, read without TensorFlow.

TensorFlow writes the index with its copy of LevelDB's table format (documented in
LevelDB's ``doc/table_format.md``):

- the file ends with a 48-byte footer: the block handle (varint offset, varint size) of
  the metaindex block, that of the index block, zero padding to 40 bytes, then the
  magic number 0xdb4775248b80fb57 as 8 little-endian bytes;
- every block is followed by a 5-byte trailer: one compression-type byte (0 = none,
  1 = snappy) and the masked CRC-32C of the block's bytes plus that type byte;
- a block is a run of entries, each ``varint shared, varint unshared, varint
  value_length, key[shared:] bytes, value bytes``, where ``shared`` is how many leading
  bytes the key has in common with the previous key (prefix compression); then an array
  of uint32 restart offsets (entries that store their whole key) and its length;
- the index block maps, in key order, a separator key of each data block to that block's
  handle; the data blocks hold the table's own keys and values.

The index of a checkpoint is small (about a hundred bytes per variable), so it is read
whole and every entry decoded once; lookups then go through a dict.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from ssl_train.crc32c import crc32c, unmask

from .wire import WireError, read_varint

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
TRAILER_SIZE = 5
NO_COMPRESSION = 0
COMPRESSION_NAMES = {1: "snappy", 2: "zlib"}


class TableError(ValueError):
    """The bytes are not a well-formed table; the message says what is wrong."""


def _handle(data: bytes, pos: int) -> tuple[int, int, int]:
    offset, pos = read_varint(data, pos)
    size, pos = read_varint(data, pos)
    return offset, size, pos


def read_block(data: bytes, offset: int, size: int, verify: bool = True) -> memoryview:
    """The contents of the block at ``offset`` (``size`` bytes before its trailer).

    Raises :class:`TableError` for a block that runs past the file, a compressed block
    (TensorFlow writes checkpoint indexes uncompressed) or, with ``verify``, a CRC that
    does not match.
    """
    end = offset + size
    if end + TRAILER_SIZE > len(data):
        raise TableError(
            f"a block at byte {offset} ({size} bytes) runs past the end of the "
            f"{len(data)}-byte file: the file is truncated"
        )
    kind = data[end]
    if verify:
        (stored,) = struct.unpack_from("<I", data, end + 1)
        actual = crc32c(memoryview(data)[offset : end + 1])
        if unmask(stored) != actual:
            raise TableError(f"the block at byte {offset} fails its CRC-32C check: corrupt file")
    if kind != NO_COMPRESSION:
        name = COMPRESSION_NAMES.get(kind, f"unknown type {kind}")
        raise TableError(
            f"the block at byte {offset} is {name}-compressed; TensorFlow writes checkpoint "
            "indexes uncompressed and this reader reads only those"
        )
    return memoryview(data)[offset:end]


def block_entries(block: memoryview) -> Iterator[tuple[bytes, memoryview]]:
    """Yield (key, value) of each entry in one block, undoing the prefix compression.

    Example:
        >>> blk = b"\\x00\\x02\\x01ab1\\x01\\x01\\x01c2" + bytes(4) + b"\\x01\\x00\\x00\\x00"
        >>> [(k, bytes(v)) for k, v in block_entries(memoryview(blk))]
        [(b'ab', b'1'), (b'ac', b'2')]
    """
    if len(block) < 4:
        raise TableError("a block shorter than its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if num_restarts == 0 or limit < 0:
        raise TableError(f"a block with a bad restart count ({num_restarts})")
    restarts = set(struct.unpack_from(f"<{num_restarts}I", block, limit))
    key = b""
    pos = 0
    try:
        while pos < limit:
            at = pos
            shared, pos = read_varint(block, pos)
            unshared, pos = read_varint(block, pos)
            value_length, pos = read_varint(block, pos)
            if at in restarts and shared:
                raise TableError(f"the entry at restart point {at} shares a key prefix")
            if shared > len(key) or pos + unshared + value_length > limit:
                raise TableError(f"the entry at byte {at} of a block is malformed")
            key = key[:shared] + bytes(block[pos : pos + unshared])
            pos += unshared
            yield key, block[pos : pos + value_length]
            pos += value_length
    except WireError as exc:
        raise TableError(f"a block entry is malformed ({exc})") from None


def read_table(data: bytes, verify: bool = True) -> Iterator[tuple[bytes, memoryview]]:
    """Yield every (key, value) of the table held in ``data``, in key order.

    ``verify`` checks each block's CRC-32C. Raises :class:`TableError` when ``data`` is
    not such a table (wrong magic number), is truncated or corrupt.
    """
    if len(data) < FOOTER_SIZE:
        raise TableError(f"{len(data)} bytes, shorter than a table's {FOOTER_SIZE}-byte footer")
    footer = len(data) - FOOTER_SIZE
    (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
    if magic != MAGIC:
        raise TableError(
            f"it does not end with the table magic number (found {magic:#018x}, "
            f"expected {MAGIC:#018x})"
        )
    try:
        _meta_offset, _meta_size, pos = _handle(data, footer)
        index_offset, index_size, _ = _handle(data, pos)
    except WireError as exc:
        raise TableError(f"the footer is malformed ({exc})") from None
    index = read_block(data, index_offset, index_size, verify)
    previous: bytes | None = None
    for _separator, handle in block_entries(index):
        try:
            offset, size, _ = _handle(bytes(handle), 0)
        except WireError as exc:
            raise TableError(f"an index entry is malformed ({exc})") from None
        for key, value in block_entries(read_block(data, offset, size, verify)):
            if previous is not None and key <= previous:
                raise TableError(f"keys out of order at {key!r}: corrupt file")
            previous = key
            yield key, value
