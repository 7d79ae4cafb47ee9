"""The trainer: one fit step of every method, which terms each method computes, and a checkpoint round trip. (The
w^k's learning-rate multiplier: tests/test_distribute.py, on one device and under MirroredStrategy.)

A fit step per method runs the traced step as users do (and checks it is traced once). The tests whose subject is
a step's arithmetic (the weighted sum, what a NaN target reaches, a resume's next step) run it eagerly
(`make_trainer(..., run_eagerly=True)`): the same numbers without a trace per trainer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pit_keras.training import checkpoints
from pit_keras.models.network import build_network
from pit_keras.training.trainer import PITTrainer

C = 4


def batches(n=2, size=32, target_value=None, seed=0):
    rng = np.random.default_rng(seed)
    batch = {
        "source_image": rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32),
        "source_label": rng.integers(0, C, (n, size, size)).astype(np.uint8),
        "target_image": rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32),
        "target_image_labels": rng.dirichlet(np.ones(C), n).astype(np.float32),
    }
    batch["source_label"][:, :4] = 255
    if target_value is not None:
        batch["target_image"][:] = target_value
    return tf.data.Dataset.from_tensors(batch).repeat()


def make_trainer(method="pit", seed=0, learning_rate=0.01, momentum=0.9, run_eagerly=False, **kwargs):
    keras.utils.set_random_seed(seed)
    network = build_network("tiny", C, num_units=3 if method == "pit" else 0)
    trainer = PITTrainer(network, C, method=method, **kwargs)
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum), run_eagerly=run_eagerly)
    return trainer


EXPECTED_TERMS = {
    "pit": {"seg_src", "img_src", "img_trg", "rec_src", "rec_trg"},
    "source_only": {"seg_src"},
    "minent": {"seg_src", "ent_trg"},
}


@pytest.mark.parametrize("method", sorted(EXPECTED_TERMS))
def test_one_fit_step_of_each_method_gives_finite_losses_traced_once(method):
    trainer = make_trainer(method)
    # compile builds the optimizer's slots: made inside the first step, they would make tf.function trace it twice.
    traces = []
    step = trainer.train_step
    trainer.train_step = lambda batch: traces.append(1) or step(batch)
    history = trainer.fit(batches(), epochs=1, steps_per_epoch=2, verbose=0)  # the second step: no retrace either
    logs = {k: v[-1] for k, v in history.history.items()}
    assert set(logs) == EXPECTED_TERMS[method] | {"loss"}
    assert all(np.isfinite(v) for v in logs.values()), logs
    assert int(trainer.optimizer.iterations.numpy()) == 2
    assert len(traces) == 1


def test_source_only_never_runs_target_images():
    # NaN target images would poison any weight they reach.
    trainer = make_trainer("source_only", run_eagerly=True)
    trainer.fit(batches(target_value=np.nan), epochs=1, steps_per_epoch=2, verbose=0)
    assert all(np.all(np.isfinite(v.numpy())) for v in trainer.network.weights)
    pit = make_trainer("pit", run_eagerly=True)
    logs = pit.fit(batches(target_value=np.nan), epochs=1, steps_per_epoch=1, verbose=0).history
    assert not np.isfinite(logs["img_trg"][-1])


@pytest.mark.parametrize("kwargs,terms", [
    ({"lambda_r": 0.0}, {"seg_src", "img_src", "img_trg"}),
    ({"lambda_c": 0.0}, {"seg_src", "rec_src", "rec_trg"}),
    ({"recon_domains": ("target",)}, {"seg_src", "img_src", "img_trg", "rec_trg"}),
])
def test_ablation_flags_select_the_terms(kwargs, terms):
    assert set(make_trainer("pit", **kwargs).term_weights) == terms


def test_total_loss_is_the_weighted_sum_of_the_terms():
    trainer = make_trainer("pit", lambda_c=0.3, lambda_r=2.0, learning_rate=0.0, run_eagerly=True)
    logs = {k: v[-1] for k, v in trainer.fit(batches(), epochs=1, steps_per_epoch=1, verbose=0).history.items()}
    expected = logs["seg_src"] + 0.3 * (logs["img_src"] + logs["img_trg"]) + 2.0 * (logs["rec_src"] + logs["rec_trg"])
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)


def test_mean_image_loss_reduction_divides_the_image_terms_by_the_class_count():
    data = next(iter(batches()))
    summed = make_trainer("pit", image_loss_reduction="sum").compute_terms(data)
    averaged = make_trainer("pit", image_loss_reduction="mean").compute_terms(data)
    for name in ("img_src", "img_trg"):
        np.testing.assert_allclose(averaged[name].numpy(), summed[name].numpy() / C, rtol=1e-5)
    np.testing.assert_allclose(averaged["rec_src"].numpy(), summed["rec_src"].numpy(), rtol=1e-6)


def test_feature_and_input_resolution_losses_agree_closely():
    data = next(iter(batches()))
    feature = make_trainer("pit", loss_resolution="feature").compute_terms(data)
    full = make_trainer("pit", loss_resolution="input").compute_terms(data)
    np.testing.assert_allclose(feature["img_src"].numpy(), full["img_src"].numpy(), rtol=0.05)
    np.testing.assert_allclose(feature["rec_trg"].numpy(), full["rec_trg"].numpy(), rtol=0.2, atol=1e-3)


def test_checkpoint_round_trip_resumes_at_the_same_step_and_weights(tmp_path):
    trainer = make_trainer("pit", run_eagerly=True)
    manager = checkpoints.manager(trainer.network, trainer.optimizer, str(tmp_path))
    trainer.fit(batches(), epochs=1, steps_per_epoch=3, verbose=0)
    manager.save(checkpoint_number=3)

    resumed = make_trainer("pit", seed=1, run_eagerly=True)  # different initial weights, overwritten by the restore
    assert checkpoints.restore_latest(resumed.network, resumed.optimizer, str(tmp_path)).endswith("ckpt-3")
    assert int(resumed.optimizer.iterations.numpy()) == 3
    for a, b in zip(trainer.network.weights, resumed.network.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert len(resumed.optimizer.variables) > 2  # the momentum slots, built by compile, restored
    for a, b in zip(trainer.optimizer.variables, resumed.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))

    # One more step from the same state gives the same weights (momentum included).
    trainer.fit(batches(seed=5), epochs=1, steps_per_epoch=1, verbose=0)
    resumed.fit(batches(seed=5), epochs=1, steps_per_epoch=1, verbose=0)
    for a, b in zip(trainer.network.trainable_weights, resumed.network.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_a_resumed_network_draws_the_dropout_masks_the_run_would_have_drawn(tmp_path):
    # FCN-8s has Dropout: a resumed run goes on with the masks of the uninterrupted one, not those of its step 0.
    def network():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((64,))
        return keras.Model(inputs, keras.layers.Dropout(0.5)(inputs))

    ones = np.ones((1, 64), np.float32)
    run = network()
    for _ in range(3):
        run(ones, training=True)
    checkpoints.manager(run, None, str(tmp_path)).save(checkpoint_number=3)
    expected = run(ones, training=True).numpy()
    resumed = network()
    assert checkpoints.restore_latest(resumed, None, str(tmp_path)).endswith("ckpt-3")
    np.testing.assert_array_equal(resumed(ones, training=True).numpy(), expected)
    # A checkpoint written without the masks' state still resumes (its masks start over).
    older = tf.train.Checkpoint(network=run)
    tf.train.CheckpointManager(older, str(tmp_path / "older" / "checkpoints"), 1, checkpoint_name="ckpt").save(3)
    assert checkpoints.restore_latest(network(), None, str(tmp_path / "older")).endswith("ckpt-3")


def test_minent_without_entropy_weight_trains_the_source_only():
    keras.utils.set_random_seed(0)
    trainer = PITTrainer(build_network("tiny", 4, num_units=0), 4, method="minent", lambda_ent=0.0)
    trainer.compile(optimizer=keras.optimizers.SGD(0.01))
    rng = np.random.default_rng(0)
    batch = {"source_image": rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32),
             "source_label": rng.integers(0, 4, (2, 32, 32)).astype(np.uint8),
             "target_image": rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32),
             "target_image_labels": np.zeros((2, 4), np.float32)}
    logs = trainer.fit(tf.data.Dataset.from_tensors(batch).repeat(), epochs=1, steps_per_epoch=1, verbose=0).history
    assert set(logs) == {"loss", "seg_src"} and np.isfinite(logs["loss"][-1])
