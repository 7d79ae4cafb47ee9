"""SYNTHIA-RAND-CITYSCAPES: 16-bit multi-channel labels in the official layout, the 16-class id map, and a
Cityscapes target read in the 16-class space; plus a one-step SYNTHIA -> Cityscapes run through the CLI (in the
test's process, tests/commands.py)."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from commands import run_in_process
from pit_keras.data import datasets, pipeline, synthia
from pit_keras.errors import UserError

# SYNTHIA class id -> 16-class train id, written out independently of classes.py (the SYNTHIA-RAND-CITYSCAPES class table).
EXPECTED_TRAIN16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11, 8: 12,
                    19: 13, 12: 14, 11: 15}
# Cityscapes label id -> 16-class train id: the 19 train classes without terrain (22), truck (27), train (31).
EXPECTED_CITYSCAPES16 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 23: 9, 24: 10, 25: 11,
                         26: 12, 28: 13, 32: 14, 33: 15}


def write_synthia_frame(root, name, class_ids, rng):
    """One frame in the official layout: 8-bit RGB, and a 16-bit 3-channel label (class, instance, 0)."""
    (root / "RGB").mkdir(parents=True, exist_ok=True)
    (root / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
    height, width = class_ids.shape
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "RGB" / name)
    instances = rng.integers(1, 65536, (height, width), dtype=np.uint16)  # must not leak into the classes
    label = np.stack([class_ids.astype(np.uint16), instances, np.zeros_like(instances)], axis=-1)
    tf.io.write_file(str(root / "GT" / "LABELS" / name), tf.io.encode_png(tf.constant(label)))


@pytest.fixture()
def synthia_root(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "RAND_CITYSCAPES"
    # Every id 0..255, and large 16-bit ids that an 8-bit reader would wrap onto valid classes (259 -> 3).
    ids = np.concatenate([np.arange(256), [259, 277, 1000, 4099, 65535] * 3 + [0]]).reshape(17, 16)
    write_synthia_frame(root, "0000000.png", ids, rng)
    write_synthia_frame(root, "0000001.png", rng.choice([1, 2, 3, 8, 0], (8, 12)), rng)
    return root


def test_labels_are_16_bit_three_channel_pngs(synthia_root):
    data = tf.io.read_file(str(synthia_root / "GT" / "LABELS" / "0000000.png"))
    decoded = tf.io.decode_png(data, channels=0, dtype=tf.uint16)
    assert decoded.dtype == tf.uint16 and decoded.shape == (17, 16, 3)
    # Why the loader does not use Pillow: it opens these as 8-bit RGB, keeping only the high byte.
    with Image.open(synthia_root / "GT" / "LABELS" / "0000000.png") as label:
        assert label.mode == "RGB"
        assert not np.array_equal(np.asarray(label)[..., 0], decoded.numpy()[..., 0])


def test_every_synthia_id_maps_to_its_train_id(synthia_root):
    pairs = synthia.list_pairs(str(synthia_root))
    assert [os.path.basename(i) for i, _ in pairs] == ["0000000.png", "0000001.png"]
    assert pairs[0][1].endswith(os.path.join("GT", "LABELS", "0000000.png"))
    class_ids = synthia.read_class_ids(pairs[0][1])
    assert class_ids.dtype == np.uint16 and int(class_ids.max()) == 65535
    train_ids = synthia.read_train_ids(pairs[0][1])
    assert train_ids.shape == (17, 16) and train_ids.dtype == np.uint8
    for synthia_id, train_id in zip(class_ids.ravel(), train_ids.ravel()):
        assert train_id == EXPECTED_TRAIN16.get(int(synthia_id), 255), synthia_id
    assert sorted(set(train_ids.ravel()) - {255}) == list(range(16))
    assert (train_ids == 255).sum() == 256 - 16 + 16  # 240 unmapped ids of 0..255, and the 16 large ids


def test_synthia_source_in_tf_data_agrees_with_the_reader(synthia_root):
    pairs, reader = datasets.source_pairs("synthia", str(synthia_root))
    assert reader is synthia.read_train_ids
    label = pairs[1][1]
    eager = pipeline.load_label(tf.constant(label), reader).numpy()
    in_dataset = next(iter(tf.data.Dataset.from_tensors(label).map(lambda p: pipeline.load_label(p, reader))))
    np.testing.assert_array_equal(eager, reader(label))
    np.testing.assert_array_equal(in_dataset.numpy(), eager)
    images, labels = next(iter(pipeline.source_dataset(pairs, reader, (12, 8), batch_size=2)))
    assert images.shape == (2, 8, 12, 3) and labels.shape == (2, 8, 12)
    assert set(np.unique(labels.numpy())) <= set(range(16)) | {255}


def test_an_8_bit_label_is_refused_by_name(synthia_root):
    bad = synthia_root / "GT" / "LABELS" / "0000001.png"
    Image.fromarray(np.full((8, 12, 3), 3, np.uint8)).save(bad)
    with pytest.raises(UserError, match=r"0000001.png: expected a 16-bit SYNTHIA label PNG, got a 8-bit"):
        synthia.read_train_ids(str(bad))
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match="0000001.png: not a PNG file"):
        synthia.read_train_ids(str(bad))


def test_synthia_layout_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(UserError, match="RGB: no such folder"):
        synthia.list_pairs(str(tmp_path))
    (tmp_path / "RGB").mkdir()
    (tmp_path / "GT" / "LABELS").mkdir(parents=True)
    with pytest.raises(UserError, match="no .png images"):
        synthia.list_pairs(str(tmp_path))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "RGB" / "0000042.png")
    with pytest.raises(UserError, match="0000042.png has no label"):
        synthia.list_pairs(str(tmp_path))


def write_cityscapes_frame(root, split, label_ids):
    city = "town"
    name = f"{city}_000000_000019"
    (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
    (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
    height, width = label_ids.shape
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(
        root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
    Image.fromarray(label_ids.astype(np.uint8)).save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")


def test_cityscapes_target_in_the_16_class_space(tmp_path):
    label_ids = np.concatenate([np.arange(34), [255] * 2]).reshape(6, 6)
    write_cityscapes_frame(tmp_path, "val", label_ids)
    pairs19, reader19, _ = datasets.target_pairs("cityscapes", str(tmp_path), "val", require_labels=True)
    pairs16, reader16, root = datasets.target_pairs("cityscapes", str(tmp_path), "val", require_labels=True,
                                                    num_classes=16)
    assert pairs16 == pairs19 and root == str(tmp_path)
    train16 = reader16(pairs16[0][1])
    for label_id, train_id in zip(label_ids.ravel(), train16.ravel()):
        assert train_id == EXPECTED_CITYSCAPES16.get(int(label_id), 255), label_id
    train19 = reader19(pairs19[0][1])
    for label_id in (22, 27, 31):  # terrain, truck, train: classes in 19 but not in 16
        position = label_ids == label_id
        assert train19[position] < 19 and train16[position] == 255
    in_dataset = next(iter(pipeline.evaluation_dataset(pairs16, reader16, (6, 6))))[1].numpy()
    np.testing.assert_array_equal(in_dataset, train16)


def test_synthia_run_trains_and_evaluates_in_16_classes(tmp_path):
    rng = np.random.default_rng(1)
    source = tmp_path / "synthia"
    for index in range(2):
        write_synthia_frame(source, f"{index:07d}.png", rng.choice(list(EXPECTED_TRAIN16) + [0], (32, 64)), rng)
    target = tmp_path / "cityscapes"
    write_cityscapes_frame(target, "train", rng.choice([7, 8, 22, 26, 27], (32, 64)))
    write_cityscapes_frame(target, "val", rng.choice([7, 8, 22, 26, 27], (32, 64)))
    model_dir = tmp_path / "run"
    result = run_in_process(
        "train", "--source=synthia", f"--source_root={source}", "--target=cityscapes", f"--target_root={target}",
        "--source_size=64,32", "--target_size=64,32", "--batch_size=1", "--num_steps=1", "--log_every=1",
        "--image_every=0", "--checkpoint_every=1", "--method=pit", "--image_labels=ground_truth",
        f"--model_dir={model_dir}", "--verbose=0")
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads((model_dir / "run.json").read_text())
    assert run["num_classes"] == 16 and run["class_set"] == "synthia16"
    scores = json.loads((model_dir / "eval_val.json").read_text())
    assert len(scores["per_class_iou"]) == 16
    assert "terrain" not in scores["per_class_iou"] and "truck" not in scores["per_class_iou"]
