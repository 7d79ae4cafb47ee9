"""The paper's backbones without downloads: DeepLab-v2 ResNet-101 and FCN-8s VGG-16 take the stock
keras.applications weights unchanged (randomised stock models stand in for ImageNet), have output stride 8, and
compute what the stock networks compute; the ASPP classifier, the Caffe preprocessing, and tools/count_params.

Each big model is built once per module, on 56-72 px inputs."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import write_run_config
from pit_keras.errors import UserError
from pit_keras.models import backbones, heads
from pit_keras.models.network import build_network


def randomize(model, rng):
    """Random values for every weight, positive where BatchNorm needs it (scales, variances)."""
    for weight in model.weights:
        name = weight.path.split("/")[-1]
        if name in ("moving_variance", "gamma"):
            value = rng.uniform(0.5, 1.5, weight.shape)
        elif name in ("moving_mean", "beta", "bias"):
            value = rng.normal(0.0, 0.1, weight.shape)
        else:
            value = weight.numpy() * rng.uniform(0.8, 1.2)  # keep the stock initialiser's scale: activations stay finite
        weight.assign(value.astype(np.float32))


def assert_same_weights(model, stock, renames=None):
    renames = renames or {}
    checked = 0
    for layer in model.layers:
        source = renames.get(layer.name, layer.name)
        if not layer.weights or source not in [l.name for l in stock.layers]:
            continue
        for ours, theirs in zip(layer.get_weights(), stock.get_layer(source).get_weights()):
            if layer.name not in renames:
                assert ours.shape == theirs.shape, layer.name
            # np.array_equal: assert_array_equal's NaN and infinity bookkeeping takes seconds on the 100 M fc weights.
            assert np.array_equal(ours, theirs.reshape(ours.shape)), layer.name
            checked += 1
    return checked


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """(stock ResNet101 with random weights, DeepLab-v2 ResNet-101 built from that stock's weights file)."""
    keras.utils.set_random_seed(0)
    stock = keras.applications.ResNet101(include_top=False, weights=None, input_shape=(None, None, 3))
    randomize(stock, np.random.default_rng(0))
    path = str(tmp_path_factory.mktemp("weights") / "resnet101_notop.weights.h5")
    stock.save_weights(path)
    return stock, backbones.build_backbone("deeplabv2_resnet101", path)


def test_resnet101_takes_every_stock_weight_unchanged(resnet):
    stock, model = resnet
    weighted = [l.name for l in stock.layers if l.weights]
    assert [l.name for l in model.layers if l.weights] == weighted
    # conv1 + 33 blocks of 3 convolutions + 4 shortcut convolutions, a BatchNorm behind each; 2 or 4 tensors each
    assert assert_same_weights(model, stock) == len(stock.weights) == 104 * 2 + 104 * 4
    assert model.count_params() == stock.count_params() == 42_658_176


def test_resnet101_is_dilated_to_output_stride_8_and_matches_the_stock_network(resnet):
    stock, model = resnet
    images = tf.random.uniform((2, 72, 56, 3), 0, 255, seed=1)
    features = model(images).numpy()
    assert features.shape == (2, 9, 7, 2048)  # ceil(72 / 8), ceil(56 / 8)
    # With the stride moved into dilation, every 4th feature is exactly the stock stride-32 feature; the stock
    # model is fed keras' own preprocessing, so this also checks the in-graph Caffe preprocessing.
    reference = stock(keras.applications.resnet.preprocess_input(images.numpy().copy())).numpy()
    assert reference.shape == (2, 3, 2, 2048)
    np.testing.assert_allclose(features[:, ::4, ::4], reference, rtol=1e-3, atol=1e-3 * np.abs(reference).max())
    assert model.get_layer("conv4_block7_2_conv").dilation_rate == (2, 2)
    assert model.get_layer("conv5_block1_2_conv").dilation_rate == (4, 4)
    assert model.get_layer("conv4_block1_1_conv").strides == (1, 1)


def test_resnet101_batchnorm_is_frozen(resnet):
    _, model = resnet
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 104 and not any(l.trainable for l in bns)
    assert not any("gamma" in w.path or "beta" in w.path or "moving" in w.path for w in model.trainable_weights)
    images = tf.random.uniform((1, 40, 40, 3), 0, 255, seed=2)
    before = [w.numpy() for w in bns[0].weights]
    np.testing.assert_array_equal(model(images, training=True).numpy(), model(images, training=False).numpy())
    for old, new in zip(before, bns[0].weights):
        np.testing.assert_array_equal(old, new.numpy())


@pytest.fixture(scope="module")
def fcn():
    """(stock VGG16 with its top and random weights, FCN-8s VGG-16 with those weights copied in)."""
    keras.utils.set_random_seed(0)
    model = backbones.build_backbone("fcn8s_vgg16", "none")
    stock = keras.applications.VGG16(include_top=True, weights=None)
    rng = np.random.default_rng(1)
    for layer in stock.layers:  # kernels are already random draws of their own; biases start at zero in both
        if layer.weights:
            layer.weights[1].assign(rng.normal(0, 0.1, layer.weights[1].shape).astype(np.float32))
    copied = backbones.copy_stock_weights(model, stock, renames={"fc6": "fc1", "fc7": "fc2"}, skip=("predictions",))
    return stock, model, copied


def test_fcn8s_takes_every_stock_weight_and_fc_layers_become_convolutions(fcn):
    stock, model, copied = fcn
    assert copied == [*(f"block{b}_conv{c}" for b, _, n in backbones.FCN8S_VGG16_BLOCKS for c in range(1, n + 1)),
                      "fc6", "fc7"]
    assert assert_same_weights(model, stock, renames={"fc6": "fc1", "fc7": "fc2"}) == 2 * 15
    assert model.get_layer("fc6").kernel.shape == (7, 7, 512, 4096)
    assert model.get_layer("fc7").kernel.shape == (1, 1, 4096, 4096)
    # fc6 as a convolution, at the centre of a 7x7 pool5 map, is the stock fully connected fc1 on that map.
    pool5 = tf.random.uniform((1, 7, 7, 512), seed=3)
    conv = model.get_layer("fc6")(pool5).numpy()[0, 3, 3]
    dense = stock.get_layer("fc1")(stock.get_layer("flatten")(pool5)).numpy()[0]
    np.testing.assert_allclose(conv, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())


def test_fcn8s_has_output_stride_8_and_stock_vgg_features(fcn):
    stock, model, _ = fcn
    images = tf.random.uniform((1, 64, 72, 3), 0, 255, seed=4)
    assert model(images).shape == (1, 8, 9, backbones.FCN8S_FEATURE_WIDTH)
    ours = keras.Model(model.input, model.get_layer("block4_pool").output)(images).numpy()
    convs = keras.Sequential([l for l in stock.layers[1:] if l.name.startswith(("block1", "block2", "block3",
                                                                                "block4"))])
    reference = convs(keras.applications.vgg16.preprocess_input(images.numpy().copy())).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max())


