"""Faults a long run meets: a kill between checkpoints, a truncated checkpoint, SIGTERM, divergence, damaged
data, a full disk. Each must cost at most the steps since the last checkpoint and explain itself.

The shared trained run (conftest.py) is the uninterrupted run a killed one must equal, and (a copy of it) the run
whose newest checkpoint is cut short. What needs no process of its own (no signal, no console output of
TensorFlow's, no exit) runs in the test's process (tests/commands.py)."""

import dataclasses
import json
import os
import re
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

import conftest
from commands import run_in_process
from conftest import REPO, TRAINED_RUN_STEPS, run_config, trained_run_args
from pit_keras.training import callbacks
from pit_keras.training import checkpoints
from pit_keras.errors import UserError
from test_trainer import batches, make_trainer


def train_args(bench, model_dir, *extra):
    return ["--source=gta5", f"--source_root={bench / 'gta5'}", "--target=cityscapes",
            f"--target_root={bench / 'cityscapes'}", "--source_size=64,32", "--target_size=64,32", "--batch_size=2",
            "--learning_rate=0.05", "--log_every=10", "--image_every=0", "--image_labels=ground_truth",
            "--evaluate=false", "--verbose=0", f"--model_dir={model_dir}", *extra]


def train_command(bench, model_dir, *extra):
    return [sys.executable, "-m", "pit_keras.train", *train_args(bench, model_dir, *extra)]


def run(command, timeout=240):
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def weights_of(model_dir, step):
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints" / f"ckpt-{step}"))
    names = sorted(n for n in reader.get_variable_to_shape_map() if n.startswith("network/"))
    assert names
    return {n: reader.get_tensor(n) for n in names}


