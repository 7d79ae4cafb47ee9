"""Evaluation on a labelled target split: confusion-matrix IoU of a network's predictions or of saved label PNGs.

Truth is read as the 19 Cityscapes train ids; truth and predictions are both mapped into the class set being
scored (`LabelSpace`), so a 19-class network or 19-class PNGs can be scored over SYNTHIA's 16 classes.
Predictions are compared at label resolution: a network's logits are upsampled bilinearly before the argmax;
saved predictions must already have the label's size. Scoring saved predictions needs numpy and Pillow only.
"""

import collections
import dataclasses
import os
import sys

import numpy as np
from PIL import Image, UnidentifiedImageError

from pit_keras.evaluation import metrics
from pit_keras.data import classes
from pit_keras.data import folder as folder_layout
from pit_keras.data.cityscapes import IMAGE_SUFFIX
from pit_keras.data.images import OUTPUT_SUFFIXES
from pit_keras.errors import UserError

OVERLAY_SUFFIX = OUTPUT_SUFFIXES[1]  # predict's colour overlays, beside its label PNGs


@dataclasses.dataclass(frozen=True)
class LabelSpace:
    """How truth and predictions reach the class set the confusion matrix is counted in.

    Build it with `label_space`.

    Args:
        num_classes: the classes asked for: 19, 16 or 13 (13 is read off the 16-class matrix as mIoU*).
        prediction_classes: the train-id space of the predictions: 19 (Cityscapes) or 16 (SYNTHIA).
        class_set: the `classes.ClassSet` counted in.
        label_lut: `[256]` look-up table from the truth (19 Cityscapes train ids) to `class_set`; None if the
            truth is already read in `class_set`.
        prediction_lut: `[256]` look-up table from predictions to `class_set`, None if they are the same.
    """

    num_classes: int
    prediction_classes: int
    class_set: classes.ClassSet
    label_lut: np.ndarray = None
    prediction_lut: np.ndarray = None

    def labels(self, train_ids):
        """19-class truth `[H, W]` -> ids in `class_set` (255 where ignored or outside it)."""
        return train_ids if self.label_lut is None else self.label_lut[train_ids]

    def predictions(self, ids):
        """Predicted ids in `prediction_classes` -> ids in `class_set`; a 19-class prediction of a class the
        set lacks (terrain, truck, train for 16) becomes 255, a miss of the true class."""
        return ids if self.prediction_lut is None else self.prediction_lut[ids]


def label_space(num_classes, prediction_classes=19):
    """The `LabelSpace` of a `--classes` evaluation of predictions in `prediction_classes` train ids.

    Args:
        num_classes: 19, 16 or 13.
        prediction_classes: 19 or 16.

    Raises:
        ValueError: for other counts, or 16-class predictions scored over 19 classes.
    """
    class_set = metrics.class_set_for(num_classes)
    if prediction_classes not in classes.CLASS_SETS_BY_COUNT:
        raise ValueError(f"Predictions must be in 19 or 16 train ids, not {prediction_classes}.")
    if prediction_classes < class_set.num_classes:
        raise ValueError(f"{prediction_classes}-class predictions cannot be scored over {num_classes} classes; "
                         f"score them over 16 or 13.")
    to16 = classes.train19_to_train16()
    return LabelSpace(
        num_classes=num_classes, prediction_classes=prediction_classes, class_set=class_set,
        label_lut=to16 if class_set.num_classes == 16 else None,
        prediction_lut=to16 if prediction_classes != class_set.num_classes else None)


def _progress(index, total, enabled):
    # Whole lines rather than one rewritten line, so an error met halfway starts on a line of its own.
    if enabled and (index % 50 == 0 or index == total):
        print(f"evaluated {index}/{total} images", file=sys.stderr, flush=True)


