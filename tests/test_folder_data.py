"""Your own data: the unsupervised demo pipeline trained from a labelled folder source (raw ids through a label
map) to a nested folder of unlabelled JPEGs and PNGs of mixed sizes, evaluated on its labelled val set; evaluate
defaulting to the run's target; results of a deployed model kept out of its export folder; and every bad input
refused in one sentence before anything is written. The commands run in the test's process (tests/commands.py)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from commands import run_in_process as run
from pit_keras.evaluation import scoring
from pit_keras.data import datasets
from pit_keras.errors import UserError

# Raw ids of the source's label PNGs (a simulator's own tags) and the map to train ids; 9 and 200 stay unmapped.
LABEL_MAP = {"1": 0, "2": 2, "3": 10, "4": 13, "5": 255}
RAW_IDS = (1, 2, 3, 4, 5, 9, 200)


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def scene(rng, width, height):
    """A street-like RGB frame: sky, buildings and road bands with noise."""
    image = np.zeros((height, width, 3), np.float32)
    image[: height // 3] = (70, 130, 180)
    image[height // 3: 2 * height // 3] = (70, 70, 70)
    image[2 * height // 3:] = (128, 64, 128)
    return np.clip(image + rng.normal(0, 20, image.shape), 0, 255)


def bands(width, height, top, middle, bottom):
    label = np.full((height, width), middle, np.uint8)
    label[: height // 3] = top
    label[2 * height // 3:] = bottom
    return label


def make_source(root, rng, num=4):
    """ROOT/images/town*/NAME.png with ROOT/labels/town*/NAME.png holding raw ids, at 64x32."""
    for k in range(num):
        relative = os.path.join(f"town{k % 2}", f"{k:04d}")
        save(root / "images" / f"{relative}.png", scene(rng, 64, 32))
        label = bands(64, 32, 3, 2, 1)
        label[:, :8] = RAW_IDS[6 - k % 3]  # a strip of ids that map to 255 or are not in the map
        save(root / "labels" / f"{relative}.png", label)
    return root


def make_camera(root, rng, val=True):
    """A nested folder of 4 unlabelled frames (JPEG and PNG, mixed-case extensions, mixed sizes), a hidden
    folder and a text file that are not images, and a labelled val set of 2 in DIR/val/images + labels."""
    frames = {"day/a/0001.jpg": (80, 40), "day/0002.PNG": (64, 32), "night/0003.JPEG": (100, 60),
              "0004.png": (48, 30)}
    for relative, (width, height) in frames.items():
        path = root / relative
        os.makedirs(path.parent, exist_ok=True)
        Image.fromarray(scene(rng, width, height).astype(np.uint8)).save(path)
    save(root / ".thumbnails" / "0001.png", scene(rng, 8, 4))
    (root / "notes.txt").write_text("not an image")
    if val:
        for relative, size in (("seq/v1.jpg", (96, 48)), ("v2.png", (64, 32))):
            path = root / "val" / "images" / relative
            os.makedirs(path.parent, exist_ok=True)
            Image.fromarray(scene(rng, *size).astype(np.uint8)).save(path)
            save(root / "val" / "labels" / (os.path.splitext(relative)[0] + ".png"), bands(*size, 10, 2, 0))
    return root


def train_args(source, camera, model_dir, *extra):
    return ("--flagfile=flags/demo.cfg", "--source=folder", f"--source_root={source}",
            f"--label_map={source / 'map.json'}", "--target=folder", f"--target_root={camera}",
            "--source_size=64,32", "--target_size=64,32", "--batch_size=2", "--num_steps=2", "--log_every=2",
            "--checkpoint_every=2", "--image_every=0", "--verbose=0", f"--model_dir={model_dir}", *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("own")
    source = make_source(root / "carla", rng)
    (source / "map.json").write_text(json.dumps(LABEL_MAP))
    camera = make_camera(root / "camera", rng)
    return source, camera


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    source, camera = data
    model_dir = tmp_path_factory.mktemp("runs") / "own_camera"
    return model_dir, run("train", *train_args(source, camera, model_dir))


def test_the_demo_pipeline_trains_on_a_camera_folder_and_evaluates_on_its_val_set(trained, data):
    model_dir, result = trained
    assert result.returncode == 0, result.stderr[-3000:]
    # The 4 frames in sub-folders, whatever their case and size; not the val set, the hidden folder or the text.
    assert "target: 4 unlabelled images" in result.stdout
    assert "target val: 2 labelled images" in result.stdout
    assert "no target label is read" in result.stdout and "trained to step 2" in result.stdout
    scores = json.loads((model_dir / "eval_val.json").read_text())
    assert scores["num_images"] == 2 and len(scores["per_class_iou"]) == 19
    config = json.loads((model_dir / "run.json").read_text())
    assert (config["target"], config["source"]) == ("folder", "folder")
    assert config["label_map"] == str(data[0] / "map.json")


def test_evaluate_defaults_to_the_runs_own_target(trained, tmp_path):
    model_dir, _ = trained
    output = tmp_path / "eval.json"
    result = run("evaluate", f"--model_dir={model_dir}", f"--output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "over 2 images of folder val" in result.stdout
    scores = json.loads(output.read_text())
    assert scores["target"] == "folder"
    assert scores["miou"] == pytest.approx(json.loads((model_dir / "eval_val.json").read_text())["miou"])


def test_image_labels_read_a_folder_source_through_its_label_map(trained, data, tmp_path):
    model_dir, _ = trained
    source, camera = data
    output = tmp_path / "labels.json"
    args = ("--source=folder", f"--source_root={source}", "--target=folder", f"--target_root={camera}",
            "--features=backbone", f"--model_dir={model_dir}", "--image_size=64,32", "--epochs=0",
            f"--cache_dir={tmp_path / 'cache'}", f"--output={output}")
    unmapped = run("image_labels", *args, "--label_map=")  # an empty map: not the run's
    assert unmapped.returncode == 2 and "holds the value 200, not a train id" in unmapped.stderr
    assert not output.exists()
    result = run("image_labels", *args)  # the run's --label_map, the default with its --model_dir
    assert result.returncode == 0, result.stderr[-2000:]
    # An untrained regressor gives every image the source prior: the mean shares of the mapped source labels
    # (rows 0-9 raw 3 -> 10, rows 10-20 raw 2 -> 2, rows 21-31 raw 1 -> 0; the strip of unmapped ids ignored).
    labels = json.loads(output.read_text())
    expected = np.zeros(19)
    expected[[10, 2, 0]] = [10 / 32, 11 / 32, 11 / 32]
    assert len(labels) == 4
    for values in labels.values():
        np.testing.assert_allclose(values, expected, atol=1e-4)


def test_a_camera_folder_without_val_labels_trains_and_says_it_is_not_evaluated(data, tmp_path):
    source, _ = data
    camera = make_camera(tmp_path / "camera", np.random.default_rng(1), val=False)
    model_dir = tmp_path / "run"
    args = [a for a in train_args(source, camera, model_dir, "--method=source_only", "--num_steps=1",
                                  "--noself_training") if a != "--flagfile=flags/demo.cfg"]
    result = run("train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    no_val = f"--target_root={camera} has no labelled val set"
    assert [line for line in result.stdout.splitlines() if no_val in line] == [
        f"{no_val} ({camera}/val/images with {camera}/val/labels, or a Cityscapes root in {camera}/val). "
        "The run will not be evaluated.",
        f"not evaluated: {no_val} ({camera}/val/images with {camera}/val/labels, or a Cityscapes root in "
        f"{camera}/val)."]
    assert not (model_dir / "eval_val.json").exists()


def test_the_label_map_maps_raw_ids_and_ignores_the_rest(data, tmp_path):
    source, _ = data
    pairs, reader = datasets.source_pairs("folder", str(source), label_map=str(source / "map.json"))
    assert [os.path.relpath(i, source) for i, _ in pairs] == [
        os.path.join("images", f"town{k % 2}", f"{k:04d}.png") for k in (0, 2, 1, 3)]
    assert all(label == image.replace("images", "labels") for image, label in pairs)
    raw = np.array([RAW_IDS], np.uint8)
    save(tmp_path / "raw.png", raw)
    np.testing.assert_array_equal(reader(str(tmp_path / "raw.png")), [[0, 2, 10, 13, 255, 255, 255]])
    # Without a map the labels must hold train ids: these raw ids (200) are refused by name.
    with pytest.raises(UserError, match=r"0000.png holds the value 200, not a train id .*give --label_map"):
        datasets.source_pairs("folder", str(source))
    # The val set's labels are train ids as they are; another split in the Cityscapes layout is read too.
    camera = data[1]
    val, val_reader, _ = datasets.target_pairs("folder", str(camera), "val", require_labels=True)
    assert [os.path.relpath(i, camera) for i, _ in val] == [os.path.join("val", "images", "seq", "v1.jpg"),
                                                            os.path.join("val", "images", "v2.png")]
    assert set(np.unique(val_reader(val[0][1]))) == {0, 2, 10}
    city = tmp_path / "cam" / "test"
    save(city / "leftImg8bit" / "test" / "x" / "x_0_0_leftImg8bit.png", np.zeros((2, 4, 3)))
    save(city / "gtFine" / "test" / "x" / "x_0_0_gtFine_labelIds.png", [[7, 26, 0, 33]] * 2)
    test, test_reader, _ = datasets.target_pairs("folder", str(tmp_path / "cam"), "test", require_labels=True)
    np.testing.assert_array_equal(test_reader(test[0][1])[0], [0, 13, 255, 18])


def test_a_runs_results_for_the_best_checkpoint_or_another_target_keep_the_trainings_own():
    from conftest import run_config

    config = run_config("/data/bench")  # its target: cityscapes at /data/bench/cityscapes
    own = scoring.run_output("run", "val", config, "last", "cityscapes", "/data/bench/cityscapes")
    assert own == os.path.join("run", "eval_val.json")  # the file training writes at its end
    assert scoring.run_output("run", "val", config, "best", "cityscapes", "/data/bench/cityscapes") == \
        os.path.join("run", "eval_val_best.json")
    assert scoring.run_output("run", "test", config, "last", "folder", "/data/camera/") == \
        os.path.join("run", "eval_test_folder_camera.json")


def test_a_deployed_models_classes_come_from_its_outputs_where_its_metadata_disagrees(tmp_path):
    import json

    from pit_keras.data import classes
    from pit_keras.deploy import predictors

    lone = tmp_path / "lone" / "model.tflite"  # copied out of its export folder: no metadata.json above it
    lone.parent.mkdir()
    assert predictors.class_set_of(str(lone), 16) is classes.SYNTHIA16
    assert predictors.class_set_of(str(lone), 19) is classes.CITYSCAPES19
    assert predictors.class_set_of(str(lone), None) is classes.CITYSCAPES19  # a labels output only: unknown
    with pytest.raises(UserError, match="model.tflite: the model predicts 7 classes; pit_keras models predict 19 "
                                        "or 16"):
        predictors.class_set_of(str(lone), 7)
    (tmp_path / "metadata.json").write_text(json.dumps({"class_set": "cityscapes19"}))  # another model's, above
    assert predictors.class_set_of(str(lone), 16) is classes.SYNTHIA16
    assert predictors.class_set_of(str(lone), None) is classes.CITYSCAPES19
    (lone.parent / "metadata.json").write_text(json.dumps({"class_set": "synthia16"}))
    assert predictors.class_set_of(str(lone), None) is classes.SYNTHIA16


def test_deployed_results_are_written_beside_the_export_folder(tmp_path):
    export = tmp_path / "demo_export"
    (export / "saved_model" / "pit" / "1").mkdir(parents=True)
    (export / "metadata.json").write_text("{}")
    (export / "pit_int8.tflite").write_bytes(b"")
    assert scoring.deployed_output(str(export / "pit_int8.tflite"), "val") == str(
        tmp_path / "demo_export_pit_int8_eval_val.json")
    assert scoring.deployed_output(str(export), "val") == str(tmp_path / "demo_export_eval_val.json")
    assert scoring.deployed_output(str(export / "saved_model" / "pit" / "1"), "test") == str(
        tmp_path / "demo_export_saved_model_pit_1_eval_test.json")
    lone = tmp_path / "elsewhere" / "model.tflite"
    lone.parent.mkdir()
    lone.write_bytes(b"")
    assert scoring.deployed_output(str(lone), "val") == str(tmp_path / "elsewhere" / "model_eval_val.json")
    with pytest.raises(UserError, match="lies inside the export folder"):
        scoring.check_output_outside_export(str(export / "results" / "r.json"), str(export / "pit_int8.tflite"))
    scoring.check_output_outside_export(str(tmp_path / "r.json"), str(export / "pit_int8.tflite"))

    result = run("evaluate", f"--tflite={export / 'pit_int8.tflite'}", f"--output={export / 'r.json'}",
                 "--target=folder", f"--target_root={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --output={export / 'r.json'} lies inside")
    assert sorted(os.listdir(export)) == ["metadata.json", "pit_int8.tflite", "saved_model"]


def test_saved_predictions_of_a_folder_val_set_are_found_by_relative_path(tmp_path):
    images = tmp_path / "cam" / "val" / "images"
    pairs = [(str(images / "seq" / "frame_1.jpg"), None), (str(images / "frame_10.png"), None)]
    pred = tmp_path / "pred"
    save(pred / "seq" / "frame_1_labelTrainIds.png", [[0]])  # as predict names them
    save(pred / "frame_10.png", [[0]])
    assert scoring.find_predictions(pairs, str(pred), image_dir=str(images)) == [
        str(pred / "seq" / "frame_1_labelTrainIds.png"), str(pred / "frame_10.png")]
    # Elsewhere under PRED a prediction is found by its stem, which frame_10 does not share with frame_1.
    os.remove(pred / "seq" / "frame_1_labelTrainIds.png")
    save(pred / "other" / "frame_1_pred.png", [[0]])
    assert scoring.find_predictions(pairs, str(pred), image_dir=str(images))[0] == str(
        pred / "other" / "frame_1_pred.png")


def refusal_case(case, tmp_path, data):
    """(train args, the expected message) of one bad input."""
    source, camera = data
    if case == "empty_target":
        empty = tmp_path / "empty"
        save(empty / "val" / "images" / "v.png", np.zeros((4, 4, 3)))  # the val set is not training data
        (empty / "frames.txt").write_text("")
        return {"target_root": empty}, f"--target_root={empty} holds no .jpg/.jpeg/.png images"
    if case in ("label_map_values", "label_map_list", "label_map_syntax"):
        bad = tmp_path / "map.json"
        bad.write_text({"label_map_values": '{"7": "road"}', "label_map_list": "[7, 0]",
                        "label_map_syntax": "{7: 0}"}[case])
        message = {"label_map_values": f'--label_map={bad} maps "7" to "road"; expected a JSON object of raw',
                   "label_map_list": f"--label_map={bad}: expected a JSON object of raw label ids",
                   "label_map_syntax": f"--label_map={bad} is not valid JSON"}[case]
        return {"label_map": bad}, message
    if case == "missing_source_labels":
        partial = tmp_path / "carla"
        make_source(partial, np.random.default_rng(0))
        os.remove(partial / "labels" / "town1" / "0003.png")
        return {"source_root": partial}, (f"--source_root={partial}: {partial / 'images' / 'town1' / '0003.png'} "
                                          f"has no label {partial / 'labels' / 'town1' / '0003.png'} (1 of 4")
    if case == "missing_val_labels":
        broken = make_camera(tmp_path / "camera", np.random.default_rng(0))
        os.remove(broken / "val" / "labels" / "v2.png")
        return {"target_root": broken}, (f"--target_root={broken}: {broken / 'val' / 'images' / 'v2.png'} has "
                                         f"no label {broken / 'val' / 'labels' / 'v2.png'} (1 of 2")
    if case == "val_label_ids":
        ids = make_camera(tmp_path / "camera", np.random.default_rng(0))
        save(ids / "val" / "labels" / "v2.png", bands(64, 32, 23, 11, 7))  # Cityscapes label ids, not train ids
        return {"target_root": ids}, (f"--target_root={ids}: {ids / 'val' / 'labels' / 'v2.png'} holds the value "
                                      f"23, not a train id (0 to 18, or 255 for ignored); the label PNGs of "
                                      f"{ids / 'val'} hold train ids")
    raise ValueError(case)


@pytest.mark.parametrize("case", ["empty_target", "label_map_values", "label_map_list", "label_map_syntax",
                                  "missing_source_labels", "missing_val_labels", "val_label_ids"])
def test_bad_inputs_are_refused_in_one_sentence_before_anything_is_written(case, data, tmp_path):
    source, camera = data
    overrides, message = refusal_case(case, tmp_path, data)
    model_dir = tmp_path / "run"
    args = [f"--{k}={v}" for k, v in overrides.items()]
    result = run("train", *train_args(source, camera, model_dir), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {message}"), lines[-1]
    assert "Traceback" not in result.stderr
    assert not model_dir.exists()
