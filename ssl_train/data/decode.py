"""The CPU half of augmentation: decode a JPEG once, crop and resize its views to uint8.

Decoding is where the CPU time goes, so the JPEG is decoded at the smallest DCT scale
(1, 1/2, 1/4 or 1/8, libjpeg's free downscaling) that still leaves every crop at least
the output size, and each view is cropped and resized in one PIL call. Everything else
(flip, colour, blur) runs batched on the training device (``ssl_train.data.augment``).

Crop parameters follow torchvision's ``RandomResizedCrop.get_params`` (area 0.08-1,
aspect ratio 3/4-4/3 drawn log-uniformly, ten tries, then a centre crop), drawn from a
generator keyed by (seed, epoch, sample key, view): the same crop on any rank or worker.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from ssl_train.data.augment import sample_generator

CROP_STAGE = 1  # keeps crop randomness apart from the device stage's, for the same key
AREA = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
EVAL_CROP = 0.875

Box = tuple[int, int, int, int]  # left, top, width, height in full-resolution pixels


def random_resized_crop_box(
    rng: np.random.Generator, width: int, height: int, area: tuple[float, float] = AREA, ratio=RATIO
) -> Box:
    """A crop box with torchvision's RandomResizedCrop distribution.

    Example:
        >>> left, top, w, h = random_resized_crop_box(np.random.default_rng(0), 500, 375)
        >>> 0 <= left <= 500 - w and 0 <= top <= 375 - h
        True
    """
    total = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = total * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, fraction: float = EVAL_CROP) -> Box:
    """The official SimCLR evaluation crop: a centred square of 0.875 of the short side.

    Example:
        >>> center_crop_box(500, 400)
        (75, 25, 350, 350)
    """
    side = int(np.rint(fraction * min(width, height)))
    return (width - side + 1) // 2, (height - side + 1) // 2, side, side


def crop_boxes(
    jpeg_size: tuple[int, int], key: str, seed: int, epoch: int, views: int
) -> list[Box]:
    """The random crop of each view of sample ``key`` (view index = position).

    Example:
        >>> crop_boxes((500, 375), "n01440764_10026", seed=0, epoch=0, views=2) == crop_boxes(
        ...     (500, 375), "n01440764_10026", seed=0, epoch=0, views=2)
        True
    """
    width, height = jpeg_size
    return [
        random_resized_crop_box(sample_generator(seed, epoch, key, view, CROP_STAGE), width, height)
        for view in range(views)
    ]


def _open(jpeg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpeg))


def decode_crops(jpeg: bytes, size: int, boxes: list[Box], resample=Image.BILINEAR) -> np.ndarray:
    """Decode once at the smallest sufficient DCT scale; return (views, size, size, 3) uint8.

    Example:
        >>> from shards.images import encode_jpeg
        >>> jpeg = encode_jpeg(Image.new("RGB", (400, 300), (200, 10, 10)))
        >>> decode_crops(jpeg, 32, [(0, 0, 300, 300), (100, 50, 64, 64)]).shape
        (2, 32, 32, 3)
    """
    img = _open(jpeg)
    width, height = img.size
    smallest_side = min(min(w, h) for _, _, w, h in boxes)
    scale = next(s for s in (8, 4, 2, 1) if smallest_side >= s * size or s == 1)
    # PIL picks the largest DCT scale s with width // requested >= s: ask for W // s
    img.draft("RGB", (max(1, width // scale), max(1, height // scale)))
    img = img.convert("RGB")
    fx, fy = img.size[0] / width, img.size[1] / height
    out = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    for n, (left, top, w, h) in enumerate(boxes):
        box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
        out[n] = np.asarray(img.resize((size, size), resample, box=box))
    return out


def image_size(jpeg: bytes) -> tuple[int, int]:
    """Width and height from the JPEG header, without decoding.

    Example:
        >>> from shards.images import encode_jpeg
        >>> image_size(encode_jpeg(Image.new("RGB", (40, 30))))
        (40, 30)
    """
    return _open(jpeg).size


def two_views(jpeg: bytes, key: str, size: int, seed: int, epoch: int) -> np.ndarray:
    """SimCLR pretraining input: two random resized crops, (2, size, size, 3) uint8.

    Example:
        >>> from shards.images import encode_jpeg
        >>> two_views(encode_jpeg(Image.new("RGB", (64, 48))), "k", 32, seed=0, epoch=0).shape
        (2, 32, 32, 3)
    """
    return decode_crops(jpeg, size, crop_boxes(image_size(jpeg), key, seed, epoch, 2))


def one_view(jpeg: bytes, key: str, size: int, seed: int, epoch: int) -> np.ndarray:
    """Finetuning and distillation input: one random resized crop, (size, size, 3) uint8."""
    return decode_crops(jpeg, size, crop_boxes(image_size(jpeg), key, seed, epoch, 1))[0]


def eval_view(jpeg: bytes, size: int) -> np.ndarray:
    """Evaluation input: the centre 87.5% square, resized bicubically, (size, size, 3) uint8."""
    return decode_crops(jpeg, size, [center_crop_box(*image_size(jpeg))], Image.BICUBIC)[0]
