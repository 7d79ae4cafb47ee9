"""Target image-level labels y_t: from a JSON file (the regressor's output) or from ground truth (the weakly
supervised setting of the paper's Table 5).

The JSON maps each image path relative to the target root to C non-negative floats summing to 1.
"""

import json
import os

import numpy as np

from pit_keras import atomic
from pit_keras.errors import UserError


def shares(train_ids, num_classes):
    """Class shares of the labelled pixels of one `[H, W]` train-id map (zeros if none is labelled)."""
    counts = np.bincount(train_ids[train_ids < num_classes].ravel(), minlength=num_classes)[:num_classes]
    total = counts.sum()
    return counts / total if total else np.zeros(num_classes)


def from_ground_truth(label_paths, reader, num_classes):
    """`[N, C]` shares computed from each image's own label file (weakly supervised setting)."""
    missing = [p for p in label_paths if p is None]
    if missing:
        raise UserError("--image_labels=ground_truth needs a label for every target training image; "
                        f"{len(missing)} have none.")
    return np.stack([shares(reader(p), num_classes) for p in label_paths]).astype(np.float32)


def load_json(path, keys, num_classes, flag="image_labels"):
    """`[N, C]` labels for the images named by `keys` (paths relative to the target root), from a JSON file."""
    if not os.path.isfile(path):
        raise UserError(f"--{flag}={path}: no such file (expected a JSON file or ground_truth).")
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"--{flag}={path}: not a readable JSON file ({err}).") from None
    if not isinstance(table, dict):
        raise UserError(f"--{flag}={path}: expected a JSON object mapping image paths to lists of floats.")
    rows = []
    for key in keys:
        if key not in table:
            raise UserError(f"--{flag}={path} has no entry for target image {key}.")
        row = np.asarray(table[key], np.float32)
        if row.shape != (num_classes,) or not np.all(np.isfinite(row)) or np.any(row < 0):
            raise UserError(f"--{flag}={path}: the entry for {key} is not {num_classes} non-negative numbers.")
        rows.append(row)
    return np.stack(rows)


def write_json(path, keys, labels):
    """Writes `{key: [C floats]}` atomically (temporary file, then rename)."""
    table = {key: [float(v) for v in row] for key, row in zip(keys, labels)}
    atomic.write_text_atomic(path, json.dumps(table, indent=1, sort_keys=True))
