"""The command lines as users run them: the shared trained run (conftest.py) and evaluate, each in a process of
its own; resuming, the baselines' short runs and the one-sentence errors in the test's process
(tests/commands.py)."""

import json
import os
import re
import shutil

import pytest

from commands import run, run_in_process
from conftest import REPO, TRAINED_RUN_STEPS, trained_run_args


def train_args(bench, model_dir, *extra):
    return ("--source=gta5", f"--source_root={bench / 'gta5'}", "--target=cityscapes",
            f"--target_root={bench / 'cityscapes'}", "--source_size=64,32", "--target_size=64,32",
            "--batch_size=2", "--learning_rate=0.01", "--log_every=2", "--checkpoint_every=2", "--image_every=2",
            "--image_labels=ground_truth", f"--model_dir={model_dir}", "--verbose=2", *extra)


def test_train_writes_checkpoints_logs_and_results(trained_run):
    # The shared run (conftest.py), trained by `python -m pit_keras.train` in a process of its own.
    model_dir, result = trained_run
    assert result.returncode == 0, result.stderr[-2000:]
    assert "target val mIoU" in result.stdout
    assert sorted(os.listdir(model_dir / "checkpoints"))[0] == "checkpoint"
    assert any(name.startswith(f"ckpt-{TRAINED_RUN_STEPS}.") for name in os.listdir(model_dir / "checkpoints"))
    assert any(name.startswith("events") for name in os.listdir(model_dir / "logs"))
    results = json.loads((model_dir / "eval_val.json").read_text())
    assert results["num_images"] == 3 and 0 <= results["miou"] <= 100
    assert len(results["per_class_iou"]) == 19


def test_train_resumes_from_the_newest_checkpoint_and_evaluate_agrees(trained_run, tiny_benchmark, tmp_path):
    model_dir = tmp_path / "pit"
    shutil.copytree(trained_run[0], model_dir)
    steps = TRAINED_RUN_STEPS + 2
    # In the test's process (a subprocess is killed and resumed in tests/test_reliability.py).
    args = [a for a in trained_run_args(tiny_benchmark, model_dir) if not a.startswith("--num_steps=")]
    resumed = run_in_process("train", *args, f"--num_steps={steps}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {TRAINED_RUN_STEPS}" in resumed.stdout and f"trained to step {steps}" in resumed.stdout
    output = tmp_path / "eval.json"
    evaluated = run("evaluate", f"--model_dir={model_dir}", "--target=cityscapes",
                    f"--target_root={tiny_benchmark / 'cityscapes'}", "--split=val", f"--output={output}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    from_train = json.loads((model_dir / "eval_val.json").read_text())
    from_evaluate = json.loads(output.read_text())
    assert from_evaluate["checkpoint"] == from_train["checkpoint"] == f"ckpt-{steps}"
    assert from_evaluate["miou"] == pytest.approx(from_train["miou"], abs=1e-6)


@pytest.mark.parametrize("method", ["source_only", "minent"])
def test_baselines_train_and_log_images(method, tiny_benchmark, tmp_path):
    args = [a for a in train_args(tiny_benchmark, tmp_path / method, "--num_steps=2", f"--method={method}",
                                  "--evaluate=false") if not a.startswith("--image_labels")]
    result = run_in_process("train", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained to step 2" in result.stdout


def test_model_dir_with_another_architecture_is_refused(trained_run, tiny_benchmark, tmp_path):
    model_dir = tmp_path / "pit"
    shutil.copytree(trained_run[0], model_dir)
    result = run_in_process("train", *train_args(tiny_benchmark, model_dir, "--num_steps=8", "--lse_r=1"))
    assert result.returncode == 2
    assert "holds a run with lse_r=[0.5, 1.0, 1.5]" in result.stderr


@pytest.mark.parametrize("args,message", [
    (("--bogus_flag=1",), "error: unknown flag --bogus_flag; --help lists the flags."),
    (("--learning_rat=1",), "error: unknown flag --learning_rat (did you mean --learning_rate?); "),
    (("--method=pitt",), "error: --method=pitt: value should be one of <pit|source_only|minent>."),
    (("--backbone=resnet7",), "error: --backbone=resnet7: value should be one of <tiny|mobilenetv3_small|"
                              "mobilenetv3_large|deeplabv2_resnet101|fcn8s_vgg16>."),
    (("--evaluate=maybe",), "error: --evaluate=maybe: expected true or false."),
    (("--noevaluate=1",), "error: --noevaluate=1 does not take an argument."),
    (("--flagfile=flags/nope.cfg",), "error: --flagfile=flags/nope.cfg: cannot be read (No such file or directory)."),
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
    result = run_in_process("train", "--source=synthetic", "--target=synthetic", *args)
    assert result.returncode == 2  # bad input; 1 is kept for bugs
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_a_backbone_name_is_refused_before_tensorflow_loads(tmp_path):
    # train in a process where importing TensorFlow or Keras fails: the name is checked with the flags.
    import subprocess
    import sys

    from pit_keras import config
    from pit_keras.models import backbones

    assert config.BACKBONE_NAMES == tuple(backbones.BACKBONES)  # the flag's names are the registry's
    code = ("import runpy, sys\n"
            "sys.modules.update(tensorflow=None, keras=None)\n"
            f"sys.argv = ['train', '--backbone=resnet7', '--model_dir={tmp_path / 'run'}']\n"
            "runpy.run_module('pit_keras.train', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: --backbone=resnet7: value should be one of")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command,flag", [("train", "label_map"), ("evaluate", "predictions_dir"),
                                          ("export", "formats"), ("predict", "overlay_alpha"),
                                          ("image_labels", "label_map")])
def test_help_lists_the_commands_own_flags_and_exits_0(command, flag):
    result = run(command, "--help")  # its own process (absl lists the main module's flags; no TensorFlow import)
    assert result.returncode == 0, result.stderr[-2000:]
    listed = set(re.findall(r"^  --(?:\[no\])?(\w+):", result.stdout, re.M))
    assert {flag, "tf_logs"} <= listed and "logtostderr" not in listed  # absl's own stay in --helpfull
    assert ("label_map" in listed) == (command in ("train", "image_labels"))


def test_missing_dataset_folder_is_named(tmp_path):
    result = run_in_process("train", "--method=source_only", f"--model_dir={tmp_path / 'run'}", "--source=gta5",
                            f"--source_root={tmp_path / 'nowhere'}", "--target=cityscapes",
                            f"--target_root={tmp_path}")
    assert result.returncode == 2
    assert f"{tmp_path / 'nowhere' / 'images'}: no such folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_without_a_run_is_refused(tmp_path):
    result = run_in_process("evaluate", f"--model_dir={tmp_path}", "--target=cityscapes",
                            f"--target_root={tmp_path}")
    assert result.returncode == 2
    assert "holds no training run" in result.stderr
