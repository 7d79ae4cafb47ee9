"""Classifier heads: the fine head and each coarse region-expansion unit is one convolution from the shared
features to C class logits ("transforms F_m via a convolution layer", paper section 4.2): a 1x1 convolution, or
for DeepLab-v2 its ASPP classifier (the paper's R-101 model); the backbone's registry entry says which."""

import keras


def classifier_head(num_classes, name, kernel_size=1):
    """One convolution to `num_classes` logits, with a bias."""
    return keras.layers.Conv2D(num_classes, kernel_size, padding="same", name=name)


# DeepLab-v2's atrous spatial pyramid: one 3x3 classifier per rate, summed (no BatchNorm, no nonlinearity).
ASPP_RATES = (6, 12, 18, 24)
HEAD_KINDS = ("conv1x1", "aspp")


@keras.saving.register_keras_serializable(package="pit_keras")
class ASPPClassifier(keras.layers.Layer):
    """DeepLab-v2's classifier: parallel 3x3 convolutions to `num_classes` logits at several atrous rates,
    summed. Weights start from N(0, 0.01) as in DeepLab-v2.

    Args:
        num_classes: C.
        rates: the dilation rate of each branch.
    """

    def __init__(self, num_classes, rates=ASPP_RATES, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.rates = tuple(int(r) for r in rates)
        self.branches = [
            keras.layers.Conv2D(num_classes, 3, padding="same", dilation_rate=rate,
                                kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                                dtype=self.dtype_policy, name=f"rate_{rate}")
            for rate in self.rates]

    def build(self, input_shape):
        for branch in self.branches:
            branch.build(input_shape)

    def call(self, features):
        return keras.ops.sum(keras.ops.stack([branch(features) for branch in self.branches]), axis=0)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "rates": self.rates}


def build_head(kind, num_classes, name):
    """The classifier of a backbone's heads: "conv1x1" (`classifier_head`) or "aspp" (`ASPPClassifier`)."""
    if kind == "conv1x1":
        return classifier_head(num_classes, name)
    if kind == "aspp":
        return ASPPClassifier(num_classes, name=name)
    raise ValueError(f"head kind {kind!r} is not one of {', '.join(HEAD_KINDS)}.")
