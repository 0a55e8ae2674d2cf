"""Write TensorFlow checkpoints with real TensorFlow and dump TensorFlow's reading of them.

Runs under ``.venv-tf/bin/python`` (``make tf-env``), never in ssl-train's ``.venv``:
tests/test_tf_checkpoint.py starts it as a subprocess, then reads the same checkpoints
with ``ssl_train.checkpoint_import`` and compares against the dumps. TensorFlow is
imported inside ``main`` so that pytest's doctest collection can import this file
without it.

Usage: python tests/tf_write_checkpoints.py OUT_DIR

OUT_DIR/tf1/model.ckpt-7*   a ``tf.compat.v1.train.Saver`` checkpoint (graph mode), with
                            SimCLR-style names (``base_model/conv2d/kernel``, ...), dtypes
                            float32/float64/float16/bfloat16/int32/int64, 0-d to 4-d, a
                            large tensor, and enough variables that the index has
                            several blocks
OUT_DIR/tf2/ckpt-1*         a ``tf.train.Checkpoint`` (object graph) of a small module tree
OUT_DIR/manifest.json       per checkpoint: prefix, and per variable TensorFlow's dtype,
                            shape and the .npy (or .bin, for strings) file of
                            ``tf.train.load_checkpoint(prefix).get_tensor(name)``
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    if dtype.startswith("int"):
        return rng.integers(-(2**30), 2**30, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype("float64" if dtype == "float64" else "float32")


# (name, shape, dtype): the SimCLR layout in miniature, plus every dtype and rank.
TF1_VARIABLES = [
    ("base_model/conv2d/kernel", (3, 3, 3, 8), "float32"),
    ("base_model/batch_normalization/gamma", (8,), "float32"),
    ("base_model/batch_normalization/beta", (8,), "float32"),
    ("base_model/batch_normalization/moving_mean", (8,), "float32"),
    ("base_model/batch_normalization/moving_variance", (8,), "float32"),
    ("base_model/conv2d/kernel/Momentum", (3, 3, 3, 8), "float32"),
    ("head_contrastive/nl_0/dense/kernel", (8, 8), "float32"),
    ("head_supervised/linear_layer/dense/kernel", (8, 10), "float32"),
    ("head_supervised/linear_layer/dense/bias", (10,), "float32"),
    ("global_step", (), "int64"),
    ("scalar_float", (), "float32"),
    ("extra/float64", (2, 3), "float64"),
    ("extra/float16", (5, 7), "float16"),
    ("extra/bfloat16", (4, 4), "bfloat16"),
    ("extra/int32", (3, 2, 1), "int32"),
    ("extra/empty", (0, 4), "float32"),
    # Larger than TensorFlow's 8 MiB write buffer and than any table block: 9.2 MB.
    ("base_model/big/kernel", (3, 3, 512, 500), "float32"),
    # A name sorting after every other one, which the tests alter in the index.
    ("zz_last", (2,), "float32"),
]
# Filler variables with long names that differ early (so prefix compression cannot
# shorten them), enough that the index outgrows one table block (TensorFlow's are
# 256 KiB): 1000 x 330 bytes.
TF1_FILLER = [(f"filler/{i:04d}/" + "x" * 300 + "/kernel", (2,), "float32") for i in range(1000)]


def write_tf1(tf, out: str, rng: np.random.Generator) -> str:
    graph = tf.Graph()
    with graph.as_default():
        assigns = []
        for name, shape, dtype in TF1_VARIABLES + TF1_FILLER:
            value = _random(rng, shape, dtype)
            if name == "global_step":
                value = np.array(112603, dtype=np.int64)
            var = tf.compat.v1.get_variable(
                name, shape=shape, dtype=getattr(tf, dtype), use_resource=False
            )
            assigns.append(var.assign(tf.cast(tf.constant(value), getattr(tf, dtype))))
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(assigns)
            return saver.save(
                sess, os.path.join(out, "model.ckpt"), global_step=7, write_meta_graph=False
            )


def write_tf2(tf, out: str, rng: np.random.Generator) -> str:
    class Dense(tf.Module):
        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.kernel = tf.Variable(_random(rng, (n_in, n_out), "float32"))
            self.bias = tf.Variable(_random(rng, (n_out,), "float32"))

    class Net(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = [Dense(4, 6), Dense(6, 3)]
            self.step = tf.Variable(np.int64(42))

    ckpt = tf.train.Checkpoint(model=Net())
    return ckpt.save(os.path.join(out, "ckpt"))


def dump(tf, prefix: str, out: str) -> dict:
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    shapes = reader.get_variable_to_shape_map()
    variables = {}
    for i, name in enumerate(sorted(dtypes)):
        value = reader.get_tensor(name)
        dtype = dtypes[name].name
        if dtype == "string":
            path = os.path.join(out, f"{i}.bin")
            with open(path, "wb") as f:
                f.write(value if isinstance(value, bytes) else value.item())
        else:
            path = os.path.join(out, f"{i}.npy")
            array = np.asarray(value)
            if dtype == "bfloat16":  # numpy has no bfloat16: keep TensorFlow's float32 view
                array = np.asarray(tf.cast(value, tf.float32))
            np.save(path, array)
        variables[name] = {"dtype": dtype, "shape": list(shapes[name]), "file": path}
    return {"prefix": prefix, "variables": variables}


def main() -> None:
    out = sys.argv[1]
    import tensorflow as tf

    rng = np.random.default_rng(19)
    manifest = {}
    for kind, write in (("tf1", write_tf1), ("tf2", write_tf2)):
        folder = os.path.join(out, kind)
        dumps = os.path.join(out, f"{kind}-dump")
        os.makedirs(folder, exist_ok=True)
        os.makedirs(dumps, exist_ok=True)
        prefix = write(tf, folder, rng)
        manifest[kind] = dump(tf, prefix, dumps)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
