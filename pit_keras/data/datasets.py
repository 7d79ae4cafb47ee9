"""From dataset flags to file lists and label readers, for every source and target the toolkit knows."""

from pit_keras.data import cityscapes, gta5, synthetic


def benchmark_roots(root):
    """(source root, target root) of the embedded benchmark under `root`, generating it on first use."""
    try:
        return synthetic.ensure(root)
    except ValueError as err:
        from pit_keras.errors import UserError
        raise UserError(str(err)) from None


def source_pairs(name, root):
    """`(pairs, reader)` of a labelled source: (image, label) paths and `reader(path) -> train ids`."""
    if name == "synthetic":
        root = benchmark_roots(root)[0]
    return gta5.list_pairs(root), gta5.read_train_ids


def target_pairs(name, root, split, require_labels=False):
    """`(pairs, reader, root)` of a target split: (image, label or None) paths, the label reader, and the
    dataset root the image-labels JSON keys are relative to."""
    if name == "synthetic":
        root = benchmark_roots(root)[1]
    return cityscapes.list_images(root, split, require_labels), cityscapes.read_train_ids, root
