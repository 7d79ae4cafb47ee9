"""Classifier heads: the fine head and each coarse region-expansion unit is one convolution from the shared
features to C class logits ("transforms F_m via a convolution layer", paper section 4.2)."""

import keras


def classifier_head(num_classes, name, kernel_size=1):
    """One convolution to `num_classes` logits, with a bias."""
    return keras.layers.Conv2D(num_classes, kernel_size, padding="same", name=name)
