"""Loading and running a trained segmenter, whatever form it ships in: a training run folder (Keras network and
its newest checkpoint), an exported SavedModel, or a `.tflite` model run by LiteRT.

Every kind is wrapped in a `Predictor` that maps one uint8 RGB image `[H, W, 3]` of any size to train ids
`[H, W]` at that size, so `predict`, the export tests and the benchmark treat them alike. The Keras predictor
runs the very function that the export saves (`serving_function`), so a SavedModel and its run give the
same labels by construction, and the tests check that they do after the round trip through disk.
"""

import json
import os
import re

import numpy as np
from PIL import Image

from pit_keras import console, runs
from pit_keras.data import classes
from pit_keras.data.images import OUTPUT_SUFFIXES, read_image
from pit_keras.deploy import resize
from pit_keras.deploy.serving import serving_function, serving_signature
from pit_keras.errors import UserError

METADATA_FILE = "metadata.json"
SAVED_MODEL_SUBDIR = os.path.join("saved_model", "pit")


def checkpoint_step(checkpoint_path):
    """The training step of a checkpoint (the trainer numbers checkpoints by step: `ckpt-STEP`)."""
    match = re.search(r"-(\d+)$", checkpoint_path)
    return int(match.group(1)) if match else None


def load_segmenter(model_dir, aspp_implementation="matmul"):
    """The fine segmenter of a training run at its newest checkpoint (`runs.load_run`).

    Args:
        model_dir: a training run folder (`run.json` and `checkpoints/`).
        aspp_implementation: how ASPP heads compute (`heads.ASPPClassifier`; the same function and weights).

    Returns:
        `(segmenter, config, checkpoint path)`; the segmenter maps float RGB `[B, H, W, 3]` in [0, 255] to
        logits at the input size, without the coarse units; the config is the run's `RunConfig`.
    """
    from pit_keras.models.network import fine_segmenter

    run = runs.load_run(model_dir, aspp_implementation=aspp_implementation)
    return fine_segmenter(run.network), run.config, run.checkpoint


def find_metadata(path):
    """The export's `metadata.json` for a model path inside an export folder, or None.

    Looks beside the path and up to three folders above it (a SavedModel sits at
    `OUTPUT/saved_model/pit/VERSION/`).
    """
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    for _ in range(4):
        candidate = os.path.join(folder, METADATA_FILE)
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return json.load(f)
        folder = os.path.dirname(folder)
    return None


class Predictor:
    """Maps a uint8 RGB image `[H, W, 3]` to train ids `[H, W]` (int32) at the image's size.

    Attributes:
        class_set: the label space the ids index (`classes.ClassSet`), for palettes.
        kind: "model_dir", "saved_model" or "tflite".
    """

    kind = None

    def __init__(self, class_set):
        self.class_set = class_set

    def __call__(self, image):
        raise NotImplementedError


class KerasPredictor(Predictor):
    """A training run's network at its newest checkpoint, through the export's serving function."""

    kind = "model_dir"

    def __init__(self, model_dir):
        import tensorflow as tf

        segmenter, config, self.checkpoint = load_segmenter(model_dir)
        super().__init__(config.classes)
        self.serve = tf.function(serving_function(segmenter, config.target_size),
                                 input_signature=[serving_signature()])

    def __call__(self, image):
        return self.serve(image[None])["labels"][0].numpy()


class SavedModelPredictor(Predictor):
    """An exported SavedModel's `serving_default` signature."""

    kind = "saved_model"

    def __init__(self, path, class_set=None):
        import tensorflow as tf

        signatures = tf.saved_model.load(path).signatures
        if "serving_default" not in signatures:
            raise UserError(f"{path}: the SavedModel has no serving_default signature (not a pit_keras export?).")
        self.signature = signatures["serving_default"]
        probabilities = self.signature.structured_outputs.get("probabilities")
        super().__init__(class_set or class_set_of(path, probabilities is not None and probabilities.shape[-1]))

    def __call__(self, image):
        return self.signature(images=image[None])["labels"][0].numpy()


