"""The network: outputs, backbones and weights, serialisation, and where the reconstruction's gradients go."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pit_keras import losses
from pit_keras.errors import UserError
from pit_keras.models import backbones
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


def test_backbone_weights_load_from_a_local_file(tmp_path):
    keras.utils.set_random_seed(1)
    trained = backbones.build_backbone("tiny")
    path = str(tmp_path / "tiny.weights.h5")
    trained.save_weights(path)
    loaded = backbones.build_backbone("tiny", path)
    for a, b in zip(trained.weights, loaded.weights):
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
