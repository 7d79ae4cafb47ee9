"""On-device deployment: every exported .tflite variant runs in MediaPipe's ImageSegmenter task on the real
Cityscapes frame in tests/data/ and agrees with predict on the same run folder; the full-int8 model is integer
inside; the GPU-delegate variant has no ArgMax and no int64 tensor; predict segments a video.

One tiny run, trained at the frame's size (256x128) so that predict on the run folder and the exported models
see the same input, is shared by the module. train and predict run in the test's process (tests/commands.py)."""

import re
import time

import numpy as np
import pytest
from PIL import Image

from commands import run_in_process
from conftest import CITYSCAPES_FRAME

FRAME = CITYSCAPES_FRAME / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png"
VARIANTS = ["float32", "float16", "dynamic_int8", "int8", "gpu_float16"]
# Pixel agreement of MediaPipe's category mask with predict on the run folder. The full-int8 model's moves with
# rounding-level changes of the 60 training steps (measured: 98.68 %, and 96.54 % with TensorFlow's graph
# optimiser off in the training process); a calibration on images at a quarter of their range gives 63.53 %.
MIN_TASK_AGREEMENT = {"float32": 0.99, "float16": 0.99, "dynamic_int8": 0.99, "int8": 0.95, "gpu_float16": 0.99}

mediapipe = pytest.importorskip("mediapipe", reason='MediaPipe tests need pip install -e ".[deploy]"')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A plain segmenter trained for 60 steps at 256x128 on a generated benchmark of that size."""
    from pit_keras.data import synthetic

    root = tmp_path_factory.mktemp("deploy") / "benchmark"
    synthetic.generate(root, num_source=6, num_target_train=6, num_target_val=2, size=(256, 128), seed=1)
    model_dir = root.parent / "run"
    result = run_in_process(
        "train", "--method=source_only", "--source=gta5", f"--source_root={root / 'gta5'}", "--target=cityscapes",
        f"--target_root={root / 'cityscapes'}", "--source_size=256,128", "--target_size=256,128", "--batch_size=2",
        "--learning_rate=0.05", "--num_steps=60", "--log_every=60", "--checkpoint_every=60", "--image_every=0",
        "--evaluate=false", f"--model_dir={model_dir}", "--verbose=0")
    assert result.returncode == 0, result.stderr[-2000:]
    return model_dir


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """Every .tflite variant at the run's (and the frame's) size, with MediaPipe metadata."""
    from pit_keras.deploy import exporting

    output = tmp_path_factory.mktemp("deploy_export") / "export"
    lines = []
    exporting.export(model_dir, output, calibration_count=6, formats=exporting.TFLITE_VARIANTS, log=lines.append)
    assert all("with MediaPipe metadata" in line for line in lines), lines
    return output


@pytest.fixture(scope="module")
def frame():
    return np.asarray(Image.open(FRAME).convert("RGB"))


@pytest.fixture(scope="module")
def predicted(model_dir, frame):
    """predict's labels for the frame from the run folder (the Keras network at the run's 256x128)."""
    from pit_keras.deploy import predictors

    labels = predictors.load_predictor(str(model_dir))(frame)
    assert labels.shape == frame.shape[:2]
    return labels


def segment_with_task(model_path, frame):
    """The MediaPipe ImageSegmenter's category mask of the frame, and the class names the task reports."""
    from mediapipe.tasks.python import BaseOptions, vision

    options = vision.ImageSegmenterOptions(base_options=BaseOptions(model_asset_path=str(model_path)),
                                           output_category_mask=True, output_confidence_masks=False)
    with vision.ImageSegmenter.create_from_options(options) as segmenter:
        result = segmenter.segment(mediapipe.Image(image_format=mediapipe.ImageFormat.SRGB,
                                                   data=np.ascontiguousarray(frame)))
        mask = result.category_mask.numpy_view()
        return mask.reshape(frame.shape[:2]).copy(), list(segmenter.labels)


