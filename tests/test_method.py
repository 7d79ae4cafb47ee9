"""Tests that guard the method: each one is shown to fail on a deliberate mistake, in a "mistake"
variant that makes it in the library (monkeypatched) and expects the check to turn red.

- `compute_terms` term by term against `losses.*` on the network's own outputs (each unit with its own r);
- one step under mixed_float16, mixed_bfloat16 and XLA moves the weights as a float32 step does;
- the reparameterisation of Eq. 1 as printed (r on W equals r = 1 on rW), and its absence under the normalised form;
- `--eval_every` keeps the best checkpoint, `restore_network(..., "best")` loads it and `evaluate_run` reports it;
- the optimizer of `runner.build_trainer`: weight decay skips the w^k, and the poly learning rate;
- at a paper flagfile's optimiser settings the w^k leave 1/K.

The learning-rate multipliers and weight decay under MirroredStrategy, and two workers against one process, are
in tests/test_distribute.py. The expensive mistake variant (a second training run) is marked slow.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, expect, micro_backbone, run_config
from pit_keras import losses
from pit_keras.training import callbacks
from pit_keras.training import checkpoints
from pit_keras.evaluation import scoring
from pit_keras.training import runner
from pit_keras.models.network import build_network, interaction_weights
from pit_keras.training.trainer import PITTrainer

C = 4


def random_batch(n=2, size=32, seed=0, zero_shares=False):
    """A PIT batch with some void source pixels; `zero_shares` gives each target image a class it lacks."""
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.ones(C), n).astype(np.float32)
    if zero_shares:
        shares[np.arange(n), np.arange(n) % C] = 0.0
        shares /= shares.sum(axis=1, keepdims=True)
    batch = {
        "source_image": rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32),
        "source_label": rng.integers(0, C, (n, size, size)).astype(np.uint8),
        "target_image": rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32),
        "target_image_labels": shares,
    }
    batch["source_label"][:, :4] = 255
    # One class absent from the first source image, so presence labels are not all ones.
    batch["source_label"][0][batch["source_label"][0] == C - 1] = 0
    return batch


def benchmark_config(bench, **overrides):
    """A `RunConfig` on the tiny generated benchmark (conftest.tiny_benchmark, conftest.run_config)."""
    return run_config(bench, **overrides)


# === 1. compute_terms term by term ===

R = (0.5, 1.0, 2.0)
W = (0.2, 0.3, 0.6)


def distinct_units(network, seed=1):
    """Gives every coarse head its own weights and bias (different scales) and the w^k distinct values."""
    rng = np.random.default_rng(seed)
    for k in range(len(R)):
        kernel, bias = network.get_layer(f"coarse_head_{k}").weights
        kernel.assign(rng.normal(0, 0.3 * (k + 1), kernel.shape).astype(np.float32))
        bias.assign(rng.normal(0, 0.5, bias.shape).astype(np.float32))
    interaction_weights(network).assign(np.array(W, np.float32))


def expected_terms(network, batch, normalize, reduction, kind, resolution):
    """The terms computed with `losses.*` on the network's outputs, unit by unit, and the per-unit L_c."""
    suffix = "_feat" if resolution == "feature" else ""
    w = interaction_weights(network)
    terms, per_unit = {}, {}
    labels = {"src": losses.image_level_labels(batch["source_label"], C),
              "trg": tf.constant(batch["target_image_labels"])}
    for tag, image in (("src", batch["source_image"]), ("trg", batch["target_image"])):
        out = network(image, training=True)
        target = labels[tag] if kind == "shares" else tf.cast(labels[tag] > 0, tf.float32)
        cams = [out[f"cam_{k}{suffix}"] for k in range(len(R))]
        per_unit[tag] = [losses.image_level_bce(target, losses.lse_pool(cam, r, normalize), reduction).numpy()
                         for cam, r in zip(cams, R)]
        terms[f"img_{tag}"] = np.sum(per_unit[tag], axis=0)
        terms[f"rec_{tag}"] = losses.reconstruction_loss(cams, w, out[f"seg{suffix}"]).numpy()
        if tag == "src":
            terms["seg_src"] = losses.pixel_cross_entropy(batch["source_label"], out["seg"]).numpy()
    return terms, per_unit


