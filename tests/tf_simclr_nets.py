"""Official-structure SimCLRv2 networks in real TensorFlow: their checkpoints and outputs.

Runs under ``.venv-tf/bin/python`` (``make tf-env``) as a subprocess of
tests/test_checkpoint_import.py. It builds ResNets with the structure, the variable
names and the layer semantics of google-research/simclr (TF1 ``resnet.py`` /
``model_util.py`` and TF2 ``tf2/resnet.py`` / ``tf2/model.py``; written here from those
facts, not copied), fills them with random weights and random BN statistics, saves them
as the official code would (a TF1 ``Saver`` checkpoint with ``base_model/conv2d_N``
names, a TF2 ``tf.train.Checkpoint(model=...)``, or a SavedModel whose root also lists
the trainable variables, as the official export does), and runs TensorFlow's inference
on the same images in float32 and float64.

Usage: python tests/tf_simclr_nets.py OUT_DIR CASES_JSON

CASES_JSON: a list of {"name", "depth", "width", "sk", "format" (tf1 | tf2 | savedmodel),
"head_layers" (layers saved), "full_head" (the last one is the 128-wide projection),
"classes", "ft_proj_selector", "image_size", "seed", "extra": optional {TF1 name: shape}
of variables the model does not have}.
Writes OUT_DIR/NAME/ckpt* and OUT_DIR/NAME/{images,features,projection,logits}_{f32,f64}.npy
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

EPS = 1e-5
LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def main() -> None:
    import tensorflow as tf

    out_dir, cases = sys.argv[1], json.loads(sys.argv[2])

    class Namer:
        """TF1 ``tf.layers`` names: per kind, numbered in creation order."""

        def __init__(self) -> None:
            self.counts = {"conv2d": 0, "batch_normalization": 0}
            self.tf1: dict[str, tf.Variable] = {}

        def name(self, kind: str) -> str:
            n = self.counts[kind]
            self.counts[kind] += 1
            return f"base_model/{kind}" if n == 0 else f"base_model/{kind}_{n}"

    class Weights:
        def __init__(self, seed: int) -> None:
            self.rng = np.random.default_rng(seed)

        def conv(self, k: int, cin: int, cout: int) -> np.ndarray:
            return (
                self.rng.standard_normal((k, k, cin, cout)) * np.sqrt(2.0 / (k * k * cin))
            ).astype(np.float32)

        def dense(self, cin: int, cout: int) -> np.ndarray:
            return (self.rng.standard_normal((cin, cout)) * np.sqrt(1.0 / cin)).astype(np.float32)

        def vector(self, n: int, low: float, high: float) -> np.ndarray:
            return self.rng.uniform(low, high, n).astype(np.float32)

    class Conv2D(tf.Module):  # a Keras Conv2D: its kernel only (no bias)
        def __init__(self, w: Weights, namer: Namer, k: int, cin: int, cout: int, stride: int = 1):
            super().__init__()
            self.kernel = tf.Variable(w.conv(k, cin, cout))
            self.k, self.stride = k, stride
            namer.tf1[f"{namer.name('conv2d')}/kernel"] = self.kernel

        def __call__(self, x, dtype):
            kernel = tf.cast(self.kernel, dtype)
            if self.stride > 1:  # fixed padding, then VALID
                total = self.k - 1
                x = tf.pad(
                    x,
                    [
                        [0, 0],
                        [total // 2, total - total // 2],
                        [total // 2, total - total // 2],
                        [0, 0],
                    ],
                )
                return tf.nn.conv2d(x, kernel, self.stride, "VALID")
            return tf.nn.conv2d(x, kernel, 1, "SAME")

    class Conv2dFixedPadding(tf.Module):
        def __init__(self, w, namer, k, cin, cout, stride):
            super().__init__()
            self.conv2d = Conv2D(w, namer, k, cin, cout, stride)

        def __call__(self, x, dtype):
            return self.conv2d(x, dtype)

    class BatchNormalization(tf.Module):
        def __init__(
            self,
            w: Weights,
            namer: Namer,
            n: int,
            center: bool = True,
            tf1_name: str | None = None,
            init_zero: bool = False,
        ):
            super().__init__()
            name = tf1_name or namer.name("batch_normalization")
            # A block's last BN starts at gamma 0 in the official code and stays small in
            # trained networks; random large ones make activations grow block by block.
            self.gamma = tf.Variable(w.vector(n, 0.05, 0.3) if init_zero else w.vector(n, 0.5, 1.5))
            self.beta = tf.Variable(w.vector(n, -0.2, 0.2)) if center else None
            self.moving_mean = tf.Variable(w.vector(n, -0.2, 0.2), trainable=False)
            self.moving_variance = tf.Variable(w.vector(n, 0.5, 1.5), trainable=False)
            for attr in ("gamma", "beta", "moving_mean", "moving_variance"):
                if getattr(self, attr) is not None:
                    namer.tf1[f"{name}/{attr}"] = getattr(self, attr)

        def __call__(self, x, dtype):
            beta = None if self.beta is None else tf.cast(self.beta, dtype)
            return tf.nn.batch_normalization(
                x,
                tf.cast(self.moving_mean, dtype),
                tf.cast(self.moving_variance, dtype),
                beta,
                tf.cast(self.gamma, dtype),
                EPS,
            )

    class BatchNormRelu(tf.Module):
        def __init__(self, w, namer, n, relu=True, center=True, tf1_name=None, init_zero=False):
            super().__init__()
            self.bn = BatchNormalization(w, namer, n, center, tf1_name, init_zero)
            self.relu = relu

        def __call__(self, x, dtype):
            x = self.bn(x, dtype)
            return tf.nn.relu(x) if self.relu else x

    class Empty(tf.Module):  # FixedPadding, pooling, DropBlock, identity: no variables
        pass

    class SKConv2D(tf.Module):
        def __init__(self, w, namer, cin, filters, stride):
            super().__init__()
            self.conv2d_fixed_padding = Conv2dFixedPadding(w, namer, 3, cin, 2 * filters, stride)
            self.batch_norm_relu = BatchNormRelu(w, namer, 2 * filters)
            mid = max(int(filters * 0.0625), 32)
            self.conv2d_0 = Conv2D(w, namer, 1, filters, mid)
            self.batch_norm_relu_1 = BatchNormRelu(w, namer, mid)
            self.conv2d_1 = Conv2D(w, namer, 1, mid, 2 * filters)

        def __call__(self, x, dtype):
            x = self.batch_norm_relu(self.conv2d_fixed_padding(x, dtype), dtype)
            streams = tf.stack(tf.split(x, 2, axis=3))
            pooled = tf.reduce_mean(tf.reduce_sum(streams, axis=0), [1, 2], keepdims=True)
            mixing = self.conv2d_1(
                self.batch_norm_relu_1(self.conv2d_0(pooled, dtype), dtype), dtype
            )
            mixing = tf.nn.softmax(tf.stack(tf.split(mixing, 2, axis=3)), axis=0)
            return tf.reduce_sum(streams * mixing, axis=0)

    class BottleneckBlock(tf.Module):
        def __init__(self, w, namer, cin, filters, stride, projection, sk):
            super().__init__()
            self.projection_layers = []
            self.sk, self.stride = sk, stride
            if projection:
                if sk:
                    if stride > 1:
                        self.projection_layers.append(Empty())
                    self.projection_layers.append(Empty())
                    self.projection_layers.append(
                        Conv2dFixedPadding(w, namer, 1, cin, 4 * filters, 1)
                    )
                else:
                    self.projection_layers.append(
                        Conv2dFixedPadding(w, namer, 1, cin, 4 * filters, stride)
                    )
                self.projection_layers.append(BatchNormRelu(w, namer, 4 * filters, relu=False))
            self.shortcut_dropblock = Empty()
            layers = [
                Conv2dFixedPadding(w, namer, 1, cin, filters, 1),
                BatchNormRelu(w, namer, filters),
                Empty(),
            ]
            if sk:
                layers.append(SKConv2D(w, namer, filters, filters, stride))
            else:
                layers += [
                    Conv2dFixedPadding(w, namer, 3, filters, filters, stride),
                    BatchNormRelu(w, namer, filters),
                ]
            layers += [
                Empty(),
                Conv2dFixedPadding(w, namer, 1, filters, 4 * filters, 1),
                BatchNormRelu(w, namer, 4 * filters, relu=False, init_zero=True),
                Empty(),
            ]
            self.conv_relu_dropblock_layers = layers

        def __call__(self, x, dtype):
            shortcut = x
            if self.projection_layers:
                if self.sk:
                    if self.stride > 1:
                        shortcut = tf.pad(shortcut, [[0, 0], [0, 1], [0, 1], [0, 0]])
                        shortcut = tf.nn.avg_pool2d(shortcut, 2, 2, "VALID")
                    else:
                        shortcut = tf.nn.avg_pool2d(shortcut, 2, 1, "SAME")
                for layer in self.projection_layers:
                    if not isinstance(layer, Empty):
                        shortcut = layer(shortcut, dtype)
            for layer in self.conv_relu_dropblock_layers:
                if not isinstance(layer, Empty):
                    x = layer(x, dtype)
            return tf.nn.relu(x + shortcut)

    class BlockGroup(tf.Module):
        def __init__(self, w, namer, cin, filters, blocks, stride, sk):
            super().__init__()
            self.layers = [BottleneckBlock(w, namer, cin, filters, stride, True, sk)]
            for _ in range(1, blocks):
                self.layers.append(BottleneckBlock(w, namer, 4 * filters, filters, 1, False, sk))

        def __call__(self, x, dtype):
            for layer in self.layers:
                x = layer(x, dtype)
            return x

    class Resnet(tf.Module):
        def __init__(self, w, namer, depth, width, sk):
            super().__init__()
            stem = 64 * width
            if sk:
                self.initial_conv_relu_max_pool = [
                    Conv2dFixedPadding(w, namer, 3, 3, stem // 2, 2),
                    BatchNormRelu(w, namer, stem // 2),
                    Conv2dFixedPadding(w, namer, 3, stem // 2, stem // 2, 1),
                    BatchNormRelu(w, namer, stem // 2),
                    Conv2dFixedPadding(w, namer, 3, stem // 2, stem, 1),
                ]
            else:
                self.initial_conv_relu_max_pool = [Conv2dFixedPadding(w, namer, 7, 3, stem, 2)]
            self.initial_conv_relu_max_pool += [
                Empty(),
                BatchNormRelu(w, namer, stem),
                Empty(),
                Empty(),
            ]
            self.block_groups = []
            cin = stem
            for g, blocks in enumerate(LAYERS[depth]):
                filters = 64 * 2**g * width
                self.block_groups.append(
                    BlockGroup(w, namer, cin, filters, blocks, 1 if g == 0 else 2, sk)
                )
                cin = 4 * filters
            self.features = cin

        def __call__(self, x, dtype):
            for layer in self.initial_conv_relu_max_pool:
                if not isinstance(layer, Empty):
                    x = layer(x, dtype)
            x = tf.nn.max_pool2d(x, 3, 2, "SAME")
            for group in self.block_groups:
                x = group(x, dtype)
            return tf.reduce_mean(x, [1, 2])

    class Dense(tf.Module):
        def __init__(self, w, cin, cout, bias):
            super().__init__()
            self.kernel = tf.Variable(w.dense(cin, cout))
            self.bias = tf.Variable(w.vector(cout, -0.5, 0.5)) if bias else None

        def __call__(self, x, dtype):
            y = tf.matmul(x, tf.cast(self.kernel, dtype))
            return y if self.bias is None else y + tf.cast(self.bias, dtype)

    class LinearLayer(tf.Module):
        def __init__(self, w, namer, scope, cin, cout, use_bias, use_bn):
            super().__init__()
            self.dense = Dense(w, cin, cout, use_bias and not use_bn)
            namer.tf1[f"{scope}/dense/kernel"] = self.dense.kernel
            if self.dense.bias is not None:
                namer.tf1[f"{scope}/dense/bias"] = self.dense.bias
            self.bn_relu = (
                BatchNormRelu(
                    w,
                    namer,
                    cout,
                    relu=False,
                    center=use_bias,
                    tf1_name=f"{scope}/batch_normalization",
                )
                if use_bn
                else None
            )

        def __call__(self, x, dtype):
            x = self.dense(x, dtype)
            return x if self.bn_relu is None else self.bn_relu(x, dtype)

    class ProjectionHead(tf.Module):
        def __init__(self, w, namer, features, layers, full):
            super().__init__()
            self.linear_layers = []
            for j in range(layers):
                last = full and j == layers - 1
                self.linear_layers.append(
                    LinearLayer(
                        w,
                        namer,
                        f"head_contrastive/nl_{j}",
                        features,
                        128 if last else features,
                        not last,
                        True,
                    )
                )
            self.full = full

        def __call__(self, x, dtype):
            hiddens = [x]
            for j, layer in enumerate(self.linear_layers):
                x = layer(x, dtype)
                if not (self.full and j == len(self.linear_layers) - 1):
                    x = tf.nn.relu(x)
                hiddens.append(x)
            return hiddens

    class SupervisedHead(tf.Module):
        def __init__(self, w, namer, cin, classes):
            super().__init__()
            self.linear_layer = LinearLayer(
                w, namer, "head_supervised/linear_layer", cin, classes, True, False
            )

        def __call__(self, x, dtype):
            return self.linear_layer(x, dtype)

    class Model(tf.Module):
        def __init__(self, case, w, namer):
            super().__init__()
            self.resnet_model = Resnet(w, namer, case["depth"], case["width"], case["sk"])
            features = self.resnet_model.features
            self._projection_head = ProjectionHead(
                w, namer, features, case["head_layers"], case["full_head"]
            )
            selector = case["ft_proj_selector"]
            reads = 128 if case["full_head"] and selector == case["head_layers"] else features
            self.supervised_head = SupervisedHead(w, namer, reads, case["classes"])
            self.selector = selector

        def __call__(self, x, dtype):
            features = self.resnet_model(x, dtype)
            hiddens = self._projection_head(features, dtype)
            return features, hiddens[-1], self.supervised_head(hiddens[self.selector], dtype)

    for case in cases:
        folder = os.path.join(out_dir, case["name"])
        os.makedirs(folder, exist_ok=True)
        namer = Namer()
        model = Model(case, Weights(case["seed"]), namer)
        if case["format"] == "tf1":
            step = tf.Variable(np.int64(250228))
            slots = {
                f"{name}/Momentum": tf.Variable(tf.zeros_like(v))
                for name, v in list(namer.tf1.items())[:3]
            }
            ema = {
                f"{name}/ExponentialMovingAverage": tf.Variable(v)
                for name, v in list(namer.tf1.items())[:2]
            }
            extra = {
                name: tf.Variable(np.zeros(shape, np.float32))
                for name, shape in case.get("extra", {}).items()
            }
            saver = tf.compat.v1.train.Saver(
                var_list={**namer.tf1, **slots, **ema, **extra, "global_step": step}
            )
            saver.save(None, os.path.join(folder, "model.ckpt-250228"), write_meta_graph=False)
        elif case["format"] == "tf2":
            checkpoint = tf.train.Checkpoint(model=model, global_step=tf.Variable(np.int64(9)))
            checkpoint.write(os.path.join(folder, "ckpt-1"))
        else:  # the official export: a module holding the model and its trainable variables
            root = tf.Module()
            root.model = model
            root.trainable_variables_list = list(model.trainable_variables)
            tf.saved_model.save(root, os.path.join(folder, "saved_model"))
        rng = np.random.default_rng(case["seed"] + 1)
        images = rng.uniform(0, 1, (3, case["image_size"], case["image_size"], 3))
        for suffix, dtype in (("f32", tf.float32), ("f64", tf.float64)):
            x = tf.constant(images, dtype)
            features, projection, logits = model(x, dtype)
            np.save(os.path.join(folder, f"images_{suffix}.npy"), x.numpy())
            np.save(os.path.join(folder, f"features_{suffix}.npy"), features.numpy())
            np.save(os.path.join(folder, f"projection_{suffix}.npy"), projection.numpy())
            np.save(os.path.join(folder, f"logits_{suffix}.npy"), logits.numpy())


if __name__ == "__main__":
    main()
