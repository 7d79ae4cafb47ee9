"""The image-level category regressor (paper section 4.2, after [41]): target images' class shares y_t estimated
by one softmax layer on frozen image features (`features.py`), trained on the source images' shares y_s.

Training follows the paper's 5.2: SGD, learning rate 1e-4, momentum 0.9, exponential decay 0.99 per epoch with
a floor of 1e-6, soft-label cross-entropy. The layer starts at the source-mean prior (zero weights, bias = log of
the mean source shares), so training moves it away from that prior only as far as the features justify: a
regressor can end up further from the target's truth than the prior, and the report prints both.
"""

import math
import os

import keras
import numpy as np
import tensorflow as tf

from pit_keras import runs
from pit_keras.data import cityscapes, datasets, pipeline
from pit_keras.adaptation import soft_labels
from pit_keras.adaptation.features import (DEFAULT_FEATURES, FEATURE_BATCH_SIZE, PREDICTION_FEATURES,
                                           SOFT_PREDICTION_FEATURES, align_features, alignment_steps,
                                           cached_features, feature_extractor)
from pit_keras.errors import UserError
from pit_keras.models.network import fine_segmenter

LEARNING_RATE = 1e-4
MOMENTUM = 0.9
DECAY_RATE = 0.99  # per epoch
MIN_LEARNING_RATE = 1e-6
BATCH_SIZE = 32


def source_shares(pairs, reader, num_classes):
    """`[N, C]` class shares of the source images' labelled pixels (y_s, paper Eq. in 4.2)."""
    return np.stack([soft_labels.shares(reader(label), num_classes) for _, label in pairs]).astype(np.float32)


@keras.saving.register_keras_serializable(package="pit_keras")
class FlooredExponentialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """`max(minimum, initial * decay_rate ** (step / decay_steps))`.

    Args:
        initial_learning_rate: the rate at step 0.
        decay_steps: steps per decay (one epoch here).
        decay_rate: the factor per `decay_steps`.
        minimum: the floor.
    """

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, minimum):
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.minimum = minimum

    def __call__(self, step):
        exponent = keras.ops.cast(step, "float32") / float(self.decay_steps)
        rate = self.initial_learning_rate * keras.ops.power(float(self.decay_rate), exponent)
        return keras.ops.maximum(rate, self.minimum)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate, "minimum": self.minimum}


def build_regressor(feature_dim, prior):
    """One softmax layer from `feature_dim` features to C shares, starting at `prior` (`[C]`, sums to 1)."""
    prior = np.asarray(prior, np.float64)
    bias = np.log(np.maximum(prior, 1e-8))
    return keras.Sequential([
        keras.Input((feature_dim,), name="features"),
        keras.layers.Dense(len(prior), activation="softmax", kernel_initializer="zeros",
                           bias_initializer=keras.initializers.Constant(bias - bias.mean()), name="shares"),
    ], name="image_level_regressor")


def train_regressor(features, shares, epochs, learning_rate=LEARNING_RATE, momentum=MOMENTUM,
                    decay_rate=DECAY_RATE, min_learning_rate=MIN_LEARNING_RATE, batch_size=BATCH_SIZE, seed=0,
                    verbose=0):
    """Fits the softmax layer to the source shares with soft-label cross-entropy; images without a labelled
    pixel (all-zero shares) are left out. Returns the trained model."""
    keep = shares.sum(axis=1) > 0
    if not keep.any():
        raise UserError("no source image has a labelled pixel: there is nothing to train the regressor on.")
    features, shares = features[keep], shares[keep]
    keras.utils.set_random_seed(seed)
    model = build_regressor(features.shape[1], shares.mean(axis=0))
    steps_per_epoch = math.ceil(len(features) / batch_size)
    schedule = FlooredExponentialDecay(learning_rate, steps_per_epoch, decay_rate, min_learning_rate)
    model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=momentum),
                  loss=keras.losses.CategoricalCrossentropy())
    if epochs > 0:
        model.fit(features, shares, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=verbose)
    return model


