"""Classifier heads: the fine head and each coarse region-expansion unit is one convolution from the shared
features to C class logits ("transforms F_m via a convolution layer", paper section 4.2): a 1x1 convolution, or
for DeepLab-v2 its ASPP classifier (the paper's R-101 model); the backbone's registry entry says which."""

import keras
import tensorflow as tf


def classifier_head(num_classes, name, kernel_size=1):
    """One convolution to `num_classes` logits, with a bias."""
    return keras.layers.Conv2D(num_classes, kernel_size, padding="same", name=name)


# DeepLab-v2's atrous spatial pyramid: one 3x3 classifier per rate, summed (no BatchNorm, no nonlinearity).
ASPP_RATES = (6, 12, 18, 24)
HEAD_KINDS = ("conv1x1", "aspp")


ASPP_IMPLEMENTATIONS = ("matmul", "conv")


@keras.saving.register_keras_serializable(package="pit_keras")
class ASPPClassifier(keras.layers.Layer):
    """DeepLab-v2's classifier: parallel 3x3 convolutions to `num_classes` logits at several atrous rates,
    summed. Weights start from N(0, 0.01) as in DeepLab-v2.

    The weights are those of one `Conv2D` per rate (`branches`, named `rate_6` ...), whatever the
    implementation, so checkpoints and stock weights load either way:

    - `"matmul"` (default): the same function computed as one matrix product from the features to every tap's
      logits (the four rates' centre taps summed into one: 33 taps), then the taps' maps shifted by their
      offsets and summed, with zeros outside the map as in "same" padding. A dilated 3x3 convolution to 19
      classes from 2048 channels keeps oneDNN's kernels far from their peak on CPUs; the single wide product
      does not: a DeepLab-v2 PIT step takes 32% less time on these CPUs, and the heads need a third of the
      memory at the paper's sizes (docs/performance.md, tools/benchmark_aspp.py).
    - `"conv"`: the four dilated convolutions, as written. Exports use this form: builtin CONV_2D ops that
      int8 accelerators run whole, quantized per output channel.

    Args:
        num_classes: C.
        rates: the dilation rate of each branch.
        implementation: "matmul" or "conv"; the same function (to float rounding).
    """

    def __init__(self, num_classes, rates=ASPP_RATES, implementation="matmul", **kwargs):
        super().__init__(**kwargs)
        if implementation not in ASPP_IMPLEMENTATIONS:
            raise ValueError(f"ASPP implementation {implementation!r} is not one of {', '.join(ASPP_IMPLEMENTATIONS)}.")
        self.num_classes = num_classes
        self.rates = tuple(int(r) for r in rates)
        self.implementation = implementation
        self.branches = [
            keras.layers.Conv2D(num_classes, 3, padding="same", dilation_rate=rate,
                                kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                                dtype=self.dtype_policy, name=f"rate_{rate}")
            for rate in self.rates]

    def build(self, input_shape):
        for branch in self.branches:
            branch.build(input_shape)

    def call(self, features):
        if self.implementation == "conv":
            return keras.ops.sum(keras.ops.stack([branch(features) for branch in self.branches]), axis=0)
        return self._shifted_taps(features)

    def _shifted_taps(self, features):
        dtype = features.dtype
        classes = self.num_classes
        # Tap (i, j) of the rate-r kernel reads the features at offset ((i - 1) r, (j - 1) r).
        kernels = [tf.cast(b.kernel, dtype) for b in self.branches]  # [3, 3, channels, C] each
        offsets, taps = [(0, 0)], [tf.add_n([k[1, 1] for k in kernels])]  # the centre taps coincide
        for rate, kernel in zip(self.rates, kernels):
            for i in range(3):
                for j in range(3):
                    if (i, j) != (1, 1):
                        offsets.append(((i - 1) * rate, (j - 1) * rate))
                        taps.append(kernel[i, j])
        logits = tf.einsum("bhwc,cn->bhwn", features, tf.concat(taps, axis=1))  # [B, H, W, taps * C]
        shape = tf.shape(features)
        height, width = shape[1], shape[2]
        # Each tap's map moved by its offset, zeros where it reads outside the features ("same" padding): the
        # rows and columns it reads are sliced and padded back to H x W. Split by tap first, as the gradient of
        # a slice is its input's size; no tensor of all taps is padded (memory at large feature maps).
        shifted = []
        for tap, (dy, dx) in zip(tf.split(logits, len(offsets), axis=-1), offsets):
            (top, rows, bottom), (left, cols, right) = _window(height, dy), _window(width, dx)
            window = tf.slice(tap, tf.stack([0, tf.minimum(max(dy, 0), height), tf.minimum(max(dx, 0), width), 0]),
                              tf.stack([-1, rows, cols, classes]))
            # Summed in float32 under a mixed policy, as a convolution accumulates.
            shifted.append(tf.pad(tf.cast(window, tf.float32), [[0, 0], [top, bottom], [left, right], [0, 0]]))
        total = tf.add_n(shifted)
        total += tf.add_n([tf.cast(b.bias, tf.float32) for b in self.branches])
        return tf.cast(total, dtype)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "rates": self.rates,
                "implementation": self.implementation}


def _window(size, offset):
    """For a map of `size` (a scalar tensor) read at `offset`: (zeros before, values, zeros after), summing to
    `size`; the values are `offset .. offset + size` clipped to the map."""
    values = tf.maximum(size - abs(offset), 0)
    before = size - values if offset < 0 else tf.zeros_like(size)
    after = size - values if offset > 0 else tf.zeros_like(size)
    return before, values, after


def build_head(kind, num_classes, name, aspp_implementation="matmul"):
    """The classifier of a backbone's heads: "conv1x1" (`classifier_head`) or "aspp" (`ASPPClassifier`, computed
    by `aspp_implementation`)."""
    if kind == "conv1x1":
        return classifier_head(num_classes, name)
    if kind == "aspp":
        return ASPPClassifier(num_classes, implementation=aspp_implementation, name=name)
    raise ValueError(f"head kind {kind!r} is not one of {', '.join(HEAD_KINDS)}.")
