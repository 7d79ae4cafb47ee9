"""Deployment: the shared trained run (conftest.py) is exported once; the SavedModel (in a fresh process) and
every .tflite variant (in LiteRT) are checked against the Keras network's labels, and predict runs all three model
kinds on awkward images. Export's all-or-nothing writing is checked by failing it midway. The commands run in the
test's process (tests/commands.py), but for one refusal of export's."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from commands import run, run_in_process
from conftest import REPO, TRAINED_RUN_STEPS
from pit_keras import atomic

# Pixel agreement with the Keras network's labels each variant must reach.
MIN_AGREEMENT = {"float32": 0.995, "float16": 0.995, "dynamic_int8": 0.97, "int8": 0.97, "gpu_float16": 0.995}


@pytest.fixture(scope="module")
def model_dir(trained_run):
    """The shared PIT run (with coarse units), trained for real so that its labels are not trivial."""
    return trained_run[0]


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    from pit_keras.deploy import exporting

    output = tmp_path_factory.mktemp("exports") / "pit"
    metadata = exporting.export(model_dir, output, calibration_count=6)
    return output, metadata


@pytest.fixture(scope="module")
def keras_predictor(model_dir):
    from pit_keras.deploy import predictors

    return predictors.load_predictor(str(model_dir))


@pytest.fixture(scope="module")
def target_images(tiny_benchmark):
    """The benchmark's target images (train and val) at 64x32, as uint8 RGB."""
    from pit_keras.data import images

    paths = sorted(str(p) for p in (tiny_benchmark / "cityscapes" / "leftImg8bit").rglob("*.png"))
    return [images.read_image(p) for p in paths]


def agreement(predictor, reference, images):
    return float(np.mean([np.mean(predictor(image) == reference(image)) for image in images]))


def test_export_writes_serving_layout_tflite_models_and_metadata(exported, model_dir):
    output, metadata = exported
    assert sorted(os.listdir(output)) == ["metadata.json", "pit_dynamic_int8.tflite", "pit_float16.tflite",
                                          "pit_float32.tflite", "pit_gpu_float16.tflite", "pit_int8.tflite",
                                          "saved_model"]
    assert os.path.isfile(output / "saved_model" / "pit" / "1" / "saved_model.pb")
    assert json.loads((output / "metadata.json").read_text()) == metadata
    assert metadata["classes"][0] == "road" and len(metadata["palette"]) == 19
    assert metadata["checkpoint"] == f"ckpt-{TRAINED_RUN_STEPS}" and metadata["checkpoint_step"] == TRAINED_RUN_STEPS
    assert metadata["training_run"]["model_dir"] == str(model_dir)
    assert metadata["training_run"]["config"]["target_size"] == [64, 32]
    assert metadata["tflite"]["input_size"] == [64, 32]
    assert metadata["files"]["pit_float32.tflite"] == os.path.getsize(output / "pit_float32.tflite")
    assert set(metadata["files"]) >= {"saved_model/pit/1/saved_model.pb", "pit_int8.tflite"}
    assert not [name for name in os.listdir(output.parent) if name.startswith(".")]