class TFLitePredictor(Predictor):
    """A `.tflite` model in LiteRT. Its input size is fixed, so images are resized to it bilinearly, and its
    logits are resized back bilinearly before the argmax (as the SavedModel does), both in numpy (`resize`):
    a `.tflite` model runs without TensorFlow.

    Reads the export's layout (one `logits` output; uint8 input, or float32 pixels for `gpu_float16`) and the
    older one (`labels` and, but for int8, `probabilities`).
    """

    kind = "tflite"

    def __init__(self, path, class_set=None, num_threads=None, xnnpack=True):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            with console.quiet_stderr():  # LiteRT's "Created TensorFlow Lite XNNPACK delegate" line
                self.interpreter = Interpreter(model_path=path, num_threads=num_threads,
                                               experimental_op_resolver_type=resolver)
                self.interpreter.allocate_tensors()  # where LiteRT applies its default delegate
                self.runner = self.interpreter.get_signature_runner()
        except ValueError as err:
            raise UserError(f"{path}: not a valid .tflite model ({err}).") from None
        details = self.runner.get_input_details()["images"]
        self.input_height, self.input_width = (int(d) for d in details["shape"][1:3])
        self.input_dtype = details["dtype"]
        outputs = self.runner.get_output_details()
        self.outputs = set(outputs)
        scores = outputs.get("logits", outputs.get("probabilities"))
        super().__init__(class_set or class_set_of(path, scores is not None and int(scores["shape"][-1])))

    def run(self, image):
        """Runs the model on an image already at its input size; returns the dict of outputs (batch of 1)."""
        return self.runner(images=image[None].astype(self.input_dtype))

    def __call__(self, image):
        height, width = image.shape[:2]
        fixed = (self.input_height, self.input_width)
        resized = image
        if (height, width) != fixed:
            resized = np.round(resize.bilinear(image, fixed)).astype(np.uint8)
        outputs = self.run(resized)
        scores = outputs.get("logits", outputs.get("probabilities"))
        if scores is None:
            labels = outputs["labels"][0]
            if (height, width) == fixed:
                return labels
            return resize.nearest(labels, (height, width))
        if (height, width) != fixed:
            scores = resize.bilinear(scores[0], (height, width))[None]
        return np.argmax(scores[0], axis=-1).astype(np.int32)


def load_predictor(path, num_threads=None, xnnpack=True, flag="model"):
    """The predictor of a model path.

    Args:
        path: a training run folder (with `run.json`), a SavedModel folder (with `saved_model.pb`), an export
            folder (its newest `saved_model/pit/VERSION/` is used) or a `.tflite` file.
        num_threads: LiteRT interpreter threads (None: its default).
        xnnpack: run `.tflite` models with LiteRT's default XNNPACK delegate (False: its builtin kernels only).
        flag: the command's flag that named `path`, for the error.

    Raises:
        UserError: if the path is none of these.
    """
    if os.path.isfile(path) and path.endswith(".tflite"):
        return TFLitePredictor(path, num_threads=num_threads, xnnpack=xnnpack)
    if os.path.isfile(os.path.join(path, runs.RUN_FILE)):
        return KerasPredictor(path)
    saved_model = path
    versions_dir = os.path.join(path, SAVED_MODEL_SUBDIR)
    if os.path.isdir(versions_dir):
        versions = [v for v in os.listdir(versions_dir) if v.isdigit()]
        if versions:
            saved_model = os.path.join(versions_dir, max(versions, key=int))
    if os.path.isfile(os.path.join(saved_model, "saved_model.pb")):
        return SavedModelPredictor(saved_model)
    raise UserError(f"--{flag}={path}: not a training run folder, a SavedModel, an export folder or a .tflite "
                    "file.")


