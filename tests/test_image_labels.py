"""The image-level regressor: chi-squared term by term, the paper's schedule, that one softmax layer
learns soft shares, the feature cache, backbone features of a trained run (and their variants: AdaBN, pyramid
and all-stage pooling, whitening), and the CLI on the tiny benchmark with a small keras.applications model and no
weights."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from commands import run_in_process
from conftest import REPO, write_run_config
from pit_keras.adaptation import features as image_features, regressor
from pit_keras.data import cityscapes, gta5
from pit_keras.adaptation import soft_labels
from pit_keras.errors import UserError
from pit_keras.models.network import build_network


def test_chi_squared_agrees_with_its_definition_term_by_term():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=4)
    q = rng.dirichlet(np.ones(5), size=4)
    q[0, 2] = p[0, 2] = 0.0  # a class absent from both contributes nothing
    expected = [0.5 * sum((a - b) ** 2 / (a + b) for a, b in zip(row_p, row_q) if a + b > 0)
                for row_p, row_q in zip(p, q)]
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
    return image_features.feature_extractor("MobileNetV3Small", None, (64, 32))


def test_standardized_features_undo_a_shift_and_scaling_between_the_domains():
    rng = np.random.default_rng(1)
    source = rng.normal(size=(50, 4))
    source[:, 3] = 7.0  # a constant dimension
    target = source[::-1] * np.array([3.0, 0.5, 2.0, 1.0]) + np.array([5.0, -1.0, 0.0, 2.0])
    aligned_source, aligned_target = image_features.align_features(source, target, "standardize")
    np.testing.assert_allclose(aligned_target, aligned_source[::-1], atol=1e-6)
    np.testing.assert_allclose(aligned_source.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(aligned_source.std(axis=0), [1, 1, 1, 0], atol=1e-6)
    unchanged = image_features.align_features(source, target, "none")
    assert unchanged[0] is source and unchanged[1] is target
    with pytest.raises(ValueError, match="coral"):
        image_features.align_features(source, target, "coral")


def test_features_are_cached_once_per_key(small_extractor, tiny_benchmark, tmp_path, monkeypatch):
    paths = [i for i, _ in gta5.list_pairs(str(tiny_benchmark / "gta5"))]
    first, path, hit = image_features.cached_features(small_extractor, paths, (64, 32), str(tmp_path), progress=False)
    assert not hit and first.shape == (len(paths), 576) and os.path.isfile(path)
    with np.load(path, allow_pickle=False) as stored:
        np.testing.assert_array_equal(stored["features"], first)
    eager = small_extractor.model(small_extractor.preprocess(
        tf.image.resize(tf.cast(tf.io.decode_png(tf.io.read_file(paths[1]), 3), tf.float32), (32, 64))[None]
        .numpy()), training=False).numpy()
    np.testing.assert_allclose(first[1], eager[0], rtol=1e-4, atol=1e-5)

    monkeypatch.setattr(image_features, "compute_features", lambda *a, **k: pytest.fail("recomputed a cached key"))
    again, again_path, hit = image_features.cached_features(small_extractor, paths, (64, 32), str(tmp_path),
                                                       progress=False)
    assert hit and again_path == path
    np.testing.assert_array_equal(again, first)
    # Another image list, size or weights is another key.
    keys = {image_features.cache_key(small_extractor, paths, (64, 32)),
            image_features.cache_key(small_extractor, paths[:-1], (64, 32)),
            image_features.cache_key(small_extractor, paths, (32, 32)),
            image_features.cache_key(image_features.FeatureExtractor(None, None, {**small_extractor.key, "weights": "imagenet"}),
                                paths, (64, 32))}
    assert len(keys) == 4


def test_backbone_features_of_a_trained_run(tiny_benchmark, tmp_path):
    network = build_network("tiny", 19, num_units=3)
    tf.train.Checkpoint(network=network).save(str(tmp_path / "checkpoints" / "ckpt"))
    write_run_config(tmp_path, method="pit", lse_r=(0.5, 1, 1.5))
    extractor = image_features.feature_extractor("backbone", None, (64, 32), model_dir=str(tmp_path))
    paths = [i for i, _ in gta5.list_pairs(str(tiny_benchmark / "gta5"))][:2]
    features = image_features.compute_features(extractor, paths, (64, 32), progress=False)
    image = tf.image.resize(tf.cast(tf.io.decode_png(tf.io.read_file(paths[0]), 3), tf.float32), (32, 64))[None]
    backbone = network.get_layer("tiny")
    expected = tf.reduce_mean(backbone(image, training=False), axis=(1, 2)).numpy()[0]
    np.testing.assert_allclose(features[0], expected, rtol=1e-4, atol=1e-5)
    assert extractor.key["checkpoint"]

    with pytest.raises(UserError, match="--features=backbone needs --model_dir"):
        image_features.feature_extractor("backbone", None, (64, 32))
    with pytest.raises(UserError, match="--features=Resnet9 is not a keras.applications model"):
        image_features.feature_extractor("Resnet9", None, (64, 32))
    with pytest.raises(UserError, match="--image_size=64,32 does not suit --features=InceptionResNetV2"):
        image_features.feature_extractor("InceptionResNetV2", None, (64, 32))


def test_predicted_shares_of_a_trained_run(tiny_benchmark, tmp_path):
    network = build_network("tiny", 19, num_units=0)
    tf.train.Checkpoint(network=network).save(str(tmp_path / "checkpoints" / "ckpt"))
    write_run_config(tmp_path, method="minent", image_labels=None, lse_r=(1,), target_size=(64, 32))
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
    """`python -m pit_keras.image_labels ARGS` in a process of its own: the command's end-to-end test. The other
    tests run it in theirs (tests/commands.py)."""
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

    bad = run_in_process("image_labels", *args[:-1], f"--output={tmp_path}")
    assert bad.returncode == 2 and "is a folder; name the JSON file" in bad.stderr.strip().splitlines()[-1]
    assert "Traceback" not in bad.stderr
    # A refused start makes no folder for its output.
    bad = run_in_process("image_labels", *args[:-1], f"--output={tmp_path / 'new' / 'sub' / 'labels.json'}",
                         f"--source_root={tmp_path / 'nowhere'}")
    assert bad.returncode == 2 and not (tmp_path / "new").exists(), bad.stderr


def test_cli_with_predicted_shares_of_a_trained_run(tiny_benchmark, tmp_path):
    run_dir = tmp_path / "run"
    network = build_network("tiny", 19, num_units=0)
    tf.train.Checkpoint(network=network).save(str(run_dir / "checkpoints" / "ckpt"))
    write_run_config(run_dir, bench=tiny_benchmark, method="minent", image_labels=None, lse_r=(1,),
                     target_size=(64, 32))
    output = tmp_path / "labels.json"
    # The run's own datasets are the defaults (gta5's, without it, would need --source_root).
    result = run_in_process("image_labels", "--features=predictions", f"--model_dir={run_dir}", f"--output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"predicted by {run_dir}" in result.stdout and "  predictions " in result.stdout
    assert len(json.loads(output.read_text())) == 6
    bad = run_in_process("image_labels", "--source=gta5", f"--source_root={tiny_benchmark / 'gta5'}",
                         "--target=cityscapes", f"--target_root={tiny_benchmark / 'cityscapes'}",
                         "--features=predictions", f"--model_dir={run_dir}", f"--output={output}",
                         "--feature_alignment=standardize")
    assert bad.returncode == 2 and "--feature_alignment=standardize does not apply" in bad.stderr
    assert "Traceback" not in bad.stderr
    other = run_in_process("image_labels", "--features=predictions", f"--model_dir={run_dir}",
                           f"--output={tmp_path / 'other.json'}", "--source=synthia")
    assert other.returncode == 2 and other.stderr.strip().splitlines()[-1] == (
        "error: --source_root is required for --source=synthia.")  # another source than the run's needs its root


# === Feature variants against the domain shift: whitening, AdaBN, pyramid and all-stage pooling ===


def test_whitening_gives_identity_covariance_per_domain():
    rng = np.random.default_rng(2)
    rotations = [np.linalg.qr(rng.normal(size=(4, 4)))[0] for _ in range(2)]
    source = rng.normal(size=(400, 4)) * [1.0, 2.0, 3.0, 4.0] @ rotations[0] + 3.0
    target = rng.normal(size=(300, 4)) * [20.0, 5.0, 10.0, 15.0] @ rotations[1] - 1.0  # another mean, scale, rotation
    for exact in (True, False):
        shrinkage = 0.0 if exact else image_features.WHITEN_SHRINKAGE
        for x in (source, target):
            white = image_features.whiten(x, shrinkage=shrinkage)
            covariance = np.cov(white, rowvar=False, bias=True)
            np.testing.assert_allclose(white.mean(axis=0), 0.0, atol=1e-5)
            values = np.linalg.eigvalsh(x.T @ x - len(x) * np.outer(x.mean(0), x.mean(0)))
            # The shrinkage eps = s * l_max leaves l / (l + eps) in the direction of eigenvalue l.
            worst = 1.0 / (1.0 + shrinkage * values.max() / values.min())
            np.testing.assert_allclose(covariance, np.eye(4), atol=1e-5 if exact else 1.0 - worst + 1e-5)
            # ZCA: the symmetric whitening matrix, the one that moves the features least.
            matrix = np.linalg.lstsq(x - x.mean(axis=0), white, rcond=None)[0]
            np.testing.assert_allclose(matrix, matrix.T, atol=1e-5)
    aligned_source, aligned_target = image_features.align_features(source, target, "whiten")
    np.testing.assert_allclose(np.cov(aligned_target, rowvar=False, bias=True), np.eye(4), atol=0.02)
    np.testing.assert_allclose(np.cov(aligned_source, rowvar=False, bias=True), np.eye(4), atol=0.02)
    # A direction without variance stays zero instead of being blown up.
    flat = image_features.whiten(np.concatenate([source[:, :3], np.full((400, 1), 7.0)], axis=1), shrinkage=0.0)
    np.testing.assert_allclose(flat[:, 3], 0.0, atol=1e-6)
    np.testing.assert_allclose(np.cov(flat[:, :3], rowvar=False, bias=True), np.eye(3), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run whose BatchNorm moving statistics are far from the batches' (so AdaBN makes a difference)."""
    keras.utils.set_random_seed(3)
    run_dir = tmp_path_factory.mktemp("tiny_run")
    network = build_network("tiny", 19, num_units=0)
    rng = np.random.default_rng(3)
    for layer in network.get_layer("tiny").layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, size=layer.moving_variance.shape))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size=layer.gamma.shape))
            layer.beta.assign(rng.normal(scale=0.3, size=layer.beta.shape))
    tf.train.Checkpoint(network=network).save(str(run_dir / "checkpoints" / "ckpt"))
    write_run_config(run_dir, method="source_only", image_labels=None, lse_r=(1,), target_size=(64, 32))
    return run_dir, network