def test_caffe_preprocessing_is_keras_resnet_and_vgg_preprocessing():
    images = np.random.default_rng(5).uniform(0, 255, (2, 5, 6, 3)).astype(np.float32)
    layer = backbones.CaffePreprocess()
    ours = layer(images).numpy()
    np.testing.assert_allclose(ours, keras.applications.resnet.preprocess_input(images.copy()), atol=1e-4)
    np.testing.assert_allclose(ours, keras.applications.vgg16.preprocess_input(images.copy()), atol=1e-4)
    np.testing.assert_allclose(backbones.CaffePreprocess.from_config(layer.get_config())(images), ours)


def test_aspp_classifier_sums_four_dilated_convolutions():
    head = heads.ASPPClassifier(5, name="aspp")
    features = tf.random.normal((2, 13, 11, 8), seed=6)
    got = head(features).numpy()
    assert [b.dilation_rate for b in head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    expected = sum(tf.nn.atrous_conv2d(features, b.kernel, rate, "SAME") + b.bias
                   for b, rate in zip(head.branches, (6, 12, 18, 24)))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert head.count_params() == 4 * (3 * 3 * 8 * 5 + 5)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_aspp_matmul_implementation_computes_the_convolutions_and_their_gradients(policy):
    # The reference is the float32 convolution; in bfloat16 the matmul form sums its taps in float32 and stays
    # close to it (bfloat16 convolutions lose more: their bias gradient here saturates at 1024).
    features = tf.random.normal((2, 13, 30, 8), seed=8)  # rate 24 reaches past the map's 13 rows
    conv = heads.ASPPClassifier(5, implementation="conv")
    matmul = heads.ASPPClassifier(5, dtype=policy)
    for head in (conv, matmul):
        head.build(features.shape)
    for source, dest in zip(conv.branches, matmul.branches):
        dest.kernel.assign(source.kernel)
        dest.bias.assign(tf.random.normal(dest.bias.shape, seed=9))
        source.bias.assign(dest.bias)
    results = []
    for head in (conv, matmul):
        with tf.GradientTape() as tape:
            tape.watch(features)
            logits = head(features)
            loss = tf.reduce_sum(tf.cast(logits, tf.float32) * tf.range(5, dtype=tf.float32))
        results.append([logits, *tape.gradient(loss, [features, *head.trainable_variables])])
    tolerance = 1e-4 if policy == "float32" else 2e-2
    for got, expected in zip(results[1], results[0]):
        expected = expected.numpy()
        np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), expected, rtol=tolerance,
                                   atol=tolerance * np.abs(expected).max())
    names = [[v.path.split("/", 1)[1] for v in head.trainable_variables] for head in (conv, matmul)]
    assert names[0] == names[1] == [f"rate_{r}/{w}" for r in (6, 12, 18, 24) for w in ("kernel", "bias")]


