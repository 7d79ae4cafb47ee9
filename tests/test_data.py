"""Dataset readers (GTA5 palette labels, the real Cityscapes frame), the tf.data pipeline eagerly and inside
tf.data, and target image-level labels."""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import CITYSCAPES_FRAME, run_config
from pit_keras import losses
from pit_keras.data import cityscapes, classes, gta5, pipeline
from pit_keras.adaptation import soft_labels
from pit_keras.errors import UserError

# Cityscapes label id -> train id, written out independently of classes.py.
EXPECTED_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                      25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def test_gta5_palette_labels_map_every_id(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    label = Image.fromarray(ids)
    label.putpalette(classes.label_id_palette())
    label.save(tmp_path / "labels" / "00001.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "00001.png")
    assert Image.open(tmp_path / "labels" / "00001.png").mode == "P"
    pairs = gta5.list_pairs(str(tmp_path))
    train_ids = gta5.read_train_ids(pairs[0][1])
    for label_id in range(256):
        assert train_ids.ravel()[label_id] == EXPECTED_TRAIN_IDS.get(label_id, 255), label_id


def test_gta5_layout_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="images: no such folder"):
        gta5.list_pairs(str(tmp_path))
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(UserError, match="no .png images"):
        gta5.list_pairs(str(tmp_path))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "00007.png")
    with pytest.raises(UserError, match="00007.png has no label"):
        gta5.list_pairs(str(tmp_path))


@pytest.mark.skipif(not CITYSCAPES_FRAME.is_dir(), reason="the shared Cityscapes sample is not beside the repo")
def test_cityscapes_reader_on_a_real_frame():
    pairs = cityscapes.list_images(str(CITYSCAPES_FRAME), "val", require_labels=True)
    assert len(pairs) == 1
    image_path, label_path = pairs[0]
    assert label_path.endswith("frankfurt_000000_000294_gtFine_labelIds.png")
    label_ids = np.asarray(Image.open(label_path))
    train_ids = cityscapes.read_train_ids(label_path)
    expected = np.vectorize(lambda i: EXPECTED_TRAIN_IDS.get(int(i), 255))(label_ids)
    np.testing.assert_array_equal(train_ids, expected)
    official = np.asarray(Image.open(label_path.replace("_labelIds", "_labelTrainIds")))
    # The sample's README: 77 pixels differ because the two files were downscaled separately.
    assert (train_ids != official).sum() <= 77
    assert pipeline.load_image(tf.constant(image_path)).shape == (128, 256, 3)


def test_cityscapes_missing_labels(tmp_path):
    city = tmp_path / "leftImg8bit" / "val" / "town"
    city.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(city / "town_000000_000019_leftImg8bit.png")
    assert cityscapes.list_images(str(tmp_path), "val")[0][1] is None
    with pytest.raises(UserError, match="town_000000_000019_leftImg8bit.png has no label"):
        cityscapes.list_images(str(tmp_path), "val", require_labels=True)
    with pytest.raises(UserError, match="leftImg8bit/train: no such folder"):
        cityscapes.list_images(str(tmp_path), "train")


def test_the_test_processes_iterate_without_tf_data_autotuning():
    # tests/conftest.py turns autotuning off where TensorFlow makes an iterator; were that hook no longer called
    # (a TensorFlow upgrade), deleted iterators would stall tests again.
    iterator = iter(tf.data.Dataset.range(3).prefetch(pipeline.AUTOTUNE))
    assert iterator._dataset.options().autotune.enabled is False
    assert list(iterator) == [0, 1, 2]


def test_source_pipeline_eager_and_in_tf_data_agree(tiny_benchmark):
    pairs = gta5.list_pairs(str(tiny_benchmark / "gta5"))
    image, label = pairs[0]
    eager = pipeline.load_label(tf.constant(label), gta5.read_train_ids, (32, 16)).numpy()
    # Nearest-neighbour halving with half-pixel centres picks the odd rows and columns.
    np.testing.assert_array_equal(eager, gta5.read_train_ids(label)[1::2, 1::2])
    in_dataset = next(iter(tf.data.Dataset.from_tensors(label).map(
        lambda p: pipeline.load_label(p, gta5.read_train_ids, (32, 16))))).numpy()
    np.testing.assert_array_equal(eager, in_dataset)

    images, labels = next(iter(pipeline.source_dataset(pairs, gta5.read_train_ids, (48, 24), batch_size=3)))
    assert images.shape == (3, 24, 48, 3) and images.dtype == tf.float32
    assert labels.shape == (3, 24, 48) and labels.dtype == tf.uint8
    assert 0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255
    assert set(np.unique(labels.numpy())) <= set(range(19)) | {255}


