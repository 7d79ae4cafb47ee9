"""The loss terms of PIT and its baselines, as plain functions of tensors.

Every loss returns one float32 value per image (`[B]`), whatever the network's compute dtype, never a batch
mean (`lse_pool` and `image_level_labels`, its inputs, give `[B, C]`): the trainer reduces each term once, with
`tf.nn.compute_average_loss`, so that the reduction is right under a distribution strategy (gradients are summed
across replicas).
"""

import math

import tensorflow as tf

from pit_keras.data.classes import IGNORE_INDEX


def lse_pool(cam, r, normalize=False):
    """Log-Sum-Exp aggregation of a class-activation map, Eq. 1 of the paper.

    `s(c) = log((1/HW) * sum_ij exp(r * S(i, j, c)))`, computed as `logsumexp(r * S) - log(HW)` so that large
    activations do not overflow.

    Args:
        cam: `[B, H, W, C]` logits.
        r: the smoothness r^k (a Python float); large r approaches max pooling, small r average pooling.
        normalize: divide by r (Pinheiro & Collobert's form, which stays on the scale of S); the paper's Eq. 1
            as printed does not, and neither does this function by default. The trainer divides unless
            `--lse_normalize=false` (docs/method.md says why).

    Returns:
        `[B, C]` image-level logits.
    """
    cam = tf.cast(cam, tf.float32)
    shape = tf.shape(cam)
    flat = tf.reshape(cam, [shape[0], shape[1] * shape[2], shape[3]])
    num_pixels = tf.cast(shape[1] * shape[2], cam.dtype)
    pooled = tf.reduce_logsumexp(r * flat, axis=1) - tf.math.log(num_pixels)
    return pooled / r if normalize else pooled


def image_level_labels(labels, num_classes, ignore_index=IGNORE_INDEX):
    """Soft image-level labels of the paper: each class's share of an image's labelled pixels.

    Args:
        labels: `[B, H, W]` integer train ids.
        num_classes: C.
        ignore_index: excluded from both the counts and the denominator (so are ids >= C).

    Returns:
        `[B, C]` float32 shares summing to 1 per image, or all zeros for an image with no labelled pixel.
    """
    labels = tf.cast(labels, tf.int32)
    valid = tf.logical_and(labels != ignore_index, labels < num_classes)
    one_hot = tf.one_hot(tf.where(valid, labels, -1), num_classes, dtype=tf.float32)
    counts = tf.reduce_sum(one_hot, axis=[1, 2])
    total = tf.reduce_sum(counts, axis=1, keepdims=True)
    return tf.math.divide_no_nan(counts, total)


def reconstruction_loss(cams, weights, seg):
    """Interaction reconstruction d_m = ||sum_k w^k S^k - S||^2, per image.

    The paper leaves the reduction open; we take the mean over pixels and classes so that lambda_r keeps its
    meaning across image sizes and class counts.

    Args:
        cams: list of K `[B, H, W, C]` coarse class-activation maps S^k.
        weights: `[K]` learnable scalars w^k.
        seg: `[B, H, W, C]` fine class-activation map S.

    Returns:
        `[B]` squared reconstruction error.
    """
    weights = tf.cast(weights, tf.float32)
    recon = tf.add_n([weights[k] * tf.cast(cam, tf.float32) for k, cam in enumerate(cams)])
    return tf.reduce_mean(tf.square(recon - tf.cast(seg, tf.float32)), axis=[1, 2, 3])


def pixel_cross_entropy(labels, logits, ignore_index=IGNORE_INDEX):
    """Pixel-wise softmax cross-entropy L_seg over labelled pixels, per image.

    Args:
        labels: `[B, H, W]` integer train ids; `ignore_index` (and ids >= C) carry no loss.
        logits: `[B, H, W, C]` fine logits at label resolution.
        ignore_index: the id that marks unlabelled pixels.

    Returns:
        `[B]` mean cross-entropy over each image's labelled pixels (0 for an image with none).
    """
    per_pixel, mask = _labelled_cross_entropy(labels, logits, ignore_index)
    return tf.math.divide_no_nan(tf.reduce_sum(per_pixel * mask, axis=[1, 2]), tf.reduce_sum(mask, axis=[1, 2]))


def _labelled_cross_entropy(labels, logits, ignore_index):
    """`(per-pixel softmax cross-entropy, 1.0 where the pixel is labelled)`, both `[B, H, W]` float32."""
    num_classes = tf.shape(logits)[-1]
    labels = tf.cast(labels, tf.int32)
    valid = tf.logical_and(labels != ignore_index, labels < num_classes)
    per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.where(valid, labels, 0), logits=tf.cast(logits, tf.float32))
    return per_pixel, tf.cast(valid, tf.float32)


def weighted_pixel_cross_entropy(labels, logits, weights, ignore_index=IGNORE_INDEX):
    """Pixel-wise softmax cross-entropy with a weight per pixel (self-training's pseudo-label confidence), per
    image: the mean of `weight * CE` over the image's labelled pixels, as DACS and DAFormer average it.

    Args:
        labels: `[B, H, W]` integer train ids; `ignore_index` (and ids >= C) carry no loss.
        logits: `[B, H, W, C]` logits at label resolution.
        weights: `[B, H, W]` float weights.

    Returns:
        `[B]` weighted mean cross-entropy.
    """
    per_pixel, mask = _labelled_cross_entropy(labels, logits, ignore_index)
    weighted = per_pixel * mask * tf.cast(weights, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(weighted, axis=[1, 2]), tf.reduce_sum(mask, axis=[1, 2]))


def image_level_bce(soft_labels, image_logits, reduction="mean", weights=None):
    """Soft-label binary cross-entropy L_img between image-level labels and sigmoid(s^k), per image.

    Args:
        soft_labels: `[B, C]` targets in [0, 1] (class shares).
        image_logits: `[B, C]` LSE-pooled logits s^k.
        reduction: "mean" over classes (the default), as a PyTorch `BCEWithLogitsLoss` with its default
            reduction computes it, or "sum" over classes, as the paper's L_c is written (the trainer sums over
            units k): the same loss with lambda_c multiplied by C.
        weights: optional `[B, C]` per-image, per-class weights in [0, 1] (how far each estimated label is
            trusted); the reduction still divides by C, so a weight below 1 lowers the term.

    Returns:
        `[B]` cross-entropy summed or averaged over classes.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be sum or mean, got {reduction!r}")
    per_class = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(soft_labels, tf.float32), logits=tf.cast(image_logits, tf.float32))
    if weights is not None:
        per_class = per_class * tf.cast(weights, tf.float32)
    return tf.reduce_sum(per_class, axis=-1) if reduction == "sum" else tf.reduce_mean(per_class, axis=-1)


def entropy_loss(logits):
    """ADVENT's entropy minimisation term: mean normalised Shannon entropy of the pixel predictions.

    Args:
        logits: `[B, H, W, C]` fine logits.

    Returns:
        `[B]` mean over pixels of `-sum_c p log p / log C`, in [0, 1].
    """
    logits = tf.cast(logits, tf.float32)
    num_classes = logits.shape[-1]
    log_p = tf.nn.log_softmax(logits, axis=-1)
    entropy = -tf.reduce_sum(tf.exp(log_p) * log_p, axis=-1) / math.log(num_classes)
    return tf.reduce_mean(entropy, axis=[1, 2])
