"""From dataset flags to file lists and label readers, for every source and target the toolkit knows."""

from pit_keras.data import cityscapes, classes, folder, gta5, synthetic
from pit_keras.errors import UserError


def benchmark_roots(root, seed=None):
    """(source root, target root) of the embedded benchmark under `root`, generating it on first use with
    generator seed `seed` (0 if None). With `seed=None` a benchmark already under `root` is taken whatever its
    generator seed; with a seed, one of another seed is refused."""
    try:
        if seed is None:
            found = synthetic.read_params(root)
            seed = found["seed"] if found is not None and "seed" in found else 0
        return synthetic.ensure(root, seed=seed)
    except ValueError as err:
        raise UserError(str(err)) from None


def source_pairs(name, root, benchmark_seed=None, label_map=None):
    """`(pairs, reader)` of a labelled source: (image, label) paths and `reader(path) -> train ids`.

    `label_map` (a JSON path, `--label_map`) maps the raw ids of a `folder` source's labels to train ids."""
    if label_map and name != "folder":
        raise UserError(f"--label_map applies to --source=folder only, not --source={name}.")
    if name == "folder":
        return folder.source_pairs(root, label_map)
    if name == "synthia":
        # Imported here: it needs TensorFlow, which commands that only read PNGs should not pay for.
        from pit_keras.data import synthia
        return synthia.list_pairs(root), synthia.read_train_ids
    if name == "synthetic":
        root = benchmark_roots(root, benchmark_seed)[0]
    return gta5.list_pairs(root), gta5.read_train_ids


_TRAIN19_TO_TRAIN16 = classes.train19_to_train16()


def _read_train16(path):
    """A Cityscapes label in the 16 SYNTHIA classes (terrain, truck, train -> 255)."""
    return _TRAIN19_TO_TRAIN16[cityscapes.read_train_ids(path)]


def target_pairs(name, root, split, require_labels=False, num_classes=19, benchmark_seed=None):
    """`(pairs, reader, root)` of a target split: (image, label or None) paths, the label reader, and the
    dataset root the image-labels JSON keys are relative to.

    A `folder` target's train split is its unlabelled images (reader None); any other split is its labelled
    set DIR/SPLIT, and `folder.NoLabelledSplit` (a `UserError`) says there is none.

    `num_classes` is the run's label space: 19 (GTA5 sources) or 16 (SYNTHIA sources, whose reader maps the
    Cityscapes train ids into the 16 SYNTHIA classes).
    """
    if num_classes not in (19, 16):
        raise ValueError(f"num_classes={num_classes}: targets are read in 19 or 16 classes.")
    if name == "folder":
        if split != "train":  # a labelled split: DIR/SPLIT (folder.NoLabelledSplit if there is none)
            pairs, reader = folder.split_pairs(root, split, num_classes)
            return pairs, reader, root
        if require_labels:
            raise UserError(f"--target=folder: the training images of --target_root={root} are unlabelled; "
                            f"labelled sets are read from {root}/val and {root}/test.")
        return folder.target_images(root), None, root  # no labels, so no reader
    if name == "synthetic":
        root = benchmark_roots(root, benchmark_seed)[1]
    reader = cityscapes.read_train_ids if num_classes == 19 else _read_train16
    return cityscapes.list_images(root, split, require_labels), reader, root
