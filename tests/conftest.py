"""Shared fixtures: a tiny generated benchmark on disk, the path of the real Cityscapes frame in tests/data/, and
run configurations for tests (`run_config`, `write_run_config`).

The suite runs on pytest-xdist's workers (setup.cfg: `-n auto`), each a process of its own. What is expensive
to make and never written to (the benchmark, the shared trained run) is made once per test run, by whichever
worker needs it first, and read by the others (`made_once`)."""

import contextlib
import fcntl
import functools
import gc
import json
import os
import pathlib
import shutil
import subprocess

import pytest

from pit_keras import atomic

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow's oneDNN kernels are off in the test processes: the tests trace hundreds of tiny graphs, and oneDNN's
# set-up per graph costs about an eighth of their CPU (tests/test_trainer.py and test_method.py: 96.6 s of user
# time on, 84.5 s off). TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it loads; the variable is put back
# right after, so the commands the tests start in processes of their own run as users run them, oneDNN on.
USER_ONEDNN = os.environ.get("TF_ENABLE_ONEDNN_OPTS")


def _runs_tests(config):
    """False in xdist's controller process, which only hands out the tests (xdist registers "dsession" there)."""
    return not config.pluginmanager.hasplugin("dsession")


@pytest.hookimpl(trylast=True)  # after pytest-xdist's, which registers "dsession"
def pytest_configure(config):
    """Sets TensorFlow up in a process that runs tests, before any test file imports it; xdist's controller
    process does not load it."""
    if _runs_tests(config):
        _set_up_tensorflow()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """The tests are over: full garbage collections until one finds nothing (at most five, as pytest's own), then
    the heap is frozen (`gc.freeze`). Whatever a finalizer of cyclic garbage raises still reaches pytest's report
    of unraisable exceptions (it is raised during those collections); pytest's collections at the end and
    Python's at exit then skip the heap of traced graphs TensorFlow leaves behind (measured: a test process
    ended 4-5 s sooner; a whole run 10 s -> 2.4 s from its last test to its end)."""
    if _runs_tests(session.config):
        for _ in range(5):
            if not gc.collect():
                break
        gc.freeze()


def _set_up_tensorflow():
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = USER_ONEDNN or "0"
    from tensorflow.python.util import _pywrap_util_port

    from pit_keras.training import distribute

    _pywrap_util_port.IsMklEnabled()  # read now
    if USER_ONEDNN is None:
        del os.environ["TF_ENABLE_ONEDNN_OPTS"]
    _without_autotune()
    # Two logical CPU devices, made before TensorFlow starts: the mirrored-strategy tests run in-process on
    # "/cpu:0" and "/cpu:1"; everything else runs on the first, as it would alone.
    distribute.configure_cpu_replicas(2)


def _without_autotune():
    """tf.data's autotuner is off for the iterators made in test processes. In TensorFlow 2.21 an iterator's
    teardown can wait out the autotuner's current period, up to a minute, with no CPU used: the cancellation
    callback wakes its optimisation loop before `IsCancelled()` turns true, and the loop sleeps again. Deleted
    iterators of earlier tests stalled 1 to 3 tests a run for 10 to 40 s each. Autotuning sets buffer sizes and
    parallelism, never the order of the elements, so what the tests check is unchanged; the commands the tests
    start in processes of their own run with it, as users run them. TensorFlow applies `_apply_debug_options`
    to a dataset wherever it makes an iterator (eager, in a tf.function, per device, distributed)."""
    import tensorflow as tf
    from tensorflow.python.data.ops import dataset_ops

    options = tf.data.Options()
    options.autotune.enabled = False
    apply_debug_options = dataset_ops.DatasetV2._apply_debug_options

    def without_autotune(dataset):
        return apply_debug_options(dataset).with_options(options)

    dataset_ops.DatasetV2._apply_debug_options = without_autotune