def tensor_ops(path):
    """(op details, tensor details) of a .tflite model in LiteRT's interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return interpreter._get_ops_details(), interpreter.get_tensor_details()


def test_predict_labels_are_not_trivial(predicted):
    """Agreement means something only if the frame gets several classes."""
    counts = np.bincount(predicted.ravel(), minlength=19) / predicted.size
    assert (counts > 0.02).sum() >= 3, counts


@pytest.mark.parametrize("variant", VARIANTS)
def test_mediapipe_task_segments_like_predict(variant, exported, frame, predicted):
    from pit_keras.data import classes

    mask, labels = segment_with_task(exported / f"pit_{variant}.tflite", frame)
    assert labels == list(classes.CITYSCAPES_CLASSES)
    match = float(np.mean(mask == predicted))
    print(f"\n{variant}: MediaPipe's category mask agrees with predict on {100 * match:.2f}% of pixels")
    assert match >= MIN_TASK_AGREEMENT[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_mediapipe_metadata_normalisation_labels_and_activation(variant, exported):
    import json

    from pit_keras.deploy import exporting
    from pit_keras.deploy import mediapipe_metadata
    from pit_keras.data import classes

    model = (exported / f"pit_{variant}.tflite").read_bytes()
    metadata = json.loads(mediapipe_metadata.metadata_json(model))
    subgraph = metadata["subgraph_metadata"][0]
    (image,) = subgraph["input_tensor_metadata"]
    (normalisation,) = image["process_units"]
    assert normalisation["options"] == {"mean": [0.0], "std": [1.0]}
    assert list(exporting.NORM_MEAN) == [0.0] and list(exporting.NORM_STD) == [1.0]
    (output,) = subgraph["output_tensor_metadata"]
    assert output["associated_files"][0]["name"] == "labels.txt"
    assert "SOFTMAX" in json.dumps(subgraph["custom_metadata"])
    labels = mediapipe_metadata.packed_files(model)["labels.txt"].decode().split("\n")
    assert [name for name in labels if name] == list(classes.CITYSCAPES_CLASSES)


def test_int8_model_is_integer_inside(exported, model_dir):
    """Every convolution of the full-int8 model takes int8 activations and weights; floats appear only at the
    uint8 input's cast and the dequantized logits."""
    import keras

    from pit_keras.deploy import predictors

    ops, tensors = tensor_ops(exported / "pit_int8.tflite")
    dtype = {t["index"]: t["dtype"] for t in tensors}
    convolutions = [op for op in ops if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    quantized = [op for op in convolutions if dtype[op["inputs"][0]] == np.int8 and dtype[op["inputs"][1]] == np.int8
                 and dtype[op["outputs"][0]] == np.int8]
    segmenter, _, _ = predictors.load_segmenter(str(model_dir), aspp_implementation="conv")
    layers = [layer for layer in segmenter._flatten_layers() if isinstance(layer, keras.layers.Conv2D)]
    print(f"\nint8: {len(quantized)} of {len(convolutions)} convolutions quantized ({len(layers)} in the network)")
    assert len(quantized) == len(convolutions) == len(layers) > 0
    float_ops = {op["op_name"] for op in ops if any(dtype[i] == np.float32 for i in op["outputs"] if i >= 0)}
    assert float_ops <= {"CAST", "DEQUANTIZE"}, float_ops
    assert {op["op_name"] for op in ops} >= {"QUANTIZE", "DEQUANTIZE"}


def test_gpu_variant_has_no_argmax_or_int64_and_agrees_with_float32(exported, frame):
    from pit_keras.deploy import predictors

    path = exported / "pit_gpu_float16.tflite"
    ops, tensors = tensor_ops(path)
    names = {op["op_name"] for op in ops}
    assert "ARG_MAX" not in names and "ARG_MIN" not in names and "CAST" not in names, names
    assert not [t["name"] for t in tensors if t["dtype"] == np.int64]
    assert "RESIZE_BILINEAR" in names
    assert resize_align_corners(path) == [False] * sum(op["op_name"] == "RESIZE_BILINEAR" for op in ops)
    # float16 weights: the convolution filters are stored as float16.
    assert any(t["dtype"] == np.float16 for t in tensors)
    gpu = predictors.load_predictor(str(path))
    logits = gpu.run(frame)["logits"][0]
    assert logits.shape == frame.shape[:2] + (19,)
    labels = np.argmax(logits, axis=-1)
    reference = predictors.load_predictor(str(exported / "pit_float32.tflite"))(frame)
    match = float(np.mean(labels == reference))
    print(f"\ngpu_float16: host argmax agrees with float32 on {100 * match:.2f}% of pixels")
    assert match >= 0.995


@pytest.mark.parametrize("height,width", [(128, 256), (37, 53), (7, 5)])
def test_numpy_resizing_is_tensorflows(height, width):
    # The .tflite predictor resizes in numpy (so it runs without TensorFlow): what tf.image.resize gives, up and
    # down, to odd sizes, on images, logits and labels.
    import tensorflow as tf

    from pit_keras.deploy import resize

    rng = np.random.default_rng(height)
    pixels = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    logits = rng.normal(size=(height, width, 19)).astype(np.float32)
    labels = rng.integers(0, 19, (height, width)).astype(np.int32)
    for size in [(64, 128), (100, 37), (256, 512), (3, 2)]:
        np.testing.assert_allclose(resize.bilinear(logits, size),
                                   tf.image.resize(logits, size, method="bilinear").numpy(), atol=1e-5)
        expected = tf.cast(tf.round(tf.image.resize(pixels, size, method="bilinear")), tf.uint8).numpy()
        assert np.mean(np.round(resize.bilinear(pixels, size)).astype(np.uint8) == expected) > 0.9999
        expected = tf.image.resize(labels[..., None], size, method="nearest").numpy()[..., 0]
        np.testing.assert_array_equal(resize.nearest(labels, size), expected)


def test_predict_with_a_tflite_model_needs_no_tensorflow(exported, frame, tmp_path):
    # predict in a process where importing TensorFlow or Keras fails (a device with LiteRT, numpy and Pillow),
    # on an image at another size than the model's: both resizes run. Its labels are the test process's.
    import subprocess
    import sys

    from conftest import REPO
    from pit_keras.deploy import predictors

    image = np.asarray(Image.fromarray(frame).resize((200, 90), Image.BILINEAR))
    Image.fromarray(image).save(tmp_path / "street.png")
    model = exported / "pit_float32.tflite"
    code = ("import runpy, sys\n"
            "sys.modules.update(tensorflow=None, keras=None)\n"
            f"sys.argv = ['predict', '--model={model}', '--input={tmp_path / 'street.png'}', "
            f"'--output_dir={tmp_path / 'out'}']\n"
            "runpy.run_module('pit_keras.predict', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "segmented 1 image(s) with the tflite model" in result.stdout
    written = np.asarray(Image.open(tmp_path / "out" / "street_labelTrainIds.png"))
    expected = predictors.load_predictor(str(model))(image)
    assert written.shape == (90, 200) and len(np.unique(expected)) > 1
    np.testing.assert_array_equal(written, expected)


def resize_align_corners(path):
    """The align_corners option of every RESIZE_BILINEAR op of a .tflite model, read from its flatbuffer."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(path.read_bytes()), 0))
    codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes]
    return [bool(op.builtinOptions.alignCorners) for graph in model.subgraphs for op in graph.operators
            if codes[op.opcodeIndex] == schema.BuiltinOperator.RESIZE_BILINEAR]


def test_export_without_mediapipe_says_so_and_still_writes_models(model_dir, tmp_path, monkeypatch):
    from pit_keras.deploy import exporting
    from pit_keras.deploy import predictors
    from pit_keras.deploy import mediapipe_metadata

    monkeypatch.setattr(mediapipe_metadata, "available", lambda: False)
    lines = []
    metadata = exporting.export(model_dir, tmp_path / "export", formats=("float32",), log=lines.append)
    assert len([line for line in lines if "mediapipe is not installed" in line]) == 1
    assert metadata["tflite"]["mediapipe_metadata"] is None
    predictor = predictors.load_predictor(str(tmp_path / "export" / "pit_float32.tflite"))
    assert predictor(np.zeros((128, 256, 3), np.uint8)).shape == (128, 256)


def write_video(path, frame, count=6):
    import cv2

    height, width = frame.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (width, height))
    for shift in range(count):
        writer.write(np.ascontiguousarray(np.roll(frame, 8 * shift, axis=1)[..., ::-1]))
    writer.release()


def test_predict_segments_a_video_and_prints_frames_per_second(exported, frame, tmp_path):
    import cv2

    small = np.asarray(Image.fromarray(frame).resize((128, 64)))
    write_video(tmp_path / "drive.mp4", small)
    result = run_in_process("predict", f"--model={exported / 'pit_int8.tflite'}", f"--input={tmp_path / 'drive.mp4'}",
                            f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "segmented 6 frame(s)" in result.stdout and "frames per second" in result.stdout
    assert re.search(r"in the model alone\) after the first frame, which took [0-9.]+ s with start-up", result.stdout)
    capture = cv2.VideoCapture(str(tmp_path / "out" / "drive_overlay.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    ok, first = capture.read()
    capture.release()
    assert ok and first.shape == (64, 128, 3)


def test_a_video_overlay_replaces_an_earlier_one_only_once_complete(tmp_path):
    import os

    import cv2

    from pit_keras.data import classes
    from pit_keras.deploy import video

    class StopsAtFrame:  # a predictor that fails on one frame (a run killed there leaves the same)
        class_set = classes.CITYSCAPES19

        def __init__(self, stop):
            self.stop, self.calls = stop, 0

        def __call__(self, image):
            self.calls += 1
            if self.calls == self.stop:
                raise RuntimeError("stopped")
            return np.zeros(image.shape[:2], np.int32)

    write_video(tmp_path / "drive.mp4", np.zeros((32, 64, 3), np.uint8), count=4)
    earlier = tmp_path / "out" / "drive_overlay.mp4"
    earlier.parent.mkdir()
    earlier.write_bytes(b"an earlier overlay")
    with pytest.raises(RuntimeError, match="stopped"):
        video.predict_video(StopsAtFrame(3), str(tmp_path / "drive.mp4"), str(earlier.parent))
    assert earlier.read_bytes() == b"an earlier overlay" and os.listdir(earlier.parent) == ["drive_overlay.mp4"]
    output, seconds = video.predict_video(StopsAtFrame(0), str(tmp_path / "drive.mp4"), str(earlier.parent))
    assert output == str(earlier) and len(seconds["all"]) == 4
    capture = cv2.VideoCapture(output)
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    capture.release()


def test_a_synthia_models_labels_are_written_as_cityscapes_train_ids(tmp_path):
    # So that evaluate --predictions_dir reads predict's PNGs in its default 19 classes (and maps them to 16).
    from pit_keras.data import classes
    from pit_keras.deploy import predictors

    class Synthia:
        class_set = classes.SYNTHIA16

        def __call__(self, image):
            return np.array([[0, 9, 15, 255]], np.int32)  # road, sky, bicycle, none in the 16 classes

    Image.fromarray(np.zeros((1, 4, 3), np.uint8)).save(tmp_path / "a.png")
    predictors.predict_files(Synthia(), [str(tmp_path / "a.png")], str(tmp_path / "out"), progress=False)
    written = np.asarray(Image.open(tmp_path / "out" / "a_labelTrainIds.png"))
    np.testing.assert_array_equal(written, [[0, 10, 18, 255]])


def test_frames_per_second_leave_out_the_first_frames_start_up(tmp_path):
    from pit_keras.data import classes
    from pit_keras.deploy import predictors

    class SlowToStart:  # a predictor whose first call pays a start-up (an import, a warm-up)
        class_set, calls = classes.CITYSCAPES19, 0

        def __call__(self, image):
            self.calls += 1
            time.sleep(0.5 if self.calls == 1 else 0.0)
            return np.zeros(image.shape[:2], np.int32)

    images = []
    for k in range(3):
        images.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(images[-1])
    _, failed, seconds = predictors.predict_files(SlowToStart(), images, str(tmp_path / "out"), progress=False)
    assert not failed and len(seconds) == 3 and seconds[0] >= 0.5 > max(seconds[1:])
    assert predictors.speed([2.0, 0.1, 0.1], "image") == \
        "at 10.0 frames per second after the first image, which took 2.00 s with start-up"
    assert predictors.speed([2.0, 0.2, 0.2], "frame", [1.5, 0.1, 0.1]) == \
        "at 5.0 frames per second (10.0 in the model alone) after the first frame, which took 2.00 s with start-up"
    assert predictors.speed([0.3], "image") == "in 0.30 s (one image, start-up included)"


def test_predict_refuses_an_unreadable_video_with_one_sentence(exported, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    result = run_in_process("predict", f"--model={exported / 'pit_float32.tflite'}",
                            f"--input={tmp_path / 'broken.mp4'}", f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--input={tmp_path / 'broken.mp4'}: OpenCV cannot decode this video file." in result.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "notes.txt").write_text("notes")
    result = run_in_process("predict", f"--model={exported / 'pit_float32.tflite'}",
                            f"--input={tmp_path / 'broken.mp4'}", f"--output_dir={tmp_path / 'notes.txt'}")
    assert result.returncode == 2 and (tmp_path / "notes.txt").read_text() == "notes"
    assert f"--output_dir={tmp_path / 'notes.txt'} is a file; give a folder" in result.stderr
