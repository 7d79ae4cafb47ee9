"""The evaluate command: finding and reading saved predictions, scoring in 19/16/13 classes against hand
computations, the results files, one-sentence errors, and agreement with cityscapesScripts."""

import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from commands import run_in_process
from conftest import CITYSCAPES_FRAME, write_run_config
from pit_keras.evaluation import scoring
from pit_keras.evaluation import metrics
from pit_keras.data import cityscapes, classes
from pit_keras.errors import UserError

FRAME = "frankfurt_000000_000294"
# A handmade 2x8 frame in 19-class train ids. Hand counts (truth by prediction):
#   road: 3 right, 1 predicted terrain; terrain: 2 right; car: 1 right, 1 predicted truck;
#   wall: 2 right; truck: both predicted car; sky: 1 right, 1 predicted road; unlabelled pixels predicted road.
TRUTH = np.array([[0, 0, 0, 0, 9, 9, 13, 13],
                  [3, 3, 14, 14, 10, 10, 255, 255]], np.uint8)
PREDICTION = np.array([[0, 0, 0, 9, 9, 9, 13, 14],
                       [3, 3, 13, 13, 10, 0, 0, 0]], np.uint8)
# 19 classes: road 3/(3+1 fn+1 fp from sky) = 60, terrain 2/3, car 1/(1+1 fn+2 fp from truck) = 25, wall 100,
# truck 0/(2 fn+1 fp), sky 1/2. Over 16 classes terrain and truck are unlabelled in truth and "no class" in
# the prediction: road keeps 60 (its terrain pixel is still a miss), car loses the truck pixels' false positives
# (1/2), wall 100, sky 50; mIoU* leaves out wall.
EXPECTED = {
    19: {"road": 60.0, "terrain": 200.0 / 3.0, "car": 25.0, "wall": 100.0, "truck": 0.0, "sky": 50.0},
    16: {"road": 60.0, "car": 50.0, "wall": 100.0, "sky": 50.0},
}
EXPECTED_MIOU = {19: (60.0 + 200.0 / 3.0 + 25.0 + 100.0 + 0.0 + 50.0) / 6.0, 16: 65.0, 13: 160.0 / 3.0}


def run(*args):
    """`python -m pit_keras.evaluate ARGS`, in the test's process (tests/commands.py)."""
    return run_in_process("evaluate", *args)


def save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def to_label_ids(train_ids):
    """19-class train ids -> Cityscapes label ids (255 -> 0, "unlabeled"), as cityscapesScripts reads them."""
    lut = np.zeros(256, np.uint8)
    lut[: len(classes.CITYSCAPES_LABEL_IDS)] = classes.CITYSCAPES_LABEL_IDS
    return lut[train_ids]


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    """A Cityscapes root holding the handmade frame; the image's red channel is 10 x the prediction."""
    root = tmp_path_factory.mktemp("handmade") / "cityscapes"
    image = np.zeros(TRUTH.shape + (3,), np.uint8)
    image[..., 0] = 10 * PREDICTION
    save_png(root / "leftImg8bit" / "val" / "frankfurt" / f"{FRAME}_leftImg8bit.png", image)
    save_png(root / "gtFine" / "val" / "frankfurt" / f"{FRAME}_gtFine_labelIds.png", to_label_ids(TRUTH))
    return root


def handmade_pairs(root):
    return cityscapes.list_images(root, "val", require_labels=True)


def test_label_space_maps_19_to_16_and_refuses_16_over_19():
    space = scoring.label_space(13, 19)
    assert space.class_set is classes.SYNTHIA16
    np.testing.assert_array_equal(space.labels(np.array([0, 9, 10, 14, 16, 18, 255])),
                                  [0, 255, 9, 255, 255, 15, 255])
    np.testing.assert_array_equal(space.predictions(np.array([9, 10])), [255, 9])
    assert scoring.label_space(16, 16).prediction_lut is None
    assert scoring.label_space(19, 19).label_lut is None
    with pytest.raises(ValueError, match="16-class predictions cannot be scored over 19"):
        scoring.label_space(19, 16)


