"""Self-training with a mean teacher, beyond the paper: DACS (Tranheden et al., WACV 2021) and DAFormer's
(Hoyer et al., CVPR 2022) recipe on top of any method.

- **EMA teacher.** A copy of the network's variables, updated after every optimizer step as
  `t <- a t + (1 - a) s` with `a = min(1 - 1 / n, ema)` after the n-th step (DACS: a copy after the first). The teacher is the same network
  called statelessly (`keras.Model.stateless_call`) on those copies, so it costs no second model. Every replica
  computes the same update from the same (mirrored) student weights, so the teacher stays identical on all.
- **Target BatchNorm statistics.** `teacher_bn="target_batch"` (the default) normalises each target batch with
  that batch's own statistics (BatchNorm in training mode, its running-statistics update discarded). A teacher
  that uses running statistics, which mix source and target batches, gives pseudo-labels that amplify the
  source model's errors; `"running"` keeps that form for comparison.
- **Pseudo-labels** are the teacher's argmax on target, weighted per image by the fraction of its pixels whose
  top probability passes `threshold` (DACS's confidence weight, per image so that it does not depend on how a
  batch is split over replicas).
- **Class-balanced selection** (`class_portion` > 0, CBST): instead of the per-image weight, each pseudo-labelled
  pixel counts (weight 1) when it passes `threshold` or is among the most confident `class_portion` of its
  image's pixels of its class (`class_balanced_mask`), and the others are left out (weight 0).
- **ClassMix.** Half of the classes of each source image (rounded up) are pasted onto its paired target image;
  the student learns the mixed image against the mixed label, source pixels with weight 1 and target pixels
  with the confidence weight. Which classes are pasted is drawn from a stateless random stream keyed by
  (seed, step, example index in the global batch), so a step splits over replicas exactly as on one device.
"""

import keras
import tensorflow as tf

from pit_keras.config import TEACHER_BNS as TEACHER_BN
from pit_keras.data.classes import IGNORE_INDEX
from pit_keras.models.network import all_layers


class EMATeacher(keras.layers.Layer):
    """The mean teacher's variables: one copy of each variable of `network`, in the same order.

    Args:
        network: the student network (built).
        ema: the EMA coefficient a.
        teacher_bn: "target_batch" or "running" (see the module docstring).
    """

    def __init__(self, network, ema=0.99, teacher_bn="target_batch", **kwargs):
        super().__init__(name="ema_teacher", **kwargs)
        if teacher_bn not in TEACHER_BN:
            raise ValueError(f"teacher_bn must be one of {TEACHER_BN}, got {teacher_bn!r}")
        self.ema = float(ema)
        self.teacher_bn = teacher_bn
        self._network = lambda: network  # not tracked: the student's variables are not the teacher's
        self.trainable_copies = [self._copy(v, "t") for v in network.trainable_variables]
        self.non_trainable_copies = [self._copy(v, "n") for v in network.non_trainable_variables]
        self.built = True

    def _copy(self, variable, kind):
        # "only_first_replica": assigned in a replica context, the first replica's value is kept on all of them
        # (they compute the same one).
        copy = self.add_weight(shape=variable.shape, dtype=variable.dtype, trainable=False,
                               name=f"{kind}_{variable.path.replace('/', '_')}",
                               initializer="zeros", aggregation="only_first_replica")
        copy.assign(variable)
        return copy

    def checkpoint(self):
        """The teacher's variables as a `tf.train.Checkpoint` (Keras keeps them in lists that TensorFlow's
        checkpoints do not follow)."""
        named = {f"trainable_{i}": v for i, v in enumerate(self.trainable_copies)}
        named.update({f"non_trainable_{i}": v for i, v in enumerate(self.non_trainable_copies)})
        return tf.train.Checkpoint(**named)

    def pairs(self):
        network = self._network()
        return list(zip(self.trainable_copies, network.trainable_variables)) + list(
            zip(self.non_trainable_copies, network.non_trainable_variables))

    def update(self, step):
        """The EMA step after the optimizer's `step`-th update (`step` counts from 1)."""
        step = tf.maximum(tf.cast(step, tf.float32), 1.0)
        alpha = tf.minimum(1.0 - 1.0 / step, self.ema)
        for copy, variable in self.pairs():
            if "float" in str(copy.dtype):
                copy.assign(alpha * copy + (1.0 - alpha) * tf.cast(variable, copy.dtype))
            else:  # e.g. a Dropout layer's int64 seed state: copied, not averaged
                copy.assign(variable)

    def outputs(self, images):
        """The teacher's outputs (the network's dict) on `images`, without gradient.

        With "target_batch" the network runs in training mode for its BatchNorm layers' sake, with every Dropout
        layer off (as DAFormer's teacher): their rate is 0 while this call is traced. A BatchNorm layer that is
        frozen (DeepLab-v2's) uses its running statistics in either mode."""
        network = self._network()
        training = self.teacher_bn == "target_batch"
        dropouts = [layer for layer in all_layers(network) if isinstance(layer, keras.layers.Dropout)]
        rates = [layer.rate for layer in dropouts]
        try:
            for layer in dropouts:
                layer.rate = 0.0
            outputs, _ = network.stateless_call(
                [tf.convert_to_tensor(v) for v in self.trainable_copies],
                [tf.convert_to_tensor(v) for v in self.non_trainable_copies], images, training=training)
        finally:
            for layer, rate in zip(dropouts, rates):
                layer.rate = rate
        return tf.nest.map_structure(tf.stop_gradient, outputs)