def tflite_ops(flatbuffer):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    return interpreter, [op["op_name"] for op in interpreter._get_ops_details()]


def test_aspp_matmul_implementation_converts_to_builtin_tflite_ops():
    from pit_keras.deploy import exporting

    image = keras.Input((None, None, 3))
    model = keras.Model(image, heads.ASPPClassifier(3)(keras.layers.Conv2D(4, 3, strides=4)(image)))
    # 160x256 input, 40x64 features: every rate's taps reach inside the map, vertically and horizontally.
    interpreter, ops = tflite_ops(exporting.convert_tflite(model, (256, 160), "float32"))
    assert "FULLY_CONNECTED" in ops or "BATCH_MATMUL" in ops
    pixels = np.random.default_rng(0).integers(0, 256, (1, 160, 256, 3), dtype=np.uint8)
    got = interpreter.get_signature_runner()(images=pixels)["logits"]  # the exports' one output
    expected = model(pixels.astype(np.float32)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3 * max(1.0, float(np.abs(expected).max())))


def test_export_holds_aspp_heads_as_dilated_convolutions(monkeypatch, tmp_path):
    # The matrix-product form would quantize its 33 taps with one int8 scale, with float ops between int8 ones.
    from pit_keras.deploy import exporting
    from pit_keras.deploy import predictors

    monkeypatch.setitem(backbones.BACKBONES, "tiny_aspp",
                        dataclasses.replace(backbones.BACKBONES["tiny"], name="tiny_aspp", head="aspp"))
    run = tmp_path / "run"
    network = build_network("tiny_aspp", num_classes=3, num_units=0)
    tf.train.Checkpoint(network=network).save(str(run / "checkpoints" / "ckpt"))
    write_run_config(run, backbone="tiny_aspp", num_classes=3, method="source_only", image_labels=None,
                     lse_r=(1.0,), target_size=(64, 32))
    segmenter, _, _ = predictors.load_segmenter(str(run), aspp_implementation="conv")
    assert segmenter.get_layer("fine_head").implementation == "conv"
    seen = {}
    real = predictors.load_segmenter
    monkeypatch.setattr(predictors, "load_segmenter",
                        lambda model_dir, **kwargs: seen.update(kwargs) or real(model_dir, **kwargs))
    exporting.export(str(run), str(tmp_path / "export"), formats=["float32"], log=lambda *_: None)
    assert seen == {"aspp_implementation": "conv"}
    _, ops = tflite_ops((tmp_path / "export" / exporting.tflite_filename("float32")).read_bytes())
    assert "CONV_2D" in ops and not {"FULLY_CONNECTED", "BATCH_MATMUL", "SPLIT"} & set(ops)