def first_unit_map(self, outputs):
    """The mistake: every coarse unit's map is the first unit's."""
    suffix = "_feat" if self.loss_resolution == "feature" else ""
    return [outputs[f"cam_0{suffix}"]] * len(self.lse_r), outputs[f"seg{suffix}"]


@pytest.mark.parametrize("normalize,reduction,kind,resolution,mistake", [
    (False, "sum", "shares", "feature", None),
    (False, "mean", "shares", "feature", None),
    (True, "sum", "shares", "feature", None),
    (True, "mean", "shares", "feature", None),
    (True, "mean", "presence", "feature", None),
    (False, "sum", "shares", "input", None),
    (False, "sum", "shares", "feature", "first_unit_map"),
    (True, "mean", "shares", "feature", "first_unit_map"),
])
def test_compute_terms_equals_the_losses_on_the_networks_outputs(monkeypatch, normalize, reduction, kind,
                                                                 resolution, mistake):
    if mistake:
        monkeypatch.setattr(PITTrainer, "_unit_maps", first_unit_map)
    keras.utils.set_random_seed(0)
    network = build_network("tiny", C, num_units=len(R))
    distinct_units(network)
    trainer = PITTrainer(network, C, "pit", lse_r=R, lse_normalize=normalize, lambda_c=0.5, lambda_r=0.5,
                         image_loss_reduction=reduction, image_label_kind=kind, loss_resolution=resolution)
    batch = random_batch(zero_shares=True)
    # In training mode, as train_step calls it (BatchNorm on the batch's statistics).
    got = {name: value.numpy() for name, value in trainer.compute_terms(batch, training=True).items()}
    expected, per_unit = expected_terms(network, batch, normalize, reduction, kind, resolution)
    assert set(got) == set(expected) == {"seg_src", "img_src", "img_trg", "rec_src", "rec_trg"}
    # The units must really differ on this batch, or the check could not tell them apart.
    for tag in ("src", "trg"):
        unit_means = [float(np.mean(u)) for u in per_unit[tag]]
        assert min(abs(a - b) for i, a in enumerate(unit_means) for b in unit_means[i + 1:]) > 1e-2, unit_means
    errors = {name: float(np.max(np.abs(got[name] - expected[name]) / (np.abs(expected[name]) + 1e-6)))
              for name in expected}

    def check():
        assert max(errors.values()) < 1e-5, errors

    expect(check, mistake)
    if mistake:
        assert errors["img_src"] > 1e-2 and errors["img_trg"] > 1e-2, errors


# === 2. one step under mixed precision and XLA moves the weights as float32 does ===

@pytest.fixture
def policy():
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


def one_step_update(policy_name, initial, jit=False, learning_rate=1e-3, backbone="tiny"):
    """The change of every trainable weight after one plain-SGD step from `initial` (or the seed-0 weights)."""
    keras.mixed_precision.set_global_policy(policy_name)
    keras.utils.set_random_seed(0)
    network = build_network(backbone, C, 3)
    if initial is not None:
        for v, value in zip(network.trainable_variables, initial):
            v.assign(value)
    before = [v.numpy() for v in network.trainable_variables]
    trainer = PITTrainer(network, C, "pit")
    # Eagerly but for XLA: the step's maths under each policy are the same traced or not (measured: the same
    # relative errors to 1e-3, the scales to 2e-3), at a fifth of the CPU; XLA compiles the traced step.
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate), jit_compile=jit, run_eagerly=not jit)
    trainer.fit(tf.data.Dataset.from_tensors(random_batch()).repeat(), epochs=1, steps_per_epoch=1, verbose=0,
                shuffle=False)
    keras.mixed_precision.set_global_policy("float32")
    return before, [v.numpy() - b for v, b in zip(network.trainable_variables, before)], trainer


_FLOAT32_STEP = {}


def float32_step(backbone):
    if backbone not in _FLOAT32_STEP:
        before, delta, _ = one_step_update("float32", None, backbone=backbone)
        _FLOAT32_STEP[backbone] = before, delta
    return _FLOAT32_STEP[backbone]


