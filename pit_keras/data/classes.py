"""Class tables, label-id maps and palettes: every dataset fact about classes lives here.

The 19 Cityscapes training classes are the common space of GTA5 and Cityscapes; SYNTHIA uses a 16-class
subset, and the paper also reports 13 of those (mIoU*, without wall, fence and pole).
"""

import dataclasses

import numpy as np

IGNORE_INDEX = 255

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)

# Cityscapes label id of each training class, in CITYSCAPES_CLASSES order.
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# Colours of the 34 Cityscapes label ids (0..33), as in cityscapesScripts' labels.py; GTA5 label PNGs carry
# this palette. Ids without a colour of their own there are black.
CITYSCAPES_LABEL_ID_COLOURS = {
    0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0), 3: (0, 0, 0), 4: (0, 0, 0), 5: (111, 74, 0),
    6: (81, 0, 81), 7: (128, 64, 128), 8: (244, 35, 232), 9: (250, 170, 160), 10: (230, 150, 140),
    11: (70, 70, 70), 12: (102, 102, 156), 13: (190, 153, 153), 14: (180, 165, 180),
    15: (150, 100, 100), 16: (150, 120, 90), 17: (153, 153, 153), 18: (153, 153, 153),
    19: (250, 170, 30), 20: (220, 220, 0), 21: (107, 142, 35), 22: (152, 251, 152),
    23: (70, 130, 180), 24: (220, 20, 60), 25: (255, 0, 0), 26: (0, 0, 142), 27: (0, 0, 70),
    28: (0, 60, 100), 29: (0, 0, 90), 30: (0, 0, 110), 31: (0, 80, 100), 32: (0, 0, 230),
    33: (119, 11, 32),
}

# SYNTHIA-RAND-CITYSCAPES class id -> index in the 16-class space.
SYNTHIA_ID_TO_TRAIN16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11,
                         8: 12, 19: 13, 12: 14, 11: 15}

# The 16 SYNTHIA classes as Cityscapes train ids, and the 13 of mIoU* (without wall, fence, pole).
SYNTHIA16_TRAIN_IDS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA13_DROPPED = ("wall", "fence", "pole")


@dataclasses.dataclass(frozen=True)
class ClassSet:
    """A label space: class names in the paper's column order and a colour for each.

    Args:
        name: "cityscapes19", "synthia16" or "synthia13".
        names: class names, index = train id in this space.
        palette: one RGB triple per class.
    """

    name: str
    names: tuple
    palette: tuple

    @property
    def num_classes(self):
        return len(self.names)

    def palette_array(self):
        """`[256, 3]` uint8 colours; train ids outside the space (255 included) are black."""
        table = np.zeros((256, 3), np.uint8)
        table[: self.num_classes] = np.asarray(self.palette, np.uint8)
        return table


CITYSCAPES19 = ClassSet("cityscapes19", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE)
SYNTHIA16 = ClassSet(
    "synthia16",
    tuple(CITYSCAPES_CLASSES[i] for i in SYNTHIA16_TRAIN_IDS),
    tuple(CITYSCAPES_PALETTE[i] for i in SYNTHIA16_TRAIN_IDS),
)
CLASS_SETS = {c.name: c for c in (CITYSCAPES19, SYNTHIA16)}
CLASS_SETS_BY_COUNT = {19: CITYSCAPES19, 16: SYNTHIA16}


def label_id_to_train_id():
    """`[256]` uint8 look-up table: Cityscapes/GTA5 label id -> 19-class train id (255 elsewhere)."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    lut[list(CITYSCAPES_LABEL_IDS)] = np.arange(len(CITYSCAPES_LABEL_IDS), dtype=np.uint8)
    return lut


def synthia_id_to_train_id():
    """`[65536]` uint8 look-up table: SYNTHIA class id (16-bit) -> 16-class train id (255 elsewhere)."""
    lut = np.full(65536, IGNORE_INDEX, np.uint8)
    for synthia_id, train_id in SYNTHIA_ID_TO_TRAIN16.items():
        lut[synthia_id] = train_id
    return lut


def train19_to_train16():
    """`[256]` uint8 look-up table: 19-class train id -> 16-class train id (terrain, truck, train -> 255)."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    lut[list(SYNTHIA16_TRAIN_IDS)] = np.arange(len(SYNTHIA16_TRAIN_IDS), dtype=np.uint8)
    return lut


def train16_to_train19():
    """`[256]` uint8 look-up table: 16-class train id -> the class's 19-class (Cityscapes) train id."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    lut[: len(SYNTHIA16_TRAIN_IDS)] = SYNTHIA16_TRAIN_IDS
    return lut


def label_id_palette():
    """Flat 768-entry palette of the label ids, as GTA5's palette PNGs store it."""
    flat = np.zeros((256, 3), np.uint8)
    for label_id, colour in CITYSCAPES_LABEL_ID_COLOURS.items():
        flat[label_id] = colour
    return flat.reshape(-1).tolist()
