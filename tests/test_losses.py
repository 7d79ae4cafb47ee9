"""The loss functions against independent numpy code on random inputs."""

import numpy as np
import pytest
import tensorflow as tf

from pit_keras import losses

RNG = np.random.default_rng(0)


def numpy_lse(cam, r, normalize):
    # Independent stable reference in float64: shift by the max before exponentiating.
    x = r * cam.astype(np.float64).reshape(cam.shape[0], -1, cam.shape[-1])
    m = x.max(axis=1)
    pooled = m + np.log(np.mean(np.exp(x - m[:, None, :]), axis=1))
    return pooled / r if normalize else pooled


@pytest.mark.parametrize("r", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("normalize", [False, True])
def test_lse_pool_matches_numpy(r, normalize):
    cam = RNG.normal(size=(3, 5, 7, 4)).astype(np.float32) * 3
    got = losses.lse_pool(tf.constant(cam), r, normalize).numpy()
    np.testing.assert_allclose(got, numpy_lse(cam, r, normalize), rtol=1e-5, atol=1e-5)


def test_lse_pool_is_stable_where_a_naive_exp_overflows():
    cam = RNG.normal(size=(2, 4, 4, 3)).astype(np.float32) + 600.0
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(1.5 * cam.astype(np.float32))).any()
    got = losses.lse_pool(tf.constant(cam), 1.5).numpy()
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, numpy_lse(cam, 1.5, False), rtol=1e-5)


def test_lse_pool_limits_are_max_and_mean():
    cam = RNG.normal(size=(2, 6, 6, 3)).astype(np.float32)
    large = losses.lse_pool(tf.constant(cam), 200.0, normalize=True).numpy()
    np.testing.assert_allclose(large, cam.max(axis=(1, 2)), atol=0.05)
    small = losses.lse_pool(tf.constant(cam), 1e-3, normalize=True).numpy()
    np.testing.assert_allclose(small, cam.mean(axis=(1, 2)), atol=1e-2)


def test_image_level_labels_matches_bincount():
    labels = RNG.integers(0, 6, size=(4, 9, 11)).astype(np.uint8)
    labels[labels == 5] = 255  # ignored
    labels[0, 0, :3] = 7  # out of the class range: ignored as well
    labels[3] = 255  # an image with no labelled pixel
    got = losses.image_level_labels(tf.constant(labels), 5).numpy()
    for b in range(3):
        valid = labels[b][labels[b] < 5]
        np.testing.assert_allclose(got[b], np.bincount(valid, minlength=5) / valid.size, rtol=1e-6)
    np.testing.assert_array_equal(got[3], np.zeros(5))


def test_reconstruction_loss_matches_numpy():
    cams = [RNG.normal(size=(2, 4, 5, 3)).astype(np.float32) for _ in range(3)]
    seg = RNG.normal(size=(2, 4, 5, 3)).astype(np.float32)
    w = np.array([0.2, -0.7, 1.3], np.float32)
    expected = np.mean((sum(wk * c for wk, c in zip(w, cams)) - seg) ** 2, axis=(1, 2, 3))
    got = losses.reconstruction_loss([tf.constant(c) for c in cams], tf.constant(w), tf.constant(seg)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_pixel_cross_entropy_ignores_unlabelled_pixels():
    logits = RNG.normal(size=(3, 4, 6, 5)).astype(np.float32)
    labels = RNG.integers(0, 5, size=(3, 4, 6)).astype(np.uint8)
    labels[0, :2] = 255
    labels[2] = 255
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    got = losses.pixel_cross_entropy(tf.constant(labels), tf.constant(logits)).numpy()
    for b in range(2):
        mask = labels[b] != 255
        nll = -np.take_along_axis(log_p[b], np.where(mask, labels[b], 0)[..., None], -1)[..., 0]
        np.testing.assert_allclose(got[b], nll[mask].mean(), rtol=1e-5)
    assert got[2] == 0.0


def test_image_level_bce_matches_numpy():
    y = RNG.dirichlet(np.ones(6), size=3).astype(np.float32)
    s = RNG.normal(size=(3, 6)).astype(np.float32) * 4
    p = 1 / (1 + np.exp(-s.astype(np.float64)))
    expected = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(-1)
    np.testing.assert_allclose(losses.image_level_bce(tf.constant(y), tf.constant(s), "sum").numpy(), expected,
                               rtol=1e-5)
    # The default averages over classes (PyTorch's BCEWithLogitsLoss reduction).
    np.testing.assert_allclose(losses.image_level_bce(tf.constant(y), tf.constant(s)).numpy(), expected / 6,
                               rtol=1e-5)


def test_entropy_loss_matches_numpy_and_is_one_for_uniform():
    logits = RNG.normal(size=(2, 3, 4, 5)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = (-(p * np.log(p)).sum(-1) / np.log(5)).mean(axis=(1, 2))
    np.testing.assert_allclose(losses.entropy_loss(tf.constant(logits)).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(losses.entropy_loss(tf.zeros((1, 2, 2, 5))).numpy(), [1.0], rtol=1e-6)
