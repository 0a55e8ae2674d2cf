"""Read TensorFlow checkpoints (TF1 ``Saver`` and TF2 ``tf.train.Checkpoint``) without TensorFlow.

The published SimCLRv2 weights are TensorFlow checkpoints: ``PREFIX.index``, a sorted
table mapping each variable name to a ``BundleEntryProto`` (dtype, shape, data shard,
byte offset, size, CRC-32C), and ``PREFIX.data-SSSSS-of-NNNNN``, the raw little-endian
tensor bytes. Importing them should not need TensorFlow (a 1.5 GB install that pins its
own numpy), so this module reads that format directly: :mod:`.sstable` parses the table,
:mod:`.wire` the protobuf entries, :mod:`ssl_train.crc32c` checks the bytes.

Every file goes through ``shards.storage``, so local paths, ``s3://`` and ``https://``
URLs (the public Google Cloud Storage bucket answers at
``https://storage.googleapis.com/simclr-checkpoints/...``) work alike, and tensors are
fetched by ranged reads (neighbours merged, :mod:`.read_plan`): a 3 GB data file is
never loaded at once, nor asked for once per tensor.
"""

from __future__ import annotations

import difflib
import math
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from shards import storage
from ssl_train.crc32c import crc32c, mask, unmask
from ssl_train.errors import UserError

from .read_plan import plan_reads
from .sstable import TableError, read_table
from .wire import BundleEntry, BundleHeader, WireError, read_varint

# TensorFlow's DataType enum (tensorflow/core/framework/types.proto): name, numpy dtype
# of the stored bytes (None: not a plain array of numbers).
DTYPES: dict[int, tuple[str, str | None]] = {
    1: ("float32", "<f4"),
    2: ("float64", "<f8"),
    3: ("int32", "<i4"),
    4: ("uint8", "u1"),
    5: ("int16", "<i2"),
    6: ("int8", "i1"),
    7: ("string", None),
    8: ("complex64", "<c8"),
    9: ("int64", "<i8"),
    10: ("bool", "?"),
    11: ("qint8", None),
    12: ("quint8", None),
    13: ("qint32", None),
    14: ("bfloat16", "<u2"),  # returned as float32, which holds every bfloat16 exactly
    15: ("qint16", None),
    16: ("quint16", None),
    17: ("uint16", "<u2"),
    18: ("complex128", "<c16"),
    19: ("float16", "<f2"),
    20: ("resource", None),
    21: ("variant", None),
    22: ("uint32", "<u4"),
    23: ("uint64", "<u8"),
}

STRING = 7
BFLOAT16 = 14

_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")


@dataclass(frozen=True)
class Variable:
    """One entry of a checkpoint: its name, TensorFlow dtype name and shape.

    ``shape`` is None when TensorFlow recorded an unknown rank. ``readable`` says whether
    :meth:`TFCheckpoint.read` can return it (numbers and strings: yes; resource handles,
    variants, quantized types and partitioned variables: no).
    """

    name: str
    dtype: str
    shape: tuple[int, ...] | None
    readable: bool


