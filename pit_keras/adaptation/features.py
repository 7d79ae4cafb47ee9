"""Image features for the image-level category regressor: a keras.applications model (the paper: Inception-ResNet-v2
with ImageNet weights), global-average pooled, or the backbone of a trained PIT run. They are computed once per
(image list, extractor, weights, size) and cached as `.npz` (no pickle), so retraining the regressor with other
settings costs seconds.

Backbone features have variants against the shift of source-trained features on the target (docs/method.md):
AdaBN (the backbone's BatchNorm normalises each single-domain batch of `ADABN_BATCH_SIZE` images with that
batch's statistics), spatial pyramid pooling (global plus 2x2 grid means of the final map), the pooled outputs
of every stage, and per-domain standardisation or ZCA whitening of the pooled features.
"""

import dataclasses
import hashlib
import importlib
import json
import math
import os

import keras
import numpy as np
import tensorflow as tf

from pit_keras import atomic, runs
from pit_keras.data import pipeline
from pit_keras.errors import UserError
from pit_keras.models.network import all_layers

DEFAULT_FEATURES = "InceptionResNetV2"
BACKBONE_FEATURES = "backbone"
# Not features but the estimate itself: the class shares that the trained run in --model_dir predicts.
PREDICTION_FEATURES = "predictions"
SOFT_PREDICTION_FEATURES = "soft_predictions"  # the mean softmax, flip-averaged (a teacher's class shares)
FEATURE_BATCH_SIZE = 8
# Cache format version: bump when what a cache file holds changes.
_CACHE_VERSION = 1
# --feature_alignment: each value is (the backbone's BatchNorm statistics, the transform of the pooled features):
# "running" statistics or each batch's own ("batch", AdaBN); then `align_features`.
FEATURE_ALIGNMENTS = ("none", "standardize", "whiten", "adabn", "adabn_standardize")
_ALIGNMENT_STEPS = {"none": ("running", "none"), "standardize": ("running", "standardize"),
                    "whiten": ("running", "whiten"), "adabn": ("batch", "none"),
                    "adabn_standardize": ("batch", "standardize")}
FEATURE_POOLINGS = ("global", "pyramid")
FEATURE_STAGES = ("last", "all")
# AdaBN: images per single-domain batch whose moments normalise it (batches are split evenly, at most this many).
ADABN_BATCH_SIZE = 16
# ZCA whitening: eps added to the covariance's eigenvalues, relative to the largest.
WHITEN_SHRINKAGE = 1e-3


@dataclasses.dataclass

class FeatureExtractor:
    """A frozen image -> feature-vector model.

    Args:
        model: `[B, H, W, 3]` -> `[B, D]`.
        preprocess: applied to float RGB batches in [0, 255] before `model` (numpy in, array out).
        key: what identifies the features it computes (name, weights, checkpoint, variant), for the cache.
        batch_statistics: `model` runs statelessly in training mode, so that its BatchNorm layers normalise each
            batch with that batch's moments and no stored statistic changes; batches are single-domain.
        batch_size: images per batch; with `batch_statistics` part of what the features are.
    """

    model: keras.Model
    preprocess: callable
    key: dict
    batch_statistics: bool = False  # BatchNorm normalises each batch with its own statistics (AdaBN)
    batch_size: int = FEATURE_BATCH_SIZE


def _file_identity(path):
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _applications_constructor(name):
    constructor = getattr(keras.applications, name, None)
    if not (callable(constructor) and name[:1].isupper()):
        examples = "InceptionResNetV2, ResNet50, MobileNetV3Small"
        raise UserError(f"--features={name} is not a keras.applications model (e.g. {examples}) or "
                        f"{BACKBONE_FEATURES}.")
    return constructor


def alignment_steps(alignment):
    """`(batch_norm, transform)` of a `FEATURE_ALIGNMENTS` value: the backbone's BatchNorm statistics ("running"
    or "batch") and the `align_features` transform of the pooled features."""
    if alignment not in _ALIGNMENT_STEPS:
        raise ValueError(f"feature alignment {alignment!r} is not one of {', '.join(FEATURE_ALIGNMENTS)}.")
    return _ALIGNMENT_STEPS[alignment]


class GridAveragePooling(keras.layers.Layer):
    """`[B, H, W, D]` -> `[B, 4 D]`: the mean of each cell of a 2x2 grid (rows split at H // 2, columns at
    W // 2), cells in row-major order. H and W must be at least 2."""

    def call(self, maps):
        shape = keras.ops.shape(maps)
        rows, cols = shape[1] // 2, shape[2] // 2
        cells = [maps[:, :rows, :cols], maps[:, :rows, cols:], maps[:, rows:, :cols], maps[:, rows:, cols:]]
        return keras.ops.concatenate([keras.ops.mean(cell, axis=(1, 2)) for cell in cells], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None if input_shape[-1] is None else 4 * input_shape[-1])


