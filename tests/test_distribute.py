"""Distribution: a step on two mirrored CPU replicas equals a step on one device, two local worker processes
stay in sync, and the mixed-precision and XLA paths give finite losses."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from conftest import REPO, run_config

MIRRORED_STEP = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    import keras
    from pit_keras.training import distribute
    from pit_keras.training import trainer as trainer_module
    from pit_keras.models.network import build_network
    from pit_keras.training.trainer import PITTrainer

    distribute.configure_cpu_replicas(2)

    C, N = 4, 4
    rng = np.random.default_rng(0)
    batch = {"source_image": rng.uniform(0, 255, (N, 32, 32, 3)).astype(np.float32),
             "source_label": rng.integers(0, C, (N, 32, 32)).astype(np.uint8),
             "target_image": rng.uniform(0, 255, (N, 32, 32, 3)).astype(np.float32),
             "target_image_labels": rng.dirichlet(np.ones(C), N).astype(np.float32)}
    batch["source_label"][:, :3] = 255

    def one_step(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            trainer = PITTrainer(build_network("tiny", C, 3), C, "pit", interaction_lr_multiplier=1.0)
            trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        history = trainer.fit(tf.data.Dataset.from_tensors(batch).repeat(), epochs=1, steps_per_epoch=1,
                              verbose=0, shuffle=False)
        assert set(history.history) == {"loss", "seg_src", "img_src", "img_trg", "rec_src", "rec_trg"}
        return [v.numpy() for v in trainer.network.trainable_weights]

    def difference():
        single = one_step(tf.distribute.get_strategy())
        mirrored = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        return max(float(np.abs(a - b).max()) for a, b in zip(single, mirrored))

    right = difference()
    # The mistake: each replica averages over its own half batch: the summed gradients come out twice too large.
    trainer_module.tf.nn.compute_average_loss = lambda per_image: tf.reduce_mean(per_image)
    print(json.dumps({"right": right, "wrong_reduction": difference()}))
""")


def run_python(code, *args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})


@pytest.fixture(scope="module")
def mirrored_differences():
    """The largest weight difference between a step on two mirrored replicas and one on one device, right and
    with the mistake, from one process."""
    result = run_python(MIRRORED_STEP)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("reduction", ["right", "wrong_reduction"])
def test_two_mirrored_replicas_equal_one_device(mirrored_differences, reduction):
    difference = mirrored_differences[reduction]
    if reduction == "right":
        assert difference < 1e-5
    else:
        assert difference > 1e-3


WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from pit_keras.config import RunConfig
    from pit_keras.training import distribute
    from pit_keras.training import runner

    strategy = distribute.make_strategy("multi_worker")
    config = RunConfig.from_json(json.loads(sys.argv[1]))
    trainer, _ = runner.run(config, sys.argv[2], strategy=strategy, log_every=2, image_every=0,
                              checkpoint_every=2, evaluate=False, verbose=0)
    np.savez(sys.argv[3], *[v.numpy() for v in trainer.network.weights])
""")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_on_localhost_stay_in_sync_and_only_the_chief_writes(tiny_benchmark, tmp_path):
    config = run_config(tiny_benchmark, interaction_lr_multiplier=0.01, image_loss_reduction="sum")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    model_dir = tmp_path / "run"
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(config.to_json()), str(model_dir), str(tmp_path / f"w{index}.npz")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [w.communicate(timeout=240) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    chief, other = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    for key in chief.files:
        np.testing.assert_array_equal(chief[key], other[key])
    assert sorted(f for f in os.listdir(model_dir / "checkpoints") if f.endswith(".index")) == \
        ["ckpt-2.index", "ckpt-4.index"]
    assert not [d for d in os.listdir(tmp_path) if d.startswith("pit_keras_worker_")]


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
