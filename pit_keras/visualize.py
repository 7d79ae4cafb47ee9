"""Pictures of labels and activation maps, as uint8 RGB numpy arrays (for TensorBoard, figures, predict)."""

import numpy as np


def colorize(train_ids, class_set):
    """`[..., H, W]` train ids -> `[..., H, W, 3]` uint8 colours of the class set's palette (255: black)."""
    return class_set.palette_array()[np.asarray(train_ids, np.uint8)]


def heatmap(values):
    """`[..., H, W]` floats -> `[..., H, W, 3]` uint8, each map scaled to its own [min, max] (blue -> red)."""
    values = np.asarray(values, np.float32)
    low = values.min(axis=(-2, -1), keepdims=True)
    high = values.max(axis=(-2, -1), keepdims=True)
    t = (values - low) / np.maximum(high - low, 1e-12)
    # A piecewise-linear blue-cyan-yellow-red ramp: monotone in brightness, readable without matplotlib.
    red = np.clip(2.0 * t - 0.5, 0.0, 1.0)
    green = np.clip(2.0 - np.abs(4.0 * t - 2.0), 0.0, 1.0)
    blue = np.clip(1.5 - 2.0 * t, 0.0, 1.0)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def overlay(image, colours, alpha=0.5):
    """Blends colour labels over an RGB image (both uint8 of the same shape)."""
    mixed = (1 - alpha) * np.asarray(image, np.float32) + alpha * np.asarray(colours, np.float32)
    return mixed.round().astype(np.uint8)
