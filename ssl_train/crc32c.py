"""CRC-32C (Castagnoli), the checksum of TensorFlow's files: the one home of it.

TensorFlow checkpoints carry a masked CRC-32C of each tensor's bytes and of each block of
their ``.index`` table (read by ``ssl_train.checkpoint_import``); TFRecord files, such as
the TensorBoard event files the stages write (``ssl_train.stages.scalars``), frame each
record with two. Nothing installed with ssl-train computes CRC-32C (``zlib.crc32``
is the other polynomial), and a byte-at-a-time loop in CPython checks 15 MB/s: minutes
for the largest published SimCLRv2 checkpoints (R152 3x+SK holds 795M parameters, 3.2 GB
in float32, more with optimizer slots). So this module splits the data into many equal
chunks, advances all their CRCs at once with numpy (four bytes per step, "slicing by
4"), and joins the chunk CRCs with the identity ``crc(A + B) = shift(crc(A), len(B)) ^
crc(B)``, which holds for the CRC without its initial value and final inversion (a
linear map over GF(2)). Measured on 2 shared cores: 115-265 MB/s, 8-17x the byte loop.
"""

from __future__ import annotations

import functools

import numpy as np

_POLY = 0x82F63B78  # CRC-32C, bit-reflected
_MASK_DELTA = 0xA282EAD8


def _byte_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for b in range(256):
        crc = b
        for _ in range(8):
            crc = (crc >> 1) ^ (_POLY if crc & 1 else 0)
        table[b] = crc
    return table


_T0 = _byte_table()
# _SLICE[k][b]: the effect of byte b followed by k zero bytes, for four bytes per step.
_SLICE = [_T0]
for _ in range(3):
    prev = _SLICE[-1]
    _SLICE.append((prev >> np.uint32(8)) ^ _T0[prev & np.uint32(0xFF)])
_TABLE_LIST = [int(x) for x in _T0]


def crc32c_reference(data: bytes, crc: int = 0) -> int:
    """CRC-32C of ``data`` one byte at a time (slow; the definition the tests check against).

    Example:
        >>> hex(crc32c_reference(b"123456789"))
        '0xe3069283'
    """
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _TABLE_LIST[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _apply(columns: tuple[int, ...], state: int) -> int:
    """A GF(2)-linear map on 32-bit states, given as the images of the 32 bits."""
    out = 0
    bit = 0
    while state:
        if state & 1:
            out ^= columns[bit]
        state >>= 1
        bit += 1
    return out


@functools.lru_cache(maxsize=64)
def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    """The map that advances a CRC state over ``nbytes`` zero bytes (by repeated squaring)."""
    one = []
    for bit in range(32):
        s = 1 << bit
        one.append(_TABLE_LIST[s & 0xFF] ^ (s >> 8))
    result = tuple(1 << bit for bit in range(32))  # identity
    power = tuple(one)
    while nbytes:
        if nbytes & 1:
            result = tuple(_apply(power, c) for c in result)
        power = tuple(_apply(power, c) for c in power)
        nbytes >>= 1
    return result


@functools.lru_cache(maxsize=64)
def _shift_tables(nbytes: int) -> tuple[np.ndarray, ...]:
    """Four 256-entry tables applying :func:`_zeros_operator` to a state byte by byte."""
    columns = _zeros_operator(nbytes)
    tables = []
    for k in range(4):
        table = np.zeros(256, dtype=np.uint32)
        for i in range(8):
            table[1 << i : 2 << i] = table[: 1 << i] ^ np.uint32(columns[8 * k + i])
        tables.append(table)
    return tuple(tables)


def _shift(states: np.ndarray, nbytes: int) -> np.ndarray:
    t0, t1, t2, t3 = _shift_tables(nbytes)
    mask = np.uint32(0xFF)
    return (
        t0[states & mask]
        ^ t1[(states >> np.uint32(8)) & mask]
        ^ t2[(states >> np.uint32(16)) & mask]
        ^ t3[states >> np.uint32(24)]
    )


def crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """CRC-32C of ``data`` (any bytes-like object or contiguous numpy array).

    Example:
        >>> hex(crc32c(b"123456789"))
        '0xe3069283'
        >>> crc32c(b"") == 0
        True
    """
    raw = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    n = raw.size
    if n == 0:
        return 0
    # Chunk length: a multiple of 4, so that each step takes one 32-bit word of each chunk;
    # about 64k chunks for large inputs keeps each numpy step large and the loop short.
    chunk = max(16, -(-n // 65536))
    chunk += -chunk % 4
    chunks = -(-n // chunk)
    # Zeros in front leave the CRC without initial value unchanged, so pad there.
    padded = np.zeros(chunks * chunk, dtype=np.uint8)
    padded[chunks * chunk - n :] = raw
    words = np.ascontiguousarray(padded.view("<u4").reshape(chunks, chunk // 4).T)
    t0, t1, t2, t3 = _SLICE
    mask = np.uint32(0xFF)
    states = np.zeros(chunks, dtype=np.uint32)
    for row in words:
        s = states ^ row
        states = (
            t3[s & mask]
            ^ t2[(s >> np.uint32(8)) & mask]
            ^ t1[(s >> np.uint32(16)) & mask]
            ^ t0[s >> np.uint32(24)]
        )
    span = chunk
    while states.size > 1:
        if states.size % 2:
            states = np.concatenate([np.zeros(1, dtype=np.uint32), states])
        states = _shift(states[0::2], span) ^ states[1::2]
        span *= 2
    raw_crc = int(states[0])
    return raw_crc ^ _apply(_zeros_operator(n), 0xFFFFFFFF) ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """TensorFlow's (and LevelDB's) masked form of a CRC, as stored in its files.

    Masking keeps a CRC of data that itself contains CRCs from being trivially related.

    Example:
        >>> unmask(mask(0xE3069283)) == 0xE3069283
        True
    """
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    """Inverse of :func:`mask`."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF
