"""tf.data pipelines: parallel decode, resize, shuffle, batch, zip source with target, prefetch.

Sizes are (W, H) as on the command line. Images are float32 RGB in [0, 255] (each backbone preprocesses inside
the network); labels are uint8 train ids resized with nearest neighbour.

A training file that fails to decode (a PNG damaged in its middle passes the start-up header checks of
`integrity`) is dropped where it is met, and named: the training pipelines read each file in Python inside
`tf.py_function`, check a PNG's chunk checksums (`integrity.png_damage`, which finds such damage without a
decoder's error), decode it with the same TensorFlow op as `decode_image`, run eagerly so that its error can be
caught with the file's path, and pass `(path, reason)` to `on_error` once per file (training appends it to
MODEL_DIR/skipped_files.txt). Should every file of a pipeline fail, it stops with a UserError.
"""

import re
import threading

import numpy as np
import tensorflow as tf

from pit_keras import console
from pit_keras.data import integrity
from pit_keras.errors import UserError, raise_in_background

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
    def read(path):
        try:
            return reader(np.asarray(path).item().decode())
        except UserError as err:  # a label file the reader refuses: its sentence, not TensorFlow's traceback
            raise_in_background(err)

    label = tf.numpy_function(read, [path], tf.uint8, stateful=False)
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


def _shard_size(count, shard):
    return count if shard is None else len(range(shard[1], count, shard[0]))


def report_skipped(path, reason):
    """The default `on_error`: one line naming the file."""
    console.message(f"skipped {path}: {reason}")


class _FileGuard:
    """Decodes one training example's files eagerly (inside `tf.py_function`), catching a file that fails.

    Args:
        domain: "source" or "target", for messages.
        count: the files of the pipeline (of its shard).
        reader: the label reader (source), or None.
        on_error: `on_error(path, reason)`, called once per failing file.
    """

    def __init__(self, domain, count, reader, on_error):
        self.domain = domain
        self.count = count
        self.reader = reader
        self.on_error = on_error or report_skipped
        self.failed = {}  # image path -> reason
        self.lock = threading.Lock()

    def _fail(self, image_path, path, reason):
        with self.lock:
            new = image_path not in self.failed
            self.failed[image_path] = reason
            everything = len(self.failed) >= self.count
        if new:
            self.on_error(path, reason)
        if everything:
            raise_in_background(UserError(
                f"no usable {self.domain} images: all {self.count} failed when decoded, e.g. {path}: {reason}."))

    def decode(self, image_path, label_path=None):
        """`(image [H, W, 3] uint8, label [H, W] uint8 (empty without a label), ok)`; empty arrays where `ok` is
        False."""
        empty_image, label = np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0), np.uint8)
        image_path = image_path.numpy().decode()
        try:
            with open(image_path, "rb") as f:
                data = f.read()
            damage = integrity.png_damage(data)
            if damage:
                raise ValueError(damage)
            image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
        except (OSError, ValueError, tf.errors.OpError) as err:
            self._fail(image_path, image_path, _reason(err))
            return empty_image, label, False
        if label_path is not None:
            label_path = label_path.numpy().decode()
            try:
                with open(label_path, "rb") as f:
                    damage = integrity.png_damage(f.read())
                if damage:
                    raise ValueError(damage)
                label = np.asarray(self.reader(label_path), np.uint8)
            except Exception as err:  # noqa: BLE001 -- readers raise UserError, Pillow and TensorFlow errors
                self._fail(image_path, label_path, _reason(err, label_path))
                return empty_image, np.zeros((0, 0), np.uint8), False
        return image, label, True


def _reason(err, path=None):
    """The reason a file failed, in words: without TensorFlow's op decorations or a leading path."""
    if isinstance(err, tf.errors.OpError):
        message = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", err.message)
        message = re.sub(r"\s*\[Op:\w+\].*$", "", message, flags=re.S)
        return f"cannot be decoded ({message})"
    if isinstance(err, OSError) and err.strerror:
        return f"cannot be read ({err.strerror})"
    message = str(err)
    if path and message.startswith(f"{path}: "):
        message = message[len(path) + 2:]
    if isinstance(err, ValueError) and "PNG" in message:
        return message
    return f"cannot be decoded ({message.rstrip('.')})"