@functools.cache
def mirrored_strategy():
    """The test process's one MirroredStrategy over its two logical CPUs. A second one would hand out the first
    one's collective keys again, for tensors of other shapes, and TensorFlow would abort the collective."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def build_micro(weights=None):
    """A backbone of one synchronized-BatchNorm convolution (output stride 8, like tiny's), for tests whose
    subject is not the backbone and whose cost is tracing or compiling its steps: a trainer under a distribution
    strategy (the reduction over replicas, the teacher's update, the learning-rate multipliers, the workers'
    sync), XLA's compiled step, which checkpoint `--eval_every` keeps, the benchmark tool's report. Under a
    strategy each of the tiny backbone's eight BatchNorm layers costs three all-reduces to trace per forward
    pass (measured: three mirrored self-training steps 9.8 -> 3.6 s of CPU)."""
    import keras

    from pit_keras.models import backbones

    image = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(image)
    return keras.Model(image, backbones._conv_bn_relu(x, 16, "down", strides=8), name="micro")


def micro_spec():
    """The registry entry (`backbones.BACKBONES`) of `build_micro`, named "micro" (a RunConfig's or the benchmark
    tool's backbone; the train command's --backbone takes the built-in names only)."""
    import dataclasses

    from pit_keras.models import backbones

    return dataclasses.replace(backbones.BACKBONES["tiny"], name="micro", build=build_micro,
                               description="one convolution, for tests whose subject is not the backbone")


@contextlib.contextmanager
def micro_backbone():
    """The micro backbone registered as "micro" inside the block only, so that no other test of the same process
    sees it."""
    from pit_keras.models import backbones

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(backbones.BACKBONES, "micro", micro_spec())
        yield


# The test files that take longest (by `--durations=0` on 2 cores), heaviest first. xdist hands a worker a
# whole file at a time in collection order (setup.cfg: `--dist loadfile --no-loadscope-reorder`), so the long files
# start first and the short ones fill in at the end, and neither worker is left running a long file alone.
LONGEST_FIRST = ["test_reliability.py", "test_distribute.py", "test_backbones.py", "test_method.py",
                 "test_benchmark.py", "test_export.py", "test_cli.py", "test_trainer.py", "test_deploy.py",
                 "test_image_labels.py", "test_demo.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a file's tests keep their order


def expect(check, mistake):
    """Runs `check`; with a deliberate mistake in place it must turn red (raise AssertionError)."""
    if mistake:
        with pytest.raises(AssertionError):
            check()
    else:
        check()


REPO = pathlib.Path(__file__).resolve().parents[1]
CITYSCAPES_FRAME = REPO / "tests" / "data" / "cityscapes_frame"


@pytest.fixture
def eager_steps(monkeypatch):
    """The trainers `runner.build_trainer` makes run their steps eagerly (Keras' `run_eagerly`), for a run of a
    few steps that tests what happens around them (a divergence caught) rather than the step itself: the same
    numbers without a trace of the train step (measured in a full run: 5.1 -> 1.8 s of CPU). An eager step costs
    several traced ones, so a longer run gains nothing. The commands' own tests, and every test of a step's
    tracing, run the traced step as users do."""
    from pit_keras.training import runner

    build_trainer = runner.build_trainer

    def eager(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.run_eagerly = True
        return trainer

    monkeypatch.setattr(runner, "build_trainer", eager)


def run_config(bench=None, **overrides):
    """A `RunConfig` for tests: PIT with ground-truth image labels on the benchmark at `bench` (the
    `tiny_benchmark` fixture; a folder that need not exist for a config that reads no data) at 64x32, the tiny
    backbone without pretrained weights, `lse_normalize` off, 4 steps of batch 4 at learning rate 0.01, momentum
    0.9; other settings at the train flags' defaults. `overrides` replace any of them (a method other than PIT
    needs `image_labels=None`)."""
    from pit_keras.config import RunConfig

    bench = pathlib.Path(bench) if bench is not None else REPO / "no_benchmark"
    settings = dict(
        source="gta5", source_root=str(bench / "gta5"), target="cityscapes", target_root=str(bench / "cityscapes"),
        source_size=(64, 32), target_size=(64, 32), backbone="tiny", backbone_weights="none", method="pit",
        lse_r=(0.5, 1.0, 1.5), lse_normalize=False, image_labels="ground_truth", batch_size=4, num_steps=4,
        learning_rate=0.01, momentum=0.9)
    settings.update(overrides)
    return RunConfig(**settings)


def write_run_config(model_dir, **overrides):
    """Writes MODEL_DIR/run.json of `run_config(**overrides)`, for a run folder whose checkpoint a test saves
    itself; returns the config."""
    config = run_config(**overrides)
    os.makedirs(model_dir, exist_ok=True)
    atomic.write_json_atomic(os.path.join(model_dir, "run.json"), config.to_json())
    return config


def made_once(tmp_path_factory, name, make):
    """`make(folder)`'s JSON-able result, made once per test run in `folder` (under pytest's base temporary
    folder, shared by the xdist workers of one run): the first worker to ask makes it while the others wait on a
    lock, then every worker reads the recorded result. A `make` that raises leaves no record, and the next
    asker starts again in an emptied `folder` (a train run must not resume a failed attempt's checkpoints)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, record = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            shutil.rmtree(folder, ignore_errors=True)
            result = make(folder)
            atomic.write_json_atomic(str(record), result)
        return json.loads(record.read_text())


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory):
    """A small two-domain benchmark (GTA5 + Cityscapes layouts) at 64x32; returns its root."""
    def make(folder):
        from pit_keras.data import synthetic

        synthetic.generate(folder / "benchmark", num_source=6, num_target_train=6, num_target_val=3, size=(64, 32),
                           seed=0)
        return str(folder / "benchmark")

    return pathlib.Path(made_once(tmp_path_factory, "bench", make))


