"""The official SimCLR evaluation preprocessing, run by real TensorFlow, dumped as .npy.

Runs under ``.venv-tf/bin/python`` (``make tf-env``), never in ssl-train's ``.venv``:
tests/test_eval_preprocessing_tf.py starts it as a subprocess and compares ssl-train's
``decode.eval_view`` and ``decode.tf_bicubic_resize`` with what it writes. TensorFlow is
imported inside ``main`` so that pytest's doctest collection can import this file
without it.

The steps are google-research/simclr's (tf2/data_util.py ``preprocess_image`` with
``is_training=False``, then ``preprocess_for_eval`` and ``center_crop`` with
``crop_proportion=0.875`` and a square output), on an image decoded as
tf.io.decode_jpeg(channels=3) does: convert_image_dtype to float32 in [0, 1], the centred
crop of ``_compute_crop_shape``, ``tf.image.resize(..., method=BICUBIC)``, clip to [0, 1].

Usage: python tests/tf_eval_preprocess.py JOBS_JSON OUT_DIR

JOBS_JSON: {"jpegs": [paths], "sizes": [32, 224], "resize": [[npy_path, height, width]]}
OUT_DIR/manifest.json: {"preprocessed": {jpeg: {size: npy}}, "decoded": {jpeg: npy},
    "resized": [npy per resize job], "tensorflow": version}
    preprocessed  float32 (size, size, 3) in [0, 1], before any rounding to uint8
    decoded       uint8 (h, w, 3): TensorFlow's own decode, to tell decoder differences
                  apart from preprocessing differences
    resized       float32: tf.image.resize(image, (height, width), "bicubic") of the
                  float32 .npy image (h, w, c)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

CROP_PROPORTION = 0.875  # simclr tf2/data_util.py


def main(jobs_path: str, out_dir: str) -> None:
    import tensorflow as tf

    def compute_crop_shape(image_height, image_width, aspect_ratio, crop_proportion):
        # simclr's _compute_crop_shape, eagerly (its tf.cond of two branches)
        image_width_float = tf.cast(image_width, tf.float32)
        image_height_float = tf.cast(image_height, tf.float32)
        if aspect_ratio > image_width_float / image_height_float:
            crop_height = tf.cast(
                tf.math.rint(crop_proportion / aspect_ratio * image_width_float), tf.int32
            )
            crop_width = tf.cast(tf.math.rint(crop_proportion * image_width_float), tf.int32)
        else:
            crop_height = tf.cast(tf.math.rint(crop_proportion * image_height_float), tf.int32)
            crop_width = tf.cast(
                tf.math.rint(crop_proportion * aspect_ratio * image_height_float), tf.int32
            )
        return crop_height, crop_width

    def center_crop(image, height, width, crop_proportion):
        shape = tf.shape(image)
        image_height, image_width = shape[0], shape[1]
        crop_height, crop_width = compute_crop_shape(
            image_height, image_width, height / width, crop_proportion
        )
        offset_height = ((image_height - crop_height) + 1) // 2
        offset_width = ((image_width - crop_width) + 1) // 2
        image = tf.image.crop_to_bounding_box(
            image, offset_height, offset_width, crop_height, crop_width
        )
        return tf.image.resize([image], [height, width], method=tf.image.ResizeMethod.BICUBIC)[0]

    def preprocess_for_eval(image, height, width):
        image = tf.image.convert_image_dtype(image, dtype=tf.float32)
        image = center_crop(image, height, width, crop_proportion=CROP_PROPORTION)
        image = tf.reshape(image, [height, width, 3])
        return tf.clip_by_value(image, 0.0, 1.0)

    with open(jobs_path) as f:
        jobs = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    manifest: dict = {
        "preprocessed": {},
        "decoded": {},
        "resized": [],
        "tensorflow": tf.__version__,
    }
    for n, path in enumerate(jobs["jpegs"]):
        with open(path, "rb") as f:
            decoded = tf.io.decode_jpeg(f.read(), channels=3)
        manifest["decoded"][path] = os.path.join(out_dir, f"decoded-{n}.npy")
        np.save(manifest["decoded"][path], decoded.numpy())
        manifest["preprocessed"][path] = {}
        for size in jobs["sizes"]:
            out = os.path.join(out_dir, f"preprocessed-{n}-{size}.npy")
            np.save(out, preprocess_for_eval(decoded, size, size).numpy())
            manifest["preprocessed"][path][str(size)] = out
    for n, (path, height, width) in enumerate(jobs["resize"]):
        image = tf.constant(np.load(path))
        resized = tf.image.resize(image, (height, width), method=tf.image.ResizeMethod.BICUBIC)
        out = os.path.join(out_dir, f"resized-{n}.npy")
        np.save(out, resized.numpy())
        manifest["resized"].append(out)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