def network_confusion(network, pairs, reader, space, input_size, progress=True):
    """The confusion matrix of the fine output of `network` on (image, label) pairs.

    Args:
        network: a PIT network (or any model with a `"seg"` layer giving logits at the input size) whose
            classes are `space.prediction_classes`.
        pairs: (image path, label path) pairs.
        reader: `reader(label path) -> [H, W]` 19-class train ids.
        space: the `LabelSpace` to count in.
        input_size: (W, H) the images are resized to before the network, as in training.
        progress: print a progress line to stderr.

    Returns:
        A filled `metrics.ConfusionMatrix` over `space.class_set`.
    """
    # Imported here so that scoring saved predictions starts in a second, without TensorFlow.
    import tensorflow as tf

    from pit_keras.data import pipeline
    from pit_keras.models.network import fine_segmenter

    segmenter = fine_segmenter(network)

    @tf.function(reduce_retracing=True)
    def predict(image, label_shape):
        logits = segmenter(image[None], training=False)
        logits = tf.image.resize(logits, label_shape, method="bilinear")
        return tf.math.argmax(logits[0], axis=-1, output_type=tf.int32)

    matrix = metrics.ConfusionMatrix(space.class_set.num_classes)
    for index, (image, label) in enumerate(pipeline.evaluation_dataset(pairs, reader, input_size), start=1):
        prediction = predict(image, tf.shape(label))
        matrix.update(space.labels(label.numpy()), space.predictions(prediction.numpy()))
        _progress(index, len(pairs), progress)
    return matrix


def evaluate(network, pairs, reader, class_set, input_size, progress=True):
    """Evaluates a network in its own class set, on labels already read in that set (training-time validation).

    Args:
        network: as for `network_confusion`, predicting `class_set`.
        pairs, input_size, progress: as for `network_confusion`.
        reader: `reader(label path) -> [H, W]` ids in `class_set` (`datasets.target_pairs(..., num_classes)`).
        class_set: the network's `classes.ClassSet`.

    Returns:
        The `metrics.summarize` dict (percent IoUs, mIoU, number of images).
    """
    space = LabelSpace(class_set.num_classes, class_set.num_classes, class_set)
    return metrics.summarize(network_confusion(network, pairs, reader, space, input_size, progress), class_set)


def _starts_with_stem(name, stem):
    # The stem ends at a separator: "frame_1" does not match frame_10.png.
    return name.startswith(stem) and not name[len(stem):len(stem) + 1].isalnum()


def find_predictions(pairs, predictions_dir, image_dir=None):
    """The saved prediction of every image, as cityscapesScripts finds them.

    For `ROOT/leftImg8bit/SPLIT/CITY/NAME_leftImg8bit.png` the prediction is `PRED/CITY/NAME_leftImg8bit.png`
    if that file exists; otherwise it is the one `.png` anywhere under PRED whose name starts with NAME
    (`CITY_SSSSSS_FFFFFF`) followed by a non-alphanumeric character or nothing. For an image of a folder layout
    (`image_dir/REL/NAME.jpg`) `PRED/REL/NAME.png` and `PRED/REL/NAME_labelTrainIds.png` are tried first; a
    NAME that more than one sub-folder holds is then looked for in PRED/REL only (another's prediction would
    score it). `predict`'s colour overlays (`*_overlay.png`) are never predictions.

    Args:
        pairs: (image path, label path) pairs of a Cityscapes-layout split, or of a folder layout.
        predictions_dir: PRED.
        image_dir: the images folder of a folder layout (`DIR/val/images`), None for the Cityscapes layout.

    Returns:
        One prediction path per pair, in order.

    Raises:
        UserError: PRED is not a folder, or an image has no prediction or several.
    """
    if not os.path.isdir(predictions_dir):
        raise UserError(f"--predictions_dir={predictions_dir}: no such folder.")
    candidates = None
    found, missing = [], []
    repeated = set()  # names that several sub-folders of a folder layout hold
    if image_dir is not None:
        counts = collections.Counter(_stem(os.path.basename(image)) for image, _ in pairs)
        repeated = {stem for stem, count in counts.items() if count > 1}
    for image, _ in pairs:
        name = os.path.basename(image)
        mirror = os.path.join(predictions_dir, os.path.basename(os.path.dirname(image)), name)
        stem = _stem(name)
        scope = None  # where the prefix match looks: anywhere under PRED, or PRED/REL for a repeated name
        if image_dir is not None:
            mirrors = folder_layout.prediction_candidates(image, image_dir, predictions_dir)
            mirror = next((path for path in mirrors if os.path.isfile(path)), mirrors[0])
            scope = os.path.dirname(mirrors[0]) if stem in repeated else None
        if os.path.isfile(mirror):
            found.append(mirror)
            continue
        if candidates is None:  # walked once, and only when some prediction is not at its mirrored path
            candidates = sorted(os.path.join(folder, f) for folder, _, files in os.walk(predictions_dir)
                                for f in files if f.lower().endswith(".png") and not f.endswith(OVERLAY_SUFFIX))
        matches = [path for path in candidates if _starts_with_stem(os.path.basename(path), stem)
                   and scope in (None, os.path.dirname(path))]
        if len(matches) > 1:
            raise UserError(f"{image} has {len(matches)} predictions under {predictions_dir} "
                            f"({', '.join(matches[:3])}{', ...' if len(matches) > 3 else ''}); keep one.")
        if matches:
            found.append(matches[0])
        else:
            missing.append((image, mirror, stem, scope or predictions_dir))
    if missing:
        image, mirror, stem, where = missing[0]
        raise UserError(f"{image} has no prediction: expected {mirror} or one {stem}*.png under "
                        f"{where} ({len(missing)} of {len(pairs)} images have none).")
    return found


