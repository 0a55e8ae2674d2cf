"""The CPU half of augmentation: decode a JPEG once, crop and resize its views to uint8.

This is all the CPU does per sample (flip, colour and blur run batched on the training
device, ``ssl_train.data.augment``), so its cost sets how many cores a GPU needs. Where
that cost goes, for a 500x375 JPEG of about 100 KB and two 224 px views
(``bench/cpu_stage.py``; BENCHMARKS.md "CPU stage"):

* decoding, about three quarters, nearly all of it libjpeg's Huffman decoding, which
  every pixel row above the last one needed must pay whatever is cropped or scaled
  (decoding at 1/8 scale still costs 80% of a full decode). libjpeg-turbo decodes here
  through simplejpeg, straight into a numpy array, at the smallest DCT scale (1, 1/2,
  1/4 or 1/8) that leaves every crop at least the output size;
* resizing each view: one antialiased bilinear resize of the crop box, in torch's uint8
  kernel (PIL's filter, about 5x faster than PIL's own resize);
* the rest (crop draws, header, copies) is small; views are written once, into the
  caller's batch when it passes ``out``.

Crop parameters follow torchvision's ``RandomResizedCrop.get_params`` (area 0.08-1,
aspect ratio 3/4-4/3 drawn log-uniformly, ten tries, then a centre crop), drawn from a
generator keyed by (seed, epoch, sample key, view): the same crop on any rank or worker.
"""

from __future__ import annotations

import io
import math

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
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


def _header(jpeg: bytes) -> tuple[int, int, bool]:
    """(width, height, fast): ``fast`` when libjpeg-turbo can decode it straight to RGB.

    CMYK/YCCK files (rare: ``shards create`` re-encodes them) and anything that is not a
    JPEG take PIL's path, which also decides what counts as broken.
    """
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(jpeg)
    except ValueError:
        width, height = _open(jpeg).size
        return width, height, False
    return width, height, colorspace in ("YCbCr", "Gray", "RGB")


