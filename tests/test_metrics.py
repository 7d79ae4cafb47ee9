"""Tests of pit_keras.evaluation.metrics against pixel-by-pixel counts and numbers worked out by hand."""

import csv
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from pit_keras.evaluation import metrics, reports
from pit_keras.data import classes


def test_confusion_matrix_counts_every_pixel_once_and_skips_ignored_ones():
    rng = np.random.default_rng(0)
    num_classes = 5
    labels = rng.integers(0, num_classes, size=(3, 16, 24)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.2] = classes.IGNORE_INDEX
    predictions = rng.integers(0, num_classes, size=labels.shape).astype(np.uint8)
    cm = metrics.ConfusionMatrix(num_classes)
    cm.update(labels[:2], predictions[:2])
    cm.update(labels[2], predictions[2])

    expected = np.zeros((num_classes, num_classes), np.int64)
    for truth, predicted in zip(labels.ravel(), predictions.ravel()):
        if truth != classes.IGNORE_INDEX:
            expected[truth, predicted] += 1
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.matrix.dtype == np.int64
    assert cm.num_images == 3


def test_truth_outside_the_classes_is_skipped_like_ignore():
    cm = metrics.ConfusionMatrix(3)
    cm.update(np.array([[0, 7, -1, 255]]), np.array([[0, 1, 1, 1]]))
    np.testing.assert_array_equal(cm.full_matrix, [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_iou_of_a_known_matrix():
    matrix = np.array([[5, 1, 0],
                       [2, 3, 1],
                       [0, 0, 4]])
    # class 0: tp 5, fp 2 (column 0), fn 1 (row 0) -> 5 / 8
    # class 1: tp 3, fp 1, fn 3                    -> 3 / 7
    # class 2: tp 4, fp 1, fn 0                    -> 4 / 5
    expected = [62.5, 300.0 / 7.0, 80.0]
    ious = metrics.iou_per_class(matrix)
    np.testing.assert_allclose(ious, expected)
    assert metrics.mean_iou(ious) == pytest.approx((62.5 + 300.0 / 7.0 + 80.0) / 3)
    assert metrics.mean_iou(ious, [0, 2]) == pytest.approx(71.25)
    assert metrics.pixel_accuracy(matrix) == pytest.approx(100.0 * 12 / 16)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    cm = metrics.ConfusionMatrix(3)
    cm.update(np.array([[0, 0, 1, 1]]), np.array([[0, 1, 1, 1]]))
    ious = metrics.iou_per_class(cm)
    np.testing.assert_allclose(ious[:2], [50.0, 200.0 / 3.0])
    assert np.isnan(ious[2])
    assert metrics.mean_iou(ious) == pytest.approx((50.0 + 200.0 / 3.0) / 2)


def test_class_predicted_but_never_true_scores_zero_and_counts():
    cm = metrics.ConfusionMatrix(3)
    cm.update(np.array([[0, 0, 1, 1]]), np.array([[0, 2, 1, 1]]))
    ious = metrics.iou_per_class(cm)
    np.testing.assert_allclose(ious, [50.0, 100.0, 0.0])
    assert metrics.mean_iou(ious) == pytest.approx(50.0)


def test_perfect_predictions_give_100():
    labels = np.random.default_rng(1).integers(0, 4, size=(2, 8, 8))
    cm = metrics.ConfusionMatrix(4)
    cm.update(labels, labels.copy())
    np.testing.assert_allclose(metrics.iou_per_class(cm), 100.0)
    assert metrics.pixel_accuracy(cm) == 100.0


def test_mean_of_nothing_is_nan_without_warning():
    with np.errstate(all="raise"):
        assert math.isnan(metrics.mean_iou([np.nan, np.nan]))
        assert math.isnan(metrics.iou_per_class(np.zeros((2, 2)))[0])
        assert math.isnan(metrics.pixel_accuracy(np.zeros((2, 2))))


def test_out_of_range_predictions_lower_recall_only():
    labels = np.array([[0, 0, 0, 0, 1, 1, 255, 255]], np.uint8)
    predictions = np.array([[0, 0, 200, 255, 1, 1, 0, 1]], np.uint8)
    cm = metrics.ConfusionMatrix(2)
    cm.update(labels, predictions)
    cm.update(labels.astype(np.int32), np.array([[0, 0, -1, 2, 1, 1, 0, 1]], np.int32))
    np.testing.assert_array_equal(cm.matrix, [[4, 0], [0, 4]])
    np.testing.assert_array_equal(cm.full_matrix[:, 2], [4, 0])
    # class 0: tp 4, fn 4 (the out-of-range pixels), no fp; class 1 is untouched.
    np.testing.assert_allclose(metrics.iou_per_class(cm), [50.0, 100.0])
    # The visible [C, C] matrix alone cannot see the missed pixels.
    np.testing.assert_allclose(metrics.iou_per_class(cm.matrix), [100.0, 100.0])
    assert metrics.pixel_accuracy(cm) == pytest.approx(100.0 * 8 / 12)


def test_shape_mismatch_names_both_shapes():
    cm = metrics.ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        cm.update(np.zeros((4, 5), np.int64), np.zeros((4, 6), np.int64))
    with pytest.raises(ValueError, match=r"\[H, W\] or \[B, H, W\]"):
        cm.update(np.zeros(5, np.int64), np.zeros(5, np.int64))
    with pytest.raises(TypeError, match="integer"):
        cm.update(np.zeros((2, 2), np.int64), np.zeros((2, 2), np.float32))
    assert cm.num_images == 0


def _synthia16_result():
    # Every class has 4 true pixels; `correct[i]` of them are predicted right and the rest out of range, so
    # class i scores 25 * correct[i] with no false positives anywhere.
    correct = [4, 3, 2, 0, 0, 0, 1, 4, 4, 3, 2, 1, 4, 4, 2, 2]
    labels = np.repeat(np.arange(16), 4)
    predictions = np.concatenate([[i] * k + [255] * (4 - k) for i, k in enumerate(correct)])
    cm = metrics.ConfusionMatrix(16)
    cm.update(labels.reshape(1, 8, 8), predictions.reshape(1, 8, 8))
    return metrics.summarize(cm, classes.SYNTHIA16)


def test_summarize_synthia16_reports_miou13():
    result = _synthia16_result()
    # wall, fence and pole (indices 3, 4, 5) score 0; the other 13 sum to
    # 100+75+50+25+100+100+75+50+25+100+100+50+50 = 900.
    assert result["miou"] == pytest.approx(900.0 / 16)
    assert result["miou13"] == pytest.approx(900.0 / 13)
    assert result["per_class_iou"]["sidewalk"] == pytest.approx(75.0)
    assert result["per_class_iou"]["wall"] == 0.0
    assert result["classes"] == list(classes.SYNTHIA16.names)
    assert result["num_images"] == 1
    assert result["pixel_accuracy"] == pytest.approx(100.0 * 36 / 64)
    assert metrics.select_miou(result, 13) == result["miou13"]
    assert metrics.select_miou(result, 16) == result["miou"]


def test_summarize_cityscapes19_marks_absent_classes_none():
    cm = metrics.ConfusionMatrix(19)
    cm.update(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
    result = metrics.summarize(cm, classes.CITYSCAPES19)
    assert "miou13" not in result
    assert result["miou"] == 100.0
    assert result["per_class_iou"]["road"] == 100.0
    assert result["per_class_iou"]["bicycle"] is None
    assert metrics.select_miou(result, 19) == 100.0
    with pytest.raises(ValueError, match="16-class"):
        metrics.select_miou(result, 13)
    with pytest.raises(ValueError, match="19 classes.*synthia16.*16"):
        metrics.summarize(cm, classes.SYNTHIA16)


def test_format_table_uses_short_names_and_dashes():
    cm = metrics.ConfusionMatrix(19)
    cm.update(np.array([[0, 0, 18, 18]]), np.array([[0, 1, 18, 18]]))
    table = reports.format_table(metrics.summarize(cm, classes.CITYSCAPES19))
    header, values = table.splitlines()
    assert header.split() == ["road", "sdwk", "bldng", "wall", "fence", "pole", "light", "sign", "vgttn",
                              "trrn", "sky", "person", "rider", "car", "truck", "bus", "train", "mcycl",
                              "bcycl", "mIoU"]
    assert values.split() == ["50.0", "0.0"] + ["-"] * 16 + ["100.0", "50.0"]
    assert set(reports.SHORT_NAMES) == set(classes.CITYSCAPES_CLASSES)


def test_format_table_synthia16_has_miou_star():
    header, values = reports.format_table(_synthia16_result()).splitlines()
    assert header.split()[3:6] == ["wall*", "fence*", "pole*"]
    assert header.split()[-2:] == ["mIoU", "mIoU*"]
    assert values.split()[-2:] == [f"{900 / 16:.1f}", f"{900 / 13:.1f}"]


def test_write_json_round_trip(tmp_path):
    cm = metrics.ConfusionMatrix(16)
    cm.update(np.zeros((2, 3, 3), np.uint8), np.zeros((2, 3, 3), np.uint8))
    result = metrics.summarize(cm, classes.SYNTHIA16)
    result["extra"] = np.float32("nan")
    path = tmp_path / "eval.json"
    path.write_text("old")
    reports.write_json(result, path)

    loaded = json.loads(path.read_text())
    assert loaded["miou"] == 100.0
    assert loaded["per_class_iou"]["road"] == 100.0
    assert loaded["per_class_iou"]["sidewalk"] is None
    assert loaded["extra"] is None
    assert loaded["num_images"] == 2
    assert loaded["classes"] == list(classes.SYNTHIA16.names)
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval.json"]


def test_write_json_creates_parents_and_nan_miou_is_null(tmp_path):
    result = metrics.summarize(metrics.ConfusionMatrix(19), classes.CITYSCAPES19)
    path = tmp_path / "a" / "b" / "eval.json"
    reports.write_json(result, path)
    loaded = json.loads(path.read_text())
    assert loaded["miou"] is None
    assert loaded["pixel_accuracy"] is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval.json"]


def test_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    path.write_text("old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(reports.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        reports.write_json({"miou": 1.0}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    assert path.read_text() == "old"


def test_class_set_for():
    assert metrics.class_set_for(19) is classes.CITYSCAPES19
    assert metrics.class_set_for(16) is classes.SYNTHIA16
    assert metrics.class_set_for(13) is classes.SYNTHIA16
    with pytest.raises(ValueError, match="Cannot evaluate 7 classes"):
        metrics.class_set_for(7)
    with pytest.raises(ValueError, match="Cannot evaluate 7 classes"):
        metrics.select_miou({"classes": [], "miou": 0.0}, 7)


def test_summarize_keeps_the_full_confusion_matrix():
    cm = metrics.ConfusionMatrix(2)
    cm.update(np.array([[0, 0, 1, 255]]), np.array([[0, 7, 1, 1]]))
    result = metrics.summarize(cm, classes.ClassSet("two", ("a", "b"), ((0, 0, 0), (1, 1, 1))))
    assert result["confusion_matrix"] == [[1, 0, 1], [0, 1, 0]]
    np.testing.assert_allclose(metrics.iou_per_class(np.array(result["confusion_matrix"])), [50.0, 100.0])


def test_write_csv_has_a_row_per_class_and_the_means(tmp_path):
    result = _synthia16_result()
    result["per_class_iou"]["road"] = None
    path = tmp_path / "eval.csv"
    reports.write_csv(result, path)
    rows = list(csv.reader(path.open(newline="")))
    assert rows[0] == ["class", "iou"]
    assert [r[0] for r in rows[1:]] == list(classes.SYNTHIA16.names) + ["mIoU", "mIoU*"]
    values = dict(rows[1:])
    assert values["road"] == ""
    assert float(values["sidewalk"]) == 75.0
    assert float(values["mIoU"]) == result["miou"] and float(values["mIoU*"]) == result["miou13"]


def test_results_paths_and_write_results(tmp_path):
    assert reports.results_paths("a/eval_val.json") == ("a/eval_val.json", "a/eval_val.csv",
                                                        "a/eval_val_confusion.png")
    assert reports.results_paths("a/out") == ("a/out", "a/out.csv", "a/out_confusion.png")
    cm = metrics.ConfusionMatrix(19)
    cm.update(np.array([[0, 0, 18, 18]]), np.array([[0, 1, 18, 18]]))
    written = reports.write_results(metrics.summarize(cm, classes.CITYSCAPES19), tmp_path / "r" / "eval.json")
    assert sorted(os.listdir(tmp_path / "r")) == ["eval.csv", "eval.json", "eval_confusion.png"]
    assert json.loads(open(written[0]).read())["miou"] == 50.0
    with Image.open(written[2]) as png:
        assert png.format == "PNG" and png.mode == "RGB"


def test_confusion_image_is_row_normalised_with_other_column_only_when_used():
    names = ("road", "car")
    darkest, grey, white = (8, 48, 107), (200, 200, 200), (255, 255, 255)
    # Row "road" is all correct (the darkest blue); row "car" has no pixels (grey).
    image = reports.confusion_image(np.array([[40, 0, 0], [0, 0, 0]]), names, cell=20)
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 16)}
    assert {darkest, grey, white} <= colours
    half = reports.confusion_image(np.array([[20, 0, 20], [0, 0, 0]]), names, cell=20)
    assert half.width == image.width + 20 and half.height == image.height
    assert darkest not in {colour for _, colour in half.getcolors(maxcolors=1 << 16)}
    # Normalised per row: ten times the counts draw the same picture.
    assert reports.confusion_image(np.array([[400, 0], [3, 1]]), names).tobytes() == \
        reports.confusion_image(np.array([[40, 0], [30, 10]]), names).tobytes()