def test_aspp_heads_are_used_when_the_backbone_asks_and_survive_safe_mode(monkeypatch, tmp_path):
    assert backbones.BACKBONES["deeplabv2_resnet101"].head == "aspp"
    assert backbones.BACKBONES["fcn8s_vgg16"].head == backbones.BACKBONES["tiny"].head == "conv1x1"
    monkeypatch.setitem(backbones.BACKBONES, "tiny_aspp",
                        dataclasses.replace(backbones.BACKBONES["tiny"], name="tiny_aspp", head="aspp"))
    network = build_network("tiny_aspp", num_classes=3, num_units=2)
    for name in ("fine_head", "coarse_head_0", "coarse_head_1"):
        assert isinstance(network.get_layer(name), heads.ASPPClassifier)
    assert network(tf.zeros((1, 32, 40, 3)))["cam_1"].shape == (1, 32, 40, 3)

    for implementation in ("conv", "matmul"):
        config = heads.ASPPClassifier(3, implementation=implementation).get_config()
        assert heads.ASPPClassifier.from_config(config).implementation == implementation
    del config["implementation"]  # a configuration saved before the option existed
    assert heads.ASPPClassifier.from_config(config).implementation == "matmul"

    image = keras.Input((None, None, 3))
    model = keras.Model(image, heads.ASPPClassifier(3)(backbones.CaffePreprocess()(image)))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = tf.random.uniform((1, 16, 16, 3), 0, 255, seed=7)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_weights_that_do_not_fit_are_refused():
    stock = keras.applications.VGG16(include_top=False, weights=None, input_shape=(None, None, 3))
    image = keras.Input((None, None, 3))
    wrong = keras.Model(image, keras.layers.Conv2D(32, 3, name="block1_conv1")(image))
    with pytest.raises(ValueError, match="block1_conv1: stock weights"):
        backbones.copy_stock_weights(wrong, stock)
    right = keras.Model(image, keras.layers.Conv2D(64, 3, name="block1_conv1")(image))
    with pytest.raises(ValueError, match="stock layers without a counterpart: block1_conv2"):
        backbones.copy_stock_weights(right, stock)


def test_a_weights_file_of_another_model_is_refused_by_flag(tmp_path):
    path = tmp_path / "junk.weights.h5"
    path.write_bytes(b"not an h5 file")
    with pytest.raises(UserError, match="--backbone_weights=.*junk.weights.h5: not a weights file of the stock"):
        backbones.load_stock_model(keras.applications.MobileNetV3Small, str(path), "MobileNetV3Small",
                                   with_top=False)
    with pytest.raises(UserError, match="--backbone_weights=.*junk.weights.h5: not a weights file of the tiny"):
        backbones.build_tiny(str(path))


@pytest.mark.slow
def test_count_params_tool_prints_every_backbone():
    from commands import run_tool_in_process

    result = run_tool_in_process("count_params", "--num_classes=19")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "PIT network: C=19 classes, K=3 coarse units" in result.stdout
    lines = result.stdout.splitlines()[3:]
    assert [line.split()[0] for line in lines] == list(backbones.BACKBONES)
    tiny = lines[0].split()
    assert tiny[1:3] == [backbones.BACKBONES["tiny"].head, str(backbones.BACKBONES["tiny"].output_stride)]