def _guarded_source(guard):
    def decode(image_path, label_path):
        image, label, ok = tf.py_function(guard.decode, [image_path, label_path], [tf.uint8, tf.uint8, tf.bool])
        image.set_shape([None, None, 3])
        label.set_shape([None, None])
        ok.set_shape([])
        return image, label, ok
    return decode


def _guarded_target(guard):
    def decode(image_path, image_labels):
        image, _, ok = tf.py_function(guard.decode, [image_path], [tf.uint8, tf.uint8, tf.bool])
        image.set_shape([None, None, 3])
        ok.set_shape([])
        return image, image_labels, ok
    return decode


def _is_ok(first, second, ok):
    return ok


def _without_ok(first, second, ok):
    return first, second


def _decoded(ds, decode):
    """`decode` (which adds an `ok` flag) in parallel; the failed elements dropped, `ok` removed."""
    return ds.map(decode, num_parallel_calls=AUTOTUNE).filter(_is_ok).map(_without_ok)


def _endless(ds, seed, batch_size, skip_batches, decode, resize, cache=False):
    count = ds.cardinality()  # of the file names: known, where it is not after a filter

    def batches(_):
        files = ds
        if cache:
            # The decoded files are kept in memory (uint8, at their own size) after their first use and resized
            # every time, as without the cache. The shuffle below sees as many elements with the same seed as
            # it does file names without the cache, so the batches are the same.
            files = _decoded(files, decode).cache()
        # The shuffled order is a function of the seed alone, so skipping the elements of the batches a resumed
        # run has already seen (cheap without the cache: nothing is decoded) continues the uninterrupted run's
        # order.
        files = files.shuffle(count, seed=seed, reshuffle_each_iteration=True).repeat()
        files = files.skip(skip_batches * batch_size)
        if not cache:
            # A file damaged past its header (checked at start-up) is dropped and named each time it is met.
            files = _decoded(files, decode)
        return files.map(resize, num_parallel_calls=AUTOTUNE).batch(batch_size, drop_remainder=True)

    # Made anew for each iterator: a shuffle's seed generator belongs to its dataset and goes on from one iterator
    # to the next, so a second iterator of one dataset would see another order. Keras' fit under a distribution
    # strategy reads a batch through an iterator of its own before training; the run's order, and a resumed
    # run's, would then depend on it.
    return tf.data.Dataset.range(1).flat_map(batches)


def source_dataset(pairs, reader, size, batch_size, seed=0, shard=None, skip_batches=0, cache=False,
                   on_error=None):
    """Endless shuffled batches of `(image, label)` from (image, label) path pairs.

    `shard=(count, index)` keeps every count-th pair from index on (one input pipeline of several);
    `skip_batches` starts after that many batches of the same sequence (resuming a run); `cache` keeps the
    decoded files in memory after their first use (uint8: 4 bytes a pixel at the files' own size), so only the
    first epoch reads and decodes them. A pair whose image or label fails to decode is dropped and
    `on_error(path, reason)` is called once for it (default: a line naming it)."""
    images, labels = zip(*pairs)
    ds = _shard(tf.data.Dataset.from_tensor_slices((list(images), list(labels))), shard)
    guard = _FileGuard("source", _shard_size(len(images), shard), reader, on_error)
    return _endless(ds, seed, batch_size, skip_batches, _guarded_source(guard),
                    lambda i, l: (resize_image(i, size), resize_label(l, size)), cache)


def target_dataset(image_paths, image_labels, size, batch_size, seed=0, shard=None, skip_batches=0, cache=False,
                   on_error=None):
    """Endless shuffled batches of `(image, soft image-level labels)`; `image_labels` is `[N, C]`; `cache` and
    `on_error` as for `source_dataset` (3 bytes a pixel)."""
    labels = np.asarray(image_labels, np.float32)
    ds = _shard(tf.data.Dataset.from_tensor_slices((list(image_paths), labels)), shard)
    guard = _FileGuard("target", _shard_size(len(labels), shard), None, on_error)
    return _endless(ds, seed + 1, batch_size, skip_batches, _guarded_target(guard),
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
