"""The command lines as users run them: a short train run, resume, evaluate, and one-sentence errors."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def run(module, *args, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", f"pit_keras.{module}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def train_args(bench, model_dir, *extra):
    return ("--source=gta5", f"--source_root={bench / 'gta5'}", "--target=cityscapes",
            f"--target_root={bench / 'cityscapes'}", "--source_size=64,32", "--target_size=64,32",
            "--batch_size=2", "--learning_rate=0.01", "--log_every=2", "--checkpoint_every=2", "--image_every=2",
            "--image_labels=ground_truth", f"--model_dir={model_dir}", "--verbose=2", *extra)


@pytest.fixture(scope="module")
def trained_run(tiny_benchmark, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("runs") / "pit"
    first = run("train", *train_args(tiny_benchmark, model_dir, "--num_steps=4"))
    return model_dir, first


def test_train_writes_checkpoints_logs_and_results(trained_run):
    model_dir, result = trained_run
    assert result.returncode == 0, result.stderr[-2000:]
    assert "target val mIoU" in result.stdout
    assert sorted(os.listdir(model_dir / "checkpoints"))[0] == "checkpoint"
    assert any(name.startswith("ckpt-4") for name in os.listdir(model_dir / "checkpoints"))
    assert any(name.startswith("events") for name in os.listdir(model_dir / "logs"))
    results = json.loads((model_dir / "eval_val.json").read_text())
    assert results["num_images"] == 3 and 0 <= results["miou"] <= 100
    assert len(results["per_class_iou"]) == 19


def test_train_resumes_from_the_newest_checkpoint_and_evaluate_agrees(trained_run, tiny_benchmark, tmp_path):
    model_dir, _ = trained_run
    resumed = run("train", *train_args(tiny_benchmark, model_dir, "--num_steps=6"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 4" in resumed.stdout and "trained to step 6" in resumed.stdout
    output = tmp_path / "eval.json"
    evaluated = run("evaluate", f"--model_dir={model_dir}", "--target=cityscapes",
                    f"--target_root={tiny_benchmark / 'cityscapes'}", "--split=val", f"--output={output}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    from_train = json.loads((model_dir / "eval_val.json").read_text())
    from_evaluate = json.loads(output.read_text())
    assert from_evaluate["checkpoint"] == "ckpt-6"
    assert from_evaluate["miou"] == pytest.approx(from_train["miou"], abs=1e-6)


@pytest.mark.parametrize("method", ["source_only", "minent"])
def test_baselines_train_and_log_images(method, tiny_benchmark, tmp_path):
    args = [a for a in train_args(tiny_benchmark, tmp_path / method, "--num_steps=2", f"--method={method}",
                                  "--evaluate=false") if not a.startswith("--image_labels")]
    result = run("train", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained to step 2" in result.stdout


def test_model_dir_with_another_architecture_is_refused(trained_run, tiny_benchmark):
    model_dir, _ = trained_run
    result = run("train", *train_args(tiny_benchmark, model_dir, "--num_steps=8", "--lse_r=1"))
    assert result.returncode == 2
    assert "holds a run with lse_r=[0.5, 1.0, 1.5]" in result.stderr


@pytest.mark.parametrize("args,message", [
    (("--bogus_flag=1",), "Unknown command line flag 'bogus_flag'"),
    (("--model_dir=x", "--method=pit"), "--method=pit needs --image_labels"),
    (("--model_dir=x", "--method=source_only", "--image_labels=ground_truth"), "only used by --method=pit"),
    (("--model_dir=x", "--method=source_only", "--source_size=256x128"), "--source_size=256x128: expected W,H"),
    (("--method=source_only",), "--model_dir is required"),
    (("--model_dir=x", "--method=source_only", "--source=gta5"), "--source_root is required for --source=gta5"),
    (("--model_dir=x", "--image_labels=ground_truth", "--lse_r=1,a"), "--lse_r=1,a: expected"),
    (("--model_dir=x", "--image_labels=ground_truth", "--image_labels_prior=p.json"),
     "--image_labels_prior only applies with --image_labels=teacher"),
    (("--model_dir=x", "--image_labels=teacher", "--self_training", "--image_label_confidence=agreement"),
     "--image_label_confidence=agreement needs --image_labels_prior"),
])
def test_bad_flags_fail_fast_with_one_sentence(args, message):
    result = run("train", "--source=synthetic", "--target=synthetic", *args, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_dataset_folder_is_named(tmp_path):
    result = run("train", "--method=source_only", f"--model_dir={tmp_path / 'run'}", "--source=gta5",
                 f"--source_root={tmp_path / 'nowhere'}", "--target=cityscapes", f"--target_root={tmp_path}")
    assert result.returncode == 2
    assert f"{tmp_path / 'nowhere' / 'images'}: no such folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_without_a_run_is_refused(tmp_path):
    result = run("evaluate", f"--model_dir={tmp_path}", "--target=cityscapes", f"--target_root={tmp_path}")
    assert result.returncode == 2
    assert "holds no training run" in result.stderr