def data_file(prefix: str, shard: int, num_shards: int) -> str:
    """The URL of data shard ``shard`` of the checkpoint at ``prefix``.

    Example:
        >>> data_file("/ckpt/model.ckpt-100", 0, 1)
        '/ckpt/model.ckpt-100.data-00000-of-00001'
    """
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def resolve_prefix(src: str) -> str:
    """The checkpoint prefix that ``src`` names.

    ``src`` may be the prefix itself (``.../model.ckpt-112603``), its ``.index`` or a data
    file, or a folder: then the checkpoint its ``checkpoint`` state file names (what
    TensorFlow's savers write beside their checkpoints), else a SavedModel's variables
    (``variables/`` or ``saved_model/variables/``), else its only ``*.index`` file.

    Example:
        >>> resolve_prefix("/ckpt/model.ckpt-100.index")
        '/ckpt/model.ckpt-100'
        >>> resolve_prefix("/ckpt/model.ckpt-100.data-00000-of-00001")
        '/ckpt/model.ckpt-100'
        >>> resolve_prefix("/ckpt/model.ckpt-100")  # doctest: +SKIP
        '/ckpt/model.ckpt-100'
    """
    if src.endswith(".index"):
        return src[: -len(".index")]
    if _DATA_SUFFIX.search(src):
        return _DATA_SUFFIX.sub("", src)
    if storage.size_or_none(f"{src}.index") is not None:
        return src
    folder = src.rstrip("/")
    state = storage.join(folder, "checkpoint")
    if storage.size_or_none(state) is not None:
        text = storage.read_bytes(state).decode("utf-8", "replace")
        match = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
        if match:
            # The saver may have recorded an absolute path on the machine that trained
            # (the published files were copied elsewhere since): the files sit beside it.
            return storage.join(folder, posixpath.basename(match.group(1)))
    for saved_model in ("variables/variables", "saved_model/variables/variables"):
        if storage.size_or_none(storage.join(folder, f"{saved_model}.index")) is not None:
            return storage.join(folder, saved_model)  # a SavedModel's variables
    fs, path = storage.filesystem(folder)
    try:
        found = sorted(fs.glob(posixpath.join(path, "*.index")))
    except (OSError, ValueError):
        found = []
    if len(found) == 1:
        return storage.join(folder, posixpath.basename(found[0])[: -len(".index")])
    if len(found) > 1:
        names = ", ".join(posixpath.basename(f) for f in found[:5])
        raise UserError(
            f"{storage.redact(src)}: several TensorFlow checkpoints ({names}); name one by "
            "its prefix or .index file"
        )
    raise UserError(
        f"{storage.redact(src)}: no TensorFlow checkpoint there; give its prefix "
        "(e.g. .../model.ckpt-112603), its .index file, or the folder that holds them"
    )


