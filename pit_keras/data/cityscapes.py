"""Cityscapes on disk: `ROOT/leftImg8bit/SPLIT/CITY/NAME_leftImg8bit.png` and
`ROOT/gtFine/SPLIT/CITY/NAME_gtFine_labelIds.png` (8-bit greyscale label ids)."""

import glob
import os


from pit_keras.data import classes, files
from pit_keras.errors import UserError

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
_LUT = classes.label_id_to_train_id()


def label_path(root, image_path, split):
    """The gtFine label-id PNG that belongs to a leftImg8bit image."""
    city = os.path.basename(os.path.dirname(image_path))
    name = os.path.basename(image_path)[: -len(IMAGE_SUFFIX)]
    return os.path.join(root, "gtFine", split, city, name + LABEL_SUFFIX)


def list_images(root, split, require_labels=False):
    """The sorted (image, label or None) pairs of a split.

    Args:
        root: the Cityscapes root (holding `leftImg8bit/` and `gtFine/`).
        split: "train", "val" or "test".
        require_labels: raise if an image has no label (evaluation, ground-truth image labels).
    """
    image_dir = os.path.join(root, "leftImg8bit", split)
    if not os.path.isdir(image_dir):
        raise UserError(f"{image_dir}: no such folder (expected the Cityscapes layout ROOT/leftImg8bit/{split}).")
    images = sorted(glob.glob(os.path.join(image_dir, "*", "*" + IMAGE_SUFFIX)))
    if not images:
        raise UserError(f"{image_dir}: no CITY/*{IMAGE_SUFFIX} images found.")
    pairs = []
    for image in images:
        label = label_path(root, image, split)
        if not os.path.isfile(label):
            if require_labels:
                raise UserError(f"{image} has no label: {label} is missing.")
            label = None
        pairs.append((image, label))
    return pairs


def read_train_ids(path):
    """Reads a gtFine labelIds PNG into `[H, W]` uint8 19-class train ids (255 where ignored)."""
    return files.read_8bit_label(path, _LUT, "greyscale labelIds PNG")


def relative_key(root, image_path):
    """The key of an image in an image-labels JSON: its path relative to the Cityscapes root."""
    return os.path.relpath(image_path, root).replace(os.sep, "/")
