"""Confusion-matrix segmentation metrics: per-class IoU, mIoU and the paper's results table.

Pure numpy (and Pillow for the heat map), so the evaluate CLI, training-time validation and tools share it
without importing TensorFlow.
Conventions follow cityscapesScripts: IoU = TP / (TP + FP + FN) per class, in percent; a class absent from
both truth and prediction has no IoU (NaN) and is left out of the mean. The paper reports SYNTHIA ->
Cityscapes twice, over 16 classes (mIoU) and over the 13 without wall, fence and pole (mIoU*); both come from
one 16-class matrix, so a 13-class evaluation is the "miou13" entry of a 16-class summary.
"""

import csv
import io
import json
import math
import os
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pit_keras import atomic
from pit_keras.data import classes

# Column headers of the paper's Tables 1 and 2, keyed by full class name.
SHORT_NAMES = {
    "road": "road", "sidewalk": "sdwk", "building": "bldng", "wall": "wall", "fence": "fence",
    "pole": "pole", "traffic light": "light", "traffic sign": "sign", "vegetation": "vgttn",
    "terrain": "trrn", "sky": "sky", "person": "person", "rider": "rider", "car": "car", "truck": "truck",
    "bus": "bus", "train": "train", "motorcycle": "mcycl", "bicycle": "bcycl",
}


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


def _counts_of(matrix):
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
    counts = _counts_of(matrix).astype(np.float64)
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
    counts = _counts_of(matrix)
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


def _cell(value):
    """One table cell: a percent with one decimal, "-" for a missing value."""
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def format_table(result):
    """The per-class table in the paper's column order (Table 1 for 19 classes, Table 2 for 16).

    Args:
        result: a dict from `summarize`.

    Returns:
        Two lines: short class names then "mIoU" (and "mIoU*" for 16 classes; as in the paper's Table 2 the
        classes it leaves out are starred), and the values with one decimal, "-" where a class is absent.
    """
    headers, cells = [], []
    with_miou13 = "miou13" in result
    for name in result["classes"]:
        short = SHORT_NAMES.get(name, name)
        headers.append(short + "*" if with_miou13 and name in classes.SYNTHIA13_DROPPED else short)
        cells.append(_cell(result["per_class_iou"][name]))
    headers.append("mIoU")
    cells.append(_cell(result["miou"]))
    if with_miou13:
        headers.append("mIoU*")
        cells.append(_cell(result["miou13"]))
    widths = [max(len(h), len(v)) for h, v in zip(headers, cells)]
    rows = (headers, cells)
    return "\n".join(" ".join(text.rjust(width) for text, width in zip(row, widths)) for row in rows)


def _json_compatible(value):
    """Converts NaN to None and numpy scalars and arrays to Python values, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_compatible(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_compatible(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _write_atomic(path, data):
    """Writes bytes so that readers see the old file or the new one, never a partial one.

    Args:
        path: destination; missing parent folders are created.
        data: the file's bytes.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        # os.open with 0o666 lets the umask set the final permissions (tempfile would force 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic.atomic_write(path, write)


def write_json(result, path):
    """Writes a result atomically: readers see the old file or the new one, never a partial one.

    Args:
        result: a dict from `summarize` (or any JSON-like dict); NaN is written as null.
        path: destination; missing parent folders are created.
    """
    text = json.dumps(_json_compatible(result), indent=2, allow_nan=False) + "\n"
    _write_atomic(path, text.encode("utf-8"))


def write_csv(result, path):
    """Writes the per-class table as CSV, atomically: `class,iou` rows, then `mIoU` (and `mIoU*`) rows.

    IoUs are percent at full precision (the JSON's numbers); an absent class or an undefined mean is an
    empty cell.

    Args:
        result: a dict from `summarize`.
        path: destination; missing parent folders are created.
    """
    def cell(value):
        return "" if value is None or math.isnan(value) else repr(float(value))

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["class", "iou"])
    for name in result["classes"]:
        writer.writerow([name, cell(result["per_class_iou"][name])])
    writer.writerow(["mIoU", cell(result["miou"])])
    if "miou13" in result:
        writer.writerow(["mIoU*", cell(result["miou13"])])
    _write_atomic(path, text.getvalue().encode("utf-8"))


