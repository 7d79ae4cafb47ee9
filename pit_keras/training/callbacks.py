"""Callbacks: everything a training step must not do (progress, checkpoints, TensorBoard scalars and images,
stopping at the step budget, on divergence or on a signal). Each reads the step from `optimizer.iterations`, so
a resumed run continues its counters."""

import json
import os
import signal
import threading

import keras
import numpy as np
import tensorflow as tf

from pit_keras import atomic, console, visualize
from pit_keras.adaptation import self_training
from pit_keras.errors import Diverged, Interrupted, UserError
from pit_keras.models.network import interaction_weights


def _step(model):
    return int(model.optimizer.iterations.numpy())


class Progress(keras.callbacks.Callback):
    """The training progress in steps (`console.ProgressLine`): `step 120/1500  3.40 steps/s  ETA 6m45s  loss
    1.2345  seg_src 0.8123 ...`, the losses being Keras' running means since the last plain line. Replaces
    Keras' progress bar (fit with `verbose=0`), whose "Epoch 1/15" counts `--log_every` blocks.

    Args:
        num_steps: the run's last step.
        log_every: steps between plain lines.
        interactive: redraw the line in between on a terminal (None: if stdout is one); False: plain lines only.
    """

    def __init__(self, num_steps, log_every, interactive=None, stream=None):
        super().__init__()
        self.num_steps = num_steps
        self.log_every = log_every
        self.interactive = interactive
        self.stream = stream
        self.line = None

    def on_train_begin(self, logs=None):
        self.line = console.ProgressLine(self.num_steps, "step", every=self.log_every, stream=self.stream,
                                         interactive=self.interactive)

    def on_train_batch_end(self, batch, logs=None):
        logs = dict(logs or {})
        ordered = {"loss": logs.pop("loss")} if "loss" in logs else {}
        ordered.update(logs)
        self.line.update(_step(self.model), ordered)

    def on_train_end(self, logs=None):
        if self.line is not None:
            self.line.close()


def write_scalar(log_dir, tag, value, step):
    """Writes one TensorBoard scalar (e.g. the final `val/miou` at the last step) to the event folder."""
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default(step=step):
        tf.summary.scalar(tag, value)
    writer.flush()
    writer.close()


class StopAtStep(keras.callbacks.Callback):
    """Ends training when the optimizer has taken `num_steps` steps (resumed runs end on the same step)."""

    def __init__(self, num_steps):
        super().__init__()
        self.num_steps = num_steps

    def on_train_batch_end(self, batch, logs=None):
        if _step(self.model) >= self.num_steps:
            self.model.stop_training = True


def _all_finite(variables):
    return all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in variables)