def test_target_pipeline_keeps_image_labels_with_their_images(tiny_benchmark):
    pairs = cityscapes.list_images(str(tiny_benchmark / "cityscapes"), "train")
    paths = [i for i, _ in pairs]
    labels = np.eye(len(paths), 19, dtype=np.float32)  # row i marks image i
    ds = pipeline.target_dataset(paths, labels, (64, 32), batch_size=2)
    for images, rows in ds.take(6):
        for image, row in zip(images.numpy(), rows.numpy()):
            expected = pipeline.load_image(tf.constant(paths[int(row.argmax())]), (64, 32)).numpy()
            np.testing.assert_allclose(image, expected, atol=1e-3)


def test_ground_truth_shares_agree_with_the_tf_loss_function(tiny_benchmark):
    pairs = cityscapes.list_images(str(tiny_benchmark / "cityscapes"), "train", require_labels=True)
    got = soft_labels.from_ground_truth([l for _, l in pairs], cityscapes.read_train_ids, 19)
    for row, (_, label) in zip(got, pairs):
        expected = losses.image_level_labels(cityscapes.read_train_ids(label)[None], 19).numpy()[0]
        np.testing.assert_allclose(row, expected, rtol=1e-6)
        assert abs(row.sum() - 1) < 1e-5


def test_image_labels_json_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "labels.json")
    keys = ["leftImg8bit/train/a/a_1_leftImg8bit.png", "leftImg8bit/train/a/a_2_leftImg8bit.png"]
    rows = np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]], np.float32)
    soft_labels.write_json(path, keys, rows)
    np.testing.assert_allclose(soft_labels.load_json(path, keys, 3), rows)
    with pytest.raises(UserError, match="has no entry for target image x.png"):
        soft_labels.load_json(path, ["x.png"], 3)
    with pytest.raises(UserError, match="is not 4 non-negative numbers"):
        soft_labels.load_json(path, keys, 4)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json: not a readable JSON file"):
        soft_labels.load_json(str(tmp_path / "bad.json"), keys, 3)
    with pytest.raises(UserError, match="no such file"):
        soft_labels.load_json(str(tmp_path / "missing.json"), keys, 3)
    with pytest.raises(UserError, match="^--image_labels_prior=.*missing.json: no such file"):
        soft_labels.load_json(str(tmp_path / "missing.json"), keys, 3, flag="image_labels_prior")
    assert json.loads((tmp_path / "labels.json").read_text())[keys[1]][2] == pytest.approx(0.7)


def test_cached_pipeline_gives_the_same_batches_and_reads_each_file_once(tiny_benchmark):
    pairs = gta5.list_pairs(str(tiny_benchmark / "gta5"))
    reads = []

    def reader(path):
        reads.append(path)
        return gta5.read_train_ids(path)

    batches = {}
    for cache in (False, True):
        reads.clear()
        ds = pipeline.source_dataset(pairs, reader, (32, 16), batch_size=2, seed=3, skip_batches=1, cache=cache)
        batches[cache] = [(i.numpy(), l.numpy()) for i, l in ds.take(8)]  # batches 2-9 of 2: three epochs of 6
    assert sorted(reads) == sorted(label for _, label in pairs)  # the cached run read each label once
    assert len(batches[False]) == len(batches[True]) == 8
    for (image, label), (cached_image, cached_label) in zip(batches[False], batches[True]):
        np.testing.assert_array_equal(image, cached_image)
        np.testing.assert_array_equal(label, cached_label)