def class_set_of(path, num_classes=None):
    """The label space of an exported model at `path` that predicts `num_classes` classes (None or False:
    unknown, as for a model with a labels output only): its export's `metadata.json`, unless that names
    another number of classes (a model copied out of its export folder, beside another's); else the class set
    of that many classes; else Cityscapes' 19.

    Raises:
        UserError: for a number of classes no class set has.
    """
    metadata = find_metadata(path)
    if metadata is not None:
        named = classes.CLASS_SETS[metadata["class_set"]]
        if not num_classes or len(named.names) == num_classes:
            return named
    if not num_classes:
        return classes.CITYSCAPES19
    if num_classes not in classes.CLASS_SETS_BY_COUNT:
        raise UserError(f"{path}: the model predicts {num_classes} classes; pit_keras models predict "
                        f"{' or '.join(str(n) for n in sorted(classes.CLASS_SETS_BY_COUNT, reverse=True))}.")
    return classes.CLASS_SETS_BY_COUNT[num_classes]


def predict_files(predictor, images, output_dir, alpha=0.5, progress=True, names=None):
    """Writes `NAME_labelTrainIds.png` (8-bit Cityscapes train ids, 255 for none; a 16-class SYNTHIA model's
    classes as their Cityscapes ids, so `evaluate --predictions_dir` reads them by default) and `NAME_overlay.png`
    (palette colours over the image) into `output_dir` for each image, going on past images that cannot be
    read.

    Args:
        predictor: a `Predictor`.
        images: image file paths (`list_images`).
        output_dir: created if missing.
        alpha: opacity of the colours in the overlay.
        progress: show the count of images for more than one image (`console.ProgressLine`).
        names: `{image: NAME}` (`output_names`; NAME may hold sub-folders, created as needed); default the file
            name without its extension.

    Returns:
        `(written, failed, seconds)`: the paths written, two per image; `(image, reason)` for each image that
        could not be read (named on a line of its own as it is met); the seconds each segmented image took to
        read, segment and write (the first includes what the predictor does once: imports, warm-up).
    """
    import time

    from pit_keras import atomic, visualize

    os.makedirs(output_dir, exist_ok=True)
    line = None
    if progress and len(images) > 1:
        line = console.ProgressLine(len(images), "image", every=max(10, -(-len(images) // 10)))
    written, failed, seconds = [], [], []
    # A 16-class SYNTHIA model's ids written as their Cityscapes train ids, as the file name says.
    to_cityscapes = classes.train16_to_train19() if predictor.class_set is classes.SYNTHIA16 else None
    for index, path in enumerate(images, start=1):
        start = time.perf_counter()
        try:
            image = read_image(path)
        except UserError as err:
            failed.append((path, str(err)))
            console.message(f"skipped {err}" if str(err).startswith(path) else f"skipped {path}: {err}")
        else:
            labels = np.asarray(predictor(image)).astype(np.uint8)
            if to_cityscapes is not None:
                labels = to_cityscapes[labels]
            name = (names or {}).get(path) or os.path.splitext(os.path.basename(path))[0]
            label_path, overlay_path = (os.path.join(output_dir, name + suffix) for suffix in OUTPUT_SUFFIXES)
            os.makedirs(os.path.dirname(label_path), exist_ok=True)
            atomic.atomic_write(label_path, lambda tmp: Image.fromarray(labels).save(tmp, format="PNG"))
            colours = visualize.overlay(image, visualize.colorize(labels, classes.CITYSCAPES19), alpha)
            atomic.atomic_write(overlay_path, lambda tmp: Image.fromarray(colours).save(tmp, format="PNG"))
            written += [label_path, overlay_path]
            seconds.append(time.perf_counter() - start)
        if line is not None:
            line.update(index)
    if line is not None:
        line.close()
    return written, failed, seconds


def speed(seconds, unit, model_seconds=None):
    """How fast the frames went, from each one's seconds: frames per second over all but the first, whose time
    (the predictor's imports and warm-up, paid once) is given on its own; `model_seconds`, those in the model
    alone, likewise."""
    if len(seconds) == 1:
        return f"in {seconds[0]:.2f} s (one {unit}, start-up included)"
    rate = f"at {(len(seconds) - 1) / max(sum(seconds[1:]), 1e-9):.1f} frames per second"
    if model_seconds:
        rate += f" ({(len(model_seconds) - 1) / max(sum(model_seconds[1:]), 1e-9):.1f} in the model alone)"
    return f"{rate} after the first {unit}, which took {seconds[0]:.2f} s with start-up"