# Relative error of the whole update: bfloat16 keeps 8 bits of mantissa, and the BatchNorm gradients of a
# random batch are sums that cancel, so its update is noisier (measured ~0.2) than float16's (~0.08).
UPDATE_TOLERANCE = {"mixed_bfloat16": 0.3, "mixed_float16": 0.15, "float32": 1e-3}


@pytest.mark.parametrize("name,jit,mistake", [
    ("mixed_bfloat16", False, None),
    ("mixed_float16", False, None),
    ("float32", True, None),
    ("mixed_float16", False, "loss_not_scaled"),
])
def test_one_step_moves_the_weights_as_a_float32_step_does(policy, monkeypatch, name, jit, mistake):
    # XLA's step on the micro backbone (conftest.build_micro): what it checks, the compiled step's update against
    # the eager one, does not depend on the depth (measured alone, with its eager reference, side by side: 5.1-6.1
    # s with the tiny backbone, 2.8-3.6 s with micro). The policies' steps, whose rounding grows with the depth,
    # on the tiny backbone.
    backbone = "micro" if jit else "tiny"
    with micro_backbone():
        before, reference = float32_step(backbone)
        if mistake:
            # train_step no longer scales the loss; LossScaleOptimizer.apply still divides the gradients by the
            # scale.
            monkeypatch.setattr(keras.optimizers.LossScaleOptimizer, "scale_loss", lambda self, loss: loss)
        _, delta, trainer = one_step_update(name, before, jit=jit, backbone=backbone)
    if name == "mixed_float16":
        assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    norm = np.sqrt(sum(float(np.sum(r ** 2)) for r in reference))
    error = np.sqrt(sum(float(np.sum((d - r) ** 2)) for d, r in zip(delta, reference))) / norm
    # The update's size along the float32 one: 1 when right, 0.5 or 2 for an update off by 2x.
    scale = sum(float(np.sum(d * r)) for d, r in zip(delta, reference)) / norm ** 2
    w_index = [v.path for v in trainer.network.trainable_variables].index(interaction_weights(trainer.network).path)
    assert np.all(reference[w_index] != 0)  # the step trains the w^k too
    print(f"{name} jit={jit}: relative error of the update {error:.4f}, scale {scale:.4f}")

    def check():
        assert error < UPDATE_TOLERANCE[name] and abs(scale - 1) < 0.1, (error, scale)

    expect(check, mistake)


# === 3. Eq. 1 as printed: r on W is r = 1 on rW ===

