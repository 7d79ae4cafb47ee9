"""Backbone registry: each entry builds a functional Keras model from an RGB image in [0, 255] (float) to one
feature map, with the preprocessing its weights expect built into the graph (so exported models take plain
pixels).

Backbone facts (feature layer, output stride, weight handling) are data in `BACKBONES`, not literals elsewhere.
"""

import dataclasses
import os

import keras
import numpy as np

from pit_keras.errors import UserError
from pit_keras.models import layers


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    Args:
        name: the `--backbone` value.
        build: `build(weights) -> keras.Model`; `weights` is None, "imagenet" or a local file path.
        output_stride: input size / feature size.
        pretrained: whether ImageNet weights exist for it.
        description: one line for `--help` and the README.
        head: the classifier of the fine head and of each coarse unit (`heads.HEAD_KINDS`): "conv1x1", or
            "aspp" (DeepLab-v2's four dilated 3x3 convolutions, summed).
    """

    name: str
    build: callable
    output_stride: int
    pretrained: bool
    description: str
    head: str = "conv1x1"


def _conv_bn_relu(x, filters, name, strides=1, dilation=1):
    x = keras.layers.Conv2D(filters, 3, strides=strides, dilation_rate=dilation, padding="same",
                            use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(synchronized=True, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_tiny(weights=None, widths=(16, 32, 64)):
    """A small dilated FCN (output stride 8, ~0.15 M parameters) for tests and the CPU demo.

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
        try:
            model.load_weights(weights)
        except Exception as err:  # noqa: BLE001 -- h5py's OSError for a damaged file, Keras' ValueError otherwise
            raise UserError(f"--backbone_weights={weights}: not a weights file of the tiny backbone ({err}).") \
                from None
    return model


def _synchronized(layer):
    if isinstance(layer, keras.layers.BatchNormalization):
        return layers.BatchNormalization.from_config({**layer.get_config(), "synchronized": True})
    return layer.__class__.from_config(layer.get_config())


def synchronize_batch_norm(model):
    """A copy of a functional model whose BatchNormalization layers compute their batch statistics over all
    replicas (the same as plain BatchNorm on one device), with the same weights."""
    synced = keras.models.clone_model(model, clone_function=_synchronized)
    synced.set_weights(model.get_weights())
    return synced


def _mobilenet_v3(constructor, feature_layer, name):
    def build(weights=None):
        # The stride-16 bottleneck output: stride 32 (the classifier's input) is too coarse for segmentation.
        base = constructor(input_shape=(None, None, 3), include_top=False, weights=weights,
                           include_preprocessing=True)
        model = keras.Model(base.input, base.get_layer(feature_layer).output, name=name)
        return synchronize_batch_norm(model)
    return build


# === Caffe-style ImageNet backbones (paper section 5.2): DeepLab-v2 ResNet-101 and FCN-8s VGG-16 ===

# keras.applications' "caffe" preprocessing (ResNet, VGG): BGR channel order, ImageNet mean subtracted, no scaling.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

# (stage name, bottleneck width, blocks, stride of the first block, dilation of the 3x3 convolutions).
# keras.applications.ResNet101 strides conv3, conv4 and conv5 by 2 (output stride 32); DeepLab-v2 keeps conv4
# and conv5 at stride 8 and dilates their 3x3 convolutions by 2 and 4 to keep the receptive field.
DEEPLABV2_RESNET101_STAGES = (
    ("conv2", 64, 3, 1, 1),
    ("conv3", 128, 4, 2, 1),
    ("conv4", 256, 23, 1, 2),
    ("conv5", 512, 3, 1, 4),
)
# FCN-8s: VGG-16's convolutional blocks as (block, filters, convolutions); fc6/fc7 become convolutions.
FCN8S_VGG16_BLOCKS = ((1, 64, 2), (2, 128, 2), (3, 256, 3), (4, 512, 3), (5, 512, 3))
# FCN-8s "at once" scales pool4 and pool3 before scoring them, because their activations are much larger than
# fc7's; the same fixed factors are applied before the projections here.
FCN8S_SKIP_SCALES = {"pool4": 1e-2, "pool3": 1e-4}
# Width of the fused stride-8 feature: at least the number of classes, so 1x1 heads on it can express any
# FCN-8s score layers (see build_fcn8s_vgg16).
FCN8S_FEATURE_WIDTH = 512


@keras.saving.register_keras_serializable(package="pit_keras")
class CaffePreprocess(keras.layers.Layer):
    """RGB in [0, 255] -> BGR minus the ImageNet mean, as `keras.applications.resnet.preprocess_input` (mode
    "caffe") does, inside the graph so exported models take plain pixels.

    Args:
        mean: the per-channel mean in BGR order.
    """

    def __init__(self, mean=CAFFE_BGR_MEAN, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)

    def call(self, images):
        bgr = keras.ops.flip(images, axis=-1)
        return bgr - keras.ops.convert_to_tensor(self.mean, dtype=bgr.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean}


def load_stock_model(constructor, weights, what, with_top):
    """The stock keras.applications model with `weights`, and whether it has its top (the classifier).

    "imagenet" downloads the file the backbone needs (`with_top`: VGG16's fc1/fc2 live in the top). A local
    file may have been saved with or without the top; both are tried, the needed one first.
    """
    attempts = (with_top,) if weights == "imagenet" else (with_top, not with_top)
    for include_top in attempts:
        shape = {} if include_top else {"input_shape": (None, None, 3)}
        try:
            return constructor(weights=weights, include_top=include_top, **shape), include_top
        except Exception as err:  # keras raises a bare Exception for a failed download, ValueError for a file
            error = err
    if weights == "imagenet":
        raise UserError(f"--backbone_weights=imagenet: could not get the {what} ImageNet weights ({error}); "
                        "download them once with internet access, or pass a local weights file.")
    raise UserError(f"--backbone_weights={weights}: not a weights file of the stock keras.applications {what} "
                    f"({error}).")


def copy_stock_weights(model, stock, renames=None, skip=()):
    """Copies every weighted layer of a stock keras.applications model into its namesake in `model`.

    Layers keep their stock names and shapes, so ImageNet weights load unchanged; `renames` maps a layer of
    `model` to its stock source where the name differs, and such a pair may differ in shape as long as the
    values reshape (FCN's fc6 is VGG's fully connected fc1 as a 7x7 convolution). Every weighted stock layer
    not in `skip` must find a home, or the copy is refused: a silently half-loaded backbone trains badly.

    Returns:
        The names of the layers of `model` that were filled.
    """
    renames = dict(renames or {})
    stock_layers = {layer.name: layer for layer in stock.layers if layer.weights}
    copied, used = [], set()
    for layer in model.layers:
        source = renames.get(layer.name, layer.name)
        if not layer.weights or source not in stock_layers:
            continue
        values, targets = stock_layers[source].weights, layer.weights
        shapes_match = [tuple(v.shape) == tuple(t.shape) for v, t in zip(values, targets)]
        if len(values) != len(targets) or not all(shapes_match):
            if layer.name not in renames or [int(np.prod(v.shape)) for v in values] != [int(np.prod(t.shape))
                                                                                           for t in targets]:
                raise ValueError(f"layer {layer.name}: stock weights {[tuple(v.shape) for v in values]} do not "
                                 f"fit {[tuple(t.shape) for t in targets]}.")
        for target, value in zip(targets, values):  # variable to variable: no copy of the 100 M fc weights in numpy
            target.assign(keras.ops.reshape(value, target.shape))
        copied.append(layer.name)
        used.add(source)
    left = sorted(set(stock_layers) - used - set(skip))
    if left:
        raise ValueError(f"stock layers without a counterpart: {', '.join(left)}.")
    return copied


def _frozen_bn(x, name):
    # DeepLab-v2 freezes BatchNorm: batches of 1-4 crops cannot estimate the statistics. Frozen twice over:
    # no trainable gamma/beta, and called with training=False so fit() never updates the moving statistics.
    bn = keras.layers.BatchNormalization(axis=-1, epsilon=1.001e-5, trainable=False, name=name)
    return bn(x, training=False)


def _bottleneck(x, filters, name, stride, dilation, conv_shortcut):
    """keras.applications' `residual_block_v1` (same layer names and shapes), with a dilated 3x3 convolution."""
    if conv_shortcut:
        shortcut = keras.layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = _frozen_bn(shortcut, f"{name}_0_bn")
    else:
        shortcut = x
    x = keras.layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = _frozen_bn(x, f"{name}_1_bn")
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = keras.layers.Conv2D(filters, 3, padding="same", dilation_rate=dilation, name=f"{name}_2_conv")(x)
    x = _frozen_bn(x, f"{name}_2_bn")
    x = keras.layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = keras.layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = _frozen_bn(x, f"{name}_3_bn")
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def build_deeplabv2_resnet101(weights=None):
    """DeepLab-v2's ResNet-101: output stride 8 (conv4 dilated 2, conv5 dilated 4), frozen BatchNorm,
    Caffe-style preprocessing; 2048 features. Its classifier is the ASPP head (`heads.ASPPClassifier`).

    The graph is keras.applications.ResNet101's, rebuilt with stride 1 and dilation in conv4/conv5 (layer
    names and weight shapes unchanged); `weights` ("imagenet" or a local file of the stock ResNet101, with or
    without its top) are loaded into the stock model and copied over layer by layer.
    """
    image = keras.Input((None, None, 3), name="image")
    x = CaffePreprocess(name="preprocess")(image)
    x = keras.layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name="conv1_pad")(x)
    x = keras.layers.Conv2D(64, 7, strides=2, name="conv1_conv")(x)
    x = _frozen_bn(x, "conv1_bn")
    x = keras.layers.Activation("relu", name="conv1_relu")(x)
    x = keras.layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, filters, blocks, stride, dilation in DEEPLABV2_RESNET101_STAGES:
        for block in range(1, blocks + 1):
            x = _bottleneck(x, filters, f"{stage}_block{block}", stride if block == 1 else 1, dilation,
                            conv_shortcut=block == 1)
    model = keras.Model(image, x, name="deeplabv2_resnet101")
    if weights is not None:
        stock, _ = load_stock_model(keras.applications.ResNet101, weights, "ResNet101", with_top=False)
        copy_stock_weights(model, stock, skip=("predictions",))
    return model


