"""Export of a training run for deployment: a SavedModel in TF Serving's layout and `.tflite` models for LiteRT.

Only the fine segmenter is exported (no coarse units, no w^k). The output folder is built under a temporary
name beside the destination and swapped into place once complete, so an interrupted export never leaves a
half model, and an existing export is replaced only after its successor is whole. `--overwrite` replaces only
an earlier export: a folder whose `metadata.json` is one this module wrote and that holds no file that
metadata does not list (`check_output_dir`); any other non-empty folder is refused.

    OUTPUT/saved_model/pit/1/        serving_default: uint8 [batch, H, W, 3] of any size -> labels, probabilities
    OUTPUT/pit_float32.tflite        uint8 [1, H, W, 3] at a fixed size -> logits (float32 [1, H, W, C])
    OUTPUT/pit_float16.tflite        float16 weights
    OUTPUT/pit_dynamic_int8.tflite   int8 weights, float activations
    OUTPUT/pit_int8.tflite           int8 weights and activations (calibrated on target images); the int8
                                     logits are dequantized at the output
    OUTPUT/pit_gpu_float16.tflite    for GPU delegates: float32 [1, H, W, 3] pixels in [0, 255] -> logits,
                                     float16 weights, no ARG_MAX, no CAST, no int64 tensor
    OUTPUT/metadata.json             classes, palette, sizes, preprocessing, training run, checkpoint, files

Every `.tflite` model has one output, the per-class logits at the input size, and no argmax: that is the layout
MediaPipe's ImageSegmenter reads (it takes the argmax as its category mask), and the LiteRT GPU delegate has no
ARG_MAX. With mediapipe installed each model also carries MediaPipe's ImageSegmenter metadata
(`mediapipe_metadata`): normalisation, the class names as a labels file, softmax activation.
"""

import contextlib
import gc
import json
import os
import shutil
import tempfile

from pit_keras import atomic, console
from pit_keras.deploy import serving
from pit_keras.deploy import predictors
from pit_keras.deploy import mediapipe_metadata
from pit_keras.data import classes
from pit_keras.errors import UserError

SAVED_MODEL = "saved_model"
TFLITE_VARIANTS = ("float32", "float16", "dynamic_int8", "int8", "gpu_float16")
# The input each variant takes: uint8 pixels, or float32 pixels in [0, 255] for GPU delegates (which run float
# tensors; a uint8 input would need a CAST they may not support).
TFLITE_INPUT_DTYPES = {"float32": "uint8", "float16": "uint8", "dynamic_int8": "uint8", "int8": "uint8",
                       "gpu_float16": "float32"}
TFLITE_OUTPUT = "logits"
# The input normalisation written into MediaPipe's metadata: the task feeds (pixel - mean) / std to a float
# input, so mean 0 and std 1 give the [0, 255] pixels the graph expects (the backbone's own normalisation is
# inside the graph). A uint8 input gets the pixels as they are whatever the metadata says.
NORM_MEAN = (0.0,)
NORM_STD = (1.0,)
FORMATS = (SAVED_MODEL,) + TFLITE_VARIANTS
SAVED_MODEL_VERSION = 1


def tflite_filename(variant):
    """The file name of a TFLite variant inside an export folder."""
    return f"pit_{variant}.tflite"


