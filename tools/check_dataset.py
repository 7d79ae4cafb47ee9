"""Checks a dataset folder before a long run: counts, image/label pairs, sizes, unreadable files and label
values outside the dataset's table; prints a summary and exits 1 if anything is wrong.

    python tools/check_dataset.py --dataset=gta5 --root=/data/gta5
    python tools/check_dataset.py --dataset=cityscapes --root=/data/cityscapes --split=train

Unlike the start-up checks of training (file headers only), every file is decoded here, so a PNG damaged past
its header is found too. Training skips such files anyway; this tells you which before step 50,000 does.
"""

import argparse
import collections
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pit_keras import console  # noqa: E402
from pit_keras.data import cityscapes, gta5, integrity  # noqa: E402
from pit_keras.errors import UserError  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(VALID_IDS))
    parser.add_argument("--root", required=True)
    parser.add_argument("--split", default="train", help="Cityscapes split")
    parser.add_argument("--limit", type=int, default=None, help="check only the first N pairs")
    parser.add_argument("--tf_logs", action="store_true", help=console.TF_LOGS_HELP)
    args = parser.parse_args()
    console.configure(tf_logs=args.tf_logs)  # SYNTHIA labels are read with TensorFlow
    try:
        summary, problems = check(args.dataset, os.path.expanduser(args.root), args.split, args.limit)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary))
    for path, reason in problems:
        print(f"  {path}: {reason}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