class TFCheckpoint:
    """A TensorFlow checkpoint opened for reading: its variables and their values.

    Opening reads only the ``.index`` file; :meth:`read` fetches one tensor's bytes from
    its data file and checks their CRC-32C (``verify=False`` skips the checks, for speed
    when the files are known good).

    Example:
        >>> ckpt = TFCheckpoint("r50_1x_sk0/model.ckpt-250228")  # doctest: +SKIP
        >>> ckpt.variables()["base_model/conv2d/kernel"]  # doctest: +SKIP
        Variable(name='base_model/conv2d/kernel', dtype='float32', shape=(7, 7, 3, 64), readable=True)
        >>> ckpt.read("global_step")  # doctest: +SKIP
        array(250228)
    """

    def __init__(self, src: str, *, verify: bool = True) -> None:
        self.prefix = resolve_prefix(src)
        self.verify = verify
        self.index_url = f"{self.prefix}.index"
        shown = storage.redact(self.index_url)
        if storage.size_or_none(self.index_url) is None:
            raise UserError(
                f"{shown}: not found; a TensorFlow checkpoint is PREFIX.index plus its "
                "PREFIX.data-* files, give the prefix or the .index file"
            )
        data = storage.read_bytes(self.index_url)
        header: BundleHeader | None = None
        entries: dict[str, BundleEntry] = {}
        try:
            for key, value in read_table(data, verify):
                if key == b"":
                    header = BundleHeader.parse(bytes(value))
                else:
                    entries[key.decode("utf-8", "replace")] = BundleEntry.parse(bytes(value))
        except TableError as exc:
            raise UserError(f"{shown}: not a TensorFlow checkpoint index: {exc}") from None
        except WireError as exc:
            raise UserError(f"{shown}: corrupt checkpoint entry ({exc})") from None
        if header is None:
            raise UserError(
                f"{shown}: a sorted table but not a TensorFlow checkpoint index (no bundle header)"
            )
        if header.big_endian:
            raise UserError(
                f"{shown}: written by a big-endian machine; this reader reads "
                "little-endian checkpoints (every published SimCLR checkpoint is one)"
            )
        if header.num_shards < 1 and entries:
            raise UserError(f"{shown}: the header says {header.num_shards} data shards")
        self.header = header
        self._entries = entries
        self._shard_sizes: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"TFCheckpoint({storage.redact(self.prefix)!r}, {len(self._entries)} variables)"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Every variable name, sorted as TensorFlow stores them."""
        return list(self._entries)

    def variables(self) -> dict[str, Variable]:
        """Every entry: name -> :class:`Variable` (dtype name, shape, readable)."""
        return {name: self._variable(name, entry) for name, entry in self._entries.items()}

    @staticmethod
    def _variable(name: str, entry: BundleEntry) -> Variable:
        dtype_name, numpy_dtype = DTYPES.get(entry.dtype, (f"DataType {entry.dtype}", None))
        readable = (numpy_dtype is not None or dtype_name == "string") and not entry.partitioned
        return Variable(name, dtype_name, entry.shape, readable and entry.shape is not None)

    def read(self, name: str) -> np.ndarray:
        """The value of variable ``name`` as a numpy array of its shape.

        Numbers keep their dtype (bfloat16 comes back as float32, exactly); strings come
        back as an object array of ``bytes``.

        Example:
            >>> TFCheckpoint("ckpt/model.ckpt-100").read("base_model/conv2d/kernel").shape  # doctest: +SKIP
            (7, 7, 3, 64)
        """
        entry = self._readable_entry(name)
        return self._decode(name, entry, self._fetch(name, entry))

    def read_many(self, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, value)`` for each of ``names``, in the order they are stored.

        Neighbouring tensors are fetched together (:func:`.read_plan.plan_reads`: a few
        requests per 64 MB instead of one per tensor), and each read's bytes are let go
        once its tensors are decoded. Every name is checked before anything is fetched.

        Example:
            >>> dict(TFCheckpoint("ckpt/model.ckpt-100").read_many(["a/kernel", "a/bias"]))  # doctest: +SKIP
            {'a/bias': array([...], dtype=float32), 'a/kernel': array([...], dtype=float32)}
        """
        entries = {name: self._readable_entry(name) for name in names}
        urls = {n: self._shard_url(n, e) for n, e in entries.items() if e.size}
        for name in entries.keys() - urls.keys():  # empty tensors: nothing to fetch
            yield name, self._decode(name, entries[name], b"")
        stored = {n: (entries[n].shard_id, entries[n].offset, entries[n].size) for n in urls}
        for read in plan_reads(stored):
            url = urls[read.members[0]]
            raw = memoryview(storage.read_range(url, read.start, read.end))
            for name in read.members:
                entry = entries[name]
                piece = raw[entry.offset - read.start : entry.offset - read.start + entry.size]
                self._verify(name, url, entry, piece)
                yield name, self._decode(name, entry, piece)

    def _readable_entry(self, name: str) -> BundleEntry:
        """The entry of ``name``, refused with the reason when it cannot be read."""
        entry = self._entries.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise UserError(f"{storage.redact(self.prefix)}: no variable {name!r}{hint}")
        variable = self._variable(name, entry)
        if not variable.readable:
            why = (
                "it is saved in slices (a partitioned variable)"
                if entry.partitioned
                else f"its dtype {variable.dtype} is not a plain tensor of numbers or strings"
                if entry.shape is not None
                else "its shape is recorded as unknown"
            )
            raise UserError(f"{storage.redact(self.prefix)}: cannot read {name!r}: {why}")
        numpy_dtype = DTYPES[entry.dtype][1]
        count = math.prod(entry.shape or ())
        if numpy_dtype is not None and entry.size != count * np.dtype(numpy_dtype).itemsize:
            raise UserError(
                f"{storage.redact(self.index_url)}: {name!r} records {entry.size} bytes for "
                f"shape {entry.shape} of {variable.dtype}: corrupt index"
            )
        return entry

    def _decode(self, name: str, entry: BundleEntry, raw: bytes | memoryview) -> np.ndarray:
        """The array an entry's checked bytes hold (a copy: ``raw`` may be let go)."""
        numpy_dtype = DTYPES[entry.dtype][1]
        if numpy_dtype is None:
            return self._strings(name, entry, bytes(raw), math.prod(entry.shape or ()))
        array = np.frombuffer(raw, dtype=numpy_dtype)
        if entry.dtype == BFLOAT16:
            array = (array.astype("<u4") << 16).view("<f4")
        return array.astype(array.dtype.newbyteorder("="), copy=True).reshape(entry.shape)

    def _fetch(self, name: str, entry: BundleEntry) -> bytes:
        """The stored bytes of one entry, from one ranged read, checked against its CRC."""
        if entry.size == 0:
            return b""
        url = self._shard_url(name, entry)
        raw = storage.read_range(url, entry.offset, entry.offset + entry.size)
        self._verify(name, url, entry, raw)
        return raw

    def _shard_url(self, name: str, entry: BundleEntry) -> str:
        """The data file holding ``entry``, checked to exist and to hold its bytes."""
        num_shards = self.header.num_shards
        if not 0 <= entry.shard_id < num_shards:
            raise UserError(
                f"{storage.redact(self.index_url)}: {name!r} is in data shard "
                f"{entry.shard_id} of {num_shards}: corrupt index"
            )
        url = data_file(self.prefix, entry.shard_id, num_shards)
        shown = storage.redact(url)
        size = self._shard_sizes.get(entry.shard_id)
        if size is None:
            size = storage.size_or_none(url)
            if size is None:
                raise UserError(
                    f"{shown}: missing; download every data file of the checkpoint "
                    f"({storage.redact(self.prefix)}.data-*-of-{num_shards:05d}) beside its .index"
                )
            self._shard_sizes[entry.shard_id] = size
        end = entry.offset + entry.size
        if end > size:
            raise UserError(
                f"{shown}: truncated: {name!r} needs bytes {entry.offset}-{end} but the file "
                f"has {size}; download it again"
            )
        return url

    def _verify(self, name: str, url: str, entry: BundleEntry, raw: bytes | memoryview) -> None:
        """A numeric entry's CRC-32C; strings are checked as they are decoded."""
        if self.verify and entry.crc32c is not None and entry.dtype != STRING:
            self._check(name, url, entry, crc32c(raw))

    def _check(self, name: str, url: str, entry: BundleEntry, actual: int) -> None:
        assert entry.crc32c is not None
        if unmask(entry.crc32c) != actual:
            raise UserError(
                f"{storage.redact(url)}: {name!r} (bytes {entry.offset}-{entry.offset + entry.size}) "
                "fails its CRC-32C check: the file is corrupt; download it again"
            )

    def _strings(self, name: str, entry: BundleEntry, raw: bytes, count: int) -> np.ndarray:
        """Decode a string tensor: varint lengths, a masked CRC of them, then the bytes.

        Checked against TensorFlow 2.21's output: the 4 bytes after the varints are the
        masked CRC-32C of the lengths, each as 4 little-endian bytes; the entry's CRC
        covers those same 4-byte lengths, then the 4 stored bytes, then the strings.
        """
        url = data_file(self.prefix, entry.shard_id, self.header.num_shards)
        lengths = []
        pos = 0
        try:
            for _ in range(count):
                length, pos = read_varint(raw, pos)
                lengths.append(length)
        except WireError:
            lengths = None
        if lengths is None or pos + 4 + sum(lengths) != len(raw):
            raise UserError(f"{storage.redact(url)}: {name!r}: malformed string tensor")
        body = pos + 4
        if self.verify:
            sizes = b"".join((n & 0xFFFFFFFF).to_bytes(4, "little") for n in lengths)
            if mask(crc32c(sizes)) != int.from_bytes(raw[pos:body], "little"):
                raise UserError(
                    f"{storage.redact(url)}: {name!r}: the string lengths fail their "
                    "CRC-32C check: the file is corrupt; download it again"
                )
            if entry.crc32c is not None:
                self._check(name, url, entry, crc32c(sizes + raw[pos:]))
        out = np.empty(count, dtype=object)
        for i, length in enumerate(lengths):
            out[i] = raw[body : body + length]
            body += length
        return out.reshape(entry.shape)
