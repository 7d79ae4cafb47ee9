"""Self-training (pit_keras/adaptation/self_training.py and the trainer's st_trg term): the EMA teacher and the confidence
weight against numpy, ClassMix alignment, teacher BatchNorm modes, and a mirrored step that equals a one-device
step with self-training and ClassMix on."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import micro_backbone, mirrored_strategy, run_config
from pit_keras import losses
from pit_keras.adaptation import self_training
from pit_keras.errors import UserError
from pit_keras.models.network import build_network
from pit_keras.training.trainer import PITTrainer, SelfTraining

C = 5


def small_network(units=0, seed=0):
    keras.utils.set_random_seed(seed)
    return build_network("tiny", C, units)


def test_ema_update_matches_numpy():
    network = small_network()
    teacher = self_training.EMATeacher(network, ema=0.9)
    before = [v.numpy().copy() for v in teacher.trainable_copies + teacher.non_trainable_copies]
    students = [v.numpy() for v in network.trainable_variables + network.non_trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, students))  # starts as a copy
    rng = np.random.default_rng(0)
    for v in network.trainable_variables + network.non_trainable_variables:
        v.assign(v.numpy() + rng.normal(size=v.shape).astype(np.float32))
    moved = [v.numpy() for v in network.trainable_variables + network.non_trainable_variables]
    teacher.update(5)  # alpha = min(1 - 1/5, 0.9) = 0.8
    after = [v.numpy() for v in teacher.trainable_copies + teacher.non_trainable_copies]
    for old, new, student in zip(before, after, moved):
        np.testing.assert_allclose(new, 0.8 * old + 0.2 * student, rtol=1e-6, atol=1e-6)
    teacher.update(100)  # alpha = 0.9
    final = [v.numpy() for v in teacher.trainable_copies]
    for old, new, student in zip(after, final, moved):
        np.testing.assert_allclose(new, 0.9 * old + 0.1 * student, rtol=1e-6, atol=1e-6)
    teacher.update(1)  # the first step copies the student
    for copy, student in zip(teacher.trainable_copies, moved):
        np.testing.assert_allclose(copy.numpy(), student, rtol=1e-6, atol=1e-6)


def test_pseudo_labels_and_confidence_weight_match_numpy():
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(C) * 0.3, size=(3, 8, 6)).astype(np.float32)
    labels, weight = self_training.pseudo_labels(tf.constant(probabilities), 0.7)
    np.testing.assert_array_equal(labels.numpy(), probabilities.argmax(-1))
    expected = (probabilities.max(-1) >= 0.7).mean(axis=(1, 2))
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-6)
    assert 0 < expected.min() and expected.max() < 1  # the test data has both kinds of pixel


def test_class_balanced_mask_keeps_each_classes_most_confident_portion():
    rng = np.random.default_rng(3)
    probabilities = rng.dirichlet(np.ones(C) * 0.3, size=(2, 10, 12)).astype(np.float32)
    portion, threshold = 0.3, 0.9
    got = self_training.class_balanced_mask(tf.constant(probabilities), threshold, portion).numpy()
    confidence, labels = probabilities.max(-1), probabilities.argmax(-1)
    expected = confidence >= threshold
    for b in range(2):
        for c in np.unique(labels[b]):
            where = np.flatnonzero(labels[b].ravel() == c)
            keep = where[np.argsort(-confidence[b].ravel()[where], kind="stable")][:int(np.ceil(portion * len(where)))]
            expected[b].ravel()[keep] = True
    np.testing.assert_array_equal(got, expected)
    # Every predicted class keeps pixels, though few pass the threshold.
    assert (confidence >= threshold).mean() < got.mean() < 1


def test_weighted_cross_entropy_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, 5, C)).astype(np.float32)
    labels = rng.integers(0, C, (2, 4, 5))
    labels[0, 0] = 255
    weights = rng.uniform(size=(2, 4, 5)).astype(np.float32)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels != 255
    ce = -np.take_along_axis(log_p, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    expected = (ce * weights * valid).sum((1, 2)) / valid.sum((1, 2))
    got = losses.weighted_pixel_cross_entropy(tf.constant(labels), tf.constant(logits), tf.constant(weights))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_classmix_keeps_image_and_label_aligned():
    rng = np.random.default_rng(3)
    source_label = rng.integers(0, C, (4, 16, 12)).astype(np.int32)
    source_label[:, :2] = 255
    source_image = source_label[..., None].astype(np.float32) * np.ones(3, np.float32)  # pixel value = its class
    target_image = np.full((4, 16, 12, 3), 200.0, np.float32)
    pseudo = np.full((4, 16, 12), 3, np.int32)
    keys = self_training.global_example_keys(7, 0, 4, C)
    mask = self_training.classmix_masks(tf.constant(source_label), keys, C).numpy()
    image = self_training.mix(tf.constant(mask), tf.constant(source_image), tf.constant(target_image)).numpy()
    label = np.where(mask, source_label, pseudo)
    # Every pasted pixel shows its source class in both image and label; every other pixel is the target's.
    np.testing.assert_array_equal(image[..., 0][mask], label[mask])
    assert (image[~mask] == 200).all() and (label[~mask] == 3).all()
    assert not mask[:, :2].any()  # ignored source pixels are never pasted
    for b in range(4):
        present = set(np.unique(source_label[b][source_label[b] != 255]))
        pasted = set(np.unique(source_label[b][mask[b]]))
        assert len(pasted) == (len(present) + 1) // 2 and pasted <= present
        # A class is pasted whole or not at all.
        for c in present:
            assert mask[b][source_label[b] == c].all() or not mask[b][source_label[b] == c].any()
    # Another step draws other classes.
    other = self_training.classmix_masks(tf.constant(source_label), self_training.global_example_keys(7, 1, 4, C), C)
    assert not np.array_equal(other.numpy(), mask)


def test_teacher_normalises_target_batches_with_their_own_statistics():
    network = small_network()
    images = tf.constant(np.random.default_rng(4).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32))
    batch_teacher = self_training.EMATeacher(network, teacher_bn="target_batch")
    running_teacher = self_training.EMATeacher(network, teacher_bn="running")
    # Before the student's training-mode call, which moves its running statistics.
    np.testing.assert_allclose(running_teacher.outputs(images)["seg"].numpy(),
                               network(images, training=False)["seg"].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(batch_teacher.outputs(images)["seg"].numpy(),
                               network(images, training=True)["seg"].numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(batch_teacher.outputs(images)["seg"].numpy(),
                           running_teacher.outputs(images)["seg"].numpy(), atol=1e-4)
    # The teacher's call leaves its running statistics (and the student's) alone.
    stats = [v.numpy().copy() for v in batch_teacher.non_trainable_copies]
    batch_teacher.outputs(images)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(stats, batch_teacher.non_trainable_copies))


def test_self_training_term_is_trained_and_ramped():
    network = small_network(units=1)
    trainer = PITTrainer(network, C, "source_only", self_training=SelfTraining(start=2, ramp=2, threshold=0.0))
    trainer.build_teacher()
    trainer.compile(optimizer=keras.optimizers.SGD(0.01))
    assert trainer.uses_target and set(trainer.term_weights) == {"seg_src", "st_trg"}
    scales = []
    for step in range(5):
        trainer.optimizer.iterations.assign(step)
        scales.append(float(trainer._dynamic_scale("st_trg")))
    assert scales == [0.0, 0.0, 0.0, 0.5, 1.0]


def test_class_balanced_selection_weighs_the_self_training_term():
    network = small_network(units=1)
    config = SelfTraining(threshold=0.9, classmix=False, class_portion=0.25)
    trainer = PITTrainer(network, C, "source_only", self_training=config)
    trainer.build_teacher()
    rng = np.random.default_rng(4)
    target = tf.constant(rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32))
    batch = {"source_image": target, "source_label": tf.zeros((2, 32, 32), tf.uint8), "target_image": target,
             "target_image_labels": tf.zeros((2, C))}
    terms = trainer.compute_terms(batch, training=False, step=0)
    probabilities = self_training.teacher_probabilities(trainer.teacher, target)
    mask = self_training.class_balanced_mask(probabilities, 0.9, 0.25)
    expected = losses.weighted_pixel_cross_entropy(tf.argmax(probabilities, -1), network(target)["seg"],
                                                   tf.cast(mask, tf.float32))
    np.testing.assert_allclose(terms["st_trg"].numpy(), expected.numpy(), rtol=1e-5)
    np.testing.assert_allclose(terms["st_confident"].numpy(), tf.reduce_mean(tf.cast(mask, tf.float32), [1, 2]))
    assert 0 < float(tf.reduce_mean(tf.cast(mask, tf.float32))) < 1


def mirrored_self_training_difference():
    """The largest difference of student and teacher weights between three self-training steps on two mirrored
    CPU replicas and on one device."""
    C, N = 4, 4
    rng = np.random.default_rng(0)
    batch = {"source_image": rng.uniform(0, 255, (N, 32, 32, 3)).astype(np.float32),
             "source_label": rng.integers(0, C, (N, 32, 32)).astype(np.uint8),
             "target_image": rng.uniform(0, 255, (N, 32, 32, 3)).astype(np.float32),
             "target_image_labels": np.zeros((N, C), np.float32)}
    batch["source_label"][:, :8] = rng.integers(0, C, (N, 1, 1))  # whole-class regions
    batch["source_label"][:, :3] = 255

    def run(strategy, run_eagerly):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            trainer = PITTrainer(build_network("micro", C, 3), C, "pit", image_labels_from_teacher=True,
                                 self_training=SelfTraining(threshold=0.3, ema=0.9))
            trainer.build_teacher()
            trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), run_eagerly=run_eagerly)
        trainer.fit(tf.data.Dataset.from_tensors(batch).repeat(), epochs=1, steps_per_epoch=3, verbose=0,
                    shuffle=False)
        return [v.numpy() for v in trainer.network.trainable_weights + trainer.teacher.trainable_copies]

    # The one-device steps run eagerly (their maths are the same traced or not; 6 s of tracing saved with the tiny
    # backbone), the mirrored ones traced, as a user's run under the strategy.
    with micro_backbone():  # conftest.build_micro says why
        single = run(tf.distribute.get_strategy(), run_eagerly=True)
        mirrored = run(mirrored_strategy(), run_eagerly=False)
    return max(float(np.abs(a - b).max()) for a, b in zip(single, mirrored))


@pytest.mark.parametrize("masks", ["global", pytest.param("per_replica_masks", marks=pytest.mark.slow)])
def test_mirrored_self_training_step_equals_one_device(monkeypatch, masks):
    if masks == "per_replica_masks":
        # The mistake: every replica draws its own examples' classes from the same stream, not what one device
        # draws.
        monkeypatch.setattr(self_training, "global_example_keys", lambda seed, step, batch_size, num_classes:
                            tf.random.stateless_uniform([batch_size, num_classes], seed=tf.stack(
                                [tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])))
    difference = mirrored_self_training_difference()
    if masks == "global":
        assert difference < 2e-5
    else:
        assert difference > 1e-3


def test_teacher_labels_without_the_self_training_loss():
    network = small_network(units=1)
    trainer = PITTrainer(network, C, "pit", lse_r=(1.0,), image_labels_from_teacher=True,
                         self_training=SelfTraining(weight=0.0))
    trainer.build_teacher()
    rng = np.random.default_rng(5)
    batch = {"source_image": rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32),
             "source_label": rng.integers(0, C, (2, 32, 32)).astype(np.uint8),
             "target_image": rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32),
             "target_image_labels": np.full((2, C), np.nan, np.float32)}  # never read
    terms = trainer.compute_terms(batch)
    assert "st_trg" not in terms and "st_trg" not in trainer.trackers
    assert np.isfinite(terms["img_trg"].numpy()).all()


def test_a_teacher_of_a_network_with_dropout_runs_it_off_and_copies_integer_state():
    image = keras.Input((None, None, 3))
    outputs = {"seg": keras.layers.Dropout(0.5)(keras.layers.Conv2D(C, 1)(image))}
    network = keras.Model(image, outputs)
    teacher = self_training.EMATeacher(network, teacher_bn="target_batch")
    assert any("int" in str(v.dtype) for v in teacher.non_trainable_copies)  # Dropout's seed state
    teacher.update(3)
    images = tf.constant(np.random.default_rng(6).uniform(0, 255, (1, 8, 8, 3)).astype(np.float32))
    np.testing.assert_allclose(teacher.outputs(images)["seg"].numpy(), network(images, training=False)["seg"].numpy(),
                               atol=1e-5)
    assert network.layers[-1].rate == 0.5  # restored for the student


def test_class_confidence_and_label_agreement_match_numpy():
    rng = np.random.default_rng(7)
    p = rng.dirichlet(np.ones(C) * 0.4, size=(2, 6, 5)).astype(np.float64)
    confidence = 1.0 + (p * np.log(p)).sum(-1) / np.log(C)  # 1 - normalised entropy, per pixel
    s = 0.01
    expected = (((p * confidence[..., None]).mean((1, 2)) + s * confidence.mean((1, 2))[:, None])
                / (p.mean((1, 2)) + s))
    got = self_training.class_confidence(tf.constant(p, tf.float32), smoothing=s).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # A class carried by confident pixels outweighs one carried by uncertain pixels of the same share.
    sure = np.full((1, 2, 2, C), 0.0, np.float32)
    sure[0, 0, :, 0] = 1.0  # two certain pixels of class 0
    sure[0, 1, :, :] = 1.0 / C  # two uniform pixels
    weights = self_training.class_confidence(tf.constant(sure)).numpy()[0]
    assert weights[0] > 0.8 and weights[1] < 0.1
    a, b = rng.dirichlet(np.ones(C), size=3), rng.dirichlet(np.ones(C), size=3)
    np.testing.assert_allclose(self_training.label_agreement(a, b).numpy(), 1 - np.abs(a - b) / (a + b + 0.01),
                               rtol=1e-5)
    np.testing.assert_allclose(self_training.label_agreement(a, a).numpy(), 1.0, rtol=1e-6)


def pit_batch(seed=5, prior=None):
    rng = np.random.default_rng(seed)
    return {"source_image": rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32),
            "source_label": rng.integers(0, C, (2, 32, 32)).astype(np.uint8),
            "target_image": rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32),
            "target_image_labels": (rng.dirichlet(np.ones(C), size=2) if prior is None else prior).astype(np.float32)}


@pytest.mark.parametrize("confidence", ["none", "entropy", "agreement"])
def test_teacher_labels_blended_from_a_prior_and_weighted_by_confidence(confidence):
    network = small_network(units=1)
    trainer = PITTrainer(network, C, "pit", lse_r=(1.0,), image_labels_from_teacher=True, image_label_prior=True,
                         image_label_confidence=confidence, self_training=SelfTraining(weight=0.0, start=0, ramp=4))
    trainer.build_teacher()
    trainer.compile(optimizer=keras.optimizers.SGD(0.01))
    batch = pit_batch()
    teacher = self_training.teacher_probabilities(trainer.teacher, batch["target_image"])
    shares = self_training.class_shares(teacher).numpy()
    prior = batch["target_image_labels"]
    if confidence == "entropy":
        weights = self_training.class_confidence(teacher).numpy()
    elif confidence == "agreement":
        weights = self_training.label_agreement(shares, prior).numpy()
    else:
        weights = np.ones_like(prior)
    logits = losses.lse_pool(network(batch["target_image"])["cam_0_feat"], 1.0, True).numpy()
    for step, alpha in ((0, 0.0), (1, 0.25), (4, 1.0)):
        trainer.optimizer.iterations.assign(step)
        assert float(trainer._dynamic_scale("img_trg")) == 1.0  # L_c on target is on from the first step
        labels = alpha * shares + (1 - alpha) * prior
        bce = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
        expected = (bce * weights).mean(-1)
        got = trainer.compute_terms(batch)["img_trg"].numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_a_runs_prior_is_read_as_the_target_image_labels(tmp_path):
    from pit_keras.training import runner
    from pit_keras.adaptation import soft_labels

    root = tmp_path / "target"
    pairs = [(str(root / "leftImg8bit" / "train" / "a" / f"{n}_leftImg8bit.png"), None) for n in ("x", "y")]
    keys = [runner.relative_key(str(root), image) for image, _ in pairs]
    rows = np.asarray([[0.5, 0.5, 0, 0, 0], [0, 0, 1.0, 0, 0]], np.float32)
    soft_labels.write_json(str(tmp_path / "prior.json"), keys, rows)
    config = run_config(image_labels="teacher", self_training=True, num_classes=C,
                        image_labels_prior=str(tmp_path / "prior.json"))
    np.testing.assert_allclose(runner.target_image_labels(config, pairs, None, str(root)), rows)
    # Without a prior the teacher's labels are computed in the step.
    without = dataclasses.replace(config, image_labels_prior=None)
    assert not runner.target_image_labels(without, pairs, None, str(root)).any()
    missing = dataclasses.replace(config, image_labels_prior=str(tmp_path / "missing.json"))
    with pytest.raises(Exception, match="--image_labels_prior="):
        runner.target_image_labels(missing, pairs, None, str(root))
    # Presence is "above 0": shares or probabilities are refused, labels of 0 and 1 taken as they are.
    presence = dataclasses.replace(config, image_label_kind="presence")
    with pytest.raises(UserError, match="prior.json holds class shares or probabilities \\(e.g. 0.5\\), and "
                                        "--image_label_kind=presence would count every class above 0"):
        runner.target_image_labels(presence, pairs, None, str(root))
    rows = (rows > 0).astype(np.float32)
    soft_labels.write_json(str(tmp_path / "presence.json"), keys, rows)
    presence = dataclasses.replace(presence, image_labels_prior=str(tmp_path / "presence.json"))
    np.testing.assert_allclose(runner.target_image_labels(presence, pairs, None, str(root)), rows)
