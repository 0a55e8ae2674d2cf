"""Generate ImageNet-layout trees of photo-like JPEGs, for tests, benchmarks and trials.

Images are smooth colour fields with texture and sensor-like noise, so their JPEG size
per pixel is close to real photos (about 100 KB at 500x375), which is what makes a
benchmark of reading, hashing and uploading honest. The awkward files real ImageNet has
(CMYK, grayscale, a PNG named .JPEG) and the broken ones a copy can have (truncated,
empty) can be added on request.
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np
from PIL import Image

from shards.sources import imagenet_wnids


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One photo-like RGB image.

    Example:
        >>> photo_like(np.random.default_rng(0), 64, 48).size
        (64, 48)
    """
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    texture = Image.fromarray(
        rng.integers(0, 256, (max(height // 6, 2), max(width // 6, 2), 3), dtype=np.uint8)
    ).resize((width, height), Image.BILINEAR)
    pixels = 0.7 * np.asarray(coarse, np.float32) + 0.3 * np.asarray(texture, np.float32)
    pixels += rng.normal(0.0, 6.0, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def make_imagenet_train(
    root: str,
    classes: int = 10,
    per_class: int = 5,
    size: tuple[int, int] = (64, 48),
    seed: int = 0,
) -> dict[str, str]:
    """Write ``root/<wnid>/<wnid>_<n>.JPEG``; return {key: wnid}.

    Example:
        >>> import tempfile
        >>> labels = make_imagenet_train(tempfile.mkdtemp(), classes=2, per_class=1)
        >>> sorted(labels.values())
        ['n01440764', 'n01443537']
    """
    rng = np.random.default_rng(seed)
    labels: dict[str, str] = {}
    for wnid in imagenet_wnids()[:classes]:
        os.makedirs(os.path.join(root, wnid), exist_ok=True)
        for n in range(per_class):
            key = f"{wnid}_{1000 + n}"
            with open(os.path.join(root, wnid, f"{key}.JPEG"), "wb") as f:
                f.write(jpeg_bytes(photo_like(rng, *size)))
            labels[key] = wnid
    return labels


def make_imagenet_val(
    root: str, count: int = 20, classes: int = 10, size: tuple[int, int] = (64, 48), seed: int = 1
) -> tuple[dict[str, str], str]:
    """Write a flat val folder and its ``LOC_val_solution.csv`` (beside the folder).

    Returns ({ImageId: wnid}, path of the CSV).

    Example:
        >>> import tempfile
        >>> labels, csv_path = make_imagenet_val(tempfile.mkdtemp() + "/val", count=3)
        >>> len(labels), csv_path.endswith("LOC_val_solution.csv")
        (3, True)
    """
    rng = np.random.default_rng(seed)
    wnids = imagenet_wnids()[:classes]
    os.makedirs(root, exist_ok=True)
    labels: dict[str, str] = {}
    for n in range(1, count + 1):
        image_id = f"ILSVRC2012_val_{n:08d}"
        with open(os.path.join(root, f"{image_id}.JPEG"), "wb") as f:
            f.write(jpeg_bytes(photo_like(rng, *size)))
        labels[image_id] = wnids[int(rng.integers(len(wnids)))]
    csv_path = os.path.join(os.path.dirname(os.path.abspath(root)), "LOC_val_solution.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for image_id, wnid in labels.items():
            writer.writerow([image_id, f"{wnid} 10 12 40 30 {wnid} 2 3 20 20"])
    return labels, csv_path


def write_awkward_files(folder: str, seed: int = 2) -> dict[str, str]:
    """Add the files a real copy of ImageNet throws at a sharder; return {file: kind}.

    Kinds: ``cmyk`` and ``gray`` (valid JPEGs to convert), ``png`` (a PNG named .JPEG),
    ``truncated`` (a JPEG cut in half), ``empty`` (zero bytes).

    Example:
        >>> import tempfile
        >>> sorted(write_awkward_files(tempfile.mkdtemp()).values())
        ['cmyk', 'empty', 'gray', 'png', 'truncated']
    """
    rng = np.random.default_rng(seed)
    wnid = os.path.basename(os.path.normpath(folder))
    files: dict[str, bytes] = {}
    files["cmyk"] = jpeg_bytes(photo_like(rng, 64, 48).convert("CMYK"))
    files["gray"] = jpeg_bytes(photo_like(rng, 64, 48).convert("L"))
    png = io.BytesIO()
    photo_like(rng, 64, 48).save(png, format="PNG")
    files["png"] = png.getvalue()
    whole = jpeg_bytes(photo_like(rng, 64, 48))
    files["truncated"] = whole[: len(whole) // 2]
    files["empty"] = b""
    out: dict[str, str] = {}
    for n, (kind, data) in enumerate(files.items()):
        name = f"{wnid}_{9000 + n}.JPEG"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        out[name] = kind
    return out
