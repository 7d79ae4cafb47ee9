"""Confusion-matrix segmentation metrics: per-class IoU, mIoU, pixel accuracy (the results files: `reports.py`).

Pure numpy, so the evaluate CLI, training-time validation and tools share it
without importing TensorFlow.
Conventions follow cityscapesScripts: IoU = TP / (TP + FP + FN) per class, in percent; a class absent from
both truth and prediction has no IoU (NaN) and is left out of the mean. The paper reports SYNTHIA ->
Cityscapes twice, over 16 classes (mIoU) and over the 13 without wall, fence and pole (mIoU*); both come from
one 16-class matrix, so a 13-class evaluation is the "miou13" entry of a 16-class summary.
"""

import math

import numpy as np

from pit_keras.data import classes

class ConfusionMatrix:
    """Accumulates a confusion matrix over images (rows: truth, columns: prediction).

    Pixels whose truth is `ignore_index` or outside `[0, num_classes)` are skipped. A prediction outside
    `[0, num_classes)` on a labelled pixel is wrong but belongs to no class: it is counted in a hidden extra
    column, so it lowers the IoU of the true class (as a false negative) without adding a false positive to
    any class. `matrix` leaves that column out; `full_matrix`, `iou_per_class(cm)` and `summarize` include it.

    Args:
        num_classes: number of classes C.
        ignore_index: truth value of unlabelled pixels.

    Attributes:
        num_classes: C.
        ignore_index: as given.
        num_images: images added so far (a `[B, H, W]` update adds B).
    """

    def __init__(self, num_classes, ignore_index=classes.IGNORE_INDEX):
        if int(num_classes) < 1:
            raise ValueError(f"ConfusionMatrix needs at least one class, got num_classes={num_classes}.")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.num_images = 0
        self._counts = np.zeros((self.num_classes, self.num_classes + 1), np.int64)

    def update(self, labels, predictions):
        """Adds one image `[H, W]` or a batch `[B, H, W]`.

        Args:
            labels: integer array of truth train ids.
            predictions: integer array of predicted train ids, same shape as `labels`.

        Raises:
            ValueError: if the shapes differ or are neither `[H, W]` nor `[B, H, W]`.
            TypeError: if either array is not of an integer type.
        """
        labels = np.asarray(labels)
        predictions = np.asarray(predictions)
        if labels.shape != predictions.shape:
            raise ValueError(
                f"Labels of shape {labels.shape} and predictions of shape {predictions.shape} differ; "
                "upsample the predictions to the label resolution first.")
        if labels.ndim not in (2, 3):
            raise ValueError(
                f"Expected labels and predictions of shape [H, W] or [B, H, W], got {labels.shape}.")
        for name, array in (("labels", labels), ("predictions", predictions)):
            if not np.issubdtype(array.dtype, np.integer):
                raise TypeError(f"The {name} must be an integer array of class ids, got dtype {array.dtype}.")
        num_images = 1 if labels.ndim == 2 else labels.shape[0]
        # Widening first keeps the comparisons (e.g. uint8 against ignore_index=-1) and the flat index below
        # free of overflow.
        labels = labels.astype(np.int64, copy=False).reshape(-1)
        predictions = predictions.astype(np.int64, copy=False).reshape(-1)
        c = self.num_classes
        labelled = (labels >= 0) & (labels < c) & (labels != self.ignore_index)
        truth = labels[labelled]
        predicted = predictions[labelled]
        predicted = np.where((predicted >= 0) & (predicted < c), predicted, c)
        self._counts += np.bincount(truth * (c + 1) + predicted, minlength=c * (c + 1)).reshape(c, c + 1)
        self.num_images += num_images

    @property
    def matrix(self):
        """`[C, C]` int64 counts, truth by prediction, without the out-of-range-prediction column."""
        return self._counts[:, : self.num_classes].copy()

    @property
    def full_matrix(self):
        """`[C, C + 1]` int64 counts; the last column counts predictions outside `[0, C)`."""
        return self._counts.copy()


def counts_of(matrix):
    """Returns the `[C, C]` or `[C, C + 1]` counts of a ConfusionMatrix or an array, checking the shape."""
    counts = matrix.full_matrix if isinstance(matrix, ConfusionMatrix) else np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[1] not in (counts.shape[0], counts.shape[0] + 1):
        raise ValueError(f"Expected a confusion matrix of shape [C, C] or [C, C + 1], got {counts.shape}.")
    return counts