def _decode(jpeg: bytes, width: int, height: int, scale: int, fast: bool) -> np.ndarray:
    """The whole image at 1/``scale`` (ceil(width/scale) x ceil(height/scale)), (h, w, 3).

    Asking libjpeg-turbo for exactly these dimensions selects the 1/2, 1/4, 1/8 DCT
    scalings, which are SIMD code; its other M/8 scalings (e.g. 5/8) measured slower than
    a full decode. A file libjpeg-turbo refuses (strict: it raises on warnings too) goes
    to PIL, which accepts what it accepted before (corrupt-data warnings) and raises on
    what it refused before (truncated files).
    """
    if fast:
        try:
            return simplejpeg.decode_jpeg(
                jpeg,
                colorspace="RGB",
                min_height=-(-height // scale),
                min_width=-(-width // scale),
            )
        except ValueError:
            pass
    img = _open(jpeg)
    # PIL picks the largest DCT scale s with width // requested >= s: ask for W // s
    img.draft("RGB", (max(1, width // scale), max(1, height // scale)))
    return np.array(img.convert("RGB"))  # writable: torch refuses read-only arrays


def _resize_views(
    out: np.ndarray, image: np.ndarray, boxes: list[tuple[float, ...]], resample
) -> None:
    """Resize each box (left, top, right, bottom) of ``image`` to ``out[n]`` (size, size, 3).

    A bilinear resize of a box on whole pixels runs in torch's uint8 antialiased kernel:
    PIL's filter (within one grey level but at a few border pixels), about 5x faster.
    Boxes on fractions of a pixel (after a reduced-scale decode) and other filters take
    PIL's resize, which takes fractional boxes: rounding them would shift a view by up to
    half a pixel of the reduced image, several grey levels of error on a textured photo.
    torch runs one thread here: two threads on one 224 px view burnt 6x the CPU-seconds
    (DataLoader workers already run one).
    """
    size = out.shape[1]
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    pil: Image.Image | None = None
    try:
        for n, box in enumerate(boxes):
            left, top, right, bottom = box
            if resample == Image.BILINEAR and all(float(v).is_integer() for v in box):
                crop = torch.from_numpy(image)[int(top) : int(bottom), int(left) : int(right)]
                crop = crop.permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
                resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
                torch.from_numpy(out[n]).copy_(resized[0].permute(1, 2, 0))
            else:
                pil = Image.fromarray(image) if pil is None else pil
                out[n] = np.asarray(pil.resize((size, size), resample, box=box))
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


def decode_crops(
    jpeg: bytes,
    size: int,
    boxes: list[Box],
    resample=Image.BILINEAR,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode once at the smallest sufficient DCT scale; return (views, size, size, 3) uint8.

    ``out``, when given, is where the views go (any strides, e.g. one sample's slot of a
    whole batch), so that the pixels are written once.

    Example:
        >>> from shards.images import encode_jpeg
        >>> jpeg = encode_jpeg(Image.new("RGB", (400, 300), (200, 10, 10)))
        >>> views = decode_crops(jpeg, 32, [(0, 0, 300, 300), (100, 50, 64, 64)])
        >>> views.shape, views[1, 5, 5].tolist()
        ((2, 32, 32, 3), [200, 10, 10])
    """
    width, height, fast = _header(jpeg)
    if out is None:
        out = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    elif out.shape != (len(boxes), size, size, 3) or out.dtype != np.uint8:
        raise ValueError(
            f"out must be uint8 {(len(boxes), size, size, 3)} for {len(boxes)} views of "
            f"{size} px, got {out.dtype} {out.shape}"
        )
    smallest_side = min(min(w, h) for _, _, w, h in boxes)
    scale = next(s for s in (8, 4, 2, 1) if smallest_side >= s * size or s == 1)
    image = _decode(jpeg, width, height, scale, fast)
    if image.shape[:2] != (-(-height // scale), -(-width // scale)):
        scale = 1  # PIL decoded it whole (not a JPEG: draft does nothing)
        if image.shape[:2] != (height, width):
            raise ValueError(f"decoded {image.shape[1]}x{image.shape[0]}, header {width}x{height}")
    # a DCT-scaled pixel i covers full-resolution pixels [i*scale, (i+1)*scale)
    scaled = [(x / scale, y / scale, (x + w) / scale, (y + h) / scale) for x, y, w, h in boxes]
    _resize_views(out, image, scaled, resample)
    return out


def image_size(jpeg: bytes) -> tuple[int, int]:
    """Width and height from the JPEG header, without decoding.

    Example:
        >>> from shards.images import encode_jpeg
        >>> image_size(encode_jpeg(Image.new("RGB", (40, 30))))
        (40, 30)
    """
    return _header(jpeg)[:2]


def two_views(
    jpeg: bytes, key: str, size: int, seed: int, epoch: int, *, out: np.ndarray | None = None
) -> np.ndarray:
    """SimCLR pretraining input: two random resized crops, (2, size, size, 3) uint8
    (written into ``out`` when given).

    Example:
        >>> from shards.images import encode_jpeg
        >>> two_views(encode_jpeg(Image.new("RGB", (64, 48))), "k", 32, seed=0, epoch=0).shape
        (2, 32, 32, 3)
    """
    return decode_crops(jpeg, size, crop_boxes(image_size(jpeg), key, seed, epoch, 2), out=out)


def one_view(
    jpeg: bytes, key: str, size: int, seed: int, epoch: int, *, out: np.ndarray | None = None
) -> np.ndarray:
    """Finetuning and distillation input: one random resized crop, (size, size, 3) uint8
    (written into ``out`` when given).

    Example:
        >>> from shards.images import encode_jpeg
        >>> one_view(encode_jpeg(Image.new("RGB", (64, 48))), "k", 32, seed=0, epoch=0).shape
        (32, 32, 3)
    """
    boxes = crop_boxes(image_size(jpeg), key, seed, epoch, 1)
    return decode_crops(jpeg, size, boxes, out=None if out is None else out[None])[0]


def eval_view(jpeg: bytes, size: int) -> np.ndarray:
    """Evaluation input: the centre 87.5% square, resized bicubically, (size, size, 3) uint8."""
    return decode_crops(jpeg, size, [center_crop_box(*image_size(jpeg))], Image.BICUBIC)[0]