def load_images(paths, size=(64, 32)):
    return tf.stack([tf.image.resize(tf.cast(tf.io.decode_png(tf.io.read_file(p), 3), tf.float32), size[::-1])
                     for p in paths])


def batch_normalised_features(backbone, images):
    """The tiny backbone by hand, every BatchNorm normalising with the batch's own mean and (biased) variance."""
    x = images
    for layer in backbone.layers[1:]:
        if isinstance(layer, keras.layers.BatchNormalization):
            mean, variance = tf.nn.moments(x, axes=[0, 1, 2])
            x = (x - mean) / tf.sqrt(variance + layer.epsilon) * layer.gamma + layer.beta
        else:
            x = layer(x, training=False)
    return tf.reduce_mean(x, axis=[1, 2]).numpy()


def test_adabn_features_normalise_each_batch_with_its_own_moments(tiny_run, tiny_benchmark):
    run_dir, network = tiny_run
    backbone = network.get_layer("tiny")
    paths = [i for i, _ in gta5.list_pairs(str(tiny_benchmark / "gta5"))]
    adabn = image_features.feature_extractor("backbone", None, (64, 32), model_dir=str(run_dir),
                                        feature_alignment="adabn")
    running = image_features.feature_extractor("backbone", None, (64, 32), model_dir=str(run_dir))
    assert adabn.batch_statistics and adabn.batch_size == image_features.ADABN_BATCH_SIZE == 16
    stored = [v.numpy().copy() for v in adabn.model.variables]
    files = adabn.key["checkpoint"]

    features = image_features.compute_features(adabn, paths, (64, 32), progress=False)  # 6 images: one batch
    images = load_images(paths)
    np.testing.assert_allclose(features, batch_normalised_features(backbone, images), rtol=1e-4, atol=1e-5)
    plain = image_features.compute_features(running, paths, (64, 32), progress=False)
    np.testing.assert_allclose(plain, tf.reduce_mean(backbone(images, training=False), axis=[1, 2]), rtol=1e-4,
                               atol=1e-5)
    assert np.abs(features - plain).max() > 0.1
    # No stored variable moved: not the extractor's moving statistics, not the checkpoint's files.
    for before, variable in zip(stored, adabn.model.variables):
        np.testing.assert_array_equal(variable.numpy(), before)
    assert image_features.feature_extractor("backbone", None, (64, 32), model_dir=str(run_dir)).key["checkpoint"] == files

    # Smaller batches: each image is normalised with the moments of its own (shuffled, evenly split) batch.
    batches = image_features.adabn_batches(len(paths), 4)
    assert sorted(len(b) for b in batches) == [3, 3] and sorted(np.concatenate(batches)) == list(range(6))
    split = image_features.compute_features(dataclasses.replace(adabn, batch_size=4), paths, (64, 32), progress=False)
    for batch in batches:
        np.testing.assert_allclose(split[batch], batch_normalised_features(backbone, tf.gather(images, batch)),
                                   rtol=1e-4, atol=1e-5)
    assert np.abs(split - features).max() > 1e-3
    with pytest.raises(ValueError, match="batches of 16"):
        image_features.compute_features(adabn, paths, (64, 32), batch_size=8)