def confusion_image(counts, names, cell=28):
    """A row-normalised confusion-matrix heat map with class names, as a Pillow image.

    Each row (a true class) is divided by its pixel count, so a cell is the share of that class's pixels
    predicted as the column's class, printed in percent where it rounds to at least 1. Rows without labelled
    pixels are grey. An "other" column (predictions outside the classes) is drawn only when it holds pixels.

    Args:
        counts: `[C, C]` or `[C, C + 1]` pixel counts, truth by prediction (see `iou_per_class`).
        names: the C class names.
        cell: side of a cell in pixels.

    Returns:
        An RGB `PIL.Image.Image`.
    """
    counts = _counts_of(counts).astype(np.float64)
    num_classes = counts.shape[0]
    if counts.shape[1] > num_classes and not counts[:, num_classes:].any():
        counts = counts[:, :num_classes]
    columns = list(names) + ["other"] * (counts.shape[1] - num_classes)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(totals > 0, counts / totals, np.nan)

    font = ImageFont.load_default()
    corner = ("truth (rows)", "prediction", "(columns)")
    label_size = max(font.getbbox(text, anchor="lt")[2] for text in columns + list(corner)) + 8
    left = top = 4 + label_size
    image = Image.new("RGB", (left + cell * len(columns) + 4, top + cell * num_classes + 4), "white")
    draw = ImageDraw.Draw(image)
    draw.multiline_text((4, 4), "\n".join(corner), fill="black", font=font)
    for row, name in enumerate(names):
        draw.text((left - 4, top + row * cell + cell // 2), name, fill="black", font=font, anchor="rm")
    # Pillow draws text horizontally only, so each column name is drawn on its own strip and turned upright.
    for col, name in enumerate(columns):
        strip = Image.new("RGB", (label_size - 4, cell), "white")
        ImageDraw.Draw(strip).text((2, cell // 2), name, fill="black", font=font, anchor="lm")
        image.paste(strip.rotate(90, expand=True), (left + col * cell, 4))
    for row in range(num_classes):
        for col in range(len(columns)):
            x, y, share = left + col * cell, top + row * cell, shares[row, col]
            # White to dark blue: the darker the cell, the more of the row's pixels it holds.
            fill = (200, 200, 200) if math.isnan(share) else tuple(
                int(round(255 - share * (255 - c))) for c in (8, 48, 107))
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fill, outline=(225, 225, 225))
            if not math.isnan(share) and round(100 * share) >= 1:
                draw.text((x + cell // 2, y + cell // 2), str(round(100 * share)), font=font, anchor="mm",
                          fill="white" if share > 0.5 else "black")
    return image


def results_paths(json_path):
    """The files `write_results` writes for a results JSON path: (json, csv, png).

    `eval_val.json` gives `eval_val.csv` and `eval_val_confusion.png` beside it.
    """
    json_path = os.fspath(json_path)
    stem = json_path[: -len(".json")] if json_path.endswith(".json") else json_path
    return json_path, stem + ".csv", stem + "_confusion.png"


def write_results(result, json_path):
    """Writes a result as JSON, the per-class CSV and the confusion heat map PNG, each atomically.

    Args:
        result: a dict from `summarize` (the heat map needs its `"confusion_matrix"`).
        json_path: the JSON's path; the others are named after it (`results_paths`).

    Returns:
        The (json, csv, png) paths written.
    """
    paths = results_paths(json_path)
    write_json(result, paths[0])
    write_csv(result, paths[1])
    png = io.BytesIO()
    confusion_image(result["confusion_matrix"], result["classes"]).save(png, format="PNG")
    _write_atomic(paths[2], png.getvalue())
    return paths


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