def iou_per_class(matrix):
    """Intersection over union of every class, in percent.

    Args:
        matrix: a `ConfusionMatrix`, or counts `[C, C]` (truth by prediction) or `[C, C + 1]` whose last
            column counts predictions outside the classes (false negatives of the row's class only).

    Returns:
        float64 `[C]`: 100 * TP / (TP + FP + FN); NaN where TP + FP + FN == 0, i.e. the class is absent from
        both truth and prediction.
    """
    counts = counts_of(matrix).astype(np.float64)
    c = counts.shape[0]
    tp = np.diagonal(counts)
    fn = counts.sum(axis=1) - tp
    fp = counts[:, :c].sum(axis=0) - tp
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, 100.0 * tp / union, np.nan)


def mean_iou(ious, class_indices=None):
    """Mean of the IoUs that exist (NaN ones are left out), in percent.

    Args:
        ious: per-class IoUs, as `iou_per_class` returns.
        class_indices: indices of the classes to average; all classes if None.

    Returns:
        The mean as a Python float; NaN if no selected class has an IoU.
    """
    ious = np.asarray(ious, np.float64)
    if class_indices is not None:
        ious = ious[np.asarray(class_indices, np.int64)]
    present = ious[~np.isnan(ious)]
    # Checked explicitly because np.nanmean warns on an all-NaN slice.
    return float(present.mean()) if present.size else math.nan


def pixel_accuracy(matrix):
    """Share of labelled pixels predicted correctly, in percent.

    Args:
        matrix: as for `iou_per_class`.

    Returns:
        100 * trace / labelled pixels as a Python float; NaN if no pixel was labelled.
    """
    counts = counts_of(matrix)
    total = counts.sum()
    return float(100.0 * np.trace(counts) / total) if total else math.nan


def _indices_without_dropped(class_set):
    """Indices of the 13 classes of mIoU* inside a 16-class set."""
    return [i for i, name in enumerate(class_set.names) if name not in classes.SYNTHIA13_DROPPED]


def summarize(cm, class_set):
    """The evaluation result of one run, as the evaluate CLI prints and writes it.

    Args:
        cm: a filled `ConfusionMatrix`.
        class_set: the `classes.ClassSet` the matrix was counted in.

    Returns:
        `{"miou", "per_class_iou", "pixel_accuracy", "num_images", "classes", "confusion_matrix"}` and, for
        SYNTHIA16, `"miou13"` (mIoU* of the paper: without wall, fence and pole). Percent values are unrounded
        floats; mIoUs may be NaN, per-class IoUs of absent classes are None. `"confusion_matrix"` is the
        `[C][C + 1]` pixel counts (rows truth, columns prediction; the last column counts predictions outside
        the classes), enough to recompute every number.

    Raises:
        ValueError: if the matrix and the class set disagree on the number of classes.
    """
    if cm.num_classes != class_set.num_classes:
        raise ValueError(f"The confusion matrix has {cm.num_classes} classes but class set "
                         f"{class_set.name!r} has {class_set.num_classes}.")
    ious = iou_per_class(cm)
    result = {"miou": mean_iou(ious)}
    if class_set.name == classes.SYNTHIA16.name:
        result["miou13"] = mean_iou(ious, _indices_without_dropped(class_set))
    result.update({
        "per_class_iou": {name: (None if np.isnan(iou) else float(iou))
                          for name, iou in zip(class_set.names, ious)},
        "pixel_accuracy": pixel_accuracy(cm),
        "num_images": int(cm.num_images),
        "classes": list(class_set.names),
        "confusion_matrix": cm.full_matrix.tolist(),
    })
    return result


def class_set_for(num_classes):
    """The class set an evaluation with `--classes N` counts in.

    Args:
        num_classes: 19 (GTA5 -> Cityscapes), 16 or 13 (SYNTHIA -> Cityscapes; 13 is read off the 16-class
            matrix).

    Returns:
        `classes.CITYSCAPES19` or `classes.SYNTHIA16`.

    Raises:
        ValueError: for any other count.
    """
    if num_classes == 19:
        return classes.CITYSCAPES19
    if num_classes in (16, 13):
        return classes.SYNTHIA16
    raise ValueError(f"Cannot evaluate {num_classes} classes; use 19 (GTA5), 16 or 13 (SYNTHIA).")


def select_miou(result, num_classes):
    """The headline mIoU of a `--classes N` evaluation.

    Args:
        result: a dict from `summarize`.
        num_classes: 19, 16 or 13.

    Returns:
        `result["miou13"]` for 13, else `result["miou"]`.

    Raises:
        ValueError: for an unsupported count, or a result counted in a different class set.
    """
    expected = class_set_for(num_classes).num_classes
    if len(result["classes"]) != expected:
        raise ValueError(f"A {num_classes}-class mIoU needs a {expected}-class result, "
                         f"got one with {len(result['classes'])} classes.")
    return result["miou13"] if num_classes == 13 else result["miou"]
