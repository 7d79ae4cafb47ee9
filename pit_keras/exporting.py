"""Export of a training run for deployment: a SavedModel in TF Serving's layout and `.tflite` models for LiteRT.

Only the fine segmenter is exported (no coarse units, no w^k). The output folder is built under a temporary
name beside the destination and renamed into place once complete, so an interrupted export never leaves a
half model, and an existing export is replaced only after its successor is whole.

    OUTPUT/saved_model/pit/1/        serving_default: uint8 [batch, H, W, 3] of any size -> labels, probabilities
    OUTPUT/pit_float32.tflite        uint8 [1, H, W, 3] at a fixed size -> labels (int32), probabilities
    OUTPUT/pit_float16.tflite        float16 weights
    OUTPUT/pit_dynamic_int8.tflite   int8 weights, float activations
    OUTPUT/pit_int8.tflite           int8 weights and activations (calibrated on target images) -> labels
    OUTPUT/metadata.json             classes, palette, sizes, preprocessing, training run, checkpoint, files
"""

import os
import shutil
import tempfile

from pit_keras import checkpoints, inference
from pit_keras.data import classes
from pit_keras.errors import UserError

SAVED_MODEL = "saved_model"
TFLITE_VARIANTS = ("float32", "float16", "dynamic_int8", "int8")
FORMATS = (SAVED_MODEL,) + TFLITE_VARIANTS
SAVED_MODEL_VERSION = 1


def tflite_filename(variant):
    """The file name of a TFLite variant inside an export folder."""
    return f"pit_{variant}.tflite"


def tflite_function(segmenter, probabilities=True):
    """The function behind a TFLite model: uint8 `[1, H, W, 3]` at its fixed size -> labels (and probabilities).

    The network runs at the input size itself (no resize inside), and the argmax is `tf.math.argmax` with an
    int32 output, which converts to the builtin ARG_MAX (`keras.ops.argmax` does not).

    Args:
        segmenter: a Keras model from float RGB in [0, 255] to logits.
        probabilities: also return the softmax (left out of the full-int8 model, where it would be 8-bit).
    """
    import tensorflow as tf

    def serve(images):
        logits = segmenter(tf.cast(images, tf.float32), training=False)
        outputs = {"labels": tf.math.argmax(logits, axis=-1, output_type=tf.int32)}
        if probabilities:
            outputs["probabilities"] = tf.nn.softmax(logits, axis=-1)
        return outputs

    return serve


def write_saved_model(segmenter, function, input_spec, path):
    """Writes `function` (which calls `segmenter`) as a SavedModel whose `serving_default` signature it is.

    Keras' `ExportArchive` tracks the model's variables explicitly, which the TFLite converter needs to freeze
    them into constants (a plain `tf.Module` leaves them as resource variables the interpreter cannot read).
    """
    import keras

    archive = keras.export.ExportArchive()
    archive.track(segmenter)
    archive.add_endpoint("serving_default", function, input_signature=[input_spec])
    archive.write_out(path, verbose=False)


def calibration_images(config, input_size, count):
    """Up to `count` target training images of the run at `input_size`, as uint8 `[1, H, W, 3]` arrays.

    Full-integer quantization fixes each activation's range from these, so they come from the domain the
    model is deployed on (the target), not the source.

    Raises:
        UserError: if the run's target has no training images.
    """
    import tensorflow as tf
    from pit_keras.data import datasets, pipeline

    pairs, _, _ = datasets.target_pairs(config["target"], config["target_root"], "train")
    images = []
    for path, _ in pairs[:count]:
        image = pipeline.load_image(path, input_size)
        images.append(tf.cast(tf.round(image), tf.uint8).numpy()[None])
    return images