def teacher_probabilities(teacher, images, flip=False):
    """`[B, H, W, C]` float32 softmax of the teacher's fine output; with `flip`, averaged with the prediction
    on the mirrored images (mirrored back)."""
    probabilities = tf.nn.softmax(tf.cast(teacher.outputs(images)["seg"], tf.float32), axis=-1)
    if flip:
        flipped = tf.nn.softmax(tf.cast(teacher.outputs(tf.reverse(images, axis=[2]))["seg"], tf.float32), axis=-1)
        probabilities = 0.5 * (probabilities + tf.reverse(flipped, axis=[2]))
    return probabilities


def pseudo_labels(probabilities, threshold):
    """`(labels [B, H, W] int32, weight [B])`: the argmax and the fraction of each image's pixels whose top
    probability is at least `threshold`."""
    confidence = tf.reduce_max(probabilities, axis=-1)
    labels = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    weight = tf.reduce_mean(tf.cast(confidence >= threshold, tf.float32), axis=[1, 2])
    return labels, weight


def class_balanced_mask(probabilities, threshold, portion):
    """`[B, H, W]` bool: class-balanced pseudo-label selection (CBST, Zou et al., ECCV 2018), per image so that it
    does not depend on how a batch is split over replicas. A pixel is kept when its top probability is at least
    `threshold`, or when it is among the `ceil(portion * n_c)` most confident of the `n_c` pixels of its image that
    the teacher gives its class c: every predicted class keeps at least that portion of its pixels, so a rare class
    whose pixels are less confident is not left out of self-training as a single threshold leaves it."""
    num_classes = probabilities.shape[-1]
    confidence = tf.reduce_max(probabilities, axis=-1)
    labels = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    shape = tf.shape(labels)
    flat_confidence = tf.reshape(confidence, [shape[0], -1])
    flat_labels = tf.reshape(labels, [shape[0], -1])
    # Pixels grouped by class, most confident first within a class (confidence is in [0, 1], classes 2 apart).
    order = tf.argsort(2.0 * tf.cast(flat_labels, tf.float32) - flat_confidence, axis=1, stable=True)
    sorted_labels = tf.gather(flat_labels, order, batch_dims=1)
    counts = tf.reduce_sum(tf.one_hot(flat_labels, num_classes, dtype=tf.int32), axis=1)  # [B, C]
    starts = tf.cumsum(counts, axis=1, exclusive=True)
    quota = tf.cast(tf.math.ceil(portion * tf.cast(counts, tf.float32)), tf.int32)
    rank = tf.range(tf.shape(flat_labels)[1])[None] - tf.gather(starts, sorted_labels, batch_dims=1)
    selected_sorted = rank < tf.gather(quota, sorted_labels, batch_dims=1)
    selected = tf.gather(selected_sorted, tf.argsort(order, axis=1), batch_dims=1)
    return tf.logical_or(tf.reshape(selected, shape), confidence >= threshold)