def test_pyramid_and_all_stage_features_of_the_tiny_backbone(tiny_run, tiny_benchmark):
    run_dir, network = tiny_run
    backbone = network.get_layer("tiny")
    assert image_features.stage_layers(backbone, "tiny") == ["stage1_refine_relu", "stage2_refine_relu"]
    paths = [i for i, _ in gta5.list_pairs(str(tiny_benchmark / "gta5"))][:3]
    extractor = image_features.feature_extractor("backbone", None, (64, 32), model_dir=str(run_dir),
                                            pooling="pyramid", stages="all")
    features = image_features.compute_features(extractor, paths, (64, 32), progress=False)
    taps = keras.Model(backbone.input, [backbone.get_layer("stage1_refine_relu").output,
                                        backbone.get_layer("stage2_refine_relu").output, backbone.output])
    stage1, stage2, final = (m.numpy() for m in taps(load_images(paths), training=False))
    assert final.shape[1:3] == (4, 8)  # 32 x 64 at output stride 8
    cells = [final[:, :2, :4], final[:, :2, 4:], final[:, 2:, :4], final[:, 2:, 4:]]
    expected = np.concatenate([stage1.mean((1, 2)), stage2.mean((1, 2)), final.mean((1, 2))]
                              + [cell.mean((1, 2)) for cell in cells], axis=1)
    assert features.shape == (3, 16 + 32 + 5 * 64)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)

    pyramid = image_features.feature_extractor("backbone", None, (64, 32), model_dir=str(run_dir), pooling="pyramid")
    np.testing.assert_allclose(image_features.compute_features(pyramid, paths, (64, 32), progress=False),
                               expected[:, 48:], rtol=1e-4, atol=1e-5)