def test_find_predictions_prefers_the_mirror_then_one_prefix_match(tmp_path):
    pairs = [(f"/data/leftImg8bit/val/{city}/{city}_000000_00000{i}_leftImg8bit.png", None)
             for i, city in enumerate(("aachen", "bonn", "koeln"))]
    pred = tmp_path / "pred"
    save_png(pred / "aachen" / "aachen_000000_000000_leftImg8bit.png", TRUTH)
    save_png(pred / "x" / "aachen_000000_000000_other.png", TRUTH)  # ignored: the mirror wins
    save_png(pred / "deep" / "er" / "bonn_000000_000001_pred.png", TRUTH)
    save_png(pred / "koeln_000000_000002_a.png", TRUTH)
    found = scoring.find_predictions(pairs, str(pred))
    assert found == [str(pred / "aachen" / "aachen_000000_000000_leftImg8bit.png"),
                     str(pred / "deep" / "er" / "bonn_000000_000001_pred.png"),
                     str(pred / "koeln_000000_000002_a.png")]

    save_png(pred / "koeln_000000_000002_b.png", TRUTH)
    with pytest.raises(UserError, match=r"koeln_000000_000002_leftImg8bit.png has 2 predictions .*keep one"):
        scoring.find_predictions(pairs, str(pred))
    shutil.rmtree(pred / "deep")
    os.remove(pred / "koeln_000000_000002_b.png")
    with pytest.raises(UserError, match=r"bonn_000000_000001_leftImg8bit.png has no prediction: expected "
                                        r".*bonn/bonn_000000_000001_leftImg8bit.png or one "
                                        r"bonn_000000_000001\*.png .*\(1 of 3 images have none\)"):
        scoring.find_predictions(pairs, str(pred))
    with pytest.raises(UserError, match="no such folder"):
        scoring.find_predictions(pairs, str(tmp_path / "nowhere"))


def test_find_predictions_takes_predicts_outputs_and_keeps_a_folder_layouts_sub_folders_apart(tmp_path):
    # predict on a Cityscapes split: a label PNG and a colour overlay per image; the overlay is no prediction.
    pairs = [("/data/leftImg8bit/val/bonn/bonn_000000_000001_leftImg8bit.png", None)]
    pred = tmp_path / "pred"
    for suffix in ("_labelTrainIds.png", "_overlay.png"):
        save_png(pred / "bonn" / f"bonn_000000_000001_leftImg8bit{suffix}", TRUTH)
    assert scoring.find_predictions(pairs, str(pred)) == [
        str(pred / "bonn" / "bonn_000000_000001_leftImg8bit_labelTrainIds.png")]
    # A folder layout: 0001.jpg in d1/ and d2/; only d1's has a prediction, which is not d2's.
    images = tmp_path / "val" / "images"
    pairs = [(str(images / d / "0001.jpg"), None) for d in ("d1", "d2")]
    save_png(pred / "d1" / "0001_pred.png", TRUTH)
    with pytest.raises(UserError, match=r"d2/0001.jpg has no prediction"):
        scoring.find_predictions(pairs, str(pred), image_dir=str(images))
    save_png(pred / "d2" / "0001_pred.png", TRUTH)
    assert scoring.find_predictions(pairs, str(pred), image_dir=str(images)) == [
        str(pred / "d1" / "0001_pred.png"), str(pred / "d2" / "0001_pred.png")]