def test_cache_images_feeds_a_run_the_same_source_and_target_batches(tiny_benchmark):
    from pit_keras.training import runner

    pairs = gta5.list_pairs(str(tiny_benchmark / "gta5"))
    target_paths = [image for image, _ in pairs[::-1]]  # any images serve as the target here
    labels = np.eye(3, 19, dtype=np.float32)[np.arange(len(target_paths)) % 3]
    domains = {"source": (pairs, gta5.read_train_ids), "target": (target_paths, labels)}
    batches = []
    for cache in (False, True):
        config = run_config(tiny_benchmark, source_size=(32, 16), target_size=(24, 16), seed=5, cache_images=cache)
        ds = runner.build_dataset(config, domains, batch_size=2, skip_batches=2)
        batches.append([{k: v.numpy() for k, v in b.items()} for b in ds.take(5)])
    assert len(batches[0]) == len(batches[1]) == 5
    for plain, cached in zip(*batches):
        assert set(plain) == set(cached) and "target_image_labels" in plain
        for key in plain:
            np.testing.assert_array_equal(plain[key], cached[key])


def test_every_iterator_of_a_run_dataset_gives_the_same_batches(tiny_benchmark):
    # Keras' fit under a distribution strategy reads a batch through an iterator of its own before it trains: the
    # batches a run (or a resumed run) sees must not depend on how many iterators were made before.
    from pit_keras.training import runner

    pairs = gta5.list_pairs(str(tiny_benchmark / "gta5"))
    target_paths = [image for image, _ in pairs[::-1]]
    labels = np.eye(3, 19, dtype=np.float32)[np.arange(len(target_paths)) % 3]
    domains = {"source": (pairs, gta5.read_train_ids), "target": (target_paths, labels)}
    for cache in (False, True):
        config = run_config(tiny_benchmark, source_size=(32, 16), target_size=(24, 16), seed=5, cache_images=cache)
        ds = runner.build_dataset(config, domains, batch_size=2, skip_batches=1)
        first, second = ([{k: v.numpy() for k, v in b.items()} for b in ds.take(7)] for _ in range(2))
        for a, b in zip(first, second):  # batches 2-8 of 2: over two epochs of 6 images
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"cache={cache} {key}")


def test_a_worker_with_two_replicas_resumes_two_of_its_batches_a_step_on(tiny_benchmark):
    # A multi-worker run's worker pipeline feeds each of its local replicas in turn: here 2 workers of 2 replicas,
    # so a resumed step 3 starts at the worker's batch 6.
    import tensorflow as tf

    from pit_keras.training import runner

    pairs = gta5.list_pairs(str(tiny_benchmark / "gta5"))
    domains = {"source": (pairs, gta5.read_train_ids), "target": ([image for image, _ in pairs], np.eye(6, 19))}
    config = run_config(tiny_benchmark, source_size=(32, 16), target_size=(24, 16), batch_size=8)
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=4)
    resumed = [b["source_image"].numpy() for b in runner.worker_dataset_fn(config, domains, 3)(context).take(3)]
    whole = [b["source_image"].numpy() for b in runner.build_dataset(config, domains, 2, shard=(2, 1)).take(9)]
    assert resumed[0].shape == (2, 16, 32, 3)
    np.testing.assert_array_equal(np.stack(resumed), np.stack(whole[6:9]))


def test_cache_images_is_refused_when_the_decoded_images_would_not_fit(tiny_benchmark, capsys, monkeypatch):
    from pit_keras.data import memory
    from pit_keras.errors import UserError

    pairs = gta5.list_pairs(str(tiny_benchmark / "gta5"))
    domains = {"source": (pairs, gta5.read_train_ids), "target": ([image for image, _ in pairs], None)}
    width, height = Image.open(pairs[0][0]).size
    needed = len(pairs) * width * height * (4 + 3)
    assert memory.cache_footprint(domains) == pytest.approx(needed)
    memory.check_cache_fits(domains, available=2 * needed)
    assert f"about {needed / 1e6:.0f} MB" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"^--cache_images: the decoded training images need about .* GB, more "
                                         r"than the .* GB of memory available"):
        memory.check_cache_fits(domains, available=needed)
    memory.check_cache_fits(domains, available=needed, shards=2)  # each of two workers keeps half
    monkeypatch.setattr(memory, "available_memory", lambda: None)
    memory.check_cache_fits(domains)
    assert "(not checked: the available memory could not be read)" in capsys.readouterr().out