def test_feature_cache_keys_differ_between_feature_variants(tiny_run, tiny_benchmark):
    run_dir, _ = tiny_run
    paths = [i for i, _ in gta5.list_pairs(str(tiny_benchmark / "gta5"))]
    variants = [("none", "global", "last"), ("adabn", "global", "last"), ("none", "pyramid", "last"),
                ("none", "global", "all"), ("adabn", "pyramid", "all")]
    keys = {image_features.cache_key(image_features.feature_extractor("backbone", None, (64, 32), str(run_dir), *v),
                                paths, (64, 32)) for v in variants}
    assert len(keys) == len(variants)
    assert image_features.feature_extractor("backbone", None, (64, 32), str(run_dir), "adabn").key["batch_norm"] == "batch"
    # Alignments that only transform the pooled features share the features they start from.
    same = {image_features.cache_key(image_features.feature_extractor("backbone", None, (64, 32), str(run_dir), a),
                                paths, (64, 32)) for a in ("none", "standardize", "whiten")}
    assert len(same) == 1
    assert image_features.cache_key(image_features.feature_extractor("backbone", None, (64, 32), str(run_dir), "adabn"),
                               paths, (64, 32)) == image_features.cache_key(
        image_features.feature_extractor("backbone", None, (64, 32), str(run_dir), "adabn_standardize"), paths, (64, 32))


