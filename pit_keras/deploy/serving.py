"""The serving function that the export saves and every predictor runs: uint8 images of any size in, train ids
and probabilities at that size out."""

def serving_function(segmenter, target_size):
    """The function behind the SavedModel's `serving_default` signature (input spec: `serving_signature()`).

    It takes uint8 RGB images `[batch, H, W, 3]` of any size, resizes them bilinearly to the run's
    `target_size` (the resolution the network was trained at, as evaluation does), runs the segmenter and
    resizes the logits back to `H x W` before the softmax and the argmax, so the outputs have the input's size.

    Args:
        segmenter: a Keras model from float RGB in [0, 255] to logits (`load_segmenter`).
        target_size: (W, H) the network runs at.

    Returns:
        `serve(images) -> {"labels": int32 [batch, H, W], "probabilities": float32 [batch, H, W, C]}`.
    """
    import tensorflow as tf

    width, height = target_size

    def serve(images):
        input_size = tf.shape(images)[1:3]
        resized = tf.image.resize(tf.cast(images, tf.float32), (height, width), method="bilinear")
        logits = segmenter(resized, training=False)
        logits = tf.image.resize(logits, input_size, method="bilinear")
        return {"labels": tf.math.argmax(logits, axis=-1, output_type=tf.int32),
                "probabilities": tf.nn.softmax(logits, axis=-1)}

    return serve


def serving_signature():
    """The input spec of `serving_function`: a batch of uint8 RGB images of any size, named `images`."""
    import tensorflow as tf

    return tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")
