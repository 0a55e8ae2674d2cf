"""Check source images cheaply and convert the few that are not RGB JPEG.

Most ImageNet files are good RGB JPEGs and are kept byte for byte. Reading only the
header tells format and mode; a JPEG that ends with its end-of-image marker is whole.
Only files that fail that test (or all files with ``full_decode``) are decoded, so the
default mode still catches truncated and empty files at close to copy speed.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

JPEG_QUALITY = 95
_JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe")


class BadImage(ValueError):
    """The file cannot become a training sample; the message is the reason."""


# Frame types every JPEG decoder reads: baseline, extended and progressive Huffman.
_COMMON_FRAMES = {0xC0, 0xC1, 0xC2}
_OTHER_FRAMES = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_START_OF_SCAN = 0xDA


def jpeg_components(data: bytes) -> int | None:
    """Colour components of a common JPEG (3 = colour, 1 = gray, 4 = CMYK), else None.

    Walks the marker segments up to the frame header: a few microseconds, against about
    25 for PIL's full header parse, which matters at a million files. Anything unusual
    (another frame type, a broken marker) returns None and goes to PIL.

    Example:
        >>> jpeg_components(encode_jpeg(Image.new("RGB", (8, 8))))
        3
        >>> jpeg_components(b"not a jpeg") is None
        True
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos, size = 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _COMMON_FRAMES:
            return data[pos + 9] if pos + 10 <= size else None
        if marker in _OTHER_FRAMES or marker == _START_OF_SCAN:
            return None
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
    return None


def _ends_with_eoi(data: bytes) -> bool:
    # Some encoders pad after the end-of-image marker with zeros or newlines.
    return data[-4096:].rstrip(b"\0\r\n ").endswith(b"\xff\xd9")


def _decode(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; the pixels are what count
            img = Image.open(io.BytesIO(data))
            img.load()
        return img
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
        text = str(exc)
        if "truncated" in text or "premature end" in text.lower():
            raise BadImage(f"truncated image ({text})") from None
        raise BadImage(f"cannot decode ({text})") from None


def encode_jpeg(img: Image.Image) -> bytes:
    """Encode an image as RGB JPEG at the quality used for every converted file.

    Example:
        >>> encode_jpeg(Image.new("L", (8, 8)))[:2]
        b'\\xff\\xd8'
    """
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def prepare_image(data: bytes, name: str, full_decode: bool = False) -> tuple[bytes, str | None]:
    """Return (RGB JPEG bytes, why it was converted or None); raise BadImage if unusable.

    Example:
        >>> jpeg, why = prepare_image(encode_jpeg(Image.new("RGB", (8, 8))), "a.JPEG")
        >>> why is None
        True
        >>> prepare_image(b"", "empty.JPEG")
        Traceback (most recent call last):
        ...
        shards.images.BadImage: empty file
    """
    if not data:
        raise BadImage("empty file")
    if not full_decode and jpeg_components(data) == 3 and _ends_with_eoi(data):
        return data, None  # the common case: a whole colour JPEG, kept as it is
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"unreadable header ({exc})") from None

    if header.format == "JPEG" and header.mode == "RGB":
        if full_decode or not _ends_with_eoi(data):
            _decode(data)
        return data, None

    img = _decode(data)
    if header.format != "JPEG":
        named_jpeg = name.lower().endswith(_JPEG_SUFFIXES)
        why = f"{header.format} file{' named as JPEG' if named_jpeg else ''} converted to RGB JPEG"
    else:
        why = f"{header.mode} JPEG converted to RGB"
    try:
        return encode_jpeg(img), why
    except (OSError, ValueError) as exc:
        raise BadImage(f"cannot convert {header.mode} to RGB ({exc})") from None
