"""ssl-train's TensorFlow checkpoint reader against checkpoints written by real TensorFlow.

TensorFlow lives only in the separate environment ``.venv-tf`` (``make tf-env``, which
``make test`` runs first). A helper script (tests/tf_write_checkpoints.py) runs there
once per module: it writes a TF1 ``Saver`` checkpoint and a TF2 object-graph
checkpoint and dumps TensorFlow's own reading of every variable. These tests read the
same files with ``ssl_train.checkpoint_import`` (no TensorFlow) and compare bit for bit,
then damage copies of the files to check each error a user can meet.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shards import storage
from ssl_train.checkpoint_import import TFCheckpoint, resolve_prefix
from ssl_train.checkpoint_import.read_plan import plan_reads
from ssl_train.checkpoint_import.sstable import FOOTER_SIZE, _handle, block_entries, read_block
from ssl_train.checkpoint_import.wire import BundleEntry, parse_fields
from ssl_train.crc32c import crc32c, crc32c_reference, mask, unmask
from ssl_train.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TF_PYTHON = ROOT / ".venv-tf" / "bin" / "python"
HELPER = ROOT / "tests" / "tf_write_checkpoints.py"

needs_tf = pytest.mark.skipif(
    not TF_PYTHON.exists(),
    reason=f"{TF_PYTHON} is missing: run `make tf-env` (TensorFlow in its own venv) first",
)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Checkpoints written by TensorFlow, with TensorFlow's reading of each variable."""
    out = tmp_path_factory.mktemp("tf-checkpoints")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(TF_PYTHON), str(HELPER), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "manifest.json").read_text())


def tf_value(info: dict) -> np.ndarray | bytes:
    if info["dtype"] == "string":
        return Path(info["file"]).read_bytes()
    return np.load(info["file"])


def assert_same_as_tensorflow(ckpt: TFCheckpoint, dumped: dict) -> None:
    """Every variable: same names, dtypes, shapes, and the same bits as TensorFlow read."""
    variables = ckpt.variables()
    assert sorted(variables) == sorted(dumped["variables"])
    for name, info in dumped["variables"].items():
        variable = variables[name]
        assert (variable.dtype, list(variable.shape)) == (info["dtype"], info["shape"]), name
        assert_same_value(ckpt.read(name), info, name)
    # Read all at once (neighbours fetched together), the values are the same.
    together = dict(ckpt.read_many(dumped["variables"]))
    assert sorted(together) == sorted(dumped["variables"])
    for name, info in dumped["variables"].items():
        assert_same_value(together[name], info, name)


def assert_same_value(ours: np.ndarray, info: dict, name: str) -> None:
    theirs = tf_value(info)
    if info["dtype"] == "string":
        assert ours.shape == () and ours.item() == theirs, name
    else:
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        assert ours.tobytes() == theirs.tobytes(), name  # bitwise, NaN payloads too


def copy_checkpoint(prefix: str, dest: Path) -> str:
    dest.mkdir(parents=True, exist_ok=True)
    for path in Path(prefix).parent.glob(Path(prefix).name + ".*"):
        shutil.copy(path, dest / path.name)
    return str(dest / Path(prefix).name)


def index_blocks(index: bytes) -> list[tuple[int, int]]:
    """(offset, size) of each data block of a table, from its footer and index block."""
    _, _, pos = _handle(index, len(index) - FOOTER_SIZE)
    offset, size, _ = _handle(index, pos)
    return [_handle(bytes(v), 0)[:2] for _, v in block_entries(read_block(index, offset, size))]


def rewrite_block(index: bytearray, offset: int, size: int, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` (same length) inside one block and fix the block's CRC."""
    at = index.find(old, offset, offset + size)
    assert at >= 0 and len(old) == len(new)
    index[at : at + len(old)] = new
    crc = mask(crc32c(bytes(index[offset : offset + size + 1])))
    index[offset + size + 1 : offset + size + 5] = struct.pack("<I", crc)


# ---- checkpoints written by TensorFlow -------------------------------------------------


@needs_tf
def test_tf1_saver_checkpoint_reads_as_tensorflow_reads_it(written: dict) -> None:
    dumped = written["tf1"]
    ckpt = TFCheckpoint(dumped["prefix"])
    assert ckpt.header.num_shards == 1 and not ckpt.header.big_endian
    assert_same_as_tensorflow(ckpt, dumped)
    # The SimCLR names and dtypes made it through, and values are values, not zeros.
    assert ckpt.read("global_step").item() == 112603
    assert ckpt.read("global_step").dtype == np.int64
    kernel = ckpt.read("base_model/conv2d/kernel")
    assert kernel.shape == (3, 3, 3, 8) and kernel.dtype == np.float32 and kernel.std() > 0.5
    assert ckpt.read("extra/bfloat16").dtype == np.float32  # numpy has no bfloat16
    assert ckpt.read("extra/empty").shape == (0, 4)
    assert kernel.flags.writeable  # torch.from_numpy takes it without a warning


@needs_tf
def test_tf1_index_spans_several_table_blocks(written: dict) -> None:
    index = Path(written["tf1"]["prefix"] + ".index").read_bytes()
    blocks = index_blocks(index)
    assert len(blocks) >= 2, blocks  # TensorFlow's table blocks are 256 KiB
    # Variables from both blocks read correctly (the first test compares them all).
    ckpt = TFCheckpoint(written["tf1"]["prefix"])
    assert "filler/0000/" + "x" * 300 + "/kernel" in ckpt and "zz_last" in ckpt


@needs_tf
def test_tf2_object_graph_checkpoint(written: dict) -> None:
    dumped = written["tf2"]
    ckpt = TFCheckpoint(dumped["prefix"])
    assert_same_as_tensorflow(ckpt, dumped)
    variables = ckpt.variables()
    graph = variables["_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert (graph.dtype, graph.shape, graph.readable) == ("string", (), True)
    kernel = "model/layers/0/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert variables[kernel].shape == (4, 6)
    assert ckpt.read("model/step/.ATTRIBUTES/VARIABLE_VALUE").item() == 42


@needs_tf
def test_every_way_of_naming_the_checkpoint(written: dict, tmp_path: Path) -> None:
    prefix = written["tf1"]["prefix"]
    for src in (prefix, prefix + ".index", prefix + ".data-00000-of-00001"):
        assert resolve_prefix(src) == prefix
    # The folder: through the `checkpoint` state file TensorFlow writes ...
    assert resolve_prefix(str(Path(prefix).parent)) == prefix
    # ... or, without one, its only .index file.
    copy = copy_checkpoint(prefix, tmp_path / "bare")
    assert resolve_prefix(str(tmp_path / "bare")) == copy
    # A state file naming a path on the machine that trained: the files beside it count.
    state = 'model_checkpoint_path: "/train/host/run/model.ckpt-7"\n'
    (tmp_path / "bare" / "checkpoint").write_text(state)
    assert resolve_prefix(str(tmp_path / "bare")) == copy
    with pytest.raises(UserError, match="no TensorFlow checkpoint there"):
        resolve_prefix(str(tmp_path / "nothing-here"))


@needs_tf
def test_reads_each_tensor_by_range_from_s3(written: dict, s3_bucket, monkeypatch) -> None:
    prefix = written["tf1"]["prefix"]
    fs, _ = storage.filesystem(s3_bucket.url)
    for path in Path(prefix).parent.glob(Path(prefix).name + ".*"):
        fs.put_file(str(path), f"{s3_bucket.name}/r50/{path.name}")
    url = f"{s3_bucket.url}/r50/{Path(prefix).name}"
    read: list[int] = []
    monkeypatch.setattr(storage, "_listeners", [lambda e, n: e == "read_bytes" and read.append(n)])
    ckpt = TFCheckpoint(url)
    name = "base_model/conv2d/kernel"
    value = ckpt.read(name)
    assert value.tobytes() == tf_value(written["tf1"]["variables"][name]).tobytes()
    # The index, then exactly the tensor's bytes: not the 9 MB data file.
    index_size = Path(prefix + ".index").stat().st_size
    assert read == [index_size, value.nbytes]


@needs_tf
def test_read_many_fetches_neighbours_together_from_s3(
    written: dict, s3_bucket, monkeypatch
) -> None:
    """All of a checkpoint's tensors in a few merged requests, each byte of them once,
    skipped neighbours (here every weight's /Momentum slot) included only when they lie
    between two wanted tensors within the gap allowed."""
    prefix = written["tf1"]["prefix"]
    fs, _ = storage.filesystem(s3_bucket.url)
    for path in Path(prefix).parent.glob(Path(prefix).name + ".*"):
        fs.put_file(str(path), f"{s3_bucket.name}/many/{path.name}")
    ckpt = TFCheckpoint(f"{s3_bucket.url}/many/{Path(prefix).name}")
    wanted = [n for n in ckpt.names() if ckpt.variables()[n].readable and "Momentum" not in n]
    entries = {n: ckpt._entries[n] for n in wanted}
    plan = plan_reads({n: (e.shard_id, e.offset, e.size) for n, e in entries.items() if e.size})
    requests: list[int] = []
    monkeypatch.setattr(
        storage, "_listeners", [lambda e, n: e == "read_bytes" and requests.append(n)]
    )
    values = dict(ckpt.read_many(wanted))
    assert sorted(values) == sorted(wanted)
    for name in wanted:
        assert_same_value(values[name], written["tf1"]["variables"][name], name)
    assert requests == [r.end - r.start for r in plan]
    assert len(requests) < len(wanted) // 4, (len(requests), len(wanted))
    # A tight gap limit skips the Momentum slots instead: more requests, fewer bytes.
    tight = plan_reads(
        {n: (e.shard_id, e.offset, e.size) for n, e in entries.items() if e.size}, max_gap_bytes=0
    )
    assert len(tight) > len(plan)
    assert sum(r.end - r.start for r in tight) < sum(requests)


def test_plan_reads_merges_neighbours_within_the_gap_and_the_request_size() -> None:
    mib = 1 << 20
    spans = {
        "a": (0, 0, mib),
        "b": (0, mib + 10, mib),  # 10 bytes after a: same read
        "c": (0, 10 * mib, mib),  # 8 MiB after b: past a 4 MiB gap, a new read
        "big": (0, 12 * mib, 100 * mib),  # larger than a request: a read of its own
        "d": (0, 112 * mib, 4),
        "other-shard": (1, 0, 4),  # next to a in offsets, but another file
        "e": (0, 113 * mib, 4),
    }
    plan = plan_reads(spans, max_gap_bytes=4 * mib, max_request_bytes=64 * mib)
    assert [(r.shard, r.start, r.end, r.members) for r in plan] == [
        (0, 0, 2 * mib + 10, ("a", "b")),
        (0, 10 * mib, 11 * mib, ("c",)),
        (0, 12 * mib, 112 * mib, ("big",)),
        (0, 112 * mib, 113 * mib + 4, ("d", "e")),
        (1, 0, 4, ("other-shard",)),
    ]
    # No read grows past the limit, and every name is in exactly one read.
    many = {f"t{i:03d}": (0, i * 1000, 900) for i in range(500)}
    plan = plan_reads(many, max_gap_bytes=200, max_request_bytes=50_000)
    assert all(r.end - r.start <= 50_000 for r in plan)
    assert sorted(n for r in plan for n in r.members) == sorted(many)
    assert len(plan) == 10  # 50 tensors of 900 bytes + 100 between fill 49,900 bytes
    assert plan_reads({}) == []


# ---- damaged files: one clear error each ------------------------------------------------


@needs_tf
def test_a_file_that_is_not_an_index(written: dict, tmp_path: Path) -> None:
    prefix = copy_checkpoint(written["tf1"]["prefix"], tmp_path)
    Path(prefix + ".index").write_bytes(os.urandom(4096))
    with pytest.raises(
        UserError, match=r"model\.ckpt-7\.index: not a TensorFlow checkpoint index.*magic"
    ):
        TFCheckpoint(prefix)
    Path(prefix + ".index").write_bytes(b"{}")
    with pytest.raises(UserError, match="shorter than a table's 48-byte footer"):
        TFCheckpoint(prefix)
    with pytest.raises(UserError, match=r"elsewhere\.index: not found"):
        TFCheckpoint(str(tmp_path / "elsewhere.index"))


@needs_tf
def test_a_truncated_data_file(written: dict, tmp_path: Path) -> None:
    prefix = copy_checkpoint(written["tf1"]["prefix"], tmp_path)
    data = Path(prefix + ".data-00000-of-00001")
    with data.open("r+b") as f:
        f.truncate(data.stat().st_size // 2)
    ckpt = TFCheckpoint(prefix)  # the index alone is fine
    with pytest.raises(UserError, match=r"data-00000-of-00001: truncated: 'zz_last' needs bytes"):
        ckpt.read("zz_last")
    with pytest.raises(UserError, match=r"data-00000-of-00001: truncated: 'zz_last' needs bytes"):
        dict(ckpt.read_many([first_stored(ckpt), "zz_last"]))


def first_stored(ckpt: TFCheckpoint) -> str:
    """The variable whose bytes come first in the data file."""
    return min((e.offset, n) for n, e in ckpt._entries.items() if e.size)[1]


@needs_tf
def test_a_missing_data_shard(written: dict, tmp_path: Path) -> None:
    prefix = copy_checkpoint(written["tf1"]["prefix"], tmp_path)
    os.remove(prefix + ".data-00000-of-00001")
    with pytest.raises(UserError, match=r"data-00000-of-00001: missing; download every data file"):
        TFCheckpoint(prefix).read("global_step")


@needs_tf
def test_a_flipped_byte_fails_the_crc(written: dict, tmp_path: Path) -> None:
    prefix = copy_checkpoint(written["tf1"]["prefix"], tmp_path)
    name = "base_model/big/kernel"
    entry = TFCheckpoint(prefix)._entries[name]
    data = Path(prefix + ".data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[entry.offset + entry.size // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"'{name}' .* fails its CRC-32C check"):
        TFCheckpoint(prefix).read(name)
    with pytest.raises(UserError, match=f"'{name}' .* fails its CRC-32C check"):
        dict(TFCheckpoint(prefix).read_many([first_stored(TFCheckpoint(prefix)), name]))
    # Without the check the damage shows: one value differs from TensorFlow's.
    damaged = TFCheckpoint(prefix, verify=False).read(name)
    original = tf_value(written["tf1"]["variables"][name])
    assert np.count_nonzero(damaged != original) == 1
    # A damaged index block is caught too.
    index = Path(prefix + ".index")
    raw = bytearray(index.read_bytes())
    raw[100] ^= 0x01
    index.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="fails its CRC-32C check: corrupt file"):
        TFCheckpoint(prefix)


@needs_tf
def test_unsupported_dtypes_and_compressed_blocks(written: dict, tmp_path: Path) -> None:
    prefix = copy_checkpoint(written["tf1"]["prefix"], tmp_path)
    index_path = Path(prefix + ".index")
    index = bytearray(index_path.read_bytes())
    offset, size = index_blocks(bytes(index))[-1]  # zz_last sorts last
    # The entry's first field is its dtype (field 1, varint): float32 (1) -> resource (20).
    rewrite_block(index, offset, size, b"zz_last\x08\x01", b"zz_last\x08\x14")
    index_path.write_bytes(bytes(index))
    ckpt = TFCheckpoint(prefix)
    variable = ckpt.variables()["zz_last"]
    assert (variable.dtype, variable.readable) == ("resource", False)
    with pytest.raises(UserError, match="cannot read 'zz_last': its dtype resource is not"):
        ckpt.read("zz_last")
    assert ckpt.read("global_step").item() == 112603  # the rest still reads
    # A block marked snappy-compressed (valid CRC) gets its own message.
    index[offset + size] = 1
    crc = mask(crc32c(bytes(index[offset : offset + size + 1])))
    index[offset + size + 1 : offset + size + 5] = struct.pack("<I", crc)
    index_path.write_bytes(bytes(index))
    with pytest.raises(UserError, match="snappy-compressed; TensorFlow writes checkpoint indexes"):
        TFCheckpoint(prefix)


@needs_tf
def test_unknown_variable_names_close_ones(written: dict) -> None:
    ckpt = TFCheckpoint(written["tf1"]["prefix"])
    with pytest.raises(
        UserError, match=r"no variable 'base_model/conv2d/kernal'.*base_model/conv2d/kernel"
    ):
        ckpt.read("base_model/conv2d/kernal")


# ---- the pieces, without TensorFlow -----------------------------------------------------


def test_crc32c_matches_the_bytewise_definition() -> None:
    rng = np.random.default_rng(0)
    lengths = [0, 1, 3, 4, 5, 15, 16, 17, 63, 64, 65, 1000, 4097, 65536 * 17 + 3]
    for n in lengths:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == crc32c_reference(data), n
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of ones
    assert all(unmask(mask(c)) == c for c in (0, 1, 0xFFFFFFFF, 0xE3069283))


def test_wire_decoding_of_bundle_entries() -> None:
    # dtype 9 (int64), shape [2, 3], shard 0, offset 300 (two-byte varint), size 48, crc.
    entry = (
        b"\x08\x09"
        + b"\x12\x08\x12\x02\x08\x02\x12\x02\x08\x03"
        + b"\x20\xac\x02"
        + b"\x28\x30"
        + b"\x35"
        + struct.pack("<I", 0xDEADBEEF)
        + b"\x40\x07"  # an unknown field, skipped
    )
    parsed = BundleEntry.parse(entry)
    assert (parsed.dtype, parsed.shape, parsed.offset, parsed.size) == (9, (2, 3), 300, 48)
    assert parsed.crc32c == 0xDEADBEEF and not parsed.partitioned
    # A negative int64 takes ten varint bytes.
    assert parse_fields(b"\x08" + b"\xff" * 9 + b"\x01") == {1: [2**64 - 1]}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
