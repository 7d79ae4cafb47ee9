"""Your own data on disk: a folder of unlabelled camera frames (`--target=folder`), an optional labelled val
set beside them, and images/labels pairs of folders (`--source=folder`, e.g. frames rendered in CARLA).

Images are JPEG or PNG (`.jpg`, `.jpeg`, `.png`, any case) of any size, in any sub-folder; the pipeline resizes
them. Label PNGs are 8-bit, single-channel (greyscale or palette indices) and are matched to their image by
relative path and stem: `images/a/b/0001.jpg` goes with `labels/a/b/0001.png`.

Target, `--target_root=DIR`:

    DIR/**/*.{jpg,jpeg,png}         the unlabelled training images: every image under DIR except DIR/val
                                    and DIR/test (the labelled splits)
    DIR/val/images/**/NAME.{jpg,jpeg,png}
    DIR/val/labels/**/NAME.png      an optional labelled val set: 19 Cityscapes train ids (255: ignored)
or
    DIR/val/leftImg8bit/val/CITY/NAME_leftImg8bit.png
    DIR/val/gtFine/val/CITY/NAME_gtFine_labelIds.png
                                    the same val set as a Cityscapes root (label ids), e.g. a link to one

`evaluate --split=test` reads DIR/test the same way.

Source, `--source_root=DIR`:

    DIR/images/**/NAME.{jpg,jpeg,png}
    DIR/labels/**/NAME.png          19 Cityscapes train ids, or raw ids mapped by `--label_map`

A label map is a JSON object from raw id (0-255) to train id (0-18, or 255 for ignored), e.g.
`{"7": 0, "8": 1, "1": 255}`; raw ids it does not list are ignored (255).
"""

import functools
import json
import os

import numpy as np
from PIL import Image

from pit_keras.data import cityscapes, classes, files
from pit_keras.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Top-level sub-folders of a --target=folder root that hold labelled splits and are left out of training.
LABELLED_SPLITS = ("val", "test")


class NoLabelledSplit(UserError):
    """The target folder has no labelled set for the split asked for (normal: most cameras have none)."""


def list_images(folder, exclude=()):
    """The sorted JPEG/PNG files under `folder`, sub-folders included (linked folders too, each once), hidden
    files and folders left out, and the top-level sub-folders named in `exclude` skipped."""
    images, seen = [], set()
    for parent, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and not (parent == folder and d in exclude)]
        images += [os.path.join(parent, n) for n in names
                   if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    return sorted(images)


def target_images(root):
    """The (image, None) pairs of the unlabelled training images of a `--target=folder` root."""
    if not os.path.isdir(root):
        raise UserError(f"--target_root={root}: no such folder.")
    images = list_images(root, exclude=LABELLED_SPLITS)
    if not images:
        raise UserError(f"--target_root={root} holds no {'/'.join(IMAGE_EXTENSIONS)} images (sub-folders "
                        f"included, {' and '.join(LABELLED_SPLITS)} left out).")
    return [(image, None) for image in images]


def _stem_key(relative):
    return os.path.splitext(relative)[0]


def labelled_pairs(image_dir, label_dir, flag):
    """The sorted (image, label) pairs of an images/labels pair of folders, matched by relative path and stem.

    Args:
        image_dir, label_dir: the two folders.
        flag: how the folders were given, for errors, e.g. "--source_root=DIR".

    Raises:
        UserError: a folder is missing, there are no images, two images share a stem, or some image has no
            label (the first is named, with the count).
    """
    if not os.path.isdir(image_dir):
        raise UserError(f"{flag}: {image_dir} is missing (expected the images/ and labels/ folders).")
    if not os.path.isdir(label_dir):
        raise UserError(f"{flag}: {label_dir} is missing (the label PNGs of the images in {image_dir}).")
    images = list_images(image_dir)
    if not images:
        raise UserError(f"{flag}: {image_dir} holds no {'/'.join(IMAGE_EXTENSIONS)} images.")
    by_stem = {}
    for image in images:
        stem = _stem_key(os.path.relpath(image, image_dir))
        if stem in by_stem:
            raise UserError(f"{flag}: {by_stem[stem]} and {image} would share the label {stem}.png; rename one.")
        by_stem[stem] = image
    pairs, missing = [], []
    for stem, image in by_stem.items():
        label = os.path.join(label_dir, stem + ".png")
        if os.path.isfile(label):
            pairs.append((image, label))
        else:
            missing.append((image, label))
    if missing:
        image, label = missing[0]
        raise UserError(f"{flag}: {image} has no label {label} ({len(missing)} of {len(images)} images in "
                        f"{image_dir} have none).")
    return sorted(pairs)


def identity_lut(num_classes=19):
    """`[256]` look-up table that keeps train ids 0..num_classes-1 and ignores (255) every other value."""
    lut = np.full(256, classes.IGNORE_INDEX, np.uint8)
    lut[:num_classes] = np.arange(num_classes, dtype=np.uint8)
    return lut


def read_label_map(path, num_classes=19):
    """`[256]` look-up table of a `--label_map` JSON: raw id -> train id, 255 for the ids it does not list."""
    expected = (f"expected a JSON object of raw label ids (0 to 255) to train ids (0 to {num_classes - 1}, or "
                f"{classes.IGNORE_INDEX} to ignore), e.g. {{\"7\": 0, \"8\": 1}}")
    try:
        with open(path) as f:
            mapping = json.load(f)
    except OSError as err:
        raise UserError(f"--label_map={path}: cannot be read ({err.strerror}).") from None
    except ValueError as err:
        raise UserError(f"--label_map={path} is not valid JSON ({err}); {expected}.") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"--label_map={path}: {expected}.")
    lut = np.full(256, classes.IGNORE_INDEX, np.uint8)
    for key, value in mapping.items():
        try:
            raw = int(key)
        except ValueError:
            raw = None
        valid_value = (isinstance(value, int) and not isinstance(value, bool)
                       and (0 <= value < num_classes or value == classes.IGNORE_INDEX))
        if raw is None or not 0 <= raw <= 255 or not valid_value:
            raise UserError(f"--label_map={path} maps {json.dumps(key)} to {json.dumps(value)}; {expected}.")
        lut[raw] = value
    return lut