def tflite_function(segmenter):
    """The function behind a TFLite model: `[1, H, W, 3]` pixels at its fixed size -> `{"logits": [1, H, W, C]}`.

    The network runs at the input size itself (no resize inside except its own bilinear upsampling of the logits,
    `tf.image.resize`: RESIZE_BILINEAR with half-pixel centres, not align_corners). There is no argmax: the
    client (MediaPipe's task, `predictors.TFLitePredictor`) takes it.

    Args:
        segmenter: a Keras model from float RGB in [0, 255] to logits.
    """
    import tensorflow as tf

    def serve(images):
        return {TFLITE_OUTPUT: segmenter(tf.cast(images, tf.float32), training=False)}

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
    """Up to `count` target training images of the run at `input_size`, as uint8 `[1, H, W, 3]` arrays, spread
    evenly over its list of them.

    Full-integer quantization fixes each activation's range from these, so they come from the domain the
    model is deployed on (the target), not the source.

    Raises:
        UserError: if the run's target has no training images.
    """
    import tensorflow as tf
    from pit_keras.data import datasets, pipeline

    pairs, _, _ = datasets.target_pairs(config.target, config.target_root, "train",
                                        benchmark_seed=config.benchmark_seed)
    # Spread over the whole list (sorted by path, so Cityscapes' first hundred are all Aachen's).
    chosen = [pairs[i * len(pairs) // count] for i in range(count)] if len(pairs) > count else pairs
    images = []
    for path, _ in chosen:
        image = pipeline.load_image(path, input_size)
        images.append(tf.cast(tf.round(image), tf.uint8).numpy()[None])
    return images


def convert_tflite(segmenter, input_size, variant, calibration=None, work_dir=None):
    """Converts the segmenter to a `.tflite` flatbuffer with builtin ops only (no Flex ops).

    Args:
        segmenter: a Keras model from float RGB in [0, 255] to logits.
        input_size: (W, H) of the fixed input.
        variant: float32 | float16 (float16 weights) | dynamic_int8 (int8 weights, float activations) |
            int8 (int8 weights and activations; uint8 input, logits dequantized at the output) |
            gpu_float16 (float16 weights, float32 input).
        calibration: for int8, the uint8 `[1, H, W, 3]` images that fix the activation ranges.
        work_dir: where the SavedModel the converter reads is written, once per input dtype and size, for the
            later variants of the same segmenter to reuse: one folder per segmenter (a temporary one if None).

    Returns:
        The model as bytes.
    """
    import tensorflow as tf

    if variant not in TFLITE_VARIANTS:
        raise ValueError(f"Unknown TFLite variant {variant!r}; expected one of {TFLITE_VARIANTS}.")
    width, height = input_size
    dtype = TFLITE_INPUT_DTYPES[variant]
    with contextlib.ExitStack() as stack:
        work_dir = work_dir or stack.enter_context(tempfile.TemporaryDirectory())
        saved_model = os.path.join(work_dir, f"tflite_{dtype}_{width}x{height}")
        if not os.path.exists(saved_model):  # renamed into place once whole: a failed write is never reused
            write_saved_model(segmenter, tflite_function(segmenter),
                              tf.TensorSpec([1, height, width, 3], dtype, name="images"), saved_model + ".partial")
            os.rename(saved_model + ".partial", saved_model)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        configure_converter(converter, variant, calibration)
        with console.quiet_stderr(), _heap_frozen():  # quiet: the converter's own log lines
            return converter.convert()


@contextlib.contextmanager
def _heap_frozen():
    """Freezes the objects that exist (`gc.freeze`), unless something else has frozen some. The converter runs a
    full garbage collection once it has loaded its SavedModel; it then walks the conversion's own objects only,
    not the whole heap (0.9 s a variant in a process holding many traced graphs)."""
    ours = gc.get_freeze_count() == 0
    if ours:
        gc.freeze()
    try:
        yield
    finally:
        if ours:
            gc.unfreeze()


def configure_converter(converter, variant, calibration):
    """Sets a converter's ops and optimizations for a TFLite variant (see `convert_tflite`)."""
    import tensorflow as tf

    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant in ("float16", "gpu_float16"):
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        if not calibration:
            raise UserError("--calibration_images: the int8 model needs at least one target training image.")
        converter.representative_dataset = lambda: ([image] for image in calibration)
        # The uint8 -> float cast at the input and the dequantization of the logits at the output stay outside
        # the int8 set; everything between runs in int8.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                               tf.lite.OpsSet.TFLITE_BUILTINS]


def save_saved_model(segmenter, target_size, path):
    """Writes the serving SavedModel (`serving.serving_function`, images of any size) to `path`."""
    write_saved_model(segmenter, serving.serving_function(segmenter, target_size), serving.serving_signature(),
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
                   files, mediapipe=False):
    """The `metadata.json` of an export: what a deployment needs to know without the training code.

    Args:
        model_dir: the training run folder.
        config: its `RunConfig`.
        checkpoint: the exported checkpoint's path.
        saved_model: whether the export holds the SavedModel.
        tflite_size: (W, H) of the TFLite input.
        tflite_variants: the TFLite variants exported.
        calibration_count: images the int8 model was calibrated on.
        files: `file_sizes` of the export folder.
        mediapipe: whether the `.tflite` models carry MediaPipe ImageSegmenter metadata.
    """
    class_set = config.classes
    target_width, target_height = config.target_size
    return {
        "class_set": class_set.name,
        "classes": list(class_set.names),
        "palette": [list(colour) for colour in class_set.palette],
        "ignore_train_id": classes.IGNORE_INDEX,
        "preprocessing": (f"RGB pixels, uint8 (float32 in [0, 255] for gpu_float16), cast to float32; the "
                          f"{config.backbone} backbone's own normalisation is part of the graph, so clients send "
                          "plain pixels."),
        "saved_model": {
            "path": os.path.join(predictors.SAVED_MODEL_SUBDIR, str(SAVED_MODEL_VERSION)),
            "signature": "serving_default",
            "input": {"name": "images", "dtype": "uint8", "shape": ["batch", "H", "W", 3]},
            "resized_to": [target_width, target_height],
            "outputs": {"labels": {"dtype": "int32", "shape": ["batch", "H", "W"]},
                        "probabilities": {"dtype": "float32", "shape": ["batch", "H", "W", class_set.num_classes]}},
            "note": "images of any size are resized bilinearly to resized_to (W, H); outputs are at the input size",
        } if saved_model else None,
        "tflite": {
            "input_size": list(tflite_size),
            "variants": {variant: {
                "file": tflite_filename(variant),
                "input": {"name": "images", "dtype": TFLITE_INPUT_DTYPES[variant],
                          "shape": [1, tflite_size[1], tflite_size[0], 3], "range": [0, 255]},
                "outputs": {TFLITE_OUTPUT: {"dtype": "float32",
                                            "shape": [1, tflite_size[1], tflite_size[0], class_set.num_classes]}},
            } for variant in tflite_variants},
            "note": "one output, the per-class logits at the input size; the train ids are their argmax",
            "calibration_images": calibration_count,
            "mediapipe_metadata": {"task": "ImageSegmenter", "norm_mean": list(NORM_MEAN),
                                   "norm_std": list(NORM_STD), "activation": "SOFTMAX",
                                   "labels": list(class_set.names)} if mediapipe else None,
        } if tflite_variants else None,
        "training_run": {"model_dir": os.path.abspath(model_dir), "config": config.to_json()},
        "checkpoint": os.path.basename(checkpoint),
        "checkpoint_step": predictors.checkpoint_step(checkpoint),
        "files": files,
    }


def _export_files(output_dir):
    """The files `metadata.json` lists (relative paths) if `output_dir` holds an export this module wrote, or
    None."""
    try:
        with open(os.path.join(output_dir, predictors.METADATA_FILE)) as f:
            metadata = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("files"), dict) or not all(
            key in metadata for key in ("class_set", "checkpoint", "training_run")):
        return None
    return set(metadata["files"])


def check_output_dir(output_dir, overwrite):
    """Refuses an output folder the export must not replace; checked before any work starts and again just
    before the new export is swapped in.

    A missing or empty folder is taken. An earlier export (its `metadata.json`, and no file that metadata does
    not list) is replaced only with `overwrite`. Anything else is refused, with `overwrite` or not: a file, a
    symbolic link, a folder holding anything else (`--output_dir=$HOME --overwrite` leaves a home alone).
    """
    if not os.path.lexists(output_dir):
        return
    if os.path.islink(output_dir):
        raise UserError(f"--output_dir={output_dir} is a symbolic link; give the folder itself.")
    if not os.path.isdir(output_dir):
        raise UserError(f"--output_dir={output_dir} is a file, not an export folder.")
    if not os.listdir(output_dir):
        return
    listed = _export_files(output_dir)
    if listed is None:
        raise UserError(f"--output_dir={output_dir} is a folder that holds no earlier export (no metadata.json "
                        "written by export), so it is never replaced, --overwrite or not; choose a new or empty "
                        "folder.")
    for root, _, names in os.walk(output_dir):
        for name in sorted(names):
            relative = os.path.relpath(os.path.join(root, name), output_dir)
            if relative != predictors.METADATA_FILE and relative not in listed:
                raise UserError(f"--output_dir={output_dir} holds an export and also {relative}, which that "
                                "export did not write, so it is not replaced, --overwrite or not; move that file "
                                "or choose another folder.")
    if not overwrite:
        raise UserError(f"--output_dir={output_dir} already exists; pass --overwrite to replace it.")


def export(model_dir, output_dir, tflite_size=None, calibration_count=100, formats=FORMATS, overwrite=False,
           log=print, mediapipe=None):
    """Exports a training run's newest checkpoint.

    Args:
        model_dir: the training run folder.
        output_dir: the export folder to create (or replace, with `overwrite`).
        tflite_size: (W, H) of the TFLite models' fixed input; the run's target_size if None.
        calibration_count: target training images to calibrate the int8 model on.
        formats: a subset of `FORMATS`.
        overwrite: replace an existing `output_dir`, once the new export is complete.
        log: where progress lines go.
        mediapipe: add MediaPipe ImageSegmenter metadata to the `.tflite` models (None: if mediapipe is
            installed; without it the models are written without and one line says so).

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
    segmenter, config, checkpoint = predictors.load_segmenter(model_dir, aspp_implementation="conv")
    tflite_size = tuple(tflite_size or config.target_size)
    parent, name = os.path.split(output_dir)
    made, _ = atomic.missing_folders(parent)  # removed again if the export fails
    os.makedirs(parent, exist_ok=True)
    staging = atomic.staging_folder(parent, name, "an export", log)
    try:
        if SAVED_MODEL in formats:
            save_saved_model(segmenter, config.target_size,
                             os.path.join(staging, predictors.SAVED_MODEL_SUBDIR, str(SAVED_MODEL_VERSION)))
            log(f"wrote the SavedModel ({checkpoint})")
        variants = [v for v in TFLITE_VARIANTS if v in formats]
        if mediapipe is None:
            mediapipe = mediapipe_metadata.available()
            if variants and not mediapipe:
                log("mediapipe is not installed, so the .tflite models carry no MediaPipe metadata "
                    "(pip install -e \".[deploy]\" adds it); LiteRT runs them either way.")
        class_names = config.classes.names
        calibration = (calibration_images(config, tflite_size, calibration_count) if "int8" in variants else None)
        work_dir = os.path.join(staging, ".tflite_work")  # the SavedModels the variants convert from
        for variant in variants:
            flatbuffer = convert_tflite(segmenter, tflite_size, variant, calibration, work_dir=work_dir)
            if mediapipe:
                flatbuffer = mediapipe_metadata.add_segmenter_metadata(flatbuffer, class_names, NORM_MEAN, NORM_STD,
                                                                       softmax=True)
            with open(os.path.join(staging, tflite_filename(variant)), "wb") as f:
                f.write(flatbuffer)
            log(f"wrote {tflite_filename(variant)} ({len(flatbuffer) / 1e6:.2f} MB"
                f"{', with MediaPipe metadata' if mediapipe else ''})")
        if os.path.exists(work_dir):  # no .tflite variant asked for: never made
            shutil.rmtree(work_dir)
        metadata = build_metadata(model_dir, config, checkpoint, SAVED_MODEL in formats, tflite_size, variants,
                                  len(calibration) if calibration else 0, file_sizes(staging), mediapipe=mediapipe)
        atomic.write_json_atomic(os.path.join(staging, predictors.METADATA_FILE), metadata)
        check_output_dir(output_dir, overwrite)  # again: the folder may have changed while exporting
        atomic.replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made:  # a refused export leaves nothing behind
            shutil.rmtree(made, ignore_errors=True)
        raise
    return metadata
