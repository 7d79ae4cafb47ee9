"""Distribution, each check shown to fail on a deliberate mistake (conftest.expect):

- in one process on two mirrored CPU replicas, a step of `runner.build_trainer`'s trainer equals the step on one
  device, the head and w^k learning-rate multipliers scale the updates as they do on one device, and weight
  decay skips the w^k;
- two local worker processes under MultiWorkerMirroredStrategy stay in sync, only the chief writes, and they
  equal one process fed the same global batches.

The mirrored steps share one fixture and run eagerly (Keras' `run_eagerly`): what they check is the maths of one
step (the reduction over replicas, the multipliers, the decay), the same traced or not (measured: the same
differences and scales to 1e-6), and the fixture took 8 s of CPU rather than 37 s of tracing with the tiny
backbone. They and the two workers use the micro backbone (conftest.build_micro). Traced steps under a strategy
are checked where the tracing is the point: tests/test_self_training.py's mirrored steps (Keras' fit
under MirroredStrategy) and the two-worker run here (the custom loop under MultiWorkerMirroredStrategy,
conftest.two_worker_run). The expensive mistake variant (a second two-worker run) is marked slow.
"""

import dataclasses
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from cluster import load_weights, run_two_workers
from conftest import REPO, TWO_WORKER_SETTINGS, expect, micro_backbone, mirrored_strategy, run_config
from pit_keras.models.network import build_network, head_variables, interaction_weights
from pit_keras.training import runner
from pit_keras.training.trainer import PITTrainer

C = 4

# === 1. Two mirrored replicas in one process ===


