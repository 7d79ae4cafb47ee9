"""Checks a dataset folder before a long run: counts, image/label pairs, sizes, unreadable files and label
values outside the dataset's table; prints a summary and exits 1 if anything is wrong.

    python tools/check_dataset.py --dataset=gta5 --root=/data/gta5
    python tools/check_dataset.py --dataset=cityscapes --root=/data/cityscapes --split=train
    python tools/check_dataset.py --dataset=folder_source --root=/data/carla --label_map=/data/carla/map.json
    python tools/check_dataset.py --dataset=folder_target --root=/data/camera --split=val

`folder_source` and `folder_target` are your own data in the layouts of `--source=folder` and `--target=folder`
(README: Datasets): `--split=train` of a target folder is its unlabelled images, `val` and `test` its
labelled sets.

Unlike the start-up checks of training (file headers only), every file is decoded here, so a PNG damaged past
its header is found too. Training skips such files anyway; this tells you which before step 50,000 does.
"""

import collections
import json
import os

import numpy as np
from absl import flags
from PIL import Image

from pit_keras.data import cityscapes, folder, gta5, integrity
from pit_keras.errors import UserError, run_main

# The raw label values each dataset's table defines (anything else is a damaged or foreign label file). A
# folder's labels hold train ids (255: ignored), or the raw ids its --label_map lists.
TRAIN_IDS = set(range(19)) | {255}
VALID_IDS = {"gta5": set(range(34)), "cityscapes": set(range(34)), "synthia": set(range(23)),
             "folder_source": TRAIN_IDS, "folder_target": TRAIN_IDS}


def raw_label_ids(dataset, path):
    """The label file's raw ids (before mapping to train ids)."""
    if dataset == "synthia":
        from pit_keras.data import synthia
        return synthia.read_class_ids(path)
    with Image.open(path) as label:
        if label.mode not in ("P", "L"):
            raise ValueError(f"expected an 8-bit label PNG, got mode {label.mode}")
        return np.asarray(label)


def list_dataset(dataset, root, split):
    """The (image, label or None) pairs to check; only the layout is checked here (each file is, in `check`)."""
    flag = f"--root={root}"
    if dataset == "folder_source":
        return folder.labelled_pairs(os.path.join(root, "images"), os.path.join(root, "labels"), flag)
    if dataset == "folder_target":
        if not os.path.isdir(root):
            raise UserError(f"{flag}: no such folder.")
        if split == "train":  # what training reads: every image but the labelled splits
            images = folder.list_images(root, exclude=folder.LABELLED_SPLITS)
            if not images:
                raise UserError(f"{flag} holds no {'/'.join(folder.IMAGE_EXTENSIONS)} images outside "
                                f"{' and '.join(folder.LABELLED_SPLITS)}.")
            return [(image, None) for image in images]
        split_dir = os.path.join(root, split)
        if os.path.isdir(os.path.join(split_dir, "leftImg8bit")):
            return cityscapes.list_images(split_dir, split, require_labels=True)
        return folder.labelled_pairs(os.path.join(split_dir, "images"), os.path.join(split_dir, "labels"), flag)
    if dataset == "gta5":
        return gta5.list_pairs(root)
    if dataset == "synthia":
        from pit_keras.data import synthia
        return synthia.list_pairs(root)
    return cityscapes.list_images(root, split)


def valid_ids(dataset, root, split, label_map):
    """The label values that are not a problem, and a name for them."""
    if label_map:
        folder.read_label_map(label_map)  # one sentence if it is no label map
        with open(label_map) as f:
            return {int(raw) for raw in json.load(f)}, f"--label_map={label_map}"
    if dataset == "folder_target" and os.path.isdir(os.path.join(root, split, "leftImg8bit")):
        return VALID_IDS["cityscapes"], "cityscapes table"  # its val set as a Cityscapes root: label ids
    if dataset.startswith("folder"):
        return VALID_IDS[dataset], "train ids"
    return VALID_IDS[dataset], f"{dataset} table"


def check(dataset, root, split="train", limit=None, label_map=None):
    """Returns (summary lines, problems) for a dataset folder; problems are `(path, reason)`. With a
    `label_map` (a folder source's), ids it does not list are ignored by training, so they are counted in the
    summary rather than reported as problems."""
    valid, table = valid_ids(dataset, root, split, label_map)
    pairs = list_dataset(dataset, root, split)[:limit]
    unlisted = collections.Counter()
    good, problems = integrity.check_pairs(pairs)
    sizes = collections.Counter()
    for image, label in good:
        try:
            with Image.open(image) as opened:
                opened.load()  # decodes the whole file: finds damage past the header
                sizes[opened.size] += 1
        except Exception as err:  # noqa: BLE001 -- Pillow raises many types for damaged files
            problems.append((image, f"cannot be decoded ({err})"))
            continue
        if label is None:
            continue
        try:
            ids = raw_label_ids(dataset, label)
        except (ValueError, UserError, OSError) as err:
            problems.append((label, f"cannot be decoded ({err})"))
            continue
        outside = sorted(set(np.unique(ids).tolist()) - valid)
        if outside and label_map:
            unlisted.update(outside)
        elif outside:
            problems.append((label, f"label values outside the {table}: {outside[:10]}"))
    summary = [f"{dataset} at {root}" + (f" ({split})" if dataset in ("cityscapes", "folder_target") else ""),
               f"  images: {len(pairs)}; without a label: {sum(label is None for _, label in pairs)}",
               "  image sizes: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(5))]
    if unlisted:
        summary.append("  ids the label map does not list (ignored in training), with the number of labels "
                       f"holding each: " + ", ".join(f"{i} ({n})" for i, n in sorted(unlisted.items())))
    summary.append(f"  problems: {len(problems)}")
    return summary, problems


FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined when it runs (so tests can import the module)."""
    flags.DEFINE_enum("dataset", None, sorted(VALID_IDS), "The dataset's layout.")
    flags.DEFINE_string("root", None, "The dataset's folder.")
    flags.DEFINE_string("split", "train", "Split of cityscapes or folder_target (train: its unlabelled images).")
    flags.DEFINE_string("label_map", None, "For folder_source: the JSON map of raw label ids to train ids that "
                        "training is given (--label_map).")
    flags.DEFINE_integer("limit", None, "Check only the first N pairs.")


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    if not FLAGS.dataset:
        raise UserError(f"--dataset is required ({', '.join(sorted(VALID_IDS))}).")
    if not FLAGS.root:
        raise UserError("--root is required (the dataset's folder).")
    if FLAGS.limit is not None and FLAGS.limit <= 0:
        raise UserError(f"--limit={FLAGS.limit}: must be positive.")
    if FLAGS.label_map and FLAGS.dataset != "folder_source":
        raise UserError(f"--label_map applies to --dataset=folder_source only, not --dataset={FLAGS.dataset}.")
    label_map = FLAGS.label_map and os.path.expanduser(FLAGS.label_map)
    # SYNTHIA labels are read with TensorFlow, imported quietly (errors.run_main set up the console).
    summary, problems = check(FLAGS.dataset, os.path.expanduser(FLAGS.root), FLAGS.split, FLAGS.limit, label_map)
    print("\n".join(summary))
    for path, reason in problems:
        print(f"  {path}: {reason}")
    return 1 if problems else 0


if __name__ == "__main__":
    define_flags()
    run_main(main)
