"""Backbone registry: each entry builds a functional Keras model from an RGB image in [0, 255] (float) to one
feature map, with the preprocessing its weights expect built into the graph (so exported models take plain
pixels).

Backbone facts (feature layer, output stride, weight handling) are data in `BACKBONES`, not literals elsewhere.
"""

import dataclasses
import os

import keras

from pit_keras.errors import UserError


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    Args:
        name: the `--backbone` value.
        build: `build(weights) -> keras.Model`; `weights` is None, "imagenet" or a local file path.
        output_stride: input size / feature size.
        pretrained: whether ImageNet weights exist for it.
        description: one line for `--help` and the README.
    """

    name: str
    build: callable
    output_stride: int
    pretrained: bool
    description: str


def _conv_bn_relu(x, filters, name, strides=1, dilation=1):
    x = keras.layers.Conv2D(filters, 3, strides=strides, dilation_rate=dilation, padding="same",
                            use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_tiny(weights=None, widths=(16, 32, 64)):
    """A small dilated FCN (output stride 8, ~0.1 M parameters) for tests and the CPU demo.

    Three stride-2 stages, then dilated 3x3 convolutions (rates 2, 4) for context without losing resolution,
    as DeepLab does at scale. No pretrained weights exist; `weights` may be a local `.weights.h5` file.
    """
    image = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(image)
    for stage, width in enumerate(widths, start=1):
        x = _conv_bn_relu(x, width, f"stage{stage}_down", strides=2)
        x = _conv_bn_relu(x, width, f"stage{stage}_refine")
    x = _conv_bn_relu(x, widths[-1], "context_d2", dilation=2)
    x = _conv_bn_relu(x, widths[-1], "context_d4", dilation=4)
    model = keras.Model(image, x, name="tiny")
    if weights == "imagenet":
        raise UserError("--backbone_weights=imagenet: the tiny backbone has no ImageNet weights; use none or a file.")
    if weights is not None:
        model.load_weights(weights)
    return model


def _mobilenet_v3(constructor, feature_layer, name):
    def build(weights=None):
        # The stride-16 bottleneck output: stride 32 (the classifier's input) is too coarse for segmentation.
        base = constructor(input_shape=(None, None, 3), include_top=False, weights=weights,
                           include_preprocessing=True)
        return keras.Model(base.input, base.get_layer(feature_layer).output, name=name)
    return build


BACKBONES = {
    spec.name: spec for spec in (
        BackboneSpec("tiny", build_tiny, 8, False, "small dilated FCN for tests and the CPU demo"),
        BackboneSpec("mobilenetv3_small", _mobilenet_v3(keras.applications.MobileNetV3Small,
                                                        "expanded_conv_7_add", "mobilenetv3_small"),
                     16, True, "keras.applications MobileNetV3Small, stride-16 features"),
        BackboneSpec("mobilenetv3_large", _mobilenet_v3(keras.applications.MobileNetV3Large,
                                                        "expanded_conv_11_add", "mobilenetv3_large"),
                     16, True, "keras.applications MobileNetV3Large, stride-16 features"),
    )
}


def resolve_weights(value):
    """Maps a `--backbone_weights` value (imagenet | none | PATH) to what the builders take."""
    if value in (None, "", "none"):
        return None
    if value == "imagenet":
        return "imagenet"
    if not os.path.isfile(value):
        raise UserError(f"--backbone_weights={value}: no such file (expected imagenet, none or a weights file).")
    return value


def build_backbone(name, weights="none"):
    """Builds the named backbone; `weights` is a `--backbone_weights` value."""
    if name not in BACKBONES:
        raise UserError(f"--backbone={name} is not one of {', '.join(sorted(BACKBONES))}.")
    return BACKBONES[name].build(resolve_weights(weights))
