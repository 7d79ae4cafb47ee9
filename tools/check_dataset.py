"""Checks a dataset folder before a long run: counts, image/label pairs, sizes, unreadable files and label
values outside the dataset's table; prints a summary and exits 1 if anything is wrong.

    python tools/check_dataset.py --dataset=gta5 --root=/data/gta5
    python tools/check_dataset.py --dataset=cityscapes --root=/data/cityscapes --split=train

Unlike the start-up checks of training (file headers only), every file is decoded here, so a PNG damaged past
its header is found too. Training skips such files anyway; this tells you which before step 50,000 does.
"""

import collections
import os

import numpy as np
from absl import flags
from PIL import Image

from pit_keras.data import cityscapes, gta5, integrity
from pit_keras.errors import UserError, run_main

# The raw label values each dataset's table defines (anything else is a damaged or foreign label file).
VALID_IDS = {"gta5": set(range(34)), "cityscapes": set(range(34)), "synthia": set(range(23))}


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
    if dataset == "gta5":
        return gta5.list_pairs(root)
    if dataset == "synthia":
        from pit_keras.data import synthia
        return synthia.list_pairs(root)
    return cityscapes.list_images(root, split)


def check(dataset, root, split="train", limit=None):
    """Returns (summary lines, problems) for a dataset folder; problems are `(path, reason)`."""
    pairs = list_dataset(dataset, root, split)[:limit]
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
        outside = sorted(set(np.unique(ids).tolist()) - VALID_IDS[dataset])
        if outside:
            problems.append((label, f"label values outside the {dataset} table: {outside[:10]}"))
    summary = [f"{dataset} at {root}" + (f" ({split})" if dataset == "cityscapes" else ""),
               f"  images: {len(pairs)}; without a label: {sum(label is None for _, label in pairs)}",
               "  image sizes: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(5)),
               f"  problems: {len(problems)}"]
    return summary, problems


FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined when it runs (so tests can import the module)."""
    flags.DEFINE_enum("dataset", None, sorted(VALID_IDS), "The dataset's layout.")
    flags.DEFINE_string("root", None, "The dataset's folder.")
    flags.DEFINE_string("split", "train", "Cityscapes split.")
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
    # SYNTHIA labels are read with TensorFlow, imported quietly (errors.run_main set up the console).
    summary, problems = check(FLAGS.dataset, os.path.expanduser(FLAGS.root), FLAGS.split, FLAGS.limit)
    print("\n".join(summary))
    for path, reason in problems:
        print(f"  {path}: {reason}")
    return 1 if problems else 0


if __name__ == "__main__":
    define_flags()
    run_main(main)
