"""Distribution: a step on two mirrored CPU replicas equals a step on one device, two local worker processes
stay in sync, and the mixed-precision and XLA paths give finite losses."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from cluster import load_weights
from conftest import mirrored_strategy
from pit_keras.models.network import build_network


def pit_step_weights(strategy):
    """The network's weights after one PIT step under `strategy` on a fixed batch of 4."""
    from pit_keras.training.trainer import PITTrainer

    C, N = 4, 4
    rng = np.random.default_rng(0)
    batch = {"source_image": rng.uniform(0, 255, (N, 32, 32, 3)).astype(np.float32),
             "source_label": rng.integers(0, C, (N, 32, 32)).astype(np.uint8),
             "target_image": rng.uniform(0, 255, (N, 32, 32, 3)).astype(np.float32),
             "target_image_labels": rng.dirichlet(np.ones(C), N).astype(np.float32)}
    batch["source_label"][:, :3] = 255
    with strategy.scope():
        keras.utils.set_random_seed(0)
        trainer = PITTrainer(build_network("tiny", C, 3), C, "pit", interaction_lr_multiplier=1.0)
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    # Compiled outside the scope, as Keras allows: the optimizer's slots are still made in the trainer's scope.
    trainer.compile(optimizer=optimizer)
    history = trainer.fit(tf.data.Dataset.from_tensors(batch).repeat(), epochs=1, steps_per_epoch=1, verbose=0,
                          shuffle=False)
    assert set(history.history) == {"loss", "seg_src", "img_src", "img_trg", "rec_src", "rec_trg"}
    return [v.numpy() for v in trainer.network.trainable_weights]


@pytest.fixture(scope="module")
def mirrored_differences():
    """The largest weight difference between a PIT step on two mirrored CPU replicas and one on one device,
    right and with the mistake (each replica averages over its own half batch: the summed gradients come out
    twice too large). On one device the mistake changes nothing (its half batch is the whole batch), so that
    step runs once."""
    from pit_keras.training import trainer as trainer_module

    single = pit_step_weights(tf.distribute.get_strategy())
    mirrored = {"right": pit_step_weights(mirrored_strategy())}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module.tf.nn, "compute_average_loss", lambda per_image: tf.reduce_mean(per_image))
        mirrored["wrong_reduction"] = pit_step_weights(mirrored_strategy())
    return {name: max(float(np.abs(a - b).max()) for a, b in zip(single, weights))
            for name, weights in mirrored.items()}


@pytest.mark.parametrize("reduction", ["right", "wrong_reduction"])
def test_two_mirrored_replicas_equal_one_device(mirrored_differences, reduction):
    difference = mirrored_differences[reduction]
    if reduction == "right":
        assert difference < 1e-5
    else:
        assert difference > 1e-3


def test_two_workers_on_localhost_stay_in_sync_and_only_the_chief_writes(two_worker_run):
    chief, other = load_weights(two_worker_run / "w0.npz"), load_weights(two_worker_run / "w1.npz")
    assert len(chief) == len(other) > 0
    for a, b in zip(chief, other):
        np.testing.assert_array_equal(a, b)
    assert sorted(f for f in os.listdir(two_worker_run / "run" / "checkpoints") if f.endswith(".index")) == \
        ["ckpt-2.index", "ckpt-4.index"]
    assert os.listdir(two_worker_run / "tmp") == []  # the other worker's checkpoints went there, and are gone


@pytest.fixture
def policy():
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("name,jit", [("mixed_bfloat16", False), ("mixed_float16", False), ("float32", True)])
def test_mixed_precision_and_xla_give_finite_losses(policy, name, jit):
    from test_trainer import batches
    from pit_keras.models.network import build_network
    from pit_keras.training.trainer import PITTrainer

    policy(name)
    keras.utils.set_random_seed(0)
    trainer = PITTrainer(build_network("tiny", 4, 3), 4, "pit")
    trainer.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=jit)
    logs = trainer.fit(batches(), epochs=1, steps_per_epoch=2, verbose=0).history
    assert all(np.isfinite(v[-1]) for v in logs.values()), logs
    if name == "mixed_float16":
        assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