def test_feature_variants_are_refused_where_they_do_not_apply(tmp_path):
    for kwargs, flag in (({"feature_alignment": "adabn"}, "--feature_alignment=adabn"),
                         ({"pooling": "pyramid"}, "--feature_pooling=pyramid"),
                         ({"stages": "all"}, "--feature_stages=all")):
        with pytest.raises(UserError, match=f"^{flag} needs --features=backbone"):
            image_features.feature_extractor("MobileNetV3Small", None, (64, 32), **kwargs)
    with pytest.raises(ValueError, match="coral"):
        image_features.alignment_steps("coral")

    image = keras.Input((None, None, 3))
    down = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="down")(image)
    frozen = keras.layers.BatchNormalization(trainable=False, name="bn")(down)
    with pytest.raises(UserError, match="--feature_alignment=adabn: the frozen backbone has no BatchNorm layer"):
        image_features._backbone_feature_model(keras.Model(image, frozen), "frozen", (32, 32), "batch", "global", "last",
                                          "adabn")
    up = keras.layers.UpSampling2D(name="up")(keras.layers.Conv2D(4, 3, strides=2, padding="same")(down))
    with pytest.raises(UserError, match="--feature_stages=all: the fcn backbone's resolution does not only fall"):
        image_features.stage_layers(keras.Model(image, up), "fcn")
    padded = keras.layers.ZeroPadding2D(1, name="pad")(down)  # a final map at no stride of the input
    with pytest.raises(UserError, match="--feature_stages=all: the padded backbone's resolution"):
        image_features.stage_layers(keras.Model(image, padded), "padded")

    common = ("--source=synthetic", "--target=synthetic", f"--output={tmp_path / 'labels.json'}")
    for args, message in (
            (("--features=MobileNetV3Small", "--feature_alignment=adabn_standardize"),
             "--feature_alignment=adabn_standardize needs --features=backbone"),
            (("--features=MobileNetV3Small", "--feature_pooling=pyramid"),
             "--feature_pooling=pyramid needs --features=backbone"),
            (("--features=predictions", f"--model_dir={tmp_path}", "--feature_stages=all"),
             "--feature_stages=all needs --features=backbone")):
        bad = run_in_process("image_labels", *common, *args)
        assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(f"error: {message}")


def test_cli_with_adabn_pyramid_features_of_all_stages(tiny_run, tiny_benchmark, tmp_path):
    run_dir, _ = tiny_run
    output = tmp_path / "labels.json"
    result = run_in_process("image_labels", "--source=gta5", f"--source_root={tiny_benchmark / 'gta5'}",
                            "--target=cityscapes", f"--target_root={tiny_benchmark / 'cityscapes'}",
                            "--features=backbone", f"--model_dir={run_dir}", "--image_size=64,32", "--epochs=2",
                            "--feature_alignment=adabn_standardize", "--feature_pooling=pyramid",
                            "--feature_stages=all", f"--cache_dir={tmp_path / 'cache'}", f"--output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("computed and cached features (368 dimensions)") == 2
    assert len(json.loads(output.read_text())) == 6 and "source-mean prior" in result.stdout


def test_the_benchmark_seed_reaches_the_data_the_estimate_reads(monkeypatch):
    # --benchmark_seed=1 on a fresh cache must generate (and read) that seed's benchmark, as train does.
    from pit_keras.adaptation import regressor
    from pit_keras.data import datasets

    seen = {}

    class Read(Exception):
        pass

    def source_pairs(name, root, benchmark_seed=None, label_map=None):
        seen["source"] = benchmark_seed
        return [], None

    def target_pairs(name, root, split, require_labels=False, num_classes=19, benchmark_seed=None):
        seen["target"] = benchmark_seed
        raise Read

    monkeypatch.setattr(datasets, "source_pairs", source_pairs)
    monkeypatch.setattr(datasets, "target_pairs", target_pairs)
    with pytest.raises(Read):
        regressor.estimate_target_labels("synthetic", "root", "synthetic", "root", 19, benchmark_seed=1)
    assert seen == {"source": 1, "target": 1}