def _kept(manager):
    """What a diverged run keeps, in words."""
    latest = manager.latest_checkpoint if manager is not None else None
    return f"the last good checkpoint, {latest}, is kept" if latest else "no checkpoint had been written yet"


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss term, naming the step and the term, before any checkpoint
    of that step is written (it must come before `Checkpointer` in the callback list).

    Args:
        manager: the run's checkpoint manager, to say which checkpoint is kept (or that none is).
    """

    def __init__(self, manager=None):
        super().__init__()
        self.manager = manager

    def on_train_batch_end(self, batch, logs=None):
        bad = [name for name, value in (logs or {}).items() if not np.isfinite(float(value))]
        if bad:
            terms = [name for name in bad if name != "loss"] or bad
            raise Diverged(f"training diverged at step {_step(self.model)}: loss term {terms[0]} is "
                           f"{float(logs[terms[0]])}; {_kept(self.manager)}. Lower --learning_rate "
                           "or check the data.")


class Checkpointer(keras.callbacks.Callback):
    """Saves network and optimizer every `every` steps and when training ends, numbered by step.

    A checkpoint is only written from finite weights, and a failed write (a full disk) stops training with a
    clear message while the previous checkpoints stay as they were (TensorFlow writes the new files first and
    updates the `checkpoint` index last).
    """

    def __init__(self, ckpt_manager, every):
        super().__init__()
        self.manager = ckpt_manager
        self.every = every
        self.last_saved = None

    def save(self):
        step = _step(self.model)
        if step == self.last_saved:
            return
        if not _all_finite(self.model.network.weights):
            raise Diverged(f"training diverged before step {step}: the weights are no longer finite; "
                           f"{_kept(self.manager)}. Lower --learning_rate or check the data.")
        try:
            self.manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as err:
            previous = self.manager.latest_checkpoint
            raise UserError(f"could not write checkpoint {step} in {self.manager.directory} ({err}); "
                            f"the previous checkpoint {previous} is intact.") from None
        self.last_saved = step

    def on_train_batch_end(self, batch, logs=None):
        if self.every and _step(self.model) % self.every == 0:
            self.save()

    def on_train_end(self, logs=None):
        self.save()


class GracefulStop(keras.callbacks.Callback):
    """On SIGTERM or SIGINT (Ctrl-C), finishes the current step, writes a checkpoint and stops with a message
    that says how to resume. Restores the previous signal handlers when training ends.

    Args:
        checkpointer: the run's `Checkpointer`.
    """

    def __init__(self, checkpointer):
        super().__init__()
        self.checkpointer = checkpointer
        self.signum = None
        self.previous = {}

    def _request(self, signum, frame):
        self.signum = signum

    def on_train_begin(self, logs=None):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._request)

    def on_train_batch_end(self, batch, logs=None):
        if self.signum is not None:
            self.checkpointer.save()
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            raise Interrupted(f"{name} at step {_step(self.model)}; checkpoint written to "
                              f"{self.checkpointer.manager.latest_checkpoint}; rerun the same command to resume.",
                              self.signum)


class Validation(keras.callbacks.Callback):
    """Every `every` steps: evaluates on the target val split, logs `val/miou` to TensorBoard and keeps the
    best checkpoint so far (by val mIoU) in its own folder, with `best.json` beside it.

    Selecting a checkpoint on target val uses target labels, which unsupervised adaptation has in principle
    not got; most peers do it, and the run reports the last and the best checkpoints side by side.

    Args:
        evaluate: `evaluate() -> results dict` on the current weights.
        best_manager: a checkpoint manager (max_to_keep=1) for the best checkpoint.
        log_dir: the TensorBoard event folder.
        every: steps between evaluations.
    """

    def __init__(self, evaluate, best_manager, log_dir, every):
        super().__init__()
        self.evaluate = evaluate
        self.best_manager = best_manager
        self.writer = tf.summary.create_file_writer(log_dir)
        self.every = every
        self.best_file = os.path.join(best_manager.directory, "best.json")
        self.best = -1.0
        if os.path.isfile(self.best_file):
            with open(self.best_file) as f:
                self.best = json.load(f)["miou"]

    def on_train_batch_end(self, batch, logs=None):
        step = _step(self.model)
        if step % self.every:
            return
        result = self.evaluate()
        with self.writer.as_default(step=step):
            tf.summary.scalar("val/miou", result["miou"])
        self.writer.flush()
        if result["miou"] > self.best:
            self.best = result["miou"]
            path = self.best_manager.save(checkpoint_number=step)
            atomic.write_text_atomic(self.best_file, json.dumps(
                {"step": step, "miou": result["miou"], "checkpoint": os.path.basename(path)}))


class TensorBoardLogger(keras.callbacks.Callback):
    """TensorBoard scalars after every logged epoch (each loss term, learning rate, w^k) and, every
    `image_every` steps, at step 0 and at the last step, pictures of a fixed batch: inputs, labels, predictions
    and, for PIT, the K coarse class-activation maps (the paper's Fig. 3).

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
        self.drawn_at = None  # the step of the last pictures

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

    def on_train_end(self, logs=None):
        # The last step's pictures, whatever --image_every (a run shorter than it would only have step 0's).
        self._maybe_draw(force=True)

    def _maybe_draw(self, force=False):
        step = _step(self.model)
        if not self.image_every or not (force or step % self.image_every == 0) or step == self.drawn_at:
            return
        self.drawn_at = step
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
        teacher = getattr(self.model, "teacher", None)
        if labels is None and teacher is not None:
            # What the student learns on target: the teacher's pseudo-labels, and where they are confident.
            probabilities = self_training.teacher_probabilities(teacher, tf.convert_to_tensor(images, tf.float32),
                                                                self.model.self_training.flip).numpy()
            tf.summary.image(f"{domain}/pseudo_label", visualize.colorize(probabilities.argmax(-1), self.class_set))
            confident = probabilities.max(-1) >= self.model.self_training.threshold
            tf.summary.image(f"{domain}/pseudo_label_confident", visualize.heatmap(confident.astype(np.float32)))
        for k in range(len(self.model.lse_r)):
            cam = outputs[f"cam_{k}"].numpy()
            # Each unit's map: its own per-pixel class decision, and how strongly it fires at all.
            tf.summary.image(f"{domain}/cam_{k}_classes", visualize.colorize(cam.argmax(-1), self.class_set))
            tf.summary.image(f"{domain}/cam_{k}_strength", visualize.heatmap(cam.max(-1)))
