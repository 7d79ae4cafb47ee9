"""tf.data pipelines: parallel decode, resize, shuffle, batch, zip source with target, prefetch.

Sizes are (W, H) as on the command line. Images are float32 RGB in [0, 255] (each backbone preprocesses inside
the network); labels are uint8 train ids resized with nearest neighbour.
"""

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def decode_image(path):
    """Decodes a PNG/JPEG to `[H, W, 3]` uint8 RGB."""
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def resize_image(image, size=None):
    """`[H, W, 3]` -> float32 in [0, 255], resized bilinearly to size=(W, H) if given."""
    image = tf.cast(image, tf.float32)
    if size is not None:
        image = tf.image.resize(image, (size[1], size[0]), method="bilinear")
    return image


def load_image(path, size=None):
    """Decodes a PNG/JPEG to `[H, W, 3]` float32 in [0, 255], resized bilinearly to size=(W, H) if given."""
    return resize_image(decode_image(path), size)


def read_label(path, reader):
    """Reads a label file with `reader(path) -> [H, W] uint8 train ids`."""
    label = tf.numpy_function(lambda p: reader(np.asarray(p).item().decode()), [path], tf.uint8, stateful=False)
    label.set_shape([None, None])
    return label


def resize_label(label, size=None):
    """`[H, W]` train ids resized (nearest) to size=(W, H) if given."""
    if size is not None:
        label = tf.image.resize(label[..., None], (size[1], size[0]), method="nearest")[..., 0]
    return label


def load_label(path, reader, size=None):
    """Reads a label file with `reader(path) -> [H, W] uint8 train ids`, resized (nearest) to size=(W, H)."""
    return resize_label(read_label(path, reader), size)


def _shard(ds, shard):
    # Sharding file names, before any decoding, gives each worker its own part of the data at no cost.
    return ds if shard is None else ds.shard(*shard)


def _endless(ds, seed, batch_size, skip_batches, decode, resize, cache=False):
    count = ds.cardinality()  # of the file names: known, where it is not after ignore_errors
    if cache:
        # The decoded files are kept in memory (uint8, at their own size) after their first use and resized
        # every time, as without the cache. The shuffle below sees as many elements with the same seed as it
        # does file names without the cache, so the batches are the same.
        ds = ds.map(decode, num_parallel_calls=AUTOTUNE).ignore_errors(log_warning=True).cache()
        load = resize
    else:
        def load(*x):
            return resize(*decode(*x))
    # The shuffled order is a function of the seed alone, so skipping the elements of the batches a resumed run
    # has already seen (cheap without the cache: nothing is decoded) continues the uninterrupted run's order.
    ds = ds.shuffle(count, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.skip(skip_batches * batch_size).map(load, num_parallel_calls=AUTOTUNE)
    # A file damaged past its header (checked at start-up) is skipped with a warning, not a crash.
    return ds.ignore_errors(log_warning=True).batch(batch_size, drop_remainder=True)


def source_dataset(pairs, reader, size, batch_size, seed=0, shard=None, skip_batches=0, cache=False):
    """Endless shuffled batches of `(image, label)` from (image, label) path pairs.

    `shard=(count, index)` keeps every count-th pair from index on (one input pipeline of several);
    `skip_batches` starts after that many batches of the same sequence (resuming a run); `cache` keeps the
    decoded files in memory after their first use (uint8: 4 bytes a pixel at the files' own size), so only the
    first epoch reads and decodes them."""
    images, labels = zip(*pairs)
    ds = _shard(tf.data.Dataset.from_tensor_slices((list(images), list(labels))), shard)
    return _endless(ds, seed, batch_size, skip_batches,
                    lambda i, l: (decode_image(i), read_label(l, reader)),
                    lambda i, l: (resize_image(i, size), resize_label(l, size)), cache)


def target_dataset(image_paths, image_labels, size, batch_size, seed=0, shard=None, skip_batches=0, cache=False):
    """Endless shuffled batches of `(image, soft image-level labels)`; `image_labels` is `[N, C]`; `cache` as
    for `source_dataset` (3 bytes a pixel)."""
    labels = np.asarray(image_labels, np.float32)
    ds = _shard(tf.data.Dataset.from_tensor_slices((list(image_paths), labels)), shard)
    return _endless(ds, seed + 1, batch_size, skip_batches, lambda i, y: (decode_image(i), y),
                    lambda i, y: (resize_image(i, size), y), cache)


def training_dataset(source, target=None):
    """Zips the domains into the trainer's batch dicts; `target=None` for source-only training."""
    if target is None:
        ds = source.map(lambda i, l: {"source_image": i, "source_label": l})
    else:
        ds = tf.data.Dataset.zip((source, target)).map(
            lambda s, t: {"source_image": s[0], "source_label": s[1],
                          "target_image": t[0], "target_image_labels": t[1]})
    return ds.prefetch(AUTOTUNE)


def evaluation_dataset(pairs, reader, size):
    """One `(image resized to size, label at full resolution)` per element, in order, unbatched."""
    images, labels = zip(*pairs)
    ds = tf.data.Dataset.from_tensor_slices((list(images), list(labels)))
    ds = ds.map(lambda i, l: (load_image(i, size), load_label(l, reader)), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)