def chi_squared(p, q):
    """Row-wise chi-squared distance `0.5 * sum_c (p_c - q_c)^2 / (p_c + q_c)` (terms with p_c + q_c = 0 are
    0); between two distributions it lies in [0, 1]."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    total = p + q
    terms = np.divide((p - q) ** 2, total, out=np.zeros_like(total), where=total > 0)
    return 0.5 * terms.sum(axis=-1)


def distance_report(truth, estimates):
    """`{name: {"chi2": mean, "l1": mean}}` of each `[N, C]` estimate against the `[N, C]` truth."""
    return {name: {"chi2": float(chi_squared(truth, est).mean()), "l1": float(np.abs(truth - est).sum(1).mean())}
            for name, est in estimates.items()}


def predicted_shares(model_dir, image_paths, num_classes, batch_size=FEATURE_BATCH_SIZE, progress=True, soft=False,
                     label_paths=None, reader=None):
    """`[N, C]` class shares of the pixels the trained run in `model_dir` assigns to each class, on images
    resized to the run's target size: a segmenter adapted without target labels (e.g. by MinEnt or
    self-training) as the image-level estimate.

    Args:
        soft: the mean of the per-pixel softmax, averaged with the mirrored image's (what a self-training
            teacher gives PIT), instead of the shares of the argmax.
        label_paths, reader: for a diagnostic against the truth only: pixels whose label is void are left out,
            as the truth's shares leave them out (training never reads them).
    """
    if not model_dir:
        raise UserError(f"--features={PREDICTION_FEATURES} needs --model_dir (a trained run).")
    config = runs.read_config(model_dir)
    if config.num_classes != num_classes:
        raise UserError(f"--model_dir={model_dir} predicts {config.num_classes} classes, not {num_classes}.")
    segmenter = fine_segmenter(runs.load_run(model_dir).network)
    size = config.target_size
    rows = []
    for start in range(0, len(image_paths), batch_size):
        images = tf.stack([pipeline.load_image(tf.constant(p), size) for p in image_paths[start:start + batch_size]])
        logits = segmenter(images, training=False)
        if soft:
            flipped = segmenter(tf.reverse(images, axis=[2]), training=False)
            per_pixel = 0.5 * (tf.nn.softmax(logits, -1) + tf.reverse(tf.nn.softmax(flipped, -1), axis=[2]))
        else:
            per_pixel = tf.one_hot(tf.math.argmax(logits, axis=-1, output_type=tf.int32), num_classes)
        if label_paths is not None:
            labels = [pipeline.resize_label(tf.constant(reader(p)), size).numpy()
                      for p in label_paths[start:start + batch_size]]
            keep = np.stack([(label != 255) & (label < num_classes) for label in labels]).astype(np.float32)
            per_pixel = per_pixel * keep[..., None]
        counts = tf.reduce_sum(tf.cast(per_pixel, tf.float32), axis=[1, 2])
        rows.append(tf.math.divide_no_nan(counts, tf.reduce_sum(counts, axis=1, keepdims=True)).numpy())
    if progress:
        print(f"  predicted the class shares of {len(image_paths)} images with {model_dir}")
    return np.concatenate(rows).astype(np.float32)


def estimate_target_labels(source, source_root, target, target_root, num_classes, features=DEFAULT_FEATURES,
                           features_weights="imagenet", image_size=(512, 256), epochs=100, model_dir=None,
                           cache_dir=None, seed=0, progress=True, feature_alignment="none", feature_pooling="global",
                           feature_stages="last", label_map=None, benchmark_seed=None):
    """The whole estimate: features of source and target training images, the regressor, its target output.
    `feature_alignment` (a `FEATURE_ALIGNMENTS` value) is applied while and after the features are computed
    (`alignment_steps`); `feature_pooling` and `feature_stages` choose backbone features (`feature_extractor`).
    `label_map` (a JSON path) maps the raw ids of a `folder` source's labels to train ids (`--label_map`);
    `benchmark_seed` is the embedded benchmark's generator seed (`--benchmark_seed`).

    Returns:
        A dict: `keys` (target image paths relative to the target root, the JSON keys), `labels` (`[N, C]`),
        `report` (chi-squared and L1 distances to the target truth of the regressor, the source-mean prior and
        the uniform prior, over the target images that have labels; None if none has), and counts.
    """
    source_pairs, source_reader = datasets.source_pairs(source, source_root, benchmark_seed, label_map=label_map)
    target_pairs, target_reader, root = datasets.target_pairs(target, target_root, "train", num_classes=num_classes,
                                                              benchmark_seed=benchmark_seed)
    shares = source_shares(source_pairs, source_reader, num_classes)
    predicted = features in (PREDICTION_FEATURES, SOFT_PREDICTION_FEATURES)
    soft = features == SOFT_PREDICTION_FEATURES
    if predicted:
        labels = predicted_shares(model_dir, [i for i, _ in target_pairs], num_classes, progress=progress, soft=soft)
    else:
        _, transform = alignment_steps(feature_alignment)
        extractor = feature_extractor(features, features_weights, image_size, model_dir, feature_alignment,
                                      feature_pooling, feature_stages)
        cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "pit_keras", "features")
        found = {}
        for domain, pairs in (("source", source_pairs), ("target", target_pairs)):
            if progress:
                print(f"{domain}: {len(pairs)} images")
            found[domain], path, hit = cached_features(extractor, [i for i, _ in pairs], image_size, cache_dir,
                                                       progress=progress)
            if progress:
                print(f"  {'cached' if hit else 'computed and cached'} features ({found[domain].shape[1]} "
                      f"dimensions): {path}")
        source_features, target_features = align_features(found["source"], found["target"], transform)
        model = train_regressor(source_features, shares, epochs, seed=seed)
        labels = np.asarray(model.predict(target_features, batch_size=256, verbose=0), np.float32)
        labels /= labels.sum(axis=1, keepdims=True)

    labelled = [k for k, (_, label) in enumerate(target_pairs) if label is not None]
    report = None
    if labelled:
        truth = np.stack([soft_labels.shares(target_reader(target_pairs[k][1]), num_classes) for k in labelled])
        has_pixels = truth.sum(axis=1) > 0
        rows = [k for k, ok in zip(labelled, has_pixels) if ok]
        prior = shares[shares.sum(axis=1) > 0].mean(axis=0)
        estimate = labels[rows]
        if predicted:  # compared over the pixels the truth counts (void left out), as the truth's shares are
            estimate = predicted_shares(model_dir, [target_pairs[k][0] for k in rows], num_classes,
                                        progress=False, soft=soft, label_paths=[target_pairs[k][1] for k in rows],
                                        reader=target_reader)
        report = distance_report(truth[has_pixels], {
            "regressor": estimate,
            "source-mean prior": np.broadcast_to(prior, (len(rows), num_classes)),
            "uniform prior": np.full((len(rows), num_classes), 1.0 / num_classes),
        })
        report["num_images"] = len(rows)
    return {"keys": [cityscapes.relative_key(root, image) for image, _ in target_pairs], "labels": labels,
            "report": report, "num_source": len(source_pairs), "num_target": len(target_pairs)}
