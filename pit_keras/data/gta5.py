"""GTA5 (Playing for Data) on disk: `ROOT/images/NNNNN.png` and `ROOT/labels/NNNNN.png`.

The label PNGs are 8-bit palette images whose palette *indices* are Cityscapes label ids; decoding them as
colours (as `tf.io.decode_png` does) would lose the ids, so labels are read with Pillow.
"""

import os

import numpy as np
from PIL import Image

from pit_keras.data import classes
from pit_keras.errors import UserError

_LUT = classes.label_id_to_train_id()


def list_pairs(root):
    """The sorted (image, label) path pairs under a GTA5 root; images without a label are reported."""
    image_dir, label_dir = os.path.join(root, "images"), os.path.join(root, "labels")
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise UserError(f"{folder}: no such folder (expected the GTA5 layout ROOT/images, ROOT/labels).")
    names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(".png"))
    if not names:
        raise UserError(f"{image_dir}: no .png images found.")
    missing = [n for n in names if not os.path.isfile(os.path.join(label_dir, n))]
    if missing:
        raise UserError(f"{os.path.join(image_dir, missing[0])} has no label in {label_dir} "
                        f"({len(missing)} of {len(names)} images lack one).")
    return [(os.path.join(image_dir, n), os.path.join(label_dir, n)) for n in names]


def read_train_ids(path):
    """Reads a GTA5 label PNG into `[H, W]` uint8 19-class train ids (255 where ignored)."""
    with Image.open(path) as label:
        if label.mode not in ("P", "L"):
            raise UserError(f"{path}: expected an 8-bit palette label PNG, got mode {label.mode}.")
        ids = np.asarray(label)
    return _LUT[ids]
