"""``ssl-train eval``'s preprocessing against the official SimCLR one, run by real TensorFlow.

TensorFlow lives only in the separate environment ``.venv-tf`` (``make tf-env``). A
helper script (tests/tf_eval_preprocess.py) runs there once per module: it preprocesses
a set of JPEGs as google-research/simclr's ``preprocess_for_eval`` does (float32, before
any rounding), and resizes random float images with ``tf.image.resize(..., "bicubic")``.
These tests compare ssl-train's ``decode.eval_view`` and ``decode.tf_bicubic_resize``
(no TensorFlow) with those dumps, and show that the previous path (DCT-scaled decode,
PIL's antialiased bicubic) was much further away.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.images import encode_jpeg
from shards.synthetic import photo_like
from ssl_train.data import decode

ROOT = Path(__file__).resolve().parents[1]
TF_PYTHON = ROOT / ".venv-tf" / "bin" / "python"
HELPER = ROOT / "tests" / "tf_eval_preprocess.py"
SIZES = (32, 224)

needs_tf = pytest.mark.skipif(
    not TF_PYTHON.exists(),
    reason=f"{TF_PYTHON} is missing: run `make tf-env` (TensorFlow in its own venv) first",
)

# Both sides decode with libjpeg-turbo (simplejpeg here, TensorFlow's own build there),
# with the fast integer IDCT that tf.io.decode_jpeg uses by default: identical pixels on
# every image here, so all that is left is the rounding to uint8, at most 0.5/255.
# ROUNDING_SLACK covers float32 rounding in the two resizes (about 1e-7 of the range).
# (libjpeg's accurate IDCT, the training path's, is 4-8 grey levels off at some pixels.)
ROUNDING_SLACK = 1e-3


def _noise(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Detail at every scale: per-pixel noise over a photo, where a 2x antialiased
    downscale and a plain bicubic one part by many grey levels."""
    pixels = np.asarray(photo_like(rng, width, height), np.float32)
    pixels += rng.normal(0.0, 40.0, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _save(img: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", **options)
    return out.getvalue()


def _jpegs() -> dict[str, bytes]:
    """Real JPEGs, square and not, odd sides, 4:2:0, 4:4:4, progressive and grayscale.
    Their 87.5% crops go from upscaled 4x (97x61's 53 px to 224) and slightly (333x251's
    220) to downscaled 2x and more, where the old path decoded at a reduced DCT scale:
    1/2 for 224 px (640x520, 901x677, 512x512), 1/8 or 1/4 for 32 px (all but 97x61)."""
    rng = np.random.default_rng(2024)
    return {
        "photo-640x520.jpg": encode_jpeg(photo_like(rng, 640, 520)),
        "noise-901x677.jpg": encode_jpeg(_noise(rng, 901, 677)),
        "noise-512x512-444.jpg": _save(_noise(rng, 512, 512), quality=95, subsampling=0),
        "photo-500x375.jpg": encode_jpeg(photo_like(rng, 500, 375)),
        "odd-333x251-progressive.jpg": _save(
            photo_like(rng, 333, 251), quality=90, progressive=True
        ),
        "gray-250x187.jpg": _save(photo_like(rng, 250, 187).convert("L"), quality=92),
        "small-97x61.jpg": encode_jpeg(photo_like(rng, 97, 61)),
    }


RESIZES = [  # (input height, width), output (height, width)
    ((328, 500), (224, 224)),  # down, non-square input
    ((455, 455), (224, 224)),  # down just over 2x
    ((2625, 97), (224, 32)),  # down 11x and up, non-square output
    ((61, 53), (224, 224)),  # up 4x
    ((220, 220), (224, 224)),  # up by 2%: every tap weight away from 0 and 1
    ((224, 224), (224, 224)),  # same size
    ((5, 3), (2, 9)),  # tiny: taps outside on both sides
    ((1, 7), (4, 3)),  # a single row
]


@pytest.fixture(scope="module")
def tensorflow(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The JPEGs, random float images, and TensorFlow's results for both."""
    work = tmp_path_factory.mktemp("tf-eval")
    jpegs = {}
    for name, data in _jpegs().items():
        (work / name).write_bytes(data)
        jpegs[str(work / name)] = data
    rng = np.random.default_rng(7)
    floats = []
    for n, (shape, _) in enumerate(RESIZES):
        image = rng.normal(0.5, 0.5, (*shape, 3)).astype(np.float32)
        np.save(work / f"float-{n}.npy", image)
        floats.append(image)
    jobs = {
        "jpegs": list(jpegs),
        "sizes": list(SIZES),
        "resize": [[str(work / f"float-{n}.npy"), *out] for n, (_, out) in enumerate(RESIZES)],
    }
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(TF_PYTHON), str(HELPER), str(work / "jobs.json"), str(work / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    return {"jpegs": jpegs, "floats": floats, **manifest}


@needs_tf
def test_resize_is_tensorflows_bicubic_resize(tensorflow) -> None:
    """Down and up, square and not, tiny images with taps off both edges: float32
    rounding apart, the same numbers."""
    for (shape, size), image, theirs in zip(
        RESIZES, tensorflow["floats"], tensorflow["resized"], strict=True
    ):
        theirs = np.load(theirs)
        ours = decode.tf_bicubic_resize(image, size)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape == (*size, 3)
        assert np.abs(ours - theirs).max() < 1e-5, (shape, size, np.abs(ours - theirs).max())


def _differences(tensorflow: dict, size: int) -> dict[str, np.ndarray]:
    """|eval_view - TensorFlow's float output x255| per image, in grey levels."""
    out = {}
    for path, data in tensorflow["jpegs"].items():
        theirs = np.load(tensorflow["preprocessed"][path][str(size)]).astype(np.float64) * 255
        ours = decode.eval_view(data, size)
        assert ours.dtype == np.uint8 and ours.shape == theirs.shape == (size, size, 3)
        out[Path(path).name] = np.abs(ours - theirs)
    return out


@needs_tf
def test_both_sides_decode_the_same_pixels(tensorflow) -> None:
    """eval_view's decode (libjpeg-turbo's fast IDCT, full scale) is tf.io.decode_jpeg's
    to the bit, so the comparison below measures preprocessing alone; the accurate IDCT
    (the training path's) is not."""
    accurate_differs = []
    for path, data in tensorflow["jpegs"].items():
        theirs = np.load(tensorflow["decoded"][path])
        width, height, fast = decode._header(data)
        assert fast, path
        ours = decode._decode(data, width, height, 1, fast, fastdct=True)
        assert np.array_equal(ours, theirs), Path(path).name
        accurate = decode._decode(data, width, height, 1, fast)
        accurate_differs.append(np.abs(accurate.astype(np.int16) - theirs).max())
    print(f"accurate IDCT vs TensorFlow's decode: max {accurate_differs} grey levels")
    assert all(d > 0 for d in accurate_differs)


@needs_tf
@pytest.mark.parametrize("size", SIZES)
def test_eval_view_is_the_official_preprocessing_to_uint8_rounding(tensorflow, size) -> None:
    differences = _differences(tensorflow, size)
    for name, difference in differences.items():
        print(f"{size} px {name}: max {difference.max():.4f} mean {difference.mean():.4f} /255")
        assert difference.max() <= 0.5 + ROUNDING_SLACK, (name, size)
    everything = np.concatenate([d.ravel() for d in differences.values()])
    print(f"{size} px all: max {everything.max():.4f} mean {everything.mean():.4f} /255")
    assert 0.2 < everything.mean() < 0.3  # rounding's 0.25, not a systematic offset


def _old_eval_view(jpeg: bytes, size: int) -> np.ndarray:
    """``eval_view`` before this change: decode at the smallest sufficient DCT scale,
    then PIL's (antialiased) bicubic resize of the crop box."""
    return decode.decode_crops(
        jpeg, size, [decode.center_crop_box(*decode.image_size(jpeg))], Image.BICUBIC
    )[0]


@needs_tf
def test_the_previous_path_was_far_from_the_official_one(tensorflow) -> None:
    """Downscaling a detailed image 2x or more, the old path's antialiasing (and its
    reduced-scale decode) moved pixels by tens of grey levels, where the new path is
    within rounding; also the same with a full-scale decode and PIL's own resize."""
    for path, data in tensorflow["jpegs"].items():
        name = Path(path).name
        if not name.startswith("noise-"):
            continue
        theirs = np.load(tensorflow["preprocessed"][path]["224"]).astype(np.float64) * 255
        old = np.abs(_old_eval_view(data, 224) - theirs)
        left, top, w, h = decode.center_crop_box(*decode.image_size(data))
        full = Image.open(io.BytesIO(data)).convert("RGB")
        pil = np.asarray(full.resize((224, 224), Image.BICUBIC, box=(left, top, left + w, top + h)))
        pil = np.abs(pil - theirs)
        new = np.abs(decode.eval_view(data, 224) - theirs)
        print(
            f"{name}: old max {old.max():.1f} mean {old.mean():.2f}; full-scale PIL max "
            f"{pil.max():.1f} mean {pil.mean():.2f}; new max {new.max():.3f} mean {new.mean():.3f}"
        )
        assert new.max() <= 0.5 + ROUNDING_SLACK
        assert old.mean() > 10 * new.mean() and old.max() > 20
        assert pil.mean() > 10 * new.mean() and pil.max() > 20
