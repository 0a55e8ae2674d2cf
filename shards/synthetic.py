"""Generate ImageNet-layout trees of photo-like JPEGs, and trees of "your own photos",
for tests, benchmarks and trials.

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
from dataclasses import dataclass

import numpy as np
from PIL import Image, features

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


# A tree of "your own photos": nested folders, names repeated across them, JPEG, PNG and
# WebP mixed, one file that is no image, and files that are not images by name.
PHOTO_FOLDERS = ("2024/trip", "2024/home", "2025", "2025/misc/deep", "")
SCENES = {"beach": (230, 200, 120), "forest": (40, 140, 50), "night": (20, 20, 70)}
_FORMATS = (("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"))


@dataclass
class PhotoTree:
    """What :func:`make_photo_tree` wrote: every image's scene (its hidden class), the
    subset a labels CSV names, and the files a sharder must report or ignore."""

    root: str
    scenes: dict[str, str]  # relative path -> scene, every readable image
    labeled: dict[str, str]  # relative path -> scene, the images the CSV labels
    labels_csv: str
    unreadable: list[str]
    others: list[str]  # not images by name (ignored, and said so)


def make_photo_tree(
    root: str,
    count: int = 100,
    labeled_fraction: float = 0.1,
    size: tuple[int, int] = (40, 32),
    seed: int = 0,
) -> PhotoTree:
    """Write ``count`` photo-like images in nested folders under ``root``, tinted by a
    scene, and ``labels.csv`` beside ``root`` naming about ``labeled_fraction`` of them
    (as many of each scene).

    Example:
        >>> import tempfile
        >>> tree = make_photo_tree(tempfile.mkdtemp() + "/photos", count=10, labeled_fraction=0.3)
        >>> len(tree.scenes), len(tree.labeled), tree.unreadable
        (10, 3, ['2025/misc/broken.jpg'])
    """
    rng = np.random.default_rng(seed)
    formats = [f for f in _FORMATS if f[0] != "WEBP" or features.check("webp")]
    scenes: dict[str, str] = {}
    for n in range(count):
        folder = PHOTO_FOLDERS[n % len(PHOTO_FOLDERS)]
        kind, suffix = formats[n % len(formats)]
        name = f"{folder}/{n // len(PHOTO_FOLDERS):04d}{suffix}".lstrip("/")
        scene = list(SCENES)[int(rng.integers(len(SCENES)))]
        tint = Image.new("RGB", size, SCENES[scene])
        image = Image.blend(photo_like(rng, *size), tint, 0.6)
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        out = io.BytesIO()
        image.save(out, format=kind, quality=90)
        with open(os.path.join(root, name), "wb") as f:
            f.write(out.getvalue())
        scenes[name] = scene
    broken, others = "2025/misc/broken.jpg", ["notes.txt", "2024/trip/.DS_Store"]
    os.makedirs(os.path.join(root, "2025/misc"), exist_ok=True)
    with open(os.path.join(root, broken), "wb") as f:
        f.write(b"this file is not an image")
    for other in others:
        with open(os.path.join(root, other), "w") as f:
            f.write("not an image\n")
    wanted = max(len(SCENES), round(count * labeled_fraction))
    labeled: dict[str, str] = {}
    for turn in range(wanted):
        scene = list(SCENES)[turn % len(SCENES)]
        pick = next((p for p, s in scenes.items() if s == scene and p not in labeled), None)
        if pick is not None:
            labeled[pick] = scene
    labels_csv = os.path.join(os.path.dirname(os.path.abspath(root)), "labels.csv")
    with open(labels_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(sorted(labeled.items()))
    return PhotoTree(root, scenes, labeled, labels_csv, [broken], sorted(others))