def linear_maps(r, seed=0):
    """Features F, and the class maps of a linear head on them: S = F W + b, and S' = F (rW) + r b."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(3, 6, 5, 8)).astype(np.float64)
    kernel, bias = rng.normal(size=(8, C)), rng.normal(size=(C,))
    return (tf.constant(features @ kernel + bias, tf.float32),
            tf.constant(features @ (r * kernel) + r * bias, tf.float32))


def check_reparameterisation():
    for r in (0.5, 1.5, 3.0):
        cam, scaled = linear_maps(r)
        printed = losses.lse_pool(cam, r, normalize=False).numpy()
        np.testing.assert_allclose(printed, losses.lse_pool(scaled, 1.0, normalize=False).numpy(),
                                   rtol=1e-5, atol=1e-5)
        normalised = losses.lse_pool(cam, r, normalize=True).numpy()
        difference = np.abs(normalised - losses.lse_pool(scaled, 1.0, normalize=True).numpy()).max()
        assert difference > 0.1, (r, difference)


def check_reparameterisation_in_the_network():
    """The same through the trainer: one unit with r on its head equals one with r = 1 on the head scaled by r."""
    r = 2.0
    keras.utils.set_random_seed(0)
    network = build_network("tiny", C, num_units=1)
    batch = random_batch()
    kernel, bias = network.get_layer("coarse_head_0").weights
    rng = np.random.default_rng(1)
    kernel.assign(rng.normal(0, 0.3, kernel.shape).astype(np.float32))
    bias.assign(rng.normal(0, 0.5, bias.shape).astype(np.float32))
    for normalize in (False, True):
        kernel_value, bias_value = kernel.numpy(), bias.numpy()
        with_r = PITTrainer(network, C, "pit", lse_r=(r,), lse_normalize=normalize).compute_terms(batch, True)
        kernel.assign(r * kernel_value)
        bias.assign(r * bias_value)
        scaled = PITTrainer(network, C, "pit", lse_r=(1.0,), lse_normalize=normalize).compute_terms(batch, True)
        kernel.assign(kernel_value)
        bias.assign(bias_value)
        difference = max(float(np.abs(with_r[t].numpy() - scaled[t].numpy()).max()) for t in ("img_src", "img_trg"))
        if normalize:
            assert difference > 1e-3, difference
        else:
            assert difference < 1e-5, difference


@pytest.mark.parametrize("mistake", [None, "always_printed", "always_normalised"])
def test_printed_lse_reparameterises_r_into_the_head_and_the_normalised_form_does_not(monkeypatch, mistake):
    if mistake:
        real = losses.lse_pool
        form = mistake == "always_normalised"
        monkeypatch.setattr(losses, "lse_pool", lambda cam, r, normalize=False: real(cam, r, form))
    expect(check_reparameterisation, mistake)
    expect(check_reparameterisation_in_the_network, mistake)


# === 4. --eval_every and the best checkpoint ===

def run_with_validation(bench, model_dir, monkeypatch, mious):
    """runner.run with --eval_every=2 over 6 steps; the three validations report `mious` (the real evaluation
    runs; only its mIoU is replaced, so that the best is neither the first nor the last). On the micro backbone
    (conftest.build_micro): what is checked is which checkpoint is kept, not what the network learns (measured
    alone, both variants of the test: 9.4-10.3 s with the tiny backbone, 4.4-4.6 s with micro)."""
    real = scoring.evaluate
    calls = []

    def evaluate(*args, progress=True, **kwargs):
        result = real(*args, progress=progress, **kwargs)
        if progress:  # the final evaluation of evaluate_run
            return result
        calls.append(result["miou"])
        return {**result, "miou": mious[len(calls) - 1]}

    monkeypatch.setattr(scoring, "evaluate", evaluate)
    config = benchmark_config(bench, num_steps=6, batch_size=2, backbone="micro")
    with micro_backbone():
        trainer, result = runner.run(config, str(model_dir), log_every=2, image_every=0, checkpoint_every=2,
                                       keep_checkpoints=3, verbose=0, eval_every=2)
    assert len(calls) == 3
    return config, trainer, result


def best_is_the_latest(real):
    def on_train_batch_end(self, batch, logs=None):
        self.best = -1.0  # the mistake: every evaluation replaces the "best"
        return real(self, batch, logs)
    return on_train_batch_end


@pytest.mark.parametrize("mistake", [None, "best_is_the_latest"])
def test_eval_every_keeps_restores_and_reports_the_best_checkpoint(tiny_benchmark, tmp_path, monkeypatch, mistake):
    if mistake:
        monkeypatch.setattr(callbacks.Validation, "on_train_batch_end",
                            best_is_the_latest(callbacks.Validation.on_train_batch_end))
    model_dir = tmp_path / "run"
    config, trainer, result = run_with_validation(tiny_benchmark, model_dir, monkeypatch, [10.0, 30.0, 20.0])
    best_file = model_dir / "best" / "best.json"
    best = json.loads(best_file.read_text())

    def check():
        assert best == {"step": 4, "miou": 30.0, "checkpoint": "ckpt-4"}, best
        network = build_network(config.backbone, config.num_classes, num_units=3)
        path = checkpoints.restore_network(network, str(model_dir), "best")
        assert path == str(model_dir / "best" / "ckpt-4")
        last = trainer.network.get_weights()
        restored = network.get_weights()
        # The restored weights are step 4's, not the last step's.
        assert any(not np.array_equal(a, b) for a, b in zip(restored, last))
        network_at_4 = build_network(config.backbone, config.num_classes, num_units=3)
        tf.train.Checkpoint(network=network_at_4).restore(
            str(model_dir / "checkpoints" / "ckpt-4")).expect_partial()
        for a, b in zip(network_at_4.get_weights(), restored):
            np.testing.assert_array_equal(a, b)
        assert result["best"] == best and result["checkpoint"] == "ckpt-6"
        assert json.loads((model_dir / "eval_val.json").read_text())["best"] == best

    with micro_backbone():
        expect(check, mistake)


# === 5. The optimizer of runner.build_trainer ===

def built_trainer(**overrides):
    keras.utils.set_random_seed(0)
    config = benchmark_config(REPO, num_classes=C, **overrides)
    network = build_network("tiny", C, num_units=3)
    return runner.build_trainer(config, network), network


@pytest.mark.parametrize("mistake", [None, "w_decayed"])
def test_weight_decay_skips_the_interaction_weights(monkeypatch, mistake):
    if mistake:
        monkeypatch.setattr(keras.optimizers.SGD, "exclude_from_weight_decay", lambda self, **kwargs: None)
    lr, decay = 0.1, 0.05
    trainer, network = built_trainer(learning_rate=lr, weight_decay=decay, momentum=0.9)
    variables = network.trainable_variables
    before = [v.numpy() for v in variables]
    trainer.optimizer.apply_gradients([(tf.zeros_like(v), v) for v in variables])
    w = interaction_weights(network)
    moved = {v.path: (v.numpy(), b) for v, b in zip(variables, before)}
    w_after, w_before = moved.pop(w.path)
    for path, (after, b) in moved.items():
        np.testing.assert_allclose(after, b * (1 - lr * decay), rtol=1e-6, atol=1e-9, err_msg=path)
    assert any(np.any(b != 0) for _, b in moved.values())

    def check():
        np.testing.assert_array_equal(w_after, w_before, err_msg="weight decay moved the w^k")

    expect(check, mistake)


@pytest.mark.parametrize("mistake", [None, "power_dropped"])
def test_poly_learning_rate_at_the_start_middle_and_end(monkeypatch, mistake):
    if mistake:
        real = keras.optimizers.schedules.PolynomialDecay
        monkeypatch.setattr(keras.optimizers.schedules, "PolynomialDecay",
                            lambda lr, decay_steps, end_learning_rate, power: real(lr, decay_steps, end_learning_rate))
    lr, steps, power = 2.5e-4, 1000, 0.9
    trainer, _ = built_trainer(learning_rate=lr, num_steps=steps, poly_power=power)
    got = {}
    for t in (0, steps // 2, steps):
        trainer.optimizer.iterations.assign(t)
        got[t] = float(trainer.optimizer.learning_rate)
    expected = {t: lr * (1 - t / steps) ** power for t in got}

    def check():
        for t in got:
            assert got[t] == pytest.approx(expected[t], rel=1e-6, abs=1e-12), (t, got, expected)

    expect(check, mistake)


# === 6. At a paper flagfile's optimiser settings the w^k leave 1/K ===

def w_after_a_short_paper_run(bench, model_dir, steps, interaction_lr_multiplier=1.0):
    config = benchmark_config(
        bench, num_steps=steps, batch_size=2, learning_rate=2.5e-4, head_lr_multiplier=10.0,
        interaction_lr_multiplier=interaction_lr_multiplier, momentum=0.9, image_loss_reduction="mean",
        lse_normalize=True, weight_decay=0.0)
    trainer, _ = runner.run(config, str(model_dir), log_every=steps, image_every=0, checkpoint_every=steps,
                              evaluate=False, verbose=0)
    return interaction_weights(trainer.network).numpy()


PAPER_RUN_STEPS = 100


@pytest.mark.parametrize("interaction_lr_multiplier", [1.0, pytest.param(0.01, marks=pytest.mark.slow)])
def test_interaction_weights_leave_one_over_k_at_the_paper_optimiser_settings(tiny_benchmark, tmp_path,
                                                                             interaction_lr_multiplier):
    w = w_after_a_short_paper_run(tiny_benchmark, tmp_path / "run", PAPER_RUN_STEPS, interaction_lr_multiplier)
    moved = float(np.abs(w - 1 / 3).max())
    print(f"w^k after {PAPER_RUN_STEPS} steps at interaction_lr_multiplier={interaction_lr_multiplier}: {w} "
          f"(max |w - 1/K| = {moved:.4f})")

    def check():
        assert moved > 0.01, w

    # The mistake is the old flagfiles' 0.01: the w^k stay at 1/K.
    expect(check, interaction_lr_multiplier != 1.0)
