"""Callbacks: everything a training step must not do (checkpoints, TensorBoard scalars and images, stopping at
the step budget). Each reads the step from `optimizer.iterations`, so a resumed run continues its counters."""

import keras
import numpy as np
import tensorflow as tf

from pit_keras import visualize
from pit_keras.models.network import interaction_weights


def _step(model):
    return int(model.optimizer.iterations.numpy())


class StopAtStep(keras.callbacks.Callback):
    """Ends training when the optimizer has taken `num_steps` steps (resumed runs end on the same step)."""

    def __init__(self, num_steps):
        super().__init__()
        self.num_steps = num_steps

    def on_train_batch_end(self, batch, logs=None):
        if _step(self.model) >= self.num_steps:
            self.model.stop_training = True


class Checkpointer(keras.callbacks.Callback):
    """Saves network and optimizer every `every` steps and when training ends, numbered by step."""

    def __init__(self, ckpt_manager, every):
        super().__init__()
        self.manager = ckpt_manager
        self.every = every
        self.last_saved = None

    def _save(self):
        step = _step(self.model)
        if step != self.last_saved:
            self.manager.save(checkpoint_number=step)
            self.last_saved = step

    def on_train_batch_end(self, batch, logs=None):
        if self.every and _step(self.model) % self.every == 0:
            self._save()

    def on_train_end(self, logs=None):
        self._save()


class TensorBoardLogger(keras.callbacks.Callback):
    """TensorBoard scalars after every logged epoch (each loss term, learning rate, w^k) and, every
    `image_every` steps, pictures of a fixed batch: inputs, labels, predictions and, for PIT, the K coarse
    class-activation maps (the paper's Fig. 3).

    Args:
        log_dir: the event folder.
        sample: a training batch dict (numpy or tensors) to draw, fixed for the whole run.
        class_set: label space for colours.
        image_every: steps between pictures; 0 never.
        max_images: how many images of the sample to draw.
    """

    def __init__(self, log_dir, sample, class_set, image_every, max_images=2):
        super().__init__()
        self.writer = tf.summary.create_file_writer(log_dir)
        self.sample = {k: v[:max_images] for k, v in sample.items()}
        self.class_set = class_set
        self.image_every = image_every

    def on_epoch_end(self, epoch, logs=None):
        step = _step(self.model)
        optimizer = self.model.optimizer
        with self.writer.as_default(step=step):
            for name, value in (logs or {}).items():
                tf.summary.scalar(f"loss/{name}", value)
            tf.summary.scalar("learning_rate", optimizer.learning_rate)
            if self.model.method == "pit":
                for k, w in enumerate(interaction_weights(self.model.network).numpy()):
                    tf.summary.scalar(f"interaction_w/{k}", w)
        self.writer.flush()

    def on_train_begin(self, logs=None):
        self._maybe_draw(force=_step(self.model) == 0)

    def on_train_batch_end(self, batch, logs=None):
        self._maybe_draw()

    def _maybe_draw(self, force=False):
        step = _step(self.model)
        if not self.image_every or not (force or step % self.image_every == 0):
            return
        with self.writer.as_default(step=step):
            self._draw("source", self.sample["source_image"], self.sample["source_label"])
            if "target_image" in self.sample:
                self._draw("target", self.sample["target_image"], None)
        self.writer.flush()

    def _draw(self, domain, images, labels):
        outputs = self.model.network(images, training=False)
        images = np.asarray(images).clip(0, 255).astype(np.uint8)
        prediction = np.argmax(outputs["seg"].numpy(), axis=-1)
        tf.summary.image(f"{domain}/image", images)
        if labels is not None:
            tf.summary.image(f"{domain}/label", visualize.colorize(labels, self.class_set))
        tf.summary.image(f"{domain}/prediction", visualize.colorize(prediction, self.class_set))
        for k in range(len(self.model.lse_r)):
            cam = outputs[f"cam_{k}"].numpy()
            # Each unit's map: its own per-pixel class decision, and how strongly it fires at all.
            tf.summary.image(f"{domain}/cam_{k}_classes", visualize.colorize(cam.argmax(-1), self.class_set))
            tf.summary.image(f"{domain}/cam_{k}_strength", visualize.heatmap(cam.max(-1)))
