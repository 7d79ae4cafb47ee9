"""The image-level regressor: chi-squared against scikit-learn, the paper's schedule, that one softmax layer
learns soft shares, the feature cache, backbone features of a trained run, and the CLI on the tiny benchmark
with a small keras.applications model and no weights."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics.pairwise import additive_chi2_kernel

from conftest import REPO
from pit_keras import regressor
from pit_keras.data import cityscapes, gta5, soft_labels
from pit_keras.errors import UserError
from pit_keras.models.network import build_network


def test_chi_squared_agrees_with_scikit_learn():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=4)
    q = rng.dirichlet(np.ones(5), size=4)
    q[0, 2] = p[0, 2] = 0.0  # a class absent from both contributes nothing
    expected = -0.5 * np.diag(additive_chi2_kernel(p, q))
    np.testing.assert_allclose(regressor.chi_squared(p, q), expected, rtol=1e-12)
    assert regressor.chi_squared(p, p).max() == 0
    assert regressor.chi_squared([1, 0], [0, 1]) == pytest.approx(1.0)


def test_learning_rate_schedule_is_the_papers():
    schedule = regressor.FlooredExponentialDecay(1e-4, decay_steps=10, decay_rate=0.99, minimum=1e-6)
    for step, expected in ((0, 1e-4), (10, 0.99e-4), (25, 1e-4 * 0.99 ** 2.5), (10 * 1000, 1e-6)):
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
    model = regressor.train_regressor(np.ones((3, 4), np.float32), np.full((3, 2), 0.5, np.float32), epochs=0,
                                      batch_size=2)
    config = model.optimizer.get_config()
    assert config["momentum"] == pytest.approx(0.9)
    assert config["learning_rate"]["config"] == {"initial_learning_rate": 1e-4, "decay_rate": 0.99,
                                                 "minimum": 1e-6, "decay_steps": 2}  # per epoch: ceil(3 / 2)


def test_regressor_starts_at_the_source_prior_and_learns_soft_shares():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(256, 6)).astype(np.float32)
    true_kernel = rng.normal(size=(6, 4))
    shares = tf.nn.softmax(features @ true_kernel).numpy().astype(np.float32)
    shares[:3] = 0.0  # images without a labelled pixel are left out, not learned as "no class"
    untrained = regressor.train_regressor(features, shares, epochs=0)
    prior = shares[3:].mean(axis=0)
    np.testing.assert_allclose(untrained.predict(features[:2], verbose=0), [prior, prior], rtol=1e-5)
    assert len(untrained.layers) == 1 and untrained.layers[0].get_config()["activation"] == "softmax"
    # The paper's learning rate is for tens of thousands of images; a larger one shows learning in a few epochs.
    trained = regressor.train_regressor(features, shares, epochs=40, learning_rate=0.5, batch_size=16)
    predicted = trained.predict(features[3:], verbose=0)
    np.testing.assert_allclose(predicted.sum(axis=1), 1.0, rtol=1e-5)
    learned = regressor.chi_squared(shares[3:], predicted).mean()
    baseline = regressor.chi_squared(shares[3:], np.broadcast_to(prior, predicted.shape)).mean()
    assert learned < 0.2 * baseline


@pytest.fixture(scope="module")
def small_extractor():
    keras.utils.set_random_seed(0)
    return regressor.feature_extractor("MobileNetV3Small", None, (64, 32))


def test_standardized_features_undo_a_shift_and_scaling_between_the_domains():
    rng = np.random.default_rng(1)
    source = rng.normal(size=(50, 4))
    source[:, 3] = 7.0  # a constant dimension
    target = source[::-1] * np.array([3.0, 0.5, 2.0, 1.0]) + np.array([5.0, -1.0, 0.0, 2.0])
    aligned_source, aligned_target = regressor.align_features(source, target, "standardize")
    np.testing.assert_allclose(aligned_target, aligned_source[::-1], atol=1e-6)
    np.testing.assert_allclose(aligned_source.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(aligned_source.std(axis=0), [1, 1, 1, 0], atol=1e-6)
    unchanged = regressor.align_features(source, target, "none")
    assert unchanged[0] is source and unchanged[1] is target
    with pytest.raises(ValueError, match="coral"):
        regressor.align_features(source, target, "coral")


def test_features_are_cached_once_per_key(small_extractor, tiny_benchmark, tmp_path, monkeypatch):
    paths = [i for i, _ in gta5.list_pairs(str(tiny_benchmark / "gta5"))]
    first, path, hit = regressor.cached_features(small_extractor, paths, (64, 32), str(tmp_path), progress=False)
    assert not hit and first.shape == (len(paths), 576) and os.path.isfile(path)
    with np.load(path, allow_pickle=False) as stored:
        np.testing.assert_array_equal(stored["features"], first)
    eager = small_extractor.model(small_extractor.preprocess(
        tf.image.resize(tf.cast(tf.io.decode_png(tf.io.read_file(paths[1]), 3), tf.float32), (32, 64))[None]
        .numpy()), training=False).numpy()
    np.testing.assert_allclose(first[1], eager[0], rtol=1e-4, atol=1e-5)

    monkeypatch.setattr(regressor, "compute_features", lambda *a, **k: pytest.fail("recomputed a cached key"))
    again, again_path, hit = regressor.cached_features(small_extractor, paths, (64, 32), str(tmp_path),
                                                       progress=False)
    assert hit and again_path == path
    np.testing.assert_array_equal(again, first)
    # Another image list, size or weights is another key.
    keys = {regressor.cache_key(small_extractor, paths, (64, 32)),
            regressor.cache_key(small_extractor, paths[:-1], (64, 32)),
            regressor.cache_key(small_extractor, paths, (32, 32)),
            regressor.cache_key(regressor.FeatureExtractor(None, None, {**small_extractor.key, "weights": "imagenet"}),
                                paths, (64, 32))}
    assert len(keys) == 4


def test_backbone_features_of_a_trained_run(tiny_benchmark, tmp_path):
    network = build_network("tiny", 19, num_units=3)
    tf.train.Checkpoint(network=network).save(str(tmp_path / "checkpoints" / "ckpt"))
    (tmp_path / "run.json").write_text(json.dumps({"backbone": "tiny", "num_classes": 19, "method": "pit",
                                                   "lse_r": [0.5, 1, 1.5]}))
    extractor = regressor.feature_extractor("backbone", None, (64, 32), model_dir=str(tmp_path))
    paths = [i for i, _ in gta5.list_pairs(str(tiny_benchmark / "gta5"))][:2]
    features = regressor.compute_features(extractor, paths, (64, 32), progress=False)
    image = tf.image.resize(tf.cast(tf.io.decode_png(tf.io.read_file(paths[0]), 3), tf.float32), (32, 64))[None]
    backbone = network.get_layer("tiny")
    expected = tf.reduce_mean(backbone(image, training=False), axis=(1, 2)).numpy()[0]
    np.testing.assert_allclose(features[0], expected, rtol=1e-4, atol=1e-5)
    assert extractor.key["checkpoint"]

    with pytest.raises(UserError, match="--features=backbone needs --model_dir"):
        regressor.feature_extractor("backbone", None, (64, 32))
    with pytest.raises(UserError, match="--features=Resnet9 is not a keras.applications model"):
        regressor.feature_extractor("Resnet9", None, (64, 32))
    with pytest.raises(UserError, match="--image_size=64,32 does not suit --features=InceptionResNetV2"):
        regressor.feature_extractor("InceptionResNetV2", None, (64, 32))


def test_predicted_shares_of_a_trained_run(tiny_benchmark, tmp_path):
    network = build_network("tiny", 19, num_units=0)
    tf.train.Checkpoint(network=network).save(str(tmp_path / "checkpoints" / "ckpt"))
    (tmp_path / "run.json").write_text(json.dumps({"backbone": "tiny", "num_classes": 19, "method": "minent",
                                                   "lse_r": [1], "target_size": [64, 32]}))
    paths = [i for i, _ in gta5.list_pairs(str(tiny_benchmark / "gta5"))][:3]
    shares = regressor.predicted_shares(str(tmp_path), paths, 19, progress=False)
    for row, path in zip(shares, paths):
        image = tf.image.resize(tf.cast(tf.io.decode_png(tf.io.read_file(path), 3), tf.float32), (32, 64))[None]
        predicted = np.argmax(network(image, training=False)["seg"].numpy()[0], axis=-1)
        np.testing.assert_allclose(row, np.bincount(predicted.ravel(), minlength=19) / predicted.size, atol=1e-6)
    with pytest.raises(UserError, match="predicts 19 classes, not 16"):
        regressor.predicted_shares(str(tmp_path), paths, 16)
    with pytest.raises(UserError, match="--features=predictions needs --model_dir"):
        regressor.predicted_shares(None, paths, 19)


def run_cli(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "pit_keras.image_labels", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_target_labels_and_reports_distances(tiny_benchmark, tmp_path):
    output = tmp_path / "labels.json"
    args = ("--source=gta5", f"--source_root={tiny_benchmark / 'gta5'}", "--target=cityscapes",
            f"--target_root={tiny_benchmark / 'cityscapes'}", "--features=MobileNetV3Small",
            "--features_weights=none", "--image_size=64,32", "--epochs=2", f"--cache_dir={tmp_path / 'cache'}",
            f"--output={output}")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    root = str(tiny_benchmark / "cityscapes")
    pairs = cityscapes.list_images(root, "train")
    keys = [cityscapes.relative_key(root, image) for image, _ in pairs]
    labels = soft_labels.load_json(str(output), keys, 19)  # what train --image_labels reads
    assert sorted(json.loads(output.read_text())) == sorted(keys)
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-5)
    for name in ("regressor", "source-mean prior", "uniform prior"):
        assert name in result.stdout
    assert "computed and cached features" in result.stdout
    assert len(os.listdir(tmp_path / "cache")) == 2  # source and target

    bad = run_cli(*args[:-1], f"--output={tmp_path}")
    assert bad.returncode == 2 and "is a folder; name the JSON file" in bad.stderr.strip().splitlines()[-1]
    assert "Traceback" not in bad.stderr


def test_cli_with_predicted_shares_of_a_trained_run(tiny_benchmark, tmp_path):
    run_dir = tmp_path / "run"
    network = build_network("tiny", 19, num_units=0)
    tf.train.Checkpoint(network=network).save(str(run_dir / "checkpoints" / "ckpt"))
    (run_dir / "run.json").write_text(json.dumps({"backbone": "tiny", "num_classes": 19, "method": "minent",
                                                  "lse_r": [1], "target_size": [64, 32]}))
    output = tmp_path / "labels.json"
    result = run_cli("--source=gta5", f"--source_root={tiny_benchmark / 'gta5'}", "--target=cityscapes",
                     f"--target_root={tiny_benchmark / 'cityscapes'}", "--features=predictions",
                     f"--model_dir={run_dir}", f"--output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"predicted by {run_dir}" in result.stdout and "  predictions " in result.stdout
    assert len(json.loads(output.read_text())) == 6
    bad = run_cli("--source=gta5", f"--source_root={tiny_benchmark / 'gta5'}", "--target=cityscapes",
                  f"--target_root={tiny_benchmark / 'cityscapes'}", "--features=predictions",
                  f"--model_dir={run_dir}", f"--output={output}", "--feature_alignment=standardize")
    assert bad.returncode == 2 and "--feature_alignment=standardize does not apply" in bad.stderr
    assert "Traceback" not in bad.stderr
