"""TensorFlow's image resizing in numpy, so that a `.tflite` model runs without TensorFlow (`predict` on a device
with only LiteRT, numpy and Pillow).

`bilinear` and `nearest` compute what `tf.image.resize(..., method="bilinear" | "nearest")` computes (TensorFlow
2's half-pixel centres, no antialiasing): the same source positions and weights, in float32, so the results
agree with TensorFlow's to float32 rounding (tests/test_deploy.py compares them, upscaling and downscaling).
"""

import numpy as np


def _positions(in_size, out_size):
    """Half-pixel source coordinates of `out_size` outputs over `in_size` inputs, as TensorFlow's kernels compute
    them in float32: (i + 0.5) * in_size / out_size - 0.5."""
    scale = np.float32(in_size) / np.float32(out_size)
    return (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)


def _bilinear_axis(in_size, out_size):
    """(lower index, upper index, weight of the upper one) per output along one axis (TensorFlow's
    `compute_interpolation_weights`: positions clamped to the edge pixels, the weight taken before clamping)."""
    position = _positions(in_size, out_size)
    floor = np.floor(position)
    lower = np.clip(floor, 0, in_size - 1).astype(np.int64)
    upper = np.clip(np.ceil(position), 0, in_size - 1).astype(np.int64)
    return lower, upper, (position - floor).astype(np.float32)


def bilinear(image, size):
    """`image` `[H, W]` or `[H, W, C]` resized to `size` (height, width) bilinearly, as float32 (what
    `tf.image.resize(image, size, method="bilinear")` returns)."""
    x = np.asarray(image, np.float32)
    height, width = size
    top, bottom, dy = _bilinear_axis(x.shape[0], height)
    left, right, dx = _bilinear_axis(x.shape[1], width)
    dx = dx.reshape((1, width) + (1,) * (x.ndim - 2))
    dy = dy.reshape((height, 1) + (1,) * (x.ndim - 2))
    rows_top, rows_bottom = x[top], x[bottom]
    top_left, top_right = rows_top[:, left], rows_top[:, right]
    bottom_left, bottom_right = rows_bottom[:, left], rows_bottom[:, right]
    upper = top_left + (top_right - top_left) * dx
    lower = bottom_left + (bottom_right - bottom_left) * dx
    return upper + (lower - upper) * dy


def _nearest_axis(in_size, out_size):
    """The source index per output along one axis (TensorFlow's half-pixel nearest neighbour: the pixel whose
    span holds the output's centre, floor((i + 0.5) * in_size / out_size), kept inside the image)."""
    scale = np.float32(in_size) / np.float32(out_size)
    position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale
    return np.minimum(np.floor(position).astype(np.int64), in_size - 1)


def nearest(image, size):
    """`image` `[H, W]` or `[H, W, C]` resized to `size` (height, width) by nearest neighbour, its dtype kept (what
    `tf.image.resize(image, size, method="nearest")` picks)."""
    x = np.asarray(image)
    return x[_nearest_axis(x.shape[0], size[0])][:, _nearest_axis(x.shape[1], size[1])]
