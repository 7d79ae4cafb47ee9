"""The quick-start demo is unsupervised: flags/demo.cfg itself (fewer steps, a tiny benchmark) trains with every
target label file deleted, and a run stopped mid-way resumes its student and its EMA teacher exactly."""

import os
import shutil
import subprocess
import sys

import numpy as np
import tensorflow as tf

from conftest import REPO


def demo_command(bench, model_dir, *extra):
    return [sys.executable, "-m", "pit_keras.train", "--flagfile=flags/demo.cfg", "--source=gta5",
            f"--source_root={bench / 'gta5'}", "--target=cityscapes", f"--target_root={bench / 'cityscapes'}",
            "--source_size=64,32", "--target_size=64,32", "--batch_size=2", "--log_every=2", "--image_every=2",
            "--verbose=0", f"--model_dir={model_dir}", *extra]


def run(command):
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def test_the_demo_trains_with_every_target_label_deleted(tiny_benchmark, tmp_path):
    bench = tmp_path / "benchmark"
    shutil.copytree(tiny_benchmark, bench)
    shutil.rmtree(bench / "cityscapes" / "gtFine")  # train and val labels alike
    result = run(demo_command(bench, tmp_path / "run", "--num_steps=4", "--evaluate=false"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no target label is read" in result.stdout
    assert "trained to step 4" in result.stdout
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "ckpt-4"))
    assert any(name.startswith("teacher/") for name in reader.get_variable_to_shape_map())


def checkpoint_values(model_dir, step, prefix):
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints" / f"ckpt-{step}"))
    names = sorted(n for n in reader.get_variable_to_shape_map()
                   if n.startswith(prefix) and "OPTIMIZER_SLOT" not in n and n.endswith("VARIABLE_VALUE"))
    assert names
    return {n: reader.get_tensor(n) for n in names}


def test_a_stopped_demo_resumes_student_and_teacher(tiny_benchmark, tmp_path):
    steps = ["--num_steps=6", "--checkpoint_every=3", "--evaluate=false", "--image_every=0", "--deterministic"]
    straight = run(demo_command(tiny_benchmark, tmp_path / "straight", *steps))
    assert straight.returncode == 0, straight.stderr[-3000:]
    # A run stopped after its step-3 checkpoint: the same folder without what came after it.
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "straight", stopped)
    for path in (stopped / "checkpoints").glob("ckpt-6.*"):
        path.unlink()
    (stopped / "checkpoints" / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-3"\n')
    resumed = run(demo_command(tiny_benchmark, stopped, *steps))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    for prefix in ("network/", "teacher/"):
        a = checkpoint_values(tmp_path / "straight", 6, prefix)
        b = checkpoint_values(stopped, 6, prefix)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
