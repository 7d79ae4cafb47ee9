"""The network: outputs, backbones and weights, BatchNorm on one replica, serialisation, and where the
reconstruction's gradients go."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import expect
from pit_keras import losses
from pit_keras.errors import UserError
from pit_keras.models import backbones, layers
from pit_keras.models.network import build_network, fine_segmenter, interaction_weights


@pytest.fixture(scope="module")
def network():
    keras.utils.set_random_seed(0)
    return build_network("tiny", num_classes=4, num_units=3)


def test_outputs_are_named_and_upsampled_to_the_input(network):
    out = network(tf.zeros((2, 40, 56, 3)))
    assert set(out) == {"seg", "seg_feat", "recon", *(f"cam_{k}" for k in range(3)),
                        *(f"cam_{k}_feat" for k in range(3))}
    for name in ("seg", "recon", "cam_0", "cam_2"):
        assert out[name].shape == (2, 40, 56, 4)
    assert out["seg_feat"].shape == (2, 5, 7, 4)  # output stride 8


def test_recon_output_is_the_weighted_sum_of_the_coarse_maps(network):
    out = network(tf.random.uniform((1, 32, 32, 3), 0, 255))
    w = interaction_weights(network).numpy()
    expected = sum(w[k] * out[f"cam_{k}"].numpy() for k in range(3))
    np.testing.assert_allclose(out["recon"].numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,stride", [("mobilenetv3_small", 16), ("mobilenetv3_large", 16)])
def test_mobilenet_backbones_build_without_weights(name, stride):
    model = backbones.build_backbone(name, "none")
    assert model(tf.zeros((1, 64, 96, 3))).shape[1:3] == (64 // stride, 96 // stride)
    assert backbones.BACKBONES[name].output_stride == stride


@pytest.mark.parametrize("name", ["tiny", "mobilenetv3_small"])
def test_trained_batch_norm_is_synchronized_across_replicas(name):
    norms = [l for l in backbones.build_backbone(name).layers if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and all(l.synchronized for l in norms)


def traced_training_call(layer, x):
    """One traced training-mode call of a BatchNorm `layer` on `x` with a gradient: the output, the gradients of a
    loss on it with respect to x, gamma and beta, the moving statistics after the call; and the traced op count."""
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * tf.cos(y))
        return [y, *tape.gradient(loss, [x, layer.gamma, layer.beta])]

    ops = len(step.get_concrete_function(x).graph.get_operations())
    return [t.numpy() for t in step(x)] + [layer.moving_mean.numpy(), layer.moving_variance.numpy()], ops


@pytest.mark.parametrize("mistake", [None, "plain_moments", "all_reduced"])
def test_synchronized_batch_norm_on_one_replica_is_keras_to_the_bit_without_all_reduces(monkeypatch, mistake):
    if mistake == "plain_moments":  # tf.nn.moments: the same statistics, rounded otherwise
        monkeypatch.setattr(layers, "local_moments", lambda x, axes: tf.nn.moments(x, axes))
    if mistake == "all_reduced":  # the override never taken
        monkeypatch.setattr(layers, "_one_replica", lambda: False)
    x = tf.random.stateless_normal((4, 16, 16, 8), seed=(1, 2)) * 2.0 + 3.0
    results = []
    for layer in (keras.layers.BatchNormalization(synchronized=True), layers.BatchNormalization(synchronized=True)):
        layer.build(x.shape)
        rng = np.random.default_rng(0)
        layer.gamma.assign(rng.uniform(0.5, 1.5, 8))
        layer.beta.assign(rng.normal(0, 0.1, 8))
        results.append(traced_training_call(layer, x))
    (theirs, their_ops), (ours, our_ops) = results

    def check():
        for a, b in zip(theirs, ours):
            assert np.array_equal(a, b)
        assert our_ops < their_ops - 8, (our_ops, their_ops)  # measured: 129 and 141

    expect(check, mistake)


def test_backbone_weights_load_from_a_local_file(tmp_path):
    keras.utils.set_random_seed(1)
    trained = backbones.build_backbone("tiny")
    path = str(tmp_path / "tiny.weights.h5")
    trained.save_weights(path)
    loaded = backbones.build_backbone("tiny", path)
    for a, b in zip(trained.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_weights_saved_with_keras_own_batch_norm_load_unchanged(tmp_path, monkeypatch):
    # .weights.h5 files name layers after their class: pit_keras' BatchNormalization keeps Keras' class name.
    with monkeypatch.context() as patched:
        patched.setattr(layers, "BatchNormalization", keras.layers.BatchNormalization)
        keras.utils.set_random_seed(3)
        stock = backbones.build_backbone("tiny")
    assert not any(isinstance(l, layers.BatchNormalization) for l in stock.layers)
    path = str(tmp_path / "tiny.weights.h5")
    stock.save_weights(path)
    loaded = backbones.build_backbone("tiny", path)
    assert any(isinstance(l, layers.BatchNormalization) for l in loaded.layers)
    for a, b in zip(stock.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("name,weights,message", [
    ("resnet7", "none", "--backbone=resnet7"),
    ("tiny", "imagenet", "no ImageNet weights"),
    ("tiny", "/nonexistent/w.h5", "no such file"),
])
def test_bad_backbone_choices_name_the_flag(name, weights, message):
    with pytest.raises(UserError, match=message):
        backbones.build_backbone(name, weights)


def test_saved_network_reloads_in_safe_mode(network, tmp_path):
    path = str(tmp_path / "net.keras")
    network.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    x = tf.random.uniform((1, 24, 24, 3), 0, 255)
    np.testing.assert_allclose(reloaded(x)["seg"].numpy(), network(x)["seg"].numpy(), rtol=1e-5, atol=1e-5)


def test_fine_segmenter_has_no_coarse_variables(network):
    segmenter = fine_segmenter(network)
    names = [v.path for v in segmenter.weights]
    assert not [n for n in names if "coarse" in n or "reconstruction" in n]
    x = tf.random.uniform((1, 24, 24, 3), 0, 255)
    np.testing.assert_allclose(segmenter(x).numpy(), network(x)["seg"].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("resolution", ["_feat", ""])
def test_reconstruction_gradients_reach_fine_and_coarse_heads(network, resolution):
    x = tf.random.uniform((2, 32, 32, 3), 0, 255)
    with tf.GradientTape() as tape:
        out = network(x, training=True)
        cams = [out[f"cam_{k}{resolution}"] for k in range(3)]
        loss = tf.reduce_mean(losses.reconstruction_loss(cams, interaction_weights(network), out[f"seg{resolution}"]))
    variables = {v.path: v for v in network.trainable_variables}
    grads = dict(zip(variables, tape.gradient(loss, list(variables.values()))))
    for head in ("fine_head", "coarse_head_0", "coarse_head_1", "coarse_head_2", "reconstruction"):
        reached = [g for path, g in grads.items() if path.startswith(head + "/") and g is not None]
        assert reached and any(float(tf.reduce_max(tf.abs(g))) > 0 for g in reached), head