def test_read_prediction_refuses_other_sizes_modes_and_label_ids(tmp_path):
    path = str(tmp_path / "p.png")
    save_png(path, TRUTH)
    np.testing.assert_array_equal(scoring.read_prediction(path, (2, 8), 19), TRUTH)
    with pytest.raises(UserError, match=r"p.png is 8x2 but its label is 16x4; predictions must be saved at "
                                        r"label resolution"):
        scoring.read_prediction(path, (4, 16), 19)
    save_png(path, to_label_ids(TRUTH))  # the label-id encoding cityscapesScripts expects
    with pytest.raises(UserError, match=r"holds id 22, not a 19-class train id \(0 to 18, or 255\); predictions "
                                        r"must be train ids, not label ids"):
        scoring.read_prediction(path, (2, 8), 19)
    with pytest.raises(UserError, match="holds id 22, not a 16-class train id"):
        scoring.read_prediction(path, (2, 8), 16)
    Image.fromarray(np.zeros((2, 8, 3), np.uint8)).save(path)
    with pytest.raises(UserError, match="8-bit single-channel PNG of train ids, got mode RGB"):
        scoring.read_prediction(path, (2, 8), 19)
    with open(path, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(UserError, match="cannot be read as a PNG"):
        scoring.read_prediction(path, (2, 8), 19)


def expected_result(num_classes):
    class_set = metrics.class_set_for(num_classes)
    per_class = EXPECTED[class_set.num_classes]
    return {name: per_class.get(name) for name in class_set.names}


@pytest.mark.parametrize("num_classes,prediction_classes", [(19, 19), (16, 19), (13, 19), (16, 16), (13, 16)])
def test_saved_predictions_against_hand_computation(handmade, tmp_path, num_classes, prediction_classes):
    prediction = PREDICTION if prediction_classes == 19 else classes.train19_to_train16()[PREDICTION]
    save_png(tmp_path / "frankfurt" / f"{FRAME}_leftImg8bit.png", prediction)
    pairs = handmade_pairs(handmade)
    space = scoring.label_space(num_classes, prediction_classes)
    paths = scoring.find_predictions(pairs, str(tmp_path))
    result = metrics.summarize(
        scoring.predictions_confusion(pairs, cityscapes.read_train_ids, paths, space, progress=False),
        space.class_set)
    # Classes absent from truth and prediction alike have no IoU and stay out of the mean.
    assert result["per_class_iou"] == pytest.approx(expected_result(num_classes))
    assert metrics.select_miou(result, num_classes) == pytest.approx(EXPECTED_MIOU[num_classes])


def test_network_predictions_are_mapped_like_saved_ones(handmade):
    import keras

    # A "network" that reads the prediction off the red channel: logit_c = 2c(R/10) - c^2 peaks at c = R/10.
    image = keras.Input((None, None, 3))
    seg = keras.layers.Conv2D(19, 1, name="seg")
    network = keras.Model(image, seg(image))
    c = np.arange(19, dtype=np.float32)
    kernel = np.zeros((1, 1, 3, 19), np.float32)
    kernel[0, 0, 0] = 2 * c / 10
    seg.set_weights([kernel, -c * c])
    for num_classes in (19, 13):
        space = scoring.label_space(num_classes, 19)
        cm = scoring.network_confusion(network, handmade_pairs(handmade), cityscapes.read_train_ids, space,
                                          input_size=(8, 2), progress=False)
        result = metrics.summarize(cm, space.class_set)
        assert result["per_class_iou"] == pytest.approx(expected_result(num_classes))
        assert metrics.select_miou(result, num_classes) == pytest.approx(EXPECTED_MIOU[num_classes])


def test_cli_perfect_predictions_score_100_and_write_json_csv_png(tmp_path):
    truth = cityscapes.read_train_ids(
        CITYSCAPES_FRAME / "gtFine" / "val" / "frankfurt" / f"{FRAME}_gtFine_labelIds.png")
    pred = tmp_path / "preds"
    save_png(pred / "frankfurt" / f"{FRAME}_leftImg8bit.png", truth)
    result = run(f"--predictions_dir={pred}", f"--target_root={CITYSCAPES_FRAME}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mIoU 100.00 (19 classes) over 1 images" in result.stdout

    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["preds", "preds_eval_val.csv", "preds_eval_val.json", "preds_eval_val_confusion.png"]
    loaded = json.loads((tmp_path / "preds_eval_val.json").read_text())
    present = {classes.CITYSCAPES_CLASSES[i] for i in np.unique(truth) if i != classes.IGNORE_INDEX}
    assert {k for k, v in loaded["per_class_iou"].items() if v is not None} == present
    assert all(v == 100.0 for v in loaded["per_class_iou"].values() if v is not None)
    assert loaded["per_class_iou"]["train"] is None
    assert (loaded["miou"], loaded["num_images"], loaded["num_classes"]) == (100.0, 1, 19)
    assert np.trace(loaded["confusion_matrix"]) == np.count_nonzero(truth != classes.IGNORE_INDEX)

    with open(tmp_path / "preds_eval_val.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class", "iou"] and len(rows) == 1 + 19 + 1
    assert rows[-1][0] == "mIoU" and float(rows[-1][1]) == loaded["miou"]
    assert dict(rows[1:20])["train"] == ""
    with Image.open(tmp_path / "preds_eval_val_confusion.png") as png:
        assert png.format == "PNG" and png.width > 19 * 20


def test_cli_classes_13_reports_miou_star(handmade, tmp_path):
    save_png(tmp_path / "p" / f"{FRAME}_pred.png", PREDICTION)
    output = tmp_path / "out" / "eval.json"
    result = run(f"--predictions_dir={tmp_path / 'p'}", f"--target_root={handmade}", "--classes=13",
                 f"--output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"mIoU* {EXPECTED_MIOU[13]:.2f} (13 classes)" in result.stdout
    header = result.stdout.splitlines()[0]
    assert header.split()[-2:] == ["mIoU", "mIoU*"] and "trrn" not in header
    loaded = json.loads(output.read_text())
    assert loaded["num_classes"] == 13 and len(loaded["classes"]) == 16
    assert loaded["miou13"] == pytest.approx(EXPECTED_MIOU[13])
    assert loaded["miou"] == pytest.approx(EXPECTED_MIOU[16])
    with open(tmp_path / "out" / "eval.csv", newline="") as f:
        rows = dict(list(csv.reader(f))[1:])
    assert float(rows["mIoU*"]) == loaded["miou13"] and float(rows["mIoU"]) == loaded["miou"]
    assert sorted(os.listdir(tmp_path / "out")) == ["eval.csv", "eval.json", "eval_confusion.png"]


@pytest.mark.parametrize("case,message", [
    ("missing", f"{FRAME}_leftImg8bit.png has no prediction: expected"),
    ("both", "Give exactly one of --model_dir (a training run), --saved_model, --tflite"),
    ("16_over_19", "--classes=19: 16-class predictions cannot be scored over 19 classes"),
    ("output_folder", "is a folder; give the path of the results JSON file"),
])
def test_cli_errors_are_one_sentence(handmade, tmp_path, case, message):
    pred = tmp_path / "p"
    pred.mkdir()
    extra = {"both": [f"--model_dir={tmp_path}"], "16_over_19": ["--prediction_classes=16", "--classes=19"],
             "output_folder": [f"--output={tmp_path}"]}
    result = run(f"--predictions_dir={pred}", f"--target_root={handmade}", *extra.get(case, []))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in result.stderr


def test_cli_names_its_own_flag_for_a_path_that_is_no_model(handmade, tmp_path):
    (tmp_path / "notes.txt").write_text("notes")
    result = run(f"--tflite={tmp_path / 'notes.txt'}", f"--target_root={handmade}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --tflite={tmp_path / 'notes.txt'}: not a training run folder, a SavedModel, an export folder or "
        "a .tflite file.")


def test_cli_model_dir_maps_a_19_class_run_into_13_classes(handmade, tmp_path):
    import tensorflow as tf

    from pit_keras.models.network import build_network

    # A 19-class run whose network predicts terrain everywhere.
    network = build_network("tiny", 19, num_units=0)
    head = network.get_layer("fine_head")
    kernel, bias = head.get_weights()
    bias[:] = 0.0
    bias[classes.CITYSCAPES_CLASSES.index("terrain")] = 10.0
    head.set_weights([np.zeros_like(kernel), bias])
    tf.train.Checkpoint(network=network).save(str(tmp_path / "run" / "checkpoints" / "ckpt"))
    write_run_config(tmp_path / "run", lse_r=(), method="source_only", image_labels=None, target_size=(32, 16))

    output = tmp_path / "eval.json"
    result = run(f"--model_dir={tmp_path / 'run'}", f"--target_root={handmade}", "--classes=13",
                 f"--output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mIoU* 0.00 (13 classes) over 1 images" in result.stdout
    scores = json.loads(output.read_text())
    assert scores["checkpoint"] == "ckpt-1" and scores["num_classes"] == 13
    assert "terrain" not in scores["per_class_iou"]
    # Mapped, terrain is no class: the true road pixels land in the "other" column. Unmapped, its id (9)
    # would read as sky (9 in the 16 classes) and score sky's pixels right.
    assert scores["confusion_matrix"][classes.SYNTHIA16.names.index("road")][16] == 4
    assert scores["per_class_iou"]["sky"] == 0.0 and scores["miou"] == 0.0 and scores["miou13"] == 0.0


def test_cli_model_dir_names_a_bad_label_file_in_one_sentence(handmade, tmp_path):
    # The labels of a run's evaluation are read inside its input pipeline: a file the reader refuses is still
    # reported in its own sentence (as with --predictions_dir), not as a TensorFlow traceback.
    import tensorflow as tf

    from pit_keras.models.network import build_network

    root = tmp_path / "cityscapes"
    shutil.copytree(handmade, root)
    label = next((root / "gtFine").rglob("*_labelIds.png"))
    Image.open(label).convert("RGB").save(label)
    network = build_network("tiny", 19, num_units=0)
    tf.train.Checkpoint(network=network).save(str(tmp_path / "run" / "checkpoints" / "ckpt"))
    write_run_config(tmp_path / "run", lse_r=(), method="source_only", image_labels=None, target_size=(32, 16))
    result = run(f"--model_dir={tmp_path / 'run'}", f"--target_root={root}", f"--output={tmp_path / 'eval.json'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {label}: ")
    assert "Traceback" not in result.stderr and not (tmp_path / "eval.json").exists()


def noisy_predictions(truth, rng, classes_drawn):
    """The truth with a third of its pixels relabelled at random and a few set to "no class" (255)."""
    prediction = np.where(truth == classes.IGNORE_INDEX, 0, truth).astype(np.uint8)
    flip = rng.random(truth.shape) < 0.35
    prediction[flip] = rng.choice(classes_drawn, size=int(flip.sum()))
    prediction[rng.random(truth.shape) < 0.03] = classes.IGNORE_INDEX
    return prediction


def test_agrees_with_cityscapesscripts(tiny_benchmark, tmp_path, monkeypatch):
    pytest.importorskip("cityscapesscripts")
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs

    # The real frame (256x128) and the benchmark's val frames (64x32) in one Cityscapes root.
    root = tmp_path / "cityscapes"
    for source in (CITYSCAPES_FRAME, tiny_benchmark / "cityscapes"):
        for folder in ("leftImg8bit", "gtFine"):
            shutil.copytree(source / folder / "val", root / folder / "val", dirs_exist_ok=True)
    pairs = cityscapes.list_images(root, "val", require_labels=True)
    assert len(pairs) == 4

    rng = np.random.default_rng(0)
    # Train (16) is never drawn, so it is absent from truth and prediction alike: NaN on both sides.
    drawn = [i for i in range(19) if i != 16]
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    for index, (image, label) in enumerate(pairs):
        prediction = noisy_predictions(cityscapes.read_train_ids(label), rng, drawn)
        city, name = os.path.basename(os.path.dirname(image)), os.path.basename(image)
        stem = name[: -len(cityscapes.IMAGE_SUFFIX)]
        # Half mirror the images, half are found by their CITY_SSSSSS_FFFFFF prefix.
        ours = ours_dir / city / name if index % 2 else ours_dir / "any" / f"{stem}_pred.png"
        save_png(ours, prediction)
        save_png(theirs_dir / f"{stem}_labelIds.png", to_label_ids(prediction))
    predictions = scoring.find_predictions(pairs, str(ours_dir))

    def theirs():
        args = cs.CArgs()
        vars(args).update(vars(cs.args))
        vars(args).update(evalInstLevelScore=False, evalPixelAccuracy=False, quiet=True, JSONOutput=False,
                          exportFile=str(tmp_path / "cs_result.json"), colorized=False)
        return cs.evaluateImgLists([str(theirs_dir / os.path.basename(label).replace("gtFine_", ""))
                                    for _, label in pairs], [label for _, label in pairs], args)

    def ours(num_classes):
        space = scoring.label_space(num_classes, 19)
        cm = scoring.predictions_confusion(pairs, cityscapes.read_train_ids, predictions, space, progress=False)
        return metrics.summarize(cm, space.class_set)

    def assert_agree(result, reference, names):
        for name in names:
            if reference[name] is None or math.isnan(reference[name]):
                assert result["per_class_iou"][name] is None, name
            else:
                assert result["per_class_iou"][name] == pytest.approx(100.0 * reference[name], abs=1e-6), name

    result, reference = ours(19), theirs()
    assert_agree(result, reference["classScores"], classes.CITYSCAPES_CLASSES)
    assert result["per_class_iou"]["train"] is None
    assert result["miou"] == pytest.approx(100.0 * reference["averageScoreClasses"], abs=1e-6)
    # Same counts, cell by cell: rows and columns in label ids there, train ids here.
    their_matrix = np.asarray(reference["confMatrix"], np.int64)
    ids = list(classes.CITYSCAPES_LABEL_IDS)
    np.testing.assert_array_equal(np.asarray(result["confusion_matrix"])[:, :19], their_matrix[np.ix_(ids, ids)])

    # SYNTHIA's 16 classes are cityscapesScripts with terrain, truck and train ignored in evaluation.
    for name in ("terrain", "truck", "train"):
        label = cs.name2label[name]
        monkeypatch.setitem(cs.id2label, label.id, label._replace(ignoreInEval=True))
    result, reference = ours(13), theirs()
    assert_agree(result, reference["classScores"], classes.SYNTHIA16.names)
    assert result["miou"] == pytest.approx(100.0 * reference["averageScoreClasses"], abs=1e-6)
    kept = [name for name in classes.SYNTHIA16.names if name not in classes.SYNTHIA13_DROPPED]
    star = np.nanmean([reference["classScores"][name] for name in kept])
    assert result["miou13"] == pytest.approx(100.0 * star, abs=1e-6)