def convert_tflite(segmenter, input_size, variant, calibration=None):
    """Converts the segmenter to a `.tflite` flatbuffer with builtin ops only (no Flex ops).

    Args:
        segmenter: a Keras model from float RGB in [0, 255] to logits.
        input_size: (W, H) of the fixed input.
        variant: float32 | float16 (float16 weights) | dynamic_int8 (int8 weights, float activations) |
            int8 (int8 weights and activations; uint8 input, int32 labels out).
        calibration: for int8, the uint8 `[1, H, W, 3]` images that fix the activation ranges.

    Returns:
        The model as bytes.
    """
    import tensorflow as tf

    if variant not in TFLITE_VARIANTS:
        raise ValueError(f"Unknown TFLite variant {variant!r}; expected one of {TFLITE_VARIANTS}.")
    width, height = input_size
    with tempfile.TemporaryDirectory() as saved_model:
        write_saved_model(segmenter, tflite_function(segmenter, probabilities=variant != "int8"),
                          tf.TensorSpec([1, height, width, 3], tf.uint8, name="images"), saved_model)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        configure_converter(converter, variant, calibration)
        return converter.convert()


def configure_converter(converter, variant, calibration):
    """Sets a converter's ops and optimizations for a TFLite variant (see `convert_tflite`)."""
    import tensorflow as tf

    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        if not calibration:
            raise UserError("--calibration_images: the int8 model needs at least one target training image.")
        converter.representative_dataset = lambda: ([image] for image in calibration)
        # The uint8 -> float cast at the input and the int32 argmax at the output stay outside the int8 set.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                               tf.lite.OpsSet.TFLITE_BUILTINS]


def save_saved_model(segmenter, target_size, path):
    """Writes the serving SavedModel (`inference.serving_function`, images of any size) to `path`."""
    write_saved_model(segmenter, inference.serving_function(segmenter, target_size), inference.serving_signature(),
                      path)