# The symbolic input that finds the stages' strides: large powers of two, a different multiple per axis, so that
# padded maps and 1x1 maps (squeeze-and-excitation) match no stride.
_PROBE_SIZE = (1024, 512)


def stage_layers(backbone, backbone_name):
    """The names of the layers whose outputs end the backbone's stages before its final map: in layer order, the
    last layer at each output stride below the final map's (stride > 1, both axes downsampled alike).

    The tiny backbone gives stage1_refine_relu (stride 2) and stage2_refine_relu (4); its final map (8) closes
    stage 3 and the context layers. Raises UserError for a backbone whose resolution rises again inside it
    (FCN-8s fuses upsampled maps): its layers form no sequence of stages.
    """
    candidates = [layer for layer in backbone.layers
                  if not isinstance(layer, keras.layers.InputLayer) and len(layer.output.shape) == 4]
    probe = keras.Model(backbone.inputs, [layer.output for layer in candidates])
    specs = probe.compute_output_spec(keras.KerasTensor((1, *_PROBE_SIZE, 3)))
    height, width = _PROBE_SIZE
    strides = []  # (stride, layer name) in layer order
    for layer, (_, rows, cols, _) in zip(candidates, (spec.shape for spec in specs)):
        if rows and cols and height % rows == 0 and width % cols == 0 and height // rows == width // cols > 1:
            strides.append((height // rows, layer.name))
    if not strides or strides[-1][1] != backbone.layers[-1].name or any(
            later < earlier for (earlier, _), (later, _) in zip(strides, strides[1:])):
        raise UserError(f"--feature_stages=all: the {backbone_name} backbone's resolution does not only fall from "
                        "its input to its final map, so it has no sequence of stages; use --feature_stages=last.")
    last = dict(strides)  # stride -> the last layer at it
    return [last[stride] for stride in sorted(last) if stride < strides[-1][0]]


def _backbone_feature_model(backbone, backbone_name, size, batch_norm, pooling, stages, alignment):
    """image `[B, H, W, 3]` -> pooled features `[B, D]` of a trained backbone (see `feature_extractor`)."""
    if batch_norm == "batch":
        norms = [layer for layer in all_layers(backbone) if isinstance(layer, keras.layers.BatchNormalization)]
        if not any(layer.trainable for layer in norms):
            raise UserError(f"--feature_alignment={alignment}: the {backbone_name} backbone has no BatchNorm layer "
                            "that normalises with batch statistics (frozen or none), so AdaBN changes nothing.")
        for layer in all_layers(backbone):  # training mode is for BatchNorm only (this network is a copy)
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = 0.0
    names = stage_layers(backbone, backbone_name) if stages == "all" else []
    if names:
        backbone = keras.Model(backbone.inputs, [backbone.get_layer(n).output for n in names] + backbone.outputs,
                               name=f"{backbone.name}_stages")
    image = keras.Input((*size, 3), name="image")
    # Running statistics: inference mode, whatever the caller asks; AdaBN: the caller's training mode.
    maps = backbone(image, **({"training": False} if batch_norm == "running" else {}))
    maps = list(maps) if names else [maps]
    pooled = [keras.layers.GlobalAveragePooling2D(name=f"{n}_avg_pool")(m) for n, m in zip(names, maps)]
    pooled.append(keras.layers.GlobalAveragePooling2D(name="avg_pool")(maps[-1]))
    if pooling == "pyramid":
        pooled.append(GridAveragePooling(name="grid_avg_pool")(maps[-1]))
    features = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="features")(pooled)
    return keras.Model(image, features, name=f"{backbone.name}_features")


def feature_extractor(name=DEFAULT_FEATURES, weights="imagenet", image_size=(512, 256), model_dir=None,
                      feature_alignment="none", pooling="global", stages="last"):
    """Builds the frozen feature extractor.

    Args:
        name: a keras.applications model name, or "backbone" for the backbone of the run in `model_dir`.
        weights: "imagenet", None or a local weights file of that keras.applications model (without its top);
            ignored for "backbone", whose weights are the run's newest checkpoint.
        image_size: (W, H) of the images fed to it.
        model_dir: a training run folder (for "backbone").
        feature_alignment: a `FEATURE_ALIGNMENTS` value; the extractor does its BatchNorm part (adabn and
            adabn_standardize: `batch_statistics`), `align_features` the rest. Only "backbone" takes AdaBN.
        pooling: "global" (average over the final map) or "pyramid" (also the means of its 2x2 grid cells, in
            row-major order: 5x the dimensions). Only for "backbone".
        stages: "last" (the final map) or "all" (also the globally pooled output of each earlier stage,
            `stage_layers`, before the final map's pooling). Only for "backbone".
    """
    width, height = image_size
    batch_norm, _ = alignment_steps(feature_alignment)
    if pooling not in FEATURE_POOLINGS:
        raise ValueError(f"feature pooling {pooling!r} is not one of {', '.join(FEATURE_POOLINGS)}.")
    if stages not in FEATURE_STAGES:
        raise ValueError(f"feature stages {stages!r} is not one of {', '.join(FEATURE_STAGES)}.")
    if name == BACKBONE_FEATURES:
        if not model_dir:
            raise UserError(f"--features={BACKBONE_FEATURES} needs --model_dir (a training run folder).")
        config, network, checkpoint = runs.load_run(model_dir)
        backbone = next(layer for layer in network.layers if isinstance(layer, keras.Model))
        model = _backbone_feature_model(backbone, config.backbone, (height, width), batch_norm, pooling,
                                        stages, feature_alignment)
        # Each backbone preprocesses inside its graph; the checkpoint's files identify its weights.
        key = {"features": name, "backbone": config.backbone,
               "checkpoint": [_file_identity(p) for p in sorted(tf.io.gfile.glob(checkpoint + "*"))],
               "batch_norm": batch_norm, "pooling": pooling, "stages": stages}
        if batch_norm == "batch":
            key["batch_size"] = ADABN_BATCH_SIZE
            return FeatureExtractor(model, lambda images: images, key, batch_statistics=True,
                                    batch_size=ADABN_BATCH_SIZE)
        return FeatureExtractor(model, lambda images: images, key)

    for flag, value, applies in (("feature_alignment", feature_alignment, batch_norm == "running"),
                                 ("feature_pooling", pooling, pooling == "global"),
                                 ("feature_stages", stages, stages == "last")):
        if not applies:
            raise UserError(f"--{flag}={value} needs --features={BACKBONE_FEATURES} (a trained run's backbone), "
                            f"not --features={name}.")
    constructor = _applications_constructor(name)
    if weights not in ("imagenet", None) and not os.path.isfile(weights):
        raise UserError(f"--features_weights={weights}: no such file (expected imagenet, none or a weights file).")
    try:
        model = constructor(include_top=False, weights=weights, pooling="avg", input_shape=(height, width, 3))
    except ValueError as err:
        if "input" in str(err).lower() and ("size" in str(err).lower() or "shape" in str(err).lower()):
            raise UserError(f"--image_size={width},{height} does not suit --features={name} ({err}).") from None
        raise UserError(f"--features_weights={weights}: could not load it into keras.applications.{name} "
                        f"without its top ({err}).") from None
    except Exception as err:  # keras raises a bare Exception when a download fails
        raise UserError(f"--features_weights={weights}: could not get the weights of {name} ({err}); download "
                        "them once with internet access, or pass a local weights file.") from None
    model.trainable = False
    preprocess = importlib.import_module(constructor.__module__).preprocess_input
    weights_key = _file_identity(weights) if weights not in ("imagenet", None) else weights
    return FeatureExtractor(model, preprocess, {"features": name, "weights": weights_key})


def adabn_batches(num_images, batch_size=ADABN_BATCH_SIZE, seed=0):
    """The index arrays of the batches whose own BatchNorm statistics normalise them (AdaBN): a fixed shuffle
    of the images (a list sorted by city would give one city's statistics), split into ceil(N / batch_size)
    batches of near-equal size (no small last batch)."""
    if num_images == 0:
        return []
    order = np.random.default_rng(seed).permutation(num_images)
    return np.array_split(order, math.ceil(num_images / batch_size))


def compute_features(extractor, image_paths, image_size, batch_size=None, progress=True):
    """`[N, D]` float32 features of the images, resized bilinearly to image_size=(W, H).

    `batch_size` defaults to the extractor's. With `batch_statistics`, the model runs statelessly in training
    mode on the `adabn_batches` (call it with one domain's images), and no variable of it changes.
    """
    batch_size = batch_size or extractor.batch_size
    if extractor.batch_statistics and batch_size != extractor.batch_size:
        raise ValueError(f"batch_size={batch_size}: these features are defined by batches of "
                         f"{extractor.batch_size}.")
    image_paths = list(image_paths)
    if not image_paths:
        return np.zeros((0, 0), np.float32)
    if extractor.batch_statistics:
        batches = adabn_batches(len(image_paths), batch_size)
        model = extractor.model
        trainable = [tf.convert_to_tensor(v) for v in model.trainable_variables]
        non_trainable = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]

        def run(images):  # the updated non-trainable variables (moving statistics) are dropped
            return model.stateless_call(trainable, non_trainable, images, training=True)[0]
    else:
        batches = [np.arange(start, min(start + batch_size, len(image_paths)))
                   for start in range(0, len(image_paths), batch_size)]

        def run(images):
            return extractor.model(images, training=False)
    order = np.concatenate(batches)
    ds = tf.data.Dataset.from_tensor_slices([image_paths[i] for i in order])
    ds = ds.map(lambda p: pipeline.load_image(p, image_size), num_parallel_calls=pipeline.AUTOTUNE)
    images = iter(ds.prefetch(pipeline.AUTOTUNE))
    rows, done, every = [], 0, 50 * batch_size
    for batch in batches:
        stacked = np.stack([next(images).numpy() for _ in batch])
        rows.append(np.asarray(run(extractor.preprocess(stacked)), np.float32))
        done += len(batch)
        if progress and (done == len(image_paths) or done // every > (done - len(batch)) // every):
            print(f"  features: {done}/{len(image_paths)} images", flush=True)
    features = np.empty_like(np.concatenate(rows))
    features[order] = np.concatenate(rows)
    return features


def cache_key(extractor, image_paths, image_size):
    """A hash of everything the features depend on: the images (path, size, time), extractor, weights, size."""
    payload = {"version": _CACHE_VERSION, "extractor": extractor.key, "image_size": list(image_size),
               "images": [_file_identity(p) for p in image_paths]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached_features(extractor, image_paths, image_size, cache_dir, progress=True):
    """Features from `cache_dir` if computed before with the same key, else computed and stored there.

    Returns:
        `(features, cache path, whether it was a cache hit)`.
    """
    key = cache_key(extractor, image_paths, image_size)
    path = os.path.join(cache_dir, f"features-{key[:24]}.npz")
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as cached:
                if cached["key"].item() == key and list(cached["paths"]) == [str(p) for p in image_paths]:
                    return cached["features"], path, True
        except (OSError, ValueError, KeyError):
            pass  # unreadable or foreign: recompute and overwrite
    features = compute_features(extractor, image_paths, image_size, progress=progress)
    os.makedirs(cache_dir, exist_ok=True)
    stored_paths = np.asarray([str(p) for p in image_paths])
    # The suffix: np.savez would add .npz to a name without it.
    atomic.atomic_write(path, lambda tmp: np.savez(tmp, features=features, paths=stored_paths, key=np.asarray(key)),
                        suffix=".npz")
    return features, path, False


FEATURE_TRANSFORMS = ("none", "standardize", "whiten")


def whiten(features, shrinkage=WHITEN_SHRINKAGE):
    """ZCA whitening of `[N, D]` features with their own mean and covariance: `(x - mean) @ W`, W = U diag((l +
    eps)^-1/2) U^T for the covariance's eigenvalues l and eigenvectors U, eps = `shrinkage` x the largest l.

    The result's covariance is U diag(l / (l + eps)) U^T: the identity up to the shrinkage, which keeps
    directions of little variance (noise, or more dimensions than images) from being blown up. Directions with
    no variance (below 1e-10 of the largest) stay zero. Of all whitening transforms, ZCA's moves the features
    least, so each dimension keeps its meaning.
    """
    x = np.asarray(features, np.float64)
    centered = x - x.mean(axis=0)
    values, vectors = np.linalg.eigh(centered.T @ centered / len(x))
    largest = max(values.max(), 0.0)
    scale = np.zeros_like(values)
    kept = values > 1e-10 * largest
    scale[kept] = 1.0 / np.sqrt(values[kept] + shrinkage * largest)
    return ((centered @ vectors) * scale @ vectors.T).astype(np.float32)


def align_features(source, target, alignment):
    """Aligns the two domains' `[N, D]` features before the regressor sees them.

    "none" leaves them; "standardize" gives each domain's features zero mean and unit variance per dimension,
    each with its own statistics (the target's from the target images, no labels), so that a shift or scaling
    of the features between the domains does not move the regressor's input (as AdaBN does for BatchNorm).
    Constant dimensions stay zero. "whiten" is ZCA whitening (`whiten`) with each domain's own mean and
    covariance: it also undoes correlations and rotations between the domains' features.
    """
    if alignment == "none":
        return source, target
    if alignment not in FEATURE_TRANSFORMS:
        raise ValueError(f"feature alignment {alignment!r} is not one of {', '.join(FEATURE_TRANSFORMS)}.")
    if alignment == "whiten":
        return whiten(source), whiten(target)

    def standardize(x):
        x = np.asarray(x, np.float64)
        std = x.std(axis=0)
        return ((x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)).astype(np.float32)

    return standardize(source), standardize(target)