def test_sigkill_then_resume_equals_an_uninterrupted_run(trained_run, tiny_benchmark, tmp_path):
    # The shared run (deterministic, a checkpoint every 40 steps) is the uninterrupted run. Its copy taken back to
    # its step-160 checkpoint is a run stopped there; that run goes on with the same flags in a process of its own,
    # is killed mid-way, and is resumed with the same flags (in this process).
    killed_dir = tmp_path / "killed"
    shutil.copytree(trained_run[0], killed_dir)
    for path in (killed_dir / "checkpoints").glob("ckpt-*"):
        if int(path.name.split(".")[0][5:]) > 160:
            path.unlink()
    (killed_dir / "checkpoints" / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-160"\nall_model_checkpoint_paths: "ckpt-160"\n')
    command = [sys.executable, "-m", "pit_keras.train", *trained_run_args(tiny_benchmark, killed_dir)]
    killed = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed_dir / "checkpoints" / "ckpt-200.index"
    deadline = time.time() + 180
    while not marker.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    last = checkpoints.latest_checkpoint(str(killed_dir))
    assert last is not None and not last.endswith(f"ckpt-{TRAINED_RUN_STEPS}"), "the run must be killed mid-way"

    resumed = run_in_process("train", *trained_run_args(tiny_benchmark, killed_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {last}" in resumed.stdout
    a, b = weights_of(killed_dir, TRAINED_RUN_STEPS), weights_of(trained_run[0], TRAINED_RUN_STEPS)
    assert a.keys() == b.keys()
    # The resumed steps ran in this process, on TensorFlow's own CPU kernels (conftest: oneDNN off), the shared
    # run's on oneDNN's: their rounding differs (measured: 5e-7 at most). A resume off by a step, a batch or the
    # momentum differs by orders of magnitude more.
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(trained_run, tiny_benchmark, tmp_path):
    model_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], model_dir)  # the shared run: its newest checkpoints
    last, previous = sorted(int(p.name[5:-6]) for p in (model_dir / "checkpoints").glob("ckpt-*.index"))[-1:-3:-1]
    data = next((model_dir / "checkpoints").glob(f"ckpt-{last}.data-*"))
    data.write_bytes(data.read_bytes()[:100])
    # Resumed as if it had started from a pretrained weights file that is gone since: a resume reads every
    # weight from its checkpoint, never that file.
    gone = tmp_path / "moved_away.weights.h5"
    resumed = run_in_process("train", *train_args(tiny_benchmark, model_dir, f"--num_steps={last + 2}",
                                                  "--checkpoint_every=2", f"--backbone_weights={gone}"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"ckpt-{last} is unreadable" in resumed.stdout
    assert "resumed from" in resumed.stdout and f"ckpt-{previous} at step {previous}" in resumed.stdout


@pytest.fixture(scope="module")
def sigterm_run(tiny_benchmark, tmp_path_factory):
    """A train process, with --tf_logs and without TF_CPP_MIN_LOG_LEVEL in its environment (as a user starts
    it), sent SIGTERM once its step-10 checkpoint is written: `(returncode, stderr, model_dir)`. The quiet
    default console is the damaged-source run's (`damaged_run`)."""
    model_dir = tmp_path_factory.mktemp("sigterm") / "run"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    process = subprocess.Popen(train_command(tiny_benchmark, model_dir, "--num_steps=100000",
                                             "--checkpoint_every=10", "--tf_logs"),
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = model_dir / "checkpoints" / "ckpt-10.index"
    deadline = time.time() + 180
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    return process.returncode, err, model_dir


def test_sigterm_writes_a_checkpoint_and_stops_cleanly(sigterm_run):
    returncode, err, model_dir = sigterm_run
    assert returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped: SIGTERM at step" in err and "rerun the same command to resume" in err
    step = int(err.split("SIGTERM at step ")[1].split(";")[0])
    assert checkpoints.latest_checkpoint(str(model_dir)).endswith(f"ckpt-{step}")
    assert "Traceback" not in err


def test_tf_logs_brings_back_what_is_hidden_by_default(sigterm_run):
    # The banner of the lines TensorFlow logs while it loads, before any logging setting applies: hidden by
    # default (test_the_console_is_quiet_and_progress_counts_steps_in_plain_lines), shown with --tf_logs.
    assert "absl::InitializeLog" in sigterm_run[1]


def test_divergence_names_step_and_term_and_keeps_the_last_good_checkpoint(tiny_benchmark, tmp_path, eager_steps):
    model_dir = tmp_path / "run"
    result = run_in_process("train", *train_args(tiny_benchmark, model_dir, "--num_steps=200",
                                                 "--checkpoint_every=1", "--learning_rate=1e8"))
    assert result.returncode == 3, result.stderr[-2000:]
    assert "training diverged" in result.stderr and "loss term" in result.stderr
    assert "Traceback" not in result.stderr
    last = checkpoints.latest_checkpoint(str(model_dir))
    assert last is not None
    assert f"the last good checkpoint, {last}, is kept" in result.stderr
    step = int(last.rsplit("-", 1)[1])
    for name, value in weights_of(model_dir, step).items():
        assert np.all(np.isfinite(value)), name


def damaged_source_run(tiny_benchmark, tmp_path):
    """A 12-step run over a source with every kind of damaged file, progress on, evaluated at the end:
    `(result, model_dir, root, images)`."""
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
    # Progress, TensorBoard pictures and the final evaluation on: the same run shows them (tests below).
    result = run(train_command(bench, model_dir, "--num_steps=12", "--checkpoint_every=6", "--verbose=1",
                               "--log_every=6", "--image_every=1000", "--evaluate=true"))
    return result, model_dir, root, images


@pytest.fixture(scope="module")
def damaged_run(tiny_benchmark, tmp_path_factory):
    return damaged_source_run(tiny_benchmark, tmp_path_factory.mktemp("damaged"))


def test_damaged_source_files_are_skipped_with_a_count(damaged_run):
    result, model_dir, root, images = damaged_run
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 3 of 6 source files" in result.stdout
    skipped = (model_dir / "skipped_files.txt").read_text()
    assert f"{root / 'labels' / images[0].name}: label is 32x16 but its image is 64x32" in skipped
    assert f"{images[1]}: the file is empty" in skipped
    assert f"{images[2]}: truncated PNG (no IEND chunk at its end)" in skipped
    # The PNG damaged in its middle passes the start-up checks: the input pipeline names it and counts it.
    damaged = f"{images[3]}: damaged PNG (the checksum of its IDAT chunk at byte 33 does not match)"
    assert damaged in skipped and len(skipped.splitlines()) == 4
    assert result.stdout.count(f"skipped {damaged}") == 1  # once, although the pipeline meets it every epoch
    assert "Traceback" not in result.stderr


def tensorboard_events(log_dir):
    """{tag: [(step, kind)]} of a run's event files."""
    from tensorflow.core.util import event_pb2

    found = {}
    for path in sorted(log_dir.glob("events*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                found.setdefault(value.tag, []).append(event.step)
    return found


def test_the_console_is_quiet_and_progress_counts_steps_in_plain_lines(damaged_run):
    result = damaged_run[0]
    # The run's process had oneDNN on, as users have it (conftest turns it off in the test processes only), so
    # its start-up line was there to be hidden.
    assert os.environ.get("TF_ENABLE_ONEDNN_OPTS") == conftest.USER_ONEDNN
    # TensorFlow's start-up lines on this CPU-only machine (with TF_CPP_MIN_LOG_LEVEL=2 as in run()).
    for noise in ("cuInit", "oneDNN", "cudart", "absl::InitializeLog", "local_rendezvous", "W0000", "I0000"):
        assert noise not in result.stderr, result.stderr[-2000:]
    assert not re.search(r"^[IWE]\d{4} ", result.stderr, re.M)  # no absl/glog-style line at all
    # Output to a pipe: one plain line per --log_every steps, no escape codes, no redraws, no Keras epochs.
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line[:10] for line in lines] == ["step  6/12", "step 12/12"]
    assert "steps/s" in lines[0] and "ETA" in lines[0] and " loss " in lines[0] and "seg_src" in lines[0]
    assert "\r" not in result.stdout and "\x1b" not in result.stdout and "Epoch" not in result.stdout


def test_tensorboard_gets_the_last_steps_pictures_and_the_final_val_miou(damaged_run):
    model_dir = damaged_run[1]
    events = tensorboard_events(model_dir / "logs")
    # --image_every=1000 on a 12-step run: step 0 and the last step.
    assert sorted(set(events["source/prediction"])) == [0, 12]
    assert events["val/miou"] == [12]


def test_missing_or_empty_dataset_folders_are_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    result = run_in_process("train", *train_args(tmp_path.parent, tmp_path / "run", "--num_steps=2",
                                                 f"--source_root={tmp_path}"))
    assert result.returncode == 2
    assert f"{tmp_path / 'images'}: no .png images found." in result.stderr
    assert not (tmp_path / "run").exists()  # a refused start leaves nothing behind


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    trainer = make_trainer("pit", run_eagerly=True)
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
    config = run_config(lse_r=(1.0,), lse_normalize=True)
    checkpoints.check_or_write_run_config(str(tmp_path), config)
    checkpoints.check_or_write_run_config(str(tmp_path), config)  # the same flags resume
    with pytest.raises(UserError, match="lse_normalize=True, not False"):
        checkpoints.check_or_write_run_config(str(tmp_path), dataclasses.replace(config, lse_normalize=False))
    with pytest.raises(UserError, match=re.escape("holds a run with lse_r=[1.0], not [0.5, 1.0]")):
        checkpoints.check_or_write_run_config(str(tmp_path), dataclasses.replace(config, lse_r=(0.5, 1.0)))
    # A run.json from before the key was recorded was trained with the old default (the paper's sum).
    old = {key: value for key, value in config.to_json().items() if key != "image_loss_reduction"}
    (tmp_path / "run.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="image_loss_reduction=sum, not mean"):
        checkpoints.check_or_write_run_config(str(tmp_path), config)


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
                                  "--momentum=-0.5", "--lambda_c=nan", "--keep_checkpoints=0"])
def test_numeric_flags_are_checked_before_anything_starts(tmp_path, flag):
    result = run_in_process("train", *train_args(tmp_path, tmp_path / "run", "--num_steps=2", flag))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--{flag.split('=')[0][2:]}=" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_every_file_failing_in_the_pipeline_stops_with_one_sentence(tiny_benchmark, tmp_path):
    root = tmp_path / "gta5"
    shutil.copytree(tiny_benchmark / "gta5", root)
    for image in sorted((root / "images").iterdir()):
        data = bytearray(image.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        image.write_bytes(bytes(data))
    shutil.copytree(tiny_benchmark / "cityscapes", tmp_path / "cityscapes")
    # The timeout catches a hang at exit (input-pipeline threads torn down while Python finalizes).
    result = run(train_command(tmp_path, tmp_path / "run", "--num_steps=12"), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no usable source images: all 6 failed when decoded, e.g. ")
    assert "damaged PNG" in lines[0]
    assert len((tmp_path / "run" / "skipped_files.txt").read_text().splitlines()) == 6


def test_the_pipeline_names_a_damaged_file_once_and_trains_on_the_others(tiny_benchmark, tmp_path):
    from pit_keras.data import gta5, pipeline

    root = tmp_path / "gta5"
    shutil.copytree(tiny_benchmark / "gta5", root)
    bad = sorted((root / "images").iterdir())[2]
    data = bytearray(bad.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    bad.write_bytes(bytes(data))
    label = sorted((root / "labels").iterdir())[4]
    data = bytearray(label.read_bytes())
    data[len(data) // 2] ^= 0xFF
    label.write_bytes(bytes(data))
    pairs = gta5.list_pairs(str(root))
    for cache in (False, True):
        reported = []
        ds = pipeline.source_dataset(pairs, gta5.read_train_ids, (32, 16), 2, on_error=lambda p, r: reported.append(p),
                                     cache=cache)
        batches = list(ds.take(8))  # two epochs of the 4 good pairs
        assert len(batches) == 8 and batches[0][0].shape == (2, 16, 32, 3)
        assert sorted(reported) == sorted([str(bad), str(label)])


def test_png_damage_is_found_by_the_chunk_checksums(tiny_benchmark):
    from pit_keras.data import integrity

    data = (tiny_benchmark / "gta5" / "images" / "00001.png").read_bytes()
    assert integrity.png_damage(data) is None
    assert integrity.png_damage(b"not a png") is None  # nothing to check: the decoder decides
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    assert "checksum of its IDAT chunk" in integrity.png_damage(bytes(flipped))
    assert integrity.png_damage(data[:-12]) == "truncated PNG (no IEND chunk at its end)"
    assert "runs past the end of the file" in integrity.png_damage(data[: len(data) // 2])


def test_progress_redraws_only_on_a_terminal_and_messages_start_their_own_line():
    import io

    from pit_keras import console

    plain = io.StringIO()
    line = console.ProgressLine(10, "step", every=5, stream=plain, interactive=False)
    for step in range(1, 11):
        line.update(step, {"loss": 1.0 / step})
    line.close()
    assert plain.getvalue().splitlines()[0].startswith("step  5/10") and len(plain.getvalue().splitlines()) == 2
    assert "\r" not in plain.getvalue()

    terminal = io.StringIO()
    line = console.ProgressLine(10, "step", every=5, stream=terminal, interactive=True, min_interval=0)
    line.update(6, {"loss": 0.5})
    assert terminal.getvalue().startswith("\rstep  6/10") and not terminal.getvalue().endswith("\n")
    console.message("skipped x.png: damaged PNG", file=terminal)  # ends the progress line first
    assert terminal.getvalue().endswith("loss 0.5000\nskipped x.png: damaged PNG\n")
    line.update(10, {"loss": 0.25})
    line.close()
    assert terminal.getvalue().endswith("loss 0.2500\n")


def test_the_rate_follows_fast_steps_over_windows_of_a_second(monkeypatch):
    import io
    import types

    from pit_keras import console

    # 40 steps a line; 50 steps/s up to step 80, then 100 steps/s: every line's window is under a second.
    def at(step):
        return step / 50 if step <= 80 else 80 / 50 + (step - 80) / 100

    clock = {"now": 0.0}
    monkeypatch.setattr(console, "time", types.SimpleNamespace(monotonic=lambda: clock["now"]))
    out = io.StringIO()
    line = console.ProgressLine(400, "step", every=40, stream=out, interactive=False)
    for step in range(1, 401):
        clock["now"] = at(step)
        line.update(step)
    rates = [float(text.split()[2]) for text in out.getvalue().splitlines()]
    assert len(rates) == 10 and rates[0] == pytest.approx(50.0)
    # The window goes on past a line until it spans a second: the rate then follows the faster steps.
    assert rates[-1] == pytest.approx(100.0) and rates[2] == pytest.approx(80 / 1.2, rel=1e-3)


def test_the_progress_callback_replaces_keras_epochs(capsys):
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    data = tf.data.Dataset.from_tensors((tf.ones((2, 1)), tf.ones((2, 1)))).repeat()
    model.fit(data, epochs=2, steps_per_epoch=2, verbose=0, shuffle=False,
              callbacks=[callbacks.Progress(num_steps=4, log_every=2, interactive=False)])
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"step 2/4  [\d.]+ steps/s  ETA 0s  loss [\d.]+  mae [\d.]+", lines[0]), lines
    assert re.fullmatch(r"step 4/4  [\d.]+ steps/s  loss [\d.]+  mae [\d.]+", lines[1]), lines


def test_quiet_stderr_drops_only_known_noise(capfd, monkeypatch):
    from pit_keras import console

    monkeypatch.setattr(console, "_quiet", True)
    with console.quiet_stderr():
        os.write(2, b"I0000 00:00:1796219023.328571   22820 port.cc:153] oneDNN custom operations are on.\n")
        os.write(2, b"E0000 00:00:1796219397.769643   27233 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n")
        os.write(2, b"E0000 00:00:1796219397.769643   27233 op.cc:1] something that matters\n")
    assert capfd.readouterr().err == "E0000 00:00:1796219397.769643   27233 op.cc:1] something that matters\n"


def test_the_first_generation_of_the_benchmark_says_so_once(tmp_path, capsys):
    from pit_keras.data import synthetic

    params = dict(num_source=1, num_target_train=1, num_target_val=1, size=(16, 8))
    synthetic.ensure(tmp_path / "bench", **params)
    out = capsys.readouterr().out
    assert out.startswith("generating the embedded benchmark: 3 images with their labels") and out.count("\n") == 1
    assert str(tmp_path / "bench") in out
    synthetic.ensure(tmp_path / "bench", **params)
    assert capsys.readouterr().out == ""


def untrained_run(model_dir):
    """A run folder (run.json and a checkpoint) of an untrained tiny network, without training."""
    from pit_keras.models.network import build_network

    config = run_config(lse_r=(1.0,), target_size=(32, 16))
    checkpoints.check_or_write_run_config(str(model_dir), config)
    network = build_network("tiny", 19, num_units=1)
    checkpoints.manager(network, None, str(model_dir)).save(checkpoint_number=0)
    return model_dir


def test_predict_goes_on_past_bad_images_and_mirrors_sub_folders(tiny_benchmark, tmp_path):
    model_dir = untrained_run(tmp_path / "run")
    inputs = tmp_path / "in"
    shutil.copytree(tiny_benchmark / "cityscapes" / "leftImg8bit", inputs)  # train/CITY/..., val/CITY/...
    (inputs / "val" / "mockfurt" / "broken.png").write_bytes(b"not an image")
    (inputs / "empty.jpg").write_bytes(b"")
    output = inputs / "predictions"  # inside the input: never read back as input
    result = run([sys.executable, "-m", "pit_keras.predict", f"--model={model_dir}", f"--input={inputs}",
                  f"--output_dir={output}"], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: 2 of 11 image(s) could not be read and have no outputs (each is named above), e.g. "
        f"{inputs / 'empty.jpg'}: not a readable image")
    assert f"skipped {inputs / 'val' / 'mockfurt' / 'broken.png'}: not a readable image" in result.stdout
    assert "segmented 9 image(s)" in result.stdout
    written = sorted(str(p.relative_to(output)) for p in output.rglob("*_labelTrainIds.png"))
    source = tiny_benchmark / "cityscapes" / "leftImg8bit"
    expected = sorted(str(p.relative_to(source).with_suffix("")) + "_labelTrainIds.png" for p in source.rglob("*.png"))
    assert written == expected and any("/" in name for name in written)
    for noise in ("cuInit", "oneDNN", "cudart", "absl::InitializeLog"):
        assert noise not in result.stderr


def test_two_images_that_would_write_the_same_outputs_are_refused(tmp_path):
    from pit_keras.data import images

    for name in ("a.png", "a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"")
    listed = images.list_images(str(tmp_path))
    with pytest.raises(UserError, match="a.jpg and .*a.png would write the same outputs \\(a_labelTrainIds.png\\)"):
        images.output_names(listed, str(tmp_path))
    # An output that would be an input image: predict run into the input folder, beside a photo named like one.
    (tmp_path / "b_overlay.png").write_bytes(b"")
    listed = images.list_images(str(tmp_path))
    images.output_names(listed[1:], str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(UserError, match=f"--output_dir={tmp_path}: predict would write .*b_overlay.png, which is one "
                                        "of the input images"):
        images.output_names(listed[1:], str(tmp_path), str(tmp_path))