def build_fcn8s_vgg16(weights=None, width=FCN8S_FEATURE_WIDTH):
    """FCN-8s on VGG-16: Caffe-style preprocessing, VGG-16's conv blocks, fc6/fc7 as 7x7 and 1x1 convolutions
    (VGG's fc1/fc2 weights reshaped), then FCN-8s' skip fusion: fc7, 2x up + pool4, 2x up + pool3; returns the
    fused stride-8 feature of `width` channels.

    FCN-8s scores C classes at fc7, pool4 and pool3 and sums the upsampled scores. Here each of those three is
    a 1x1 projection to `width` channels, fused the same way (bilinear upsampling, FCN-8s' fixed pool4/pool3
    scales), and the network's 1x1 heads score the fused feature. Upsampling and the heads are linear, so a
    head on this feature equals FCN-8s' three score layers with skips, factored through `width` >= C channels:
    the fine head and every coarse unit get an FCN-8s scoring of their own over one shared backbone, and heads
    keep taking one feature map. Unlike the Caffe original there is no 100-pixel padding of conv1_1 and no
    cropping; "same" padding keeps the maps aligned.

    `weights`: "imagenet" or a local file of the stock VGG16 with its top (fc1, fc2 are fc6, fc7); a file
    without the top loads the convolutions and leaves fc6/fc7 at their random initialisation, with a warning.
    """
    image = keras.Input((None, None, 3), name="image")
    x = CaffePreprocess(name="preprocess")(image)
    pools = {}
    for block, filters, convs in FCN8S_VGG16_BLOCKS:
        for conv in range(1, convs + 1):
            x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                    name=f"block{block}_conv{conv}")(x)
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
        pools[f"pool{block}"] = x
    x = keras.layers.Conv2D(4096, 7, padding="same", activation="relu", name="fc6")(x)
    x = keras.layers.Dropout(0.5, name="drop6")(x)
    x = keras.layers.Conv2D(4096, 1, activation="relu", name="fc7")(x)
    x = keras.layers.Dropout(0.5, name="drop7")(x)
    x = keras.layers.Conv2D(width, 1, name="fc7_proj")(x)
    for tap in ("pool4", "pool3"):
        x = layers.ResizeLike(name=f"up_to_{tap}")([x, pools[tap]])
        y = keras.layers.Rescaling(FCN8S_SKIP_SCALES[tap], name=f"{tap}_scale")(pools[tap])
        y = keras.layers.Conv2D(width, 1, name=f"{tap}_proj")(y)
        x = keras.layers.Add(name=f"fuse_{tap}")([x, y])
    model = keras.Model(image, x, name="fcn8s_vgg16")
    if weights is not None:
        stock, with_top = load_stock_model(keras.applications.VGG16, weights, "VGG16", with_top=True)
        if not with_top:
            print(f"warning: --backbone_weights={weights} holds no fc1/fc2 (a VGG16 file without its top): "
                  "fc6 and fc7 start from random weights.")
        skip = ("predictions",) if with_top else ()
        copy_stock_weights(model, stock, renames={"fc6": "fc1", "fc7": "fc2"}, skip=skip)
    return model


BACKBONES = {
    spec.name: spec for spec in (
        BackboneSpec("tiny", build_tiny, 8, False, "small dilated FCN for tests and the CPU demo"),
        BackboneSpec("mobilenetv3_small", _mobilenet_v3(keras.applications.MobileNetV3Small,
                                                        "expanded_conv_7_add", "mobilenetv3_small"),
                     16, True, "keras.applications MobileNetV3Small, stride-16 features"),
        BackboneSpec("mobilenetv3_large", _mobilenet_v3(keras.applications.MobileNetV3Large,
                                                        "expanded_conv_11_add", "mobilenetv3_large"),
                     16, True, "keras.applications MobileNetV3Large, stride-16 features"),
        BackboneSpec("deeplabv2_resnet101", build_deeplabv2_resnet101, 8, True,
                     "DeepLab-v2 ResNet-101 (keras.applications weights), dilated conv4/conv5, ASPP heads",
                     head="aspp"),
        BackboneSpec("fcn8s_vgg16", build_fcn8s_vgg16, 8, True,
                     "FCN-8s VGG-16 (keras.applications weights), fused stride-8 feature, 1x1 heads"),
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
