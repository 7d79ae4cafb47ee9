"""GTA5 (Playing for Data) on disk: `ROOT/images/NNNNN.png` and `ROOT/labels/NNNNN.png`.

The label PNGs are 8-bit palette images whose palette *indices* are Cityscapes label ids; decoding them as
colours (as `tf.io.decode_png` does) would lose the ids, so labels are read with Pillow.
"""

import os

from pit_keras.data import classes, files

_LUT = classes.label_id_to_train_id()


def list_pairs(root):
    """The sorted (image, label) path pairs under a GTA5 root; images without a label are reported."""
    return files.same_name_pairs(os.path.join(root, "images"), os.path.join(root, "labels"),
                                 "the GTA5 layout ROOT/images, ROOT/labels")


def read_train_ids(path):
    """Reads a GTA5 label PNG into `[H, W]` uint8 19-class train ids (255 where ignored)."""
    return files.read_8bit_label(path, _LUT, "palette label PNG")