def read_label(path, lut):
    """Reads a label PNG (8-bit, greyscale or palette) into `[H, W]` uint8 train ids through `lut`."""
    return files.read_8bit_label(path, lut, "single-channel label PNG")


def label_reader(lut):
    """`reader(path) -> [H, W]` uint8 train ids, through the `[256]` look-up table `lut`."""
    return functools.partial(read_label, lut=lut)


def check_label(path, flag, num_classes=19, mapped=False, hint="give --label_map to map raw ids"):
    """Reads one label as a sample of its folder and refuses it (one sentence ending with `hint`) if it is not
    an 8-bit single-channel PNG or, unless its ids are `mapped` by a label map, holds values that are not train
    ids."""
    try:
        with Image.open(path) as label:
            mode = label.mode
            ids = np.asarray(label) if mode in ("P", "L") else None
    except Exception as err:  # noqa: BLE001 -- Pillow raises many types for unreadable files
        raise UserError(f"{flag}: {path} cannot be read as a PNG ({err}).") from None
    if ids is None:
        raise UserError(f"{flag}: {path} is a {mode} image; labels must be 8-bit single-channel PNGs (greyscale "
                        "values or palette indices are the ids).")
    if mapped:
        return
    outside = sorted(set(np.unique(ids).tolist()) - set(range(num_classes)) - {classes.IGNORE_INDEX})
    if outside:
        raise UserError(f"{flag}: {path} holds the value {outside[0]}, not a train id (0 to {num_classes - 1}, "
                        f"or {classes.IGNORE_INDEX} for ignored); {hint}.")


def source_pairs(root, label_map=None):
    """`(pairs, reader)` of a `--source=folder` root: (image, label) pairs and `reader(path) -> train ids`
    (19 classes), through `label_map` (a JSON path) if given."""
    flag = f"--source_root={root}"
    if not os.path.isdir(root):
        raise UserError(f"{flag}: no such folder.")
    lut = read_label_map(label_map) if label_map else identity_lut()
    pairs = labelled_pairs(os.path.join(root, "images"), os.path.join(root, "labels"), flag)
    check_label(pairs[0][1], flag, mapped=bool(label_map))
    return pairs, label_reader(lut)


def split_pairs(root, split, num_classes=19):
    """`(pairs, reader)` of the labelled split `DIR/SPLIT` of a `--target=folder` root, in either layout.

    The reader gives ids in `num_classes` (19, or 16: the SYNTHIA classes, terrain, truck and train ignored).

    Raises:
        NoLabelledSplit: DIR/SPLIT does not exist.
        UserError: it exists but is incomplete or in neither layout.
    """
    folder = os.path.join(root, split)
    flag = f"--target_root={root}"
    if not os.path.isdir(folder):
        raise NoLabelledSplit(f"{flag} has no labelled {split} set ({folder}/images with {folder}/labels, or a "
                              f"Cityscapes root in {folder}).")
    to_space = (lambda lut: lut) if num_classes == 19 else (lambda lut: classes.train19_to_train16()[lut])
    if os.path.isdir(os.path.join(folder, "images")):
        pairs = labelled_pairs(os.path.join(folder, "images"), os.path.join(folder, "labels"), flag)
        for _, label in pairs:  # every one: a val set is small, and a label in other ids would score garbage
            check_label(label, flag, hint=f"the label PNGs of {folder} hold train ids (label ids go in the "
                                          "Cityscapes layout)")
        return pairs, label_reader(to_space(identity_lut()))
    if os.path.isdir(os.path.join(folder, "leftImg8bit")):
        pairs = cityscapes.list_images(folder, split, require_labels=True)
        return pairs, label_reader(to_space(classes.label_id_to_train_id()))
    raise UserError(f"{flag}: {folder} holds neither images/ with labels/ nor a Cityscapes root "
                    f"(leftImg8bit/{split} with gtFine/{split}).")


def prediction_candidates(image, image_dir, predictions_dir):
    """Where a saved prediction of a folder-layout image may be, in order: PRED/REL/STEM.png, then
    PRED/REL/STEM_labelTrainIds.png (as `predict` names it), REL being the image's sub-folder in `image_dir`."""
    stem = _stem_key(os.path.relpath(image, image_dir))
    return [os.path.join(predictions_dir, stem + ".png"),
            os.path.join(predictions_dir, stem + "_labelTrainIds.png")]
