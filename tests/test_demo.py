"""The quick-start demo is unsupervised: flags/demo.cfg itself (fewer steps, a tiny benchmark) trains with every
target label file deleted, and a run stopped mid-way resumes its student and its EMA teacher exactly. One
uninterrupted run serves both tests."""

import shutil

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from commands import run_in_process


def demo(bench, model_dir, *extra):
    """The train command with flags/demo.cfg on `bench`, in this process (tests/commands.py)."""
    return run_in_process(
        "train", "--flagfile=flags/demo.cfg", "--source=gta5", f"--source_root={bench / 'gta5'}",
        "--target=cityscapes", f"--target_root={bench / 'cityscapes'}", "--source_size=64,32", "--target_size=64,32",
        "--batch_size=2", "--log_every=2", "--image_every=2", "--verbose=0", f"--model_dir={model_dir}", *extra)


# Deterministic, a checkpoint every 3 steps: the stopped run resumes from the middle one.
STEPS = ["--num_steps=6", "--checkpoint_every=3", "--evaluate=false", "--deterministic"]


@pytest.fixture(scope="module")
def unlabelled_benchmark(tiny_benchmark, tmp_path_factory):
    """The tiny benchmark without any target label file."""
    bench = tmp_path_factory.mktemp("demo") / "benchmark"
    shutil.copytree(tiny_benchmark, bench)
    shutil.rmtree(bench / "cityscapes" / "gtFine")  # train and val labels alike
    return bench


@pytest.fixture(scope="module")
def demo_run(unlabelled_benchmark, tmp_path_factory):
    """The demo trained for 6 steps without target labels, TensorBoard pictures every 2: `(model_dir, result)`."""
    model_dir = tmp_path_factory.mktemp("demo_run") / "straight"
    return model_dir, demo(unlabelled_benchmark, model_dir, *STEPS)


def test_the_demo_trains_with_every_target_label_deleted(demo_run):
    model_dir, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no target label is read" in result.stdout
    assert "trained to step 6" in result.stdout
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints" / "ckpt-6"))
    assert any(name.startswith("teacher/") for name in reader.get_variable_to_shape_map())
    # The run was --deterministic, in this process: tests/commands.py turned op determinism off again after it.
    assert not tf_config.is_op_determinism_enabled()


def checkpoint_values(model_dir, step, prefix):
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints" / f"ckpt-{step}"))
    names = sorted(n for n in reader.get_variable_to_shape_map()
                   if n.startswith(prefix) and "OPTIMIZER_SLOT" not in n and n.endswith("VARIABLE_VALUE"))
    assert names
    return {n: reader.get_tensor(n) for n in names}


def test_a_stopped_demo_resumes_student_and_teacher(demo_run, unlabelled_benchmark, tmp_path):
    straight, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    # A run stopped after its step-3 checkpoint: the same folder without what came after it.
    stopped = tmp_path / "stopped"
    shutil.copytree(straight, stopped)
    for path in (stopped / "checkpoints").glob("ckpt-6.*"):
        path.unlink()
    (stopped / "checkpoints" / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-3"\n')
    resumed = demo(unlabelled_benchmark, stopped, *STEPS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    for prefix in ("network/", "teacher/"):
        a = checkpoint_values(straight, 6, prefix)
        b = checkpoint_values(stopped, 6, prefix)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