def class_shares(probabilities):
    """`[B, C]` mean of the per-pixel class probabilities: an image's soft class shares."""
    return tf.reduce_mean(probabilities, axis=[1, 2])


def class_confidence(probabilities, smoothing=0.01):
    """`[B, C]` the teacher's confidence in each class share of each image: the mean of the per-pixel
    confidence `1 - H(p) / log C` over the pixels, each pixel counted by its probability of the class, so a class
    share made of uncertain pixels gets a low weight. `smoothing` pulls a class with (almost) no pixels towards
    the image's mean confidence (its absence is as sure as the image's prediction)."""
    num_classes = probabilities.shape[-1]
    p = tf.cast(probabilities, tf.float32)
    entropy = -tf.reduce_sum(p * tf.math.log(tf.maximum(p, 1e-12)), axis=-1) / tf.math.log(float(num_classes))
    confidence = 1.0 - entropy  # [B, H, W]
    weighted = tf.reduce_mean(p * confidence[..., None], axis=[1, 2])
    shares = tf.reduce_mean(p, axis=[1, 2])
    mean = tf.reduce_mean(confidence, axis=[1, 2])[:, None]
    return (weighted + smoothing * mean) / (shares + smoothing)


def label_agreement(a, b, smoothing=0.01):
    """`[B, C]` agreement of two estimates of the same image labels, in [0, 1]: `1 - |a - b| / (a + b + s)`."""
    a, b = tf.cast(a, tf.float32), tf.cast(b, tf.float32)
    return 1.0 - tf.abs(a - b) / (a + b + smoothing)


def global_example_keys(seed, step, batch_size, num_classes):
    """`[batch_size, C]` uniform keys for this replica's examples, taken from the rows of a stateless draw over
    the global batch that this replica's slice holds (Keras splits a global batch into contiguous slices)."""
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context is not None else 1
    replica = context.replica_id_in_sync_group if context is not None else 0
    seed = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
    keys = tf.random.stateless_uniform([batch_size * replicas, num_classes], seed=seed)
    start = tf.cast(replica, tf.int32) * batch_size
    return keys[start:start + batch_size]


def classmix_masks(source_labels, keys, num_classes):
    """`[B, H, W]` bool: the pixels of each source image whose class is among the half of its present classes
    (rounded up) with the smallest keys.

    Args:
        source_labels: `[B, H, W]` train ids (ignored ids are never pasted).
        keys: `[B, C]` random keys, one per class.
        num_classes: C.
    """
    labels = tf.cast(source_labels, tf.int32)
    valid = tf.logical_and(labels != IGNORE_INDEX, labels < num_classes)
    present = tf.reduce_any(tf.one_hot(tf.where(valid, labels, -1), num_classes, on_value=True, off_value=False,
                                       dtype=tf.bool), axis=[1, 2])
    num_present = tf.reduce_sum(tf.cast(present, tf.int32), axis=1)
    num_chosen = (num_present + 1) // 2
    # Absent classes sort last; a present class is chosen when its rank is below num_chosen.
    ranked = tf.where(present, keys, 2.0 + keys)
    rank = tf.argsort(tf.argsort(ranked, axis=1), axis=1)
    chosen = tf.logical_and(present, rank < num_chosen[:, None])
    return tf.gather(chosen, tf.where(valid, labels, 0), batch_dims=1) & valid


def mix(mask, source, target):
    """`mask ? source : target`, broadcasting a `[B, H, W]` mask over trailing channels."""
    mask = tf.reshape(mask, tf.concat([tf.shape(mask), tf.ones([tf.rank(source) - 3], tf.int32)], 0))
    return tf.where(mask, source, target)


def ramp(step, start, length):
    """The weight at step index `step` (0 for the first step): 0 up to index `start`, then linear to 1 at index
    `start + length`; with `length` 0, 1 from index `start` on."""
    step = tf.cast(step, tf.float32)
    if length <= 0:
        return tf.cast(step >= start, tf.float32)
    return tf.clip_by_value((step - start) / float(length), 0.0, 1.0)
