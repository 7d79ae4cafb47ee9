"""Custom layers of the PIT network. No `Lambda` layers: every layer has `get_config()`, so saved models load
with Keras' `safe_mode` on."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="pit_keras")
class ResizeLike(keras.layers.Layer):
    """Bilinearly resizes a feature map to the spatial size of a reference tensor.

    Called on `[x, reference]`; used to upsample head logits to the input size whatever that size is, so one
    network serves every image size (training crops, full-resolution evaluation, export).

    Args:
        interpolation: a `tf.image.resize` method.
    """

    def __init__(self, interpolation="bilinear", **kwargs):
        super().__init__(**kwargs)
        self.interpolation = interpolation

    def call(self, inputs):
        x, reference = inputs
        size = tf.shape(reference)[1:3]
        # Resized in float32 whatever the policy: tf.image.resize returns float32 for bfloat16/float16 input,
        # and XLA refuses the mixed types that leaves in the gradient (tensorflow/tensorflow#81273).
        resized = tf.image.resize(tf.cast(x, tf.float32), size, method=self.interpolation)
        return tf.cast(resized, x.dtype)

    def compute_output_shape(self, input_shapes):
        x_shape, ref_shape = input_shapes
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[3])

    def get_config(self):
        return {**super().get_config(), "interpolation": self.interpolation}


@keras.saving.register_keras_serializable(package="pit_keras")
class RegionReconstruction(keras.layers.Layer):
    """Weighted sum of the K coarse class-activation maps, `sum_k w^k S^k`, with learnable scalars w^k.

    The layer owns the paper's w^k (`self.w`); the trainer reads them for the reconstruction loss and trains them
    at the heads' learning rate times `--interaction_lr_multiplier`.

    Args:
        num_units: K, the number of region-expansion units.
    """

    def __init__(self, num_units, **kwargs):
        super().__init__(**kwargs)
        self.num_units = num_units

    def build(self, input_shape):
        # Starting at 1/K makes the first reconstruction the average of the coarse maps.
        self.w = self.add_weight(
            name="w", shape=(self.num_units,),
            initializer=keras.initializers.Constant(1.0 / self.num_units), dtype="float32")

    def call(self, cams):
        w = tf.cast(self.w, cams[0].dtype)
        return tf.add_n([w[k] * cam for k, cam in enumerate(cams)])

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]

    def get_config(self):
        return {**super().get_config(), "num_units": self.num_units}


@keras.saving.register_keras_serializable(package="pit_keras")
class BatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization, whose synchronized batch statistics skip the cross-replica sums on one replica.

    With `synchronized=True` Keras computes the statistics from sums of x, x^2 and a count, each all-reduced over
    the replicas. With one replica (no strategy, or a strategy of one device) those all-reduces are identities,
    yet each adds a merge call and a custom gradient to the traced step. Here the same sums and divisions run
    without them: the same statistics to the bit, with fewer ops to trace and run. Across replicas, and for
    float16/bfloat16 statistics or masks, it is Keras' layer. The class keeps Keras' name: `.weights.h5` files
    address layers by their class's name, so weights files load into either.
    """

    def _moments(self, inputs, mask):
        if (self.synchronized and mask is None and keras.backend.standardize_dtype(inputs.dtype) == "float32"
                and _one_replica()):
            return local_moments(inputs, self._reduction_axes)
        return super()._moments(inputs, mask)


def _one_replica():
    context = tf.distribute.get_replica_context()
    return context is not None and context.num_replicas_in_sync == 1


def local_moments(x, axes):
    """Keras' synchronized moments (`keras.src.backend.tensorflow.nn._compute_moments_sync`) on one replica:
    sums over `axes`, divided by the count, variance E(x^2) - E(x)^2 clipped at 0; `axes` squeezed away."""
    count = tf.reduce_sum(tf.ones_like(x, name="count"), axis=axes, keepdims=True)
    total = tf.reduce_sum(x, axis=axes, keepdims=True)
    squares = tf.reduce_sum(tf.square(x), axis=axes, keepdims=True)
    mean = tf.math.divide_no_nan(total, count)
    variance = tf.maximum(tf.math.divide_no_nan(squares, count) - tf.square(mean), 0.0)
    return tf.squeeze(mean, axes), tf.squeeze(variance, axes)
