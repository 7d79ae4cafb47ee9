"""SYNTHIA-RAND-CITYSCAPES on disk: `ROOT/RGB/NNNNNNN.png` and `ROOT/GT/LABELS/NNNNNNN.png`.

The label PNGs are 16-bit, multi-channel; the class id is in the first channel (the second holds instance
ids). Pillow cannot read 16-bit multi-channel PNGs, so labels are decoded with `tf.io.decode_png(dtype=uint16)`.
That decoder silently widens 8-bit PNGs to 16 bits (scaling 0..255 to 0..65535), which would turn every id
into garbage, so the bit depth is read from the PNG header first and anything but 16 bits is refused.
"""

import os
import struct

import tensorflow as tf

from pit_keras.data import classes, files
from pit_keras.errors import UserError

IMAGE_DIR = "RGB"
LABEL_DIR = os.path.join("GT", "LABELS")
# Labels larger than this are refused before decoding (a corrupt or hostile header, not a SYNTHIA frame).
MAX_MEGAPIXELS = 50

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LUT = classes.synthia_id_to_train_id()


def list_pairs(root):
    """The sorted (image, label) path pairs under a SYNTHIA-RAND-CITYSCAPES root; missing labels are reported."""
    return files.same_name_pairs(os.path.join(root, IMAGE_DIR), os.path.join(root, LABEL_DIR),
                                 "the SYNTHIA-RAND-CITYSCAPES layout ROOT/RGB, ROOT/GT/LABELS")


def _png_header(path, data):
    """(width, height, bit depth) from a PNG's IHDR chunk."""
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise UserError(f"{path}: not a PNG file (SYNTHIA labels are 16-bit PNGs).")
    width, height, bit_depth = struct.unpack(">IIB", data[16:25])
    return width, height, bit_depth


def read_class_ids(path):
    """Reads a SYNTHIA label PNG into `[H, W]` uint16 SYNTHIA class ids (its first channel)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UserError(f"{path}: cannot read the label ({err.strerror}).") from None
    width, height, bit_depth = _png_header(path, data)
    if bit_depth != 16:
        raise UserError(f"{path}: expected a 16-bit SYNTHIA label PNG, got a {bit_depth}-bit one (is this a "
                        "GT/COLOR image or a converted label?).")
    if width * height > MAX_MEGAPIXELS * 1e6:
        raise UserError(f"{path} is {width}x{height}, over the {MAX_MEGAPIXELS} MP limit.")
    try:
        decoded = tf.io.decode_png(data, channels=0, dtype=tf.uint16).numpy()
    except tf.errors.InvalidArgumentError as err:
        raise UserError(f"{path}: corrupt PNG ({err.message}).") from None
    return decoded[..., 0]


def read_train_ids(path):
    """Reads a SYNTHIA label PNG into `[H, W]` uint8 16-class train ids (255 where ignored)."""
    return _LUT[read_class_ids(path)]