def mirrored_steps(config):
    """One step of `runner.build_trainer(config)`'s trainer from the same weights on the same batch of 4: on one
    device at multipliers 1 (the reference), at head_lr_multiplier 10 and interaction_lr_multiplier 0.5, and at
    those with a mistake (the w^k's multiplier taken as absolute rather than relative to the heads'); on two
    mirrored CPU replicas at 10 and 0.5, right and with a mistake (each replica's loss averaged over its own half
    batch, so the summed gradients come out twice too large); and a zero-gradient step with weight decay under
    the strategy, right and with the w^k decayed.

    Returns, per step at 10 and 0.5, the update of each kind of variable (backbone, heads, w^k) along the
    reference update (`scale`, and the relative `residual` off it) and the largest difference from the one-device
    step at 10 and 0.5 relative to that step's largest update (`difference`); and the decay steps' results."""
    rng = np.random.default_rng(0)
    N = 4
    batch = {"source_image": rng.uniform(0, 255, (N, 32, 32, 3)).astype(np.float32),
             "source_label": rng.integers(0, C, (N, 32, 32)).astype(np.uint8),
             "target_image": rng.uniform(0, 255, (N, 32, 32, 3)).astype(np.float32),
             "target_image_labels": rng.dirichlet(np.ones(C), N).astype(np.float32)}
    batch["source_label"][:, :3] = 255
    strategy = mirrored_strategy()
    initial = []

    def step(strategy, **overrides):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            network = build_network("micro", C, 3)
            trainer = runner.build_trainer(dataclasses.replace(config, **overrides), network)
            trainer.run_eagerly = True  # the module docstring says why
            if not initial:
                initial.extend(v.numpy() for v in network.trainable_variables)
            for v, value in zip(network.trainable_variables, initial):
                v.assign(value)
        trainer.fit(tf.data.Dataset.from_tensors(batch).repeat(), epochs=1, steps_per_epoch=1, verbose=0,
                    shuffle=False)
        heads = {v.path for v in head_variables(network)}
        w = interaction_weights(network).path
        kinds = ["w" if v.path == w else "head" if v.path in heads else "backbone"
                 for v in network.trainable_variables]
        return kinds, [v.numpy() - a for v, a in zip(network.trainable_variables, initial)]

    def compared(deltas, reference, one_device, kinds):
        out = {"difference": max(float(np.abs(d - s).max()) for d, s in zip(deltas, one_device, strict=True))
               / max(float(np.abs(s).max()) for s in one_device)}
        for kind in ("backbone", "head", "w"):
            d = np.concatenate([x.ravel() for x, k in zip(deltas, kinds) if k == kind])
            r = np.concatenate([x.ravel() for x, k in zip(reference, kinds) if k == kind])
            scale = float(d @ r / (r @ r))
            out[kind] = {"scale": scale,
                         "residual": float(np.linalg.norm(d - scale * r) / np.linalg.norm(scale * r))}
        return out

    def zero_gradient_step():
        # Weight decay under the strategy: a zero-gradient step leaves the w^k alone, the rest shrinks.
        with strategy.scope():
            network = build_network("micro", C, 3)
            trainer = runner.build_trainer(dataclasses.replace(config, weight_decay=0.05, learning_rate=0.1),
                                           network)
        w_before = interaction_weights(network).numpy()
        kernel = network.get_layer("fine_head").weights[0]
        kernel_before = kernel.numpy()
        strategy.run(lambda: trainer.optimizer.apply_gradients(
            [(tf.zeros_like(v), v) for v in network.trainable_variables]))
        return {"w_moved": float(np.abs(interaction_weights(network).numpy() - w_before).max()),
                "head_factor": float(np.median(kernel.numpy() / kernel_before))}

    def absolute(self):
        scales = {v.path: self.head_lr_multiplier for v in head_variables(self.network)}
        scales[interaction_weights(self.network).path] = self.interaction_lr_multiplier
        return scales

    multipliers = dict(head_lr_multiplier=10.0, interaction_lr_multiplier=0.5)
    one_device = tf.distribute.get_strategy()
    kinds, reference = step(one_device, head_lr_multiplier=1.0, interaction_lr_multiplier=1.0)
    deltas = {"one_device": step(one_device, **multipliers)[1], "right": step(strategy, **multipliers)[1]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf.nn, "compute_average_loss", lambda per_image: tf.reduce_mean(per_image))
        deltas["wrong_reduction"] = step(strategy, **multipliers)[1]
    with pytest.MonkeyPatch.context() as patch:
        # The mistake (the w^k's multiplier as absolute) makes the same update on one device as under the strategy.
        patch.setattr(PITTrainer, "_lr_multipliers", absolute)
        deltas["w_absolute"] = step(one_device, **multipliers)[1]
    steps = {name: compared(d, reference, deltas["one_device"], kinds) for name, d in deltas.items()}
    steps["decay_right"] = zero_gradient_step()
    with pytest.MonkeyPatch.context() as patch:
        # The mistake: the w^k no longer excluded from weight decay.
        patch.setattr(keras.optimizers.SGD, "exclude_from_weight_decay", lambda self, **kwargs: None)
        steps["decay_w_decayed"] = zero_gradient_step()
    steps["replicas"] = strategy.num_replicas_in_sync
    return steps


@pytest.fixture(scope="module")
def mirrored():
    with micro_backbone():  # conftest.build_micro says why
        return mirrored_steps(run_config(REPO, num_classes=C, learning_rate=0.01, momentum=0.0))


@pytest.mark.parametrize("mistake", [None, "wrong_reduction"])
def test_two_mirrored_replicas_equal_one_device(mirrored, mistake):
    assert mirrored["replicas"] == 2
    difference = mirrored[mistake or "right"]["difference"]
    print(f"{mistake or 'right'}: largest difference from the one-device step, relative to its largest update: "
          f"{difference:.3g}")

    def check():
        assert difference < 1e-4, difference

    expect(check, mistake)