def test_saved_model_in_a_fresh_process_matches_keras(exported, keras_predictor, target_images, tmp_path):
    output, _ = exported
    # An odd size exercises the resize to target_size and back inside the graph.
    odd = np.asarray(Image.fromarray(target_images[0]).resize((45, 27)))
    images = target_images[:4] + [odd]
    np.savez(tmp_path / "images.npz", *images)
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "images = np.load(sys.argv[2], allow_pickle=False)\n"
        "out = {}\n"
        "for key in images.files:\n"
        "    result = serve(images=tf.constant(images[key][None]))\n"
        "    assert result['probabilities'].shape[-1] == 19\n"
        "    out[key] = result['labels'][0].numpy()\n"
        "np.savez(sys.argv[3], **out)\n")
    result = subprocess.run([sys.executable, "-c", script, str(output / "saved_model" / "pit" / "1"),
                             str(tmp_path / "images.npz"), str(tmp_path / "labels.npz")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    labels = np.load(tmp_path / "labels.npz", allow_pickle=False)
    for index, image in enumerate(images):
        served = labels[f"arr_{index}"]
        assert served.shape == image.shape[:2] and served.dtype == np.int32
        match = np.mean(served == keras_predictor(image))
        assert match >= 0.999, f"image {index}: {match:.4f}"


def test_saved_model_holds_no_coarse_unit_variables(exported, model_dir):
    import tensorflow as tf

    from pit_keras import runs
    from pit_keras.deploy import predictors
    from pit_keras.models.network import build_network

    output, _ = exported
    loaded = tf.saved_model.load(str(output / "saved_model" / "pit" / "1"))
    segmenter, config, _ = predictors.load_segmenter(str(model_dir))
    network = build_network(config.backbone, config.num_classes, num_units=len(config.lse_r))
    shapes = sorted(tuple(v.shape) for v in loaded.variables)
    assert shapes == sorted(tuple(v.shape) for v in segmenter.variables)
    assert len(network.variables) > len(loaded.variables)
    assert not [v.name for v in loaded.variables if "coarse" in v.name or "reconstruction" in v.name]
    assert runs.read_config(str(model_dir)).method == "pit"


@pytest.mark.parametrize("variant", ["float32", "float16", "dynamic_int8", "int8", "gpu_float16"])
def test_tflite_runs_in_litert_and_agrees_with_keras(variant, exported, keras_predictor, target_images):
    from pit_keras.deploy import predictors

    output, _ = exported
    predictor = predictors.load_predictor(str(output / f"pit_{variant}.tflite"))
    assert predictor.kind == "tflite"
    details = predictor.runner.get_input_details()["images"]
    assert list(details["shape"]) == [1, 32, 64, 3]
    assert details["dtype"] == (np.float32 if variant == "gpu_float16" else np.uint8)
    outputs = predictor.run(target_images[0])
    assert list(outputs) == ["logits"]
    assert outputs["logits"].shape == (1, 32, 64, 19) and outputs["logits"].dtype == np.float32
    ops = {op["op_name"] for op in predictor.interpreter._get_ops_details()}
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
    match = agreement(predictor, keras_predictor, target_images)
    print(f"\n{variant}: {100 * match:.2f}% of pixels agree with the Keras network")
    assert match >= MIN_AGREEMENT[variant]


def test_export_refuses_an_existing_output_dir(exported, model_dir):
    from pit_keras.deploy import exporting
    from pit_keras.errors import UserError

    output, _ = exported
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        exporting.export(model_dir, output)


def test_interrupted_export_leaves_the_previous_export_untouched(exported, model_dir, monkeypatch):
    from pit_keras.deploy import exporting

    output, _ = exported
    before = exporting.file_sizes(output)
    metadata_before = (output / "metadata.json").read_text()

    def fail(segmenter, input_size, variant, calibration=None, work_dir=None):
        raise KeyboardInterrupt("interrupted while converting")

    # The SavedModel is written before the first conversion fails, so the staging folder is not empty.
    monkeypatch.setattr(exporting, "convert_tflite", fail)
    with pytest.raises(KeyboardInterrupt):
        exporting.export(model_dir, output, formats=("saved_model", "float32"), overwrite=True)
    assert exporting.file_sizes(output) == before
    assert (output / "metadata.json").read_text() == metadata_before
    assert sorted(os.listdir(output.parent)) == ["pit"]


def test_a_saved_model_only_export_holds_the_saved_model_and_its_metadata(model_dir, tmp_path):
    from pit_keras.deploy import exporting

    # Staging folders of earlier exports to the same folder: one whose process was killed (gone), one of a
    # running process, one of another host. Only the first is removed.
    ended = subprocess.Popen(["true"])
    ended.wait()
    prefix = atomic.staging_prefix("export")
    stale, running, elsewhere = (f"{prefix}{ended.pid}", f"{prefix}{os.getppid()}",
                                 f".export.partial-another-host-{ended.pid}")
    for folder in (stale, running, elsewhere):
        (tmp_path / folder / "saved_model").mkdir(parents=True)
    lines = []
    metadata = exporting.export(model_dir, tmp_path / "export", formats=("saved_model",), log=lines.append)
    assert sorted(os.listdir(tmp_path / "export")) == ["metadata.json", "saved_model"]
    assert metadata["tflite"] is None and sorted(os.listdir(tmp_path)) == sorted([elsewhere, running, "export"])
    assert f"removed {tmp_path / stale}, left by an export that was stopped" in lines


def test_overwrite_replaces_the_export_once_complete(exported, model_dir, tmp_path):
    from pit_keras.deploy import exporting

    output = tmp_path / "export"
    shutil.copytree(exported[0], output)  # an earlier, complete export
    exporting.export(model_dir, output, formats=("dynamic_int8",), overwrite=True)
    assert sorted(os.listdir(output)) == ["metadata.json", "pit_dynamic_int8.tflite"]
    assert os.listdir(tmp_path) == ["export"]


def small_export(folder):
    """A folder laid out as export writes it (a SavedModel file, a .tflite, metadata.json listing them)."""
    from pit_keras.deploy import exporting

    (folder / "saved_model" / "pit" / "1").mkdir(parents=True)
    (folder / "saved_model" / "pit" / "1" / "saved_model.pb").write_bytes(b"pb")
    (folder / "pit_float32.tflite").write_bytes(b"tflite")
    metadata = {"class_set": "cityscapes19", "checkpoint": "ckpt-6", "training_run": {"model_dir": "runs/x"},
                "files": exporting.file_sizes(folder)}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


def test_overwrite_never_replaces_a_folder_that_holds_no_export(tmp_path):
    from pit_keras.deploy import exporting
    from pit_keras.errors import UserError

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("key")
    (home / "notes.txt").write_text("notes")
    before = exporting.file_sizes(home)
    with pytest.raises(UserError, match="holds no earlier export .*, so it is never replaced, --overwrite or not"):
        exporting.export(str(tmp_path / "no_run"), home, formats=("float32",), overwrite=True)
    assert exporting.file_sizes(home) == before and os.listdir(tmp_path) == ["home"]
    (home / "metadata.json").write_text('{"name": "another tool"}')  # a metadata.json export did not write
    with pytest.raises(UserError, match="holds no earlier export"):
        exporting.check_output_dir(str(home), overwrite=True)
    copy = small_export(tmp_path / "copy")
    (copy / "saved_model" / "notes.txt").write_text("mine")  # beside the export's files
    with pytest.raises(UserError, match="holds an export and also saved_model/notes.txt, which that export did "
                                        "not write, so it is not replaced"):
        exporting.check_output_dir(str(copy), overwrite=True)
    (copy / "saved_model" / "notes.txt").unlink()
    exporting.check_output_dir(str(copy), overwrite=True)  # the export alone is replaced
    (tmp_path / "empty").mkdir()
    exporting.check_output_dir(str(tmp_path / "empty"), overwrite=False)  # an empty folder is taken
    with pytest.raises(UserError, match="is a file, not an export folder"):
        exporting.check_output_dir(str(home / "notes.txt"), overwrite=True)
    (tmp_path / "link").symlink_to(copy)
    with pytest.raises(UserError, match="is a symbolic link"):
        exporting.check_output_dir(str(tmp_path / "link"), overwrite=True)


def test_export_cli_refuses_to_overwrite_a_home_folder_in_one_sentence(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("notes")
    # Refused before the run is read or TensorFlow is loaded.
    result = run("export", f"--model_dir={tmp_path / 'no_run'}", f"--output_dir={home}", "--overwrite", timeout=60)
    assert result.returncode == 2
    assert result.stderr == (f"error: --output_dir={home} is a folder that holds no earlier export (no metadata.json "
                             "written by export), so it is never replaced, --overwrite or not; choose a new or "
                             "empty folder.\n")
    assert os.listdir(home) == ["notes.txt"] and os.listdir(tmp_path) == ["home"]


def test_the_new_export_is_swapped_in_whole_before_the_old_one_is_deleted(tmp_path, monkeypatch):
    from pit_keras import atomic

    old, new = tmp_path / "export", tmp_path / ".export.partial-1"
    for folder, name in ((old, "old.tflite"), (new, "new.tflite")):
        folder.mkdir()
        (folder / name).write_text(name)
        (folder / "metadata.json").write_text("{}")
    # Interrupted while deleting the old export: the destination already holds the new one, whole.
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda path: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_folder(str(new), str(old))
    assert sorted(os.listdir(old)) == ["metadata.json", "new.tflite"]
    assert atomic._exchange(str(new), str(old))  # Linux swaps two folders in one step
    assert sorted(os.listdir(new)) == ["metadata.json", "new.tflite"]


def awkward_images(folder):
    """RGBA, greyscale, 16-bit greyscale and palette images of odd sizes."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (27, 45, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (50, 33), dtype=np.uint8), "L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 65536, (17, 71), dtype=np.uint16)).save(folder / "grey16.png")
    Image.fromarray(rng.integers(0, 256, (31, 64, 3), dtype=np.uint8)).convert("P").save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 256, (40, 61, 3), dtype=np.uint8)).save(folder / "photo.jpg")
    return {"rgba": (45, 27), "grey": (33, 50), "grey16": (71, 17), "palette": (64, 31), "photo": (61, 40)}


@pytest.mark.parametrize("kind", ["model_dir", "saved_model", "tflite"])
def test_predict_writes_labels_and_overlays_at_the_input_size(kind, exported, model_dir, tmp_path):
    output, _ = exported
    model = {"model_dir": model_dir, "saved_model": output, "tflite": output / "pit_float16.tflite"}[kind]
    sizes = awkward_images(tmp_path / "in")
    result = run_in_process("predict", f"--model={model}", f"--input={tmp_path / 'in'}",
                            f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"with the {kind} model" in result.stdout
    for name, size in sizes.items():
        with Image.open(tmp_path / "out" / f"{name}_labelTrainIds.png") as labels:
            assert labels.mode == "L" and labels.size == size
            assert np.asarray(labels).max() < 19
        with Image.open(tmp_path / "out" / f"{name}_overlay.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == size


def huge_png_header(path, width, height):
    """A PNG that declares width x height pixels but holds almost no data: only its header is ever read."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))


def test_predict_refuses_huge_images_and_names_bad_paths(exported, tmp_path):
    from pit_keras.data import images
    from pit_keras.errors import UserError

    output, _ = exported
    huge_png_header(tmp_path / "huge.png", 10000, 6000)
    with pytest.raises(UserError, match="10000x6000 \\(60 MP\\), over the 50 MP limit"):
        images.read_image(str(tmp_path / "huge.png"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.png: not a readable image"):
        images.read_image(str(tmp_path / "broken.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: the folder holds no .png"):
        images.list_images(str(tmp_path / "empty"))
    result = run_in_process("predict", f"--model={tmp_path / 'nowhere'}", f"--input={tmp_path}",
                            f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--model={tmp_path / 'nowhere'}: no such file or folder." in result.stderr
    result = run_in_process("predict", f"--model={output}", f"--input={tmp_path / 'huge.png'}",
                            f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and "over the 50 MP limit" in result.stderr
    assert "Traceback" not in result.stderr


def test_export_cli_refuses_to_overwrite_with_one_sentence(exported, model_dir):
    output, _ = exported
    result = run_in_process("export", f"--model_dir={model_dir}", f"--output_dir={output}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--output_dir={output} already exists; pass --overwrite to replace it." in result.stderr


def test_rest_client_request_and_response_round_trip_through_the_saved_model(exported, target_images):
    import tensorflow as tf

    sys.path.insert(0, str(REPO / "export"))
    import client

    output, _ = exported
    image = target_images[0][:20, :30]
    body = json.loads(json.dumps(client.build_request(image)))
    assert json.loads((REPO / "export" / "rest_request.json").read_text()).keys() == body.keys()
    serve = tf.saved_model.load(str(output / "saved_model" / "pit" / "1")).signatures[body["signature_name"]]
    outputs = serve(images=tf.constant(body["inputs"]["images"], tf.uint8))
    # What TF Serving's REST API answers for a columnar ("inputs") request.
    response = json.loads(json.dumps({"outputs": {k: v.numpy().tolist() for k, v in outputs.items()}}))
    labels = client.parse_response(response)
    assert labels.shape == (20, 30) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, outputs["labels"][0].numpy())


def test_evaluate_scores_the_deployed_models_like_the_run(exported, model_dir, tiny_benchmark, tmp_path):
    import json

    target = ("--target=cityscapes", f"--target_root={tiny_benchmark / 'cityscapes'}")
    scores = {}
    for name, flag in [("run", f"--model_dir={model_dir}"), ("saved_model", f"--saved_model={exported[0]}"),
                       ("tflite", f"--tflite={exported[0] / 'pit_float32.tflite'}")]:
        result = run_in_process("evaluate", flag, *target, f"--output={tmp_path / name}.json")
        assert result.returncode == 0, result.stderr[-2000:]
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["miou"]
    # The SavedModel serves exactly the run's network; float32 LiteRT differs only by rounding.
    assert scores["saved_model"] == pytest.approx(scores["run"], abs=0.5)
    assert scores["tflite"] == pytest.approx(scores["run"], abs=1.0)


def test_int8_calibration_images_are_spread_over_the_targets_training_images(monkeypatch):
    import types

    import tensorflow as tf

    from pit_keras.data import datasets, pipeline
    from pit_keras.deploy import exporting

    pairs = [(f"city{i // 4}_{i:02d}.png", None) for i in range(12)]  # sorted by path: cities in turn
    monkeypatch.setattr(datasets, "target_pairs", lambda *args, **kwargs: (pairs, None, None))
    read = []
    monkeypatch.setattr(pipeline, "load_image", lambda path, size: read.append(path) or tf.zeros((2, 2, 3)))
    config = types.SimpleNamespace(target="cityscapes", target_root="root", benchmark_seed=0)
    assert len(exporting.calibration_images(config, (2, 2), 3)) == 3
    assert read == ["city0_00.png", "city1_04.png", "city2_08.png"]
    read.clear()
    exporting.calibration_images(config, (2, 2), 20)
    assert read == [path for path, _ in pairs]


def test_rest_client_reads_images_as_predict_does(tmp_path):
    # 16-bit grey scaled down to 8 bits, not clipped at 255; RGBA without its alpha.
    sys.path.insert(0, str(REPO / "export"))
    import client

    from pit_keras.data import images

    grey = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    rgba = np.random.default_rng(0).integers(0, 256, (8, 64, 4)).astype(np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    for name in ("grey16.png", "rgba.png"):
        np.testing.assert_array_equal(client.read_rgb(tmp_path / name), images.read_image(str(tmp_path / name)))
    assert len(np.unique(client.read_rgb(tmp_path / "grey16.png"))) == 64


def test_a_refused_export_leaves_no_folder_behind(model_dir, tmp_path):
    # The int8 calibration finds no target images (the run's target root is gone): the export's new parent
    # folders go with it.
    from pit_keras.deploy import exporting
    from pit_keras.errors import UserError

    run = tmp_path / "run"
    shutil.copytree(model_dir, run)
    config = json.loads((run / "run.json").read_text())
    config["target_root"] = str(tmp_path / "gone")
    (run / "run.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="gone"):
        exporting.export(str(run), str(tmp_path / "new" / "a" / "export"), formats=("int8",))
    assert sorted(os.listdir(tmp_path)) == ["run"]
