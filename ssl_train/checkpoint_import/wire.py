"""The few protobuf messages of a TensorFlow checkpoint index, decoded by hand.

Each value in a checkpoint's ``.index`` table is a serialized ``BundleEntryProto``
(``tensorflow/core/protobuf/tensor_bundle.proto``), and the empty key holds a
``BundleHeaderProto``. Reading them needs only the protobuf wire format (varints and
length-delimited fields), so ssl-train decodes them here instead of depending on the
``protobuf`` package and TensorFlow's generated classes. Unknown fields are skipped, as
protobuf readers do, so newer TensorFlow versions that add fields still read.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class WireError(ValueError):
    """Bytes that are not a valid protobuf message of the expected kind."""


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode one base-128 varint at ``pos``; return (value, position after it).

    Example:
        >>> read_varint(b"\\xac\\x02", 0)
        (300, 2)
    """
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise WireError("varint runs past the end of the data")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def parse_fields(data: bytes | memoryview) -> dict[int, list[int | bytes]]:
    """Split a message into its fields: field number -> values in order of appearance.

    Varint and fixed-width fields give ints, length-delimited fields give bytes (a
    nested message, a string or a packed array; the caller knows which).

    Example:
        >>> parse_fields(b"\\x08\\x01\\x12\\x02hi")
        {1: [1], 2: [b'hi']}
    """
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    end = len(data)
    while pos < end:
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == 0:
            value, pos = read_varint(data, pos)
        elif wire_type == 1:
            if pos + 8 > end:
                raise WireError("fixed64 field runs past the end")
            value = int.from_bytes(data[pos : pos + 8], "little")
            pos += 8
        elif wire_type == 2:
            length, pos = read_varint(data, pos)
            if pos + length > end:
                raise WireError("length-delimited field runs past the end")
            value = bytes(data[pos : pos + length])
            pos += length
        elif wire_type == 5:
            if pos + 4 > end:
                raise WireError("fixed32 field runs past the end")
            value = int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire_type} (field {number})")
        fields.setdefault(number, []).append(value)
    return fields


def _int64(value: int) -> int:
    """A varint as a signed 64-bit integer (negative numbers take ten bytes)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _last_int(fields: dict[int, list[int | bytes]], number: int, default: int = 0) -> int:
    values = fields.get(number)
    if not values:
        return default
    value = values[-1]  # protobuf: the last occurrence of a scalar field wins
    if not isinstance(value, int):
        raise WireError(f"field {number} should be a number")
    return _int64(value)


def _message(fields: dict[int, list[int | bytes]], number: int) -> bytes | None:
    values = fields.get(number)
    if not values:
        return None
    # Repeated occurrences of a message field merge; concatenating the bytes does that.
    if not all(isinstance(v, bytes) for v in values):
        raise WireError(f"field {number} should be a message")
    return b"".join(values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BundleHeader:
    """``BundleHeaderProto``: how many data shards, their byte order, the format version."""

    num_shards: int
    big_endian: bool
    producer: int
    min_consumer: int

    @classmethod
    def parse(cls, data: bytes) -> BundleHeader:
        """Decode the header stored under the empty key.

        Example:
            >>> BundleHeader.parse(b"\\x08\\x01\\x1a\\x02\\x08\\x01")
            BundleHeader(num_shards=1, big_endian=False, producer=1, min_consumer=0)
        """
        fields = parse_fields(data)
        version = _message(fields, 3)
        vfields = parse_fields(version) if version else {}
        return cls(
            num_shards=_last_int(fields, 1),
            big_endian=_last_int(fields, 2) == 1,
            producer=_last_int(vfields, 1),
            min_consumer=_last_int(vfields, 2),
        )


@dataclass(frozen=True)
class BundleEntry:
    """``BundleEntryProto``: where one tensor's bytes are and what they hold.

    ``shape`` is None when TensorFlow recorded an unknown rank; ``partitioned`` is True
    for a variable saved in slices (``slices`` field), whose bytes live under other keys.
    """

    dtype: int
    shape: tuple[int, ...] | None
    shard_id: int
    offset: int
    size: int
    crc32c: int | None
    partitioned: bool = field(default=False)

    @classmethod
    def parse(cls, data: bytes) -> BundleEntry:
        """Decode one table value.

        Example:
            >>> BundleEntry.parse(b"\\x08\\x01\\x12\\x04\\x12\\x02\\x08\\x03\\x28\\x0c")
            BundleEntry(dtype=1, shape=(3,), shard_id=0, offset=0, size=12, crc32c=None, partitioned=False)
        """
        fields = parse_fields(data)
        shape_bytes = _message(fields, 2)
        shape: tuple[int, ...] | None = ()
        if shape_bytes is not None:
            sfields = parse_fields(shape_bytes)
            if _last_int(sfields, 3):  # unknown_rank
                shape = None
            else:
                dims = []
                for dim in sfields.get(2, []):
                    if not isinstance(dim, bytes):
                        raise WireError("TensorShapeProto.dim should be a message")
                    dims.append(_last_int(parse_fields(dim), 1))
                shape = tuple(dims)
        crc = fields.get(6)
        return cls(
            dtype=_last_int(fields, 1),
            shape=shape,
            shard_id=_last_int(fields, 3),
            offset=_last_int(fields, 4),
            size=_last_int(fields, 5),
            crc32c=int(crc[-1]) if crc else None,
            partitioned=bool(fields.get(7)),
        )