TRAINED_RUN_STEPS = 240


def trained_run_args(bench, model_dir):
    """The train flags of the shared `trained_run` (its folder aside); tests/test_reliability.py interrupts a run
    with the same flags and compares it with the shared one."""
    return ["--source=gta5", f"--source_root={bench / 'gta5'}", "--target=cityscapes",
            f"--target_root={bench / 'cityscapes'}", "--source_size=64,32", "--target_size=64,32", "--batch_size=2",
            "--learning_rate=0.05", f"--num_steps={TRAINED_RUN_STEPS}", "--checkpoint_every=40", "--log_every=40",
            "--image_every=0", "--image_labels=ground_truth", "--deterministic", "--evaluate=true", "--verbose=2",
            f"--model_dir={model_dir}"]


@pytest.fixture(scope="session")
def trained_run(tiny_benchmark, tmp_path_factory):
    """One PIT run (three coarse units, ground-truth image labels) trained for real by `python -m pit_keras.train`
    in a process of its own, shared by every test that needs a trained run folder (the train command's own
    results, resuming, evaluate, export, predict, interrupted runs): 240 deterministic steps at 64x32 and learning
    rate 0.05, so its labels are not trivial; a checkpoint every 40 steps (the newest three kept), progress lines,
    evaluated on the benchmark's val split at the end. Returns `(model_dir, result)`, `result` the finished
    process. Never written to: a test that resumes or damages a run works on a copy (`shutil.copytree`)."""
    def make(folder):
        from commands import run

        result = run("train", *trained_run_args(tiny_benchmark, folder / "pit"))
        assert result.returncode == 0, result.stderr[-2000:]
        return {"model_dir": str(folder / "pit"), "args": result.args, "returncode": result.returncode,
                "stdout": result.stdout, "stderr": result.stderr}

    made = made_once(tmp_path_factory, "trained_run", make)
    return pathlib.Path(made["model_dir"]), subprocess.CompletedProcess(made["args"], made["returncode"],
                                                                        made["stdout"], made["stderr"])


TWO_WORKER_SETTINGS = dict(backbone="micro", num_steps=4, batch_size=4, learning_rate=0.01, momentum=0.9)


@pytest.fixture(scope="session")
def two_worker_run(tiny_benchmark, tmp_path_factory):
    """One PIT run (`run_config` on the tiny benchmark with `TWO_WORKER_SETTINGS`: the micro backbone) on two
    local worker processes under MultiWorkerMirroredStrategy (tests/cluster.py), shared by the distribution tests:
    returns its folder (FOLDER/run, FOLDER/w0.npz, FOLDER/w1.npz and their .initial.npz, FOLDER/tmp)."""
    def make(folder):
        from cluster import run_two_workers

        run_two_workers(run_config(tiny_benchmark, **TWO_WORKER_SETTINGS), folder)
        return str(folder)

    return pathlib.Path(made_once(tmp_path_factory, "two_worker_run", make))
