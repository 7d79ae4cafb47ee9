"""Faults a long run meets: a kill between checkpoints, a truncated checkpoint, SIGTERM, divergence, damaged
data, a full disk. Each must cost at most the steps since the last checkpoint and explain itself."""

import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import REPO
from pit_keras import callbacks, checkpoints
from pit_keras.errors import UserError
from test_trainer import batches, make_trainer


def train_command(bench, model_dir, *extra):
    return [sys.executable, "-m", "pit_keras.train", "--source=gta5", f"--source_root={bench / 'gta5'}",
            "--target=cityscapes", f"--target_root={bench / 'cityscapes'}", "--source_size=64,32",
            "--target_size=64,32", "--batch_size=2", "--learning_rate=0.05", "--log_every=10", "--image_every=0",
            "--image_labels=ground_truth", "--evaluate=false", "--verbose=0", f"--model_dir={model_dir}", *extra]


def run(command, timeout=240):
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def weights_of(model_dir, step):
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints" / f"ckpt-{step}"))
    names = sorted(n for n in reader.get_variable_to_shape_map() if n.startswith("network/"))
    assert names
    return {n: reader.get_tensor(n) for n in names}


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_benchmark, tmp_path):
    steps = ["--num_steps=240", "--checkpoint_every=40", "--deterministic"]
    killed = subprocess.Popen(train_command(tiny_benchmark, tmp_path / "killed", *steps), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "killed" / "checkpoints" / "ckpt-80.index"
    deadline = time.time() + 180
    while not marker.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    last = checkpoints.latest_checkpoint(str(tmp_path / "killed"))
    assert last is not None and not last.endswith("ckpt-240"), "the run must be killed mid-way"

    resumed = run(train_command(tiny_benchmark, tmp_path / "killed", *steps))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {last}" in resumed.stdout
    straight = run(train_command(tiny_benchmark, tmp_path / "straight", *steps))
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = weights_of(tmp_path / "killed", 240), weights_of(tmp_path / "straight", 240)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tiny_benchmark, tmp_path):
    model_dir = tmp_path / "run"
    first = run(train_command(tiny_benchmark, model_dir, "--num_steps=6", "--checkpoint_every=2"))
    assert first.returncode == 0, first.stderr[-2000:]
    data = next((model_dir / "checkpoints").glob("ckpt-6.data-*"))
    data.write_bytes(data.read_bytes()[:100])
    resumed = run(train_command(tiny_benchmark, model_dir, "--num_steps=8", "--checkpoint_every=2"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "ckpt-6 is unreadable" in resumed.stdout
    assert "resumed from" in resumed.stdout and "ckpt-4 at step 4" in resumed.stdout


def test_sigterm_writes_a_checkpoint_and_stops_cleanly(tiny_benchmark, tmp_path):
    model_dir = tmp_path / "run"
    process = subprocess.Popen(train_command(tiny_benchmark, model_dir, "--num_steps=100000",
                                             "--checkpoint_every=50"),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = model_dir / "checkpoints" / "ckpt-50.index"
    deadline = time.time() + 180
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped: SIGTERM at step" in err and "rerun the same command to resume" in err
    step = int(err.split("SIGTERM at step ")[1].split(";")[0])
    assert checkpoints.latest_checkpoint(str(model_dir)).endswith(f"ckpt-{step}")
    assert "Traceback" not in err


def test_divergence_names_step_and_term_and_keeps_the_last_good_checkpoint(tiny_benchmark, tmp_path):
    model_dir = tmp_path / "run"
    result = run(train_command(tiny_benchmark, model_dir, "--num_steps=200", "--checkpoint_every=1",
                               "--learning_rate=1e8"))
    assert result.returncode == 3, result.stderr[-2000:]
    assert "training diverged" in result.stderr and "loss term" in result.stderr
    assert "Traceback" not in result.stderr
    last = checkpoints.latest_checkpoint(str(model_dir))
    assert last is not None
    assert f"the last good checkpoint, {last}, is kept" in result.stderr
    step = int(last.rsplit("-", 1)[1])
    for name, value in weights_of(model_dir, step).items():
        assert np.all(np.isfinite(value)), name


def test_damaged_source_files_are_skipped_with_a_count(tiny_benchmark, tmp_path):
    root = tmp_path / "gta5"
    shutil.copytree(tiny_benchmark / "gta5", root)
    images = sorted((root / "images").iterdir())
    # A label whose size differs from its image, and an empty image: caught at start-up.
    Image.open(root / "labels" / images[0].name).resize((32, 16)).save(root / "labels" / images[0].name)
    images[1].write_bytes(b"")
    # A PNG cut short: its header is fine, its closing IEND chunk is gone; caught at start-up too.
    data = images[2].read_bytes()
    images[2].write_bytes(data[: len(data) // 2])
    # A PNG damaged in its middle: skipped by the input pipeline whenever it is met.
    data = bytearray(images[3].read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    images[3].write_bytes(bytes(data))
    bench = tmp_path
    shutil.copytree(tiny_benchmark / "cityscapes", bench / "cityscapes")
    model_dir = tmp_path / "run"
    result = run(train_command(bench, model_dir, "--num_steps=12", "--checkpoint_every=6"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 3 of 6 source files" in result.stdout
    skipped = (model_dir / "skipped_files.txt").read_text()
    assert f"{root / 'labels' / images[0].name}: label is 32x16 but its image is 64x32" in skipped
    assert f"{images[1]}: the file is empty" in skipped
    assert f"{images[2]}: truncated PNG (no IEND chunk at its end)" in skipped
    assert "Traceback" not in result.stderr


def test_missing_or_empty_dataset_folders_are_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    result = run(train_command(tmp_path.parent, tmp_path / "run", "--num_steps=2", f"--source_root={tmp_path}"))
    assert result.returncode == 2
    assert f"{tmp_path / 'images'}: no .png images found." in result.stderr
    assert not (tmp_path / "run").exists()  # a refused start leaves nothing behind


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    trainer = make_trainer("pit")
    manager = checkpoints.manager(trainer.network, trainer.optimizer, str(tmp_path), max_to_keep=1)
    checkpointer = callbacks.Checkpointer(manager, every=1)
    checkpointer.set_model(trainer)
    trainer.fit(batches(), epochs=1, steps_per_epoch=1, verbose=0)
    checkpointer.save()
    saved = manager.latest_checkpoint

    def full_disk(**kwargs):
        raise OSError(28, "No space left on device")

    manager.save = full_disk
    trainer.fit(batches(), epochs=1, steps_per_epoch=1, verbose=0)
    with pytest.raises(UserError, match=f"No space left on device.*previous checkpoint {saved} is intact"):
        checkpointer.save()
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")) == saved


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    keras.utils.set_random_seed(0)
    trainer = make_trainer("pit")
    manager = checkpoints.manager(trainer.network, trainer.optimizer, str(tmp_path))
    checkpointer = callbacks.Checkpointer(manager, every=1)
    checkpointer.set_model(trainer)
    trainer.network.trainable_weights[0].assign(tf.fill(trainer.network.trainable_weights[0].shape, np.nan))
    with pytest.raises(UserError, match="no longer finite"):
        checkpointer.save()
    assert manager.latest_checkpoint is None


def test_a_run_resumed_with_another_objective_is_refused(tmp_path):
    config = {"backbone": "tiny", "num_classes": 19, "lse_r": [1.0], "method": "pit", "lse_normalize": True}
    checkpoints.check_or_write_run_config(str(tmp_path), config)
    checkpoints.check_or_write_run_config(str(tmp_path), config)  # the same flags resume
    with pytest.raises(UserError, match="lse_normalize=True, not False"):
        checkpoints.check_or_write_run_config(str(tmp_path), {**config, "lse_normalize": False})
    # A run.json from before the key was recorded was trained with the old default (the paper's sum).
    (tmp_path / "run.json").write_text('{"backbone": "tiny", "num_classes": 19, "lse_r": [1.0], "method": "pit"}')
    with pytest.raises(UserError, match="image_loss_reduction=sum, not mean"):
        checkpoints.check_or_write_run_config(str(tmp_path), {**config, "lse_normalize": False,
                                                              "image_loss_reduction": "mean"})


def test_divergence_before_any_checkpoint_says_so():
    import types

    model = types.SimpleNamespace(optimizer=types.SimpleNamespace(iterations=tf.Variable(1, dtype=tf.int64)))
    guard = callbacks.DivergenceGuard(types.SimpleNamespace(latest_checkpoint=None))
    guard.set_model(model)
    with pytest.raises(callbacks.Diverged, match="no checkpoint had been written yet"):
        guard.on_train_batch_end(0, {"loss": float("nan"), "seg_src": float("nan")})
    guard = callbacks.DivergenceGuard(types.SimpleNamespace(latest_checkpoint="run/checkpoints/ckpt-4"))
    guard.set_model(model)
    with pytest.raises(callbacks.Diverged, match="the last good checkpoint, run/checkpoints/ckpt-4, is kept"):
        guard.on_train_batch_end(0, {"loss": float("inf")})


@pytest.mark.parametrize("flag", ["--learning_rate=nan", "--learning_rate=inf", "--learning_rate=0",
                                  "--momentum=-0.5", "--lambda_c=nan"])
def test_numeric_flags_are_checked_before_anything_starts(tmp_path, flag):
    result = run(train_command(tmp_path, tmp_path / "run", "--num_steps=2", flag))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--{flag.split('=')[0][2:]}=" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
