"""Evaluation on a labelled target split: predictions upsampled to label resolution, confusion-matrix IoU."""

import sys

import tensorflow as tf

from pit_keras import metrics
from pit_keras.data import pipeline
from pit_keras.models.network import fine_segmenter


def evaluate(network, pairs, reader, class_set, input_size, progress=True):
    """Evaluates the fine output of `network` on (image, label) pairs.

    Args:
        network: a PIT network (or any model with a `"seg"` layer giving logits at the input size).
        pairs: (image path, label path) pairs.
        reader: `reader(label path) -> [H, W]` train ids.
        class_set: the label space (`classes.ClassSet`).
        input_size: (W, H) the images are resized to before the network, as in training.
        progress: print a progress line to stderr.

    Returns:
        The `metrics.summarize` dict (percent IoUs, mIoU, number of images).
    """
    segmenter = fine_segmenter(network)

    @tf.function(reduce_retracing=True)
    def predict(image, label_shape):
        logits = segmenter(image[None], training=False)
        logits = tf.image.resize(logits, label_shape, method="bilinear")
        return tf.math.argmax(logits[0], axis=-1, output_type=tf.int32)

    matrix = metrics.ConfusionMatrix(class_set.num_classes)
    for index, (image, label) in enumerate(pipeline.evaluation_dataset(pairs, reader, input_size), start=1):
        prediction = predict(image, tf.shape(label))
        matrix.update(label.numpy(), prediction.numpy())
        if progress and (index % 50 == 0 or index == len(pairs)):
            print(f"\revaluated {index}/{len(pairs)} images", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return metrics.summarize(matrix, class_set)