def file_sizes(folder):
    """`{relative path: bytes}` of every file under `folder`, sorted by path."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    return dict(sorted(sizes.items()))


def build_metadata(model_dir, config, checkpoint, saved_model, tflite_size, tflite_variants, calibration_count,
                   files):
    """The `metadata.json` of an export: what a deployment needs to know without the training code.

    Args:
        model_dir: the training run folder.
        config: its `run.json`.
        checkpoint: the exported checkpoint's path.
        saved_model: whether the export holds the SavedModel.
        tflite_size: (W, H) of the TFLite input.
        tflite_variants: the TFLite variants exported.
        calibration_count: images the int8 model was calibrated on.
        files: `file_sizes` of the export folder.
    """
    class_set = classes.CLASS_SETS[config["class_set"]]
    target_width, target_height = config["target_size"]
    return {
        "class_set": class_set.name,
        "classes": list(class_set.names),
        "palette": [list(colour) for colour in class_set.palette],
        "ignore_train_id": classes.IGNORE_INDEX,
        "preprocessing": (
            f"RGB uint8 pixels, cast to float32 in [0, 255]; the {config['backbone']} backbone's own "
            "normalisation is part of the graph, so clients send plain pixels."),
        "saved_model": {
            "path": os.path.join(inference.SAVED_MODEL_SUBDIR, str(SAVED_MODEL_VERSION)),
            "signature": "serving_default",
            "input": {"name": "images", "dtype": "uint8", "shape": ["batch", "H", "W", 3]},
            "resized_to": [target_width, target_height],
            "outputs": {"labels": {"dtype": "int32", "shape": ["batch", "H", "W"]},
                        "probabilities": {"dtype": "float32", "shape": ["batch", "H", "W", class_set.num_classes]}},
            "note": "images of any size are resized bilinearly to resized_to (W, H); outputs are at the input size",
        } if saved_model else None,
        "tflite": {
            "input": {"name": "images", "dtype": "uint8", "shape": [1, tflite_size[1], tflite_size[0], 3]},
            "input_size": list(tflite_size),
            "variants": {variant: {
                "file": tflite_filename(variant),
                "outputs": ["labels"] if variant == "int8" else ["labels", "probabilities"],
            } for variant in tflite_variants},
            "calibration_images": calibration_count,
        } if tflite_variants else None,
        "training_run": {"model_dir": os.path.abspath(model_dir), "config": config},
        "checkpoint": os.path.basename(checkpoint),
        "checkpoint_step": inference.checkpoint_step(checkpoint),
        "files": files,
    }


def check_output_dir(output_dir, overwrite):
    """Refuses an existing output folder unless `overwrite`; checked before any work starts."""
    if os.path.lexists(output_dir) and not overwrite:
        raise UserError(f"--output_dir={output_dir} already exists; pass --overwrite to replace it.")
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir={output_dir} is a file, not an export folder.")


def export(model_dir, output_dir, tflite_size=None, calibration_count=100, formats=FORMATS, overwrite=False,
           log=print):
    """Exports a training run's newest checkpoint.

    Args:
        model_dir: the training run folder.
        output_dir: the export folder to create (or replace, with `overwrite`).
        tflite_size: (W, H) of the TFLite models' fixed input; the run's target_size if None.
        calibration_count: target training images to calibrate the int8 model on.
        formats: a subset of `FORMATS`.
        overwrite: replace an existing `output_dir`, once the new export is complete.
        log: where progress lines go.

    Returns:
        The metadata dict written to `OUTPUT/metadata.json`.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise UserError(f"--formats={','.join(formats)}: choose from {', '.join(FORMATS)}.")
    output_dir = os.path.abspath(output_dir)
    check_output_dir(output_dir, overwrite)
    # The exported graph holds ASPP heads as their four dilated convolutions (builtin CONV_2D, quantized per output
    # channel, run whole by int8 accelerators and delegates), not as the training's matrix product, whose 33 taps
    # would share one int8 scale and leave float ops between int8 ones (label agreement 97.9% against 98.8%).
    segmenter, config, checkpoint = inference.load_segmenter(model_dir, aspp_implementation="conv")
    tflite_size = tuple(tflite_size or config["target_size"])
    parent, name = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    # A sibling folder, so the final rename stays on one file system and is atomic.
    staging = os.path.join(parent, f".{name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        if SAVED_MODEL in formats:
            save_saved_model(segmenter, config["target_size"],
                             os.path.join(staging, inference.SAVED_MODEL_SUBDIR, str(SAVED_MODEL_VERSION)))
            log(f"wrote the SavedModel ({checkpoint})")
        variants = [v for v in TFLITE_VARIANTS if v in formats]
        calibration = (calibration_images(config, tflite_size, calibration_count) if "int8" in variants else None)
        for variant in variants:
            flatbuffer = convert_tflite(segmenter, tflite_size, variant, calibration)
            with open(os.path.join(staging, tflite_filename(variant)), "wb") as f:
                f.write(flatbuffer)
            log(f"wrote {tflite_filename(variant)} ({len(flatbuffer) / 1e6:.2f} MB)")
        metadata = build_metadata(model_dir, config, checkpoint, SAVED_MODEL in formats, tflite_size, variants,
                                  len(calibration) if calibration else 0, file_sizes(staging))
        checkpoints.write_json_atomic(os.path.join(staging, inference.METADATA_FILE), metadata)
        replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return metadata


def replace_folder(new, destination):
    """Moves the complete folder `new` to `destination`; an old `destination` is deleted only once `new` is in
    its place.

    POSIX has no atomic swap of two folders, so the old one steps aside first (to `NEW-old`); should the second
    rename fail it is put back. Only a kill between the two renames leaves the old export under that name.
    """
    if not os.path.exists(destination):
        os.rename(new, destination)
        return
    old = f"{new}-old"
    os.rename(destination, old)
    try:
        os.rename(new, destination)
    except BaseException:
        os.rename(old, destination)
        raise
    shutil.rmtree(old)