def _stem(name):
    return name[: -len(IMAGE_SUFFIX)] if name.endswith(IMAGE_SUFFIX) else os.path.splitext(name)[0]


def read_prediction(path, label_shape, num_classes):
    """Reads a saved prediction: an 8-bit single-channel PNG of train ids at label resolution.

    Args:
        path: the PNG.
        label_shape: (H, W) of its label.
        num_classes: the train-id space (ids 0..num_classes-1, and 255 for "no class").

    Returns:
        `[H, W]` uint8 ids.

    Raises:
        UserError: unreadable, not 8-bit single-channel, of another size, or holding ids outside the space.
    """
    try:
        with Image.open(path) as png:
            if png.mode not in ("L", "P"):
                raise UserError(f"{path}: expected an 8-bit single-channel PNG of train ids, got mode "
                                f"{png.mode}.")
            # Compared before decoding, so a wrong file is refused without reading its pixels.
            if png.size != (label_shape[1], label_shape[0]):
                raise UserError(f"{path} is {png.size[0]}x{png.size[1]} but its label is {label_shape[1]}x"
                                f"{label_shape[0]}; predictions must be saved at label resolution.")
            ids = np.asarray(png)
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"{path}: cannot be read as a PNG ({err}).") from None
    invalid = (ids >= num_classes) & (ids != classes.IGNORE_INDEX)
    if invalid.any():
        raise UserError(f"{path} holds id {int(ids[invalid][0])}, not a {num_classes}-class train id (0 to "
                        f"{num_classes - 1}, or 255); predictions must be train ids, not label ids.")
    return ids


def predictions_confusion(pairs, reader, prediction_paths, space, progress=True):
    """The confusion matrix of saved predictions (see `find_predictions` and `read_prediction`).

    Args:
        pairs: (image path, label path) pairs.
        reader: `reader(label path) -> [H, W]` 19-class train ids.
        prediction_paths: one prediction PNG per pair, in `space.prediction_classes` train ids.
        space: the `LabelSpace` to count in.
        progress: print a progress line to stderr.

    Returns:
        A filled `metrics.ConfusionMatrix` over `space.class_set`.
    """
    matrix = metrics.ConfusionMatrix(space.class_set.num_classes)
    for index, ((_, label_path), path) in enumerate(zip(pairs, prediction_paths), start=1):
        label = reader(label_path)
        prediction = read_prediction(path, label.shape, space.prediction_classes)
        matrix.update(space.labels(label), space.predictions(prediction))
        _progress(index, len(pairs), progress)
    return matrix