@pytest.mark.parametrize("placement,mistake", [("one_device", None), ("right", None), ("w_absolute", "w_absolute")])
def test_head_and_interaction_learning_rates_on_one_device_and_under_mirrored_strategy(mirrored, placement,
                                                                                      mistake):
    # head_lr_multiplier 10, interaction_lr_multiplier 0.5 (relative to the heads): the heads move 10x, the w^k
    # 5x, the backbone 1x the update of a step at multipliers 1 from the same weights on the same batch.
    got = mirrored[placement]
    print(f"{placement}: update of each kind of variable along the multipliers-1 update: {got}")
    expected = {"backbone": 1.0, "head": 10.0, "w": 5.0}

    def check():
        for kind in expected:
            assert abs(got[kind]["scale"] / expected[kind] - 1) < 1e-3 and got[kind]["residual"] < 1e-3, (kind, got)

    expect(check, mistake)


@pytest.mark.parametrize("mistake", [None, "w_decayed"])
def test_weight_decay_skips_the_interaction_weights_under_mirrored_strategy(mirrored, mistake):
    decay = mirrored["decay_" + (mistake or "right")]
    assert decay["head_factor"] == pytest.approx(1 - 0.1 * 0.05, rel=1e-6)

    def check():
        assert decay["w_moved"] == 0.0, decay

    expect(check, mistake)


# === 2. Two worker processes ===

def test_two_workers_on_localhost_stay_in_sync_and_only_the_chief_writes(two_worker_run):
    chief, other = load_weights(two_worker_run / "w0.npz"), load_weights(two_worker_run / "w1.npz")
    assert len(chief) == len(other) > 0
    for a, b in zip(chief, other):
        np.testing.assert_array_equal(a, b)
    assert sorted(f for f in os.listdir(two_worker_run / "run" / "checkpoints") if f.endswith(".index")) == \
        ["ckpt-2.index", "ckpt-4.index"]
    assert os.listdir(two_worker_run / "tmp") == []  # the other worker's checkpoints went there, and are gone


def one_process_on_the_workers_batches(config, initial):
    """A single-process run from the same weights whose every global batch is worker 0's shard batch followed
    by worker 1's, as the two workers' replicas see them."""
    keras.utils.set_random_seed(config.seed)
    network = build_network(config.backbone, config.num_classes, num_units=config.num_units)
    for v, value in zip(network.weights, initial):
        v.assign(value)
    trainer = runner.build_trainer(config, network)
    trainer.run_eagerly = True  # the workers' traced steps against eager ones: the same maths, no second trace
    domains = runner.load_domains(config, trainer)
    half = config.batch_size // 2
    shards = [runner.build_dataset(config, domains, half, shard=(2, i)) for i in range(2)]
    data = tf.data.Dataset.zip(tuple(shards)).map(
        lambda a, b: {key: tf.concat([a[key], b[key]], axis=0) for key in a})
    trainer.fit(data, epochs=1, steps_per_epoch=config.num_steps, verbose=0, shuffle=False)
    return [v.numpy() for v in network.weights]


@pytest.mark.parametrize("mistake", [None, pytest.param("shard_ignored", marks=pytest.mark.slow)])
def test_two_workers_equal_one_process_fed_the_same_global_batches(two_worker_run, tiny_benchmark, tmp_path,
                                                                    mistake):
    config = run_config(tiny_benchmark, **TWO_WORKER_SETTINGS)
    folder = two_worker_run
    if mistake:
        folder = tmp_path
        run_two_workers(config, folder, mistake)
    final = load_weights(folder / "w0.npz")
    initial = load_weights(folder / "w0.npz.initial.npz")
    with micro_backbone():
        single = one_process_on_the_workers_batches(config, initial)
    differences = [float(np.abs(f - s).max()) for f, s in zip(final, single, strict=True)]
    moved = max(float(np.abs(s - i).max()) for s, i in zip(single, initial))
    assert moved > 1e-3
    print(f"two workers against one process: max weight difference {max(differences):.3g} (weights moved {moved:.3g})")

    def check():
        assert max(differences) < 1e-5, differences

    expect(check, mistake)
