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

Evaluation (``eval_view``) is the official SimCLR ``preprocess_for_eval`` instead: a
full-resolution decode (no DCT scaling; the fast integer IDCT, as ``tf.io.decode_jpeg``),
the centre 87.5% square, TensorFlow's ``tf.image.resize(..., "bicubic")`` reproduced
(``tf_bicubic_resize``), clipped, and only then rounded to uint8. Measured against
TensorFlow 2.21 running the official steps (x255, seven test JPEGs at 224 px,
``tests/test_eval_preprocessing_tf.py``): max 0.50/255, mean 0.25/255, the uint8 rounding
alone, as both decode the same pixels (the previous path, DCT-scaled decode and PIL's
antialiased bicubic: max 91/255, mean 4.0/255).
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


def _decode(
    jpeg: bytes, width: int, height: int, scale: int, fast: bool, *, fastdct: bool = False
) -> np.ndarray:
    """The whole image at 1/``scale`` (ceil(width/scale) x ceil(height/scale)), (h, w, 3).

    Asking libjpeg-turbo for exactly these dimensions selects the 1/2, 1/4, 1/8 DCT
    scalings, which are SIMD code; its other M/8 scalings (e.g. 5/8) measured slower than
    a full decode. A file libjpeg-turbo refuses (strict: it raises on warnings too) goes
    to PIL, which accepts what it accepted before (corrupt-data warnings) and raises on
    what it refused before (truncated files).

    ``fastdct`` selects libjpeg's fast integer IDCT (JDCT_IFAST) over the accurate one:
    TensorFlow's ``tf.io.decode_jpeg`` default, so ``eval_view`` decodes the same pixels as
    the official pipeline (with fancy upsampling, also both libraries' default). The PIL
    fallback ignores it.
    """
    if fast:
        try:
            return simplejpeg.decode_jpeg(
                jpeg,
                colorspace="RGB",
                fastdct=fastdct,
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


def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """TensorFlow's bicubic resampling along one axis: (index, weight), each (out_size, 4).

    Output pixel ``i`` is ``sum_k weight[i, k] * input[index[i, k]]``: the rows of a banded
    (out_size, in_size) matrix with four non-zeros each. As ResizeBicubic with
    ``half_pixel_centers=True`` (what ``tf.image.resize(method="bicubic")`` runs, in
    float32): sample centre ``x = (i + 0.5) * in/out - 0.5``; taps ``floor(x) - 1`` to
    ``floor(x) + 2``; Keys' cubic kernel with a = -0.5, read from TensorFlow's 1025-entry
    table (the fraction ``x - floor(x)`` rounded to 1/1024: the exact kernel is off by up
    to 8e-4 of the value range on a random image); taps outside the image get weight 0 and the rest are
    renormalised to sum to 1. Taps outside are clamped into range (with weight 0) so that
    indexing never fails.

    Example:
        >>> index, weight = bicubic_taps(4, 2)
        >>> index.tolist()
        [[0, 0, 1, 2], [1, 2, 3, 3]]
        >>> weight.astype(float).round(4).tolist()  # (-1, 9, 9, -1)/16, first tap dropped
        [[0.0, 0.5294, 0.5294, -0.0588], [-0.0588, 0.5294, 0.5294, 0.0]]
    """
    scale = np.float32(in_size) / np.float32(out_size)
    centre = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    base = np.floor(centre)
    fraction = np.rint((centre - base) * np.float32(1024)).astype(np.float64) / 1024
    distance = np.stack([fraction + 1, fraction, 1 - fraction, 2 - fraction], axis=1)
    a = -0.5
    near = ((a + 2) * distance - (a + 3)) * distance * distance + 1  # |d| <= 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a  # 1 < |d| < 2
    weight = np.where(distance <= 1, near, far).astype(np.float32)
    index = base.astype(np.int64)[:, None] + np.arange(-1, 3)
    inside = (index >= 0) & (index < in_size)
    weight = np.where(inside, weight, np.float32(0))
    weight /= weight.sum(axis=1, keepdims=True)
    return np.clip(index, 0, in_size - 1), weight


def tf_bicubic_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``tf.image.resize(image, size, method="bicubic")`` (antialias off), without TensorFlow:
    (height, width, channels) of any real dtype to ``size`` = (height, width), float32.

    Why: the official SimCLR evaluation resizes with exactly this, and PIL's bicubic is
    another filter (antialiased: it widens the kernel when downscaling, so a crop shrunk
    2x or more comes out blurrier, tens of grey levels away on a detailed image). It is
    separable: two products with the banded matrices of ``bicubic_taps``, applied as four
    gathered, weighted rows and then columns (a dense product costs 30x as much for a
    2600 px crop). Rows go first and the input is only indexed, never copied whole to
    float32, so a uint8 crop can be passed as it is. Agrees with TensorFlow 2.21 to
    float32 rounding (about 1e-7 of the value range; ``tests/test_eval_preprocessing_tf.py``).

    Example:
        >>> ramp = np.arange(4, dtype=np.float32)[None, :, None]  # one row: 0 1 2 3
        >>> tf_bicubic_resize(ramp, (1, 2))[0, :, 0].astype(float).round(4).tolist()
        [0.4118, 2.5882]
        >>> tf_bicubic_resize(np.zeros((375, 500, 3), np.uint8), (224, 224)).shape
        (224, 224, 3)
    """
    height, width = size
    row_index, row_weight = bicubic_taps(image.shape[0], height)
    column_index, column_weight = bicubic_taps(image.shape[1], width)
    f32 = np.float32
    rows = np.multiply(row_weight[:, 0, None, None], image[row_index[:, 0]], dtype=f32)
    for k in range(1, 4):
        rows += row_weight[:, k, None, None] * image[row_index[:, k]]
    out = column_weight[None, :, 0, None] * rows[:, column_index[:, 0]]
    for k in range(1, 4):
        out += column_weight[None, :, k, None] * rows[:, column_index[:, k]]
    return out


def eval_view(jpeg: bytes, size: int) -> np.ndarray:
    """Evaluation input, (size, size, 3) uint8: the official SimCLR ``preprocess_for_eval``
    but for the final rounding to uint8.

    The JPEG is decoded at full resolution (never DCT-scaled, which would change pixels)
    with the fast integer IDCT, as ``tf.io.decode_jpeg`` does by default (the same pixels
    as TensorFlow's decode; the accurate IDCT is up to 8 grey levels off); its centre
    87.5% square (``center_crop_box``) is resized by ``tf_bicubic_resize``, clipped to
    [0, 255] and rounded to the nearest integer; evaluation then divides by 255. So each
    value is within 0.5/255 of the official float pipeline (module docstring). CMYK and
    other files that libjpeg-turbo refuses are decoded by PIL (accurate IDCT).

    Example:
        >>> from shards.images import encode_jpeg
        >>> view = eval_view(encode_jpeg(Image.new("RGB", (500, 375), (200, 10, 10))), 32)
        >>> view.shape, view.dtype, view[16, 16].tolist()
        ((32, 32, 3), dtype('uint8'), [200, 10, 10])
    """
    width, height, fast = _header(jpeg)
    image = _decode(jpeg, width, height, 1, fast, fastdct=True)
    if image.shape[:2] != (height, width):
        raise ValueError(f"decoded {image.shape[1]}x{image.shape[0]}, header {width}x{height}")
    left, top, w, h = center_crop_box(width, height)
    resized = tf_bicubic_resize(image[top : top + h, left : left + w], (size, size))
    return np.rint(np.clip(resized, 0, 255, out=resized), out=resized).astype(np.uint8)
