"""File-level helpers the dataset layouts share: pairing images with same-named labels, reading 8-bit label
PNGs through a look-up table."""

import os

import numpy as np
from PIL import Image

from pit_keras.errors import UserError


def same_name_pairs(image_dir, label_dir, layout):
    """The sorted (image, label) pairs of two folders whose PNGs share their names (GTA5, SYNTHIA).

    Args:
        image_dir, label_dir: the two folders.
        layout: how the layout is described in errors, e.g. "the GTA5 layout ROOT/images, ROOT/labels".
    """
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise UserError(f"{folder}: no such folder (expected {layout}).")
    names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(".png"))
    if not names:
        raise UserError(f"{image_dir}: no .png images found.")
    missing = [n for n in names if not os.path.isfile(os.path.join(label_dir, n))]
    if missing:
        raise UserError(f"{os.path.join(image_dir, missing[0])} has no label in {label_dir} "
                        f"({len(missing)} of {len(names)} images lack one).")
    return [(os.path.join(image_dir, n), os.path.join(label_dir, n)) for n in names]


def read_8bit_label(path, lut, kind):
    """Reads an 8-bit label PNG (palette indices or grey values are the ids) through a `[256]` look-up table.

    Args:
        path: the label file.
        lut: id -> train id.
        kind: what the file should be, for the error, e.g. "palette label PNG".
    """
    with Image.open(path) as label:
        if label.mode not in ("P", "L"):
            raise UserError(f"{path}: expected an 8-bit {kind}, got mode {label.mode}.")
        ids = np.asarray(label)
    return lut[ids]
