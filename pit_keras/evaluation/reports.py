"""Evaluation results as files and text: the paper's results table, JSON and CSV of every number, and the
confusion matrix as a PNG heat map, each written atomically (and fsynced, so that a power loss cannot leave an
empty results file). Pure numpy and Pillow, without TensorFlow.
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
from pit_keras.evaluation.metrics import counts_of

# Column headers of the paper's Tables 1 and 2, keyed by full class name.
SHORT_NAMES = {
    "road": "road", "sidewalk": "sdwk", "building": "bldng", "wall": "wall", "fence": "fence",
    "pole": "pole", "traffic light": "light", "traffic sign": "sign", "vegetation": "vgttn",
    "terrain": "trrn", "sky": "sky", "person": "person", "rider": "rider", "car": "car", "truck": "truck",
    "bus": "bus", "train": "train", "motorcycle": "mcycl", "bicycle": "bcycl",
}


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
    counts = counts_of(counts).astype(np.float64)
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