def predictor_confusion(predictor, pairs, reader, space, progress=True):
    """The confusion matrix of a deployed model (`predictors.Predictor`: SavedModel or .tflite) on (image,
    label) pairs; its labels come at the image's size and are brought to the label's by nearest neighbour
    when the two differ.

    Args:
        predictor: maps a uint8 image to train ids in `space.prediction_classes`.
        pairs, reader, space, progress: as for `predictions_confusion`.

    Returns:
        A filled `metrics.ConfusionMatrix` over `space.class_set`.
    """
    from pit_keras.data import images

    matrix = metrics.ConfusionMatrix(space.class_set.num_classes)
    for index, (image_path, label_path) in enumerate(pairs, start=1):
        label = reader(label_path)
        prediction = np.asarray(predictor(images.read_image(image_path)))
        if prediction.shape != label.shape:
            rows = (np.arange(label.shape[0]) * prediction.shape[0] // label.shape[0])[:, None]
            cols = (np.arange(label.shape[1]) * prediction.shape[1] // label.shape[1])[None, :]
            prediction = prediction[rows, cols]
        matrix.update(space.labels(label), space.predictions(prediction))
        _progress(index, len(pairs), progress)
    return matrix


EXPORT_METADATA = "metadata.json"  # what marks an export folder (`python -m pit_keras.export --output_dir`)


def export_folder(path):
    """The export folder that `path` is or lies in (the nearest folder holding metadata.json, the path itself
    or up to three folders above it: a SavedModel sits at OUTPUT/saved_model/pit/VERSION), or None."""
    current = os.path.abspath(path)
    if not os.path.isdir(current):
        current = os.path.dirname(current)
    for _ in range(4):
        if os.path.isfile(os.path.join(current, EXPORT_METADATA)):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return None


def run_output(model_dir, split, config, checkpoint="last", target=None, root=None):
    """The default results JSON of a run's evaluation (`evaluate --model_dir`): MODEL_DIR/eval_SPLIT.json for
    its last checkpoint on its own target (the file training writes at its end), with `_best` for the best
    checkpoint and `_TARGET_ROOTNAME` for another labelled set (`target` at `root`), so that neither replaces
    the training's own."""
    name = f"eval_{split}" + ("_best" if checkpoint == "best" else "")

    def where(folder):
        return os.path.abspath(folder) if folder else None

    if target is not None and (target, where(root)) != (config.target, where(config.target_root)):
        name += f"_{target}" + (f"_{os.path.basename(os.path.normpath(root))}" if root else "")
    return os.path.join(model_dir, name + ".json")


def deployed_output(path, split):
    """The default results JSON of a deployed model (`evaluate --saved_model/--tflite`), never inside its export
    folder (which `export --overwrite` replaces and a server reads): beside the folder, named
    EXPORT_REL_eval_SPLIT.json (REL: the model's path inside it, "_"-joined, without .tflite; nothing for the
    folder itself). A model outside any export folder gets MODEL_eval_SPLIT.json beside it."""
    path = os.path.abspath(path)
    base = path[: -len(".tflite")] if path.endswith(".tflite") else path
    export = export_folder(path)
    if export is None:
        return f"{base}_eval_{split}.json"
    relative = os.path.relpath(base, export)
    name = os.path.basename(export) + ("" if relative == os.curdir else "_" + relative.replace(os.sep, "_"))
    return os.path.join(os.path.dirname(export), f"{name}_eval_{split}.json")


def check_output_outside_export(output, model_path):
    """Refuses a results path inside the export folder of the model scored (one sentence, naming --output)."""
    export = export_folder(model_path)
    if export is None:
        return
    if os.path.commonpath([os.path.realpath(output), os.path.realpath(export)]) == os.path.realpath(export):
        raise UserError(f"--output={output} lies inside the export folder {export}, which export --overwrite "
                        "replaces; write the results outside it (the default is beside it).")
