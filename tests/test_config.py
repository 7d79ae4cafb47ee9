"""`RunConfig` (pit_keras/config.py) and its run.json: the round trip, older files read with the values their
runs were trained with, unknown keys and bad values refused in one sentence, and the train flags building the
same configuration. No training."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_config
from pit_keras import runs
from pit_keras.config import MIGRATIONS, RunConfig
from pit_keras.errors import UserError

# The keys of the first run.json files (the core slice's train.parse_config).
FIRST_RUN_KEYS = ("source", "source_root", "target", "target_root", "source_size", "target_size", "backbone",
                  "backbone_weights", "num_classes", "class_set", "method", "lse_r", "lse_normalize", "lambda_c",
                  "lambda_r", "lambda_ent", "recon_domains", "loss_resolution", "interaction_lr_multiplier",
                  "image_labels", "batch_size", "num_steps", "learning_rate", "momentum", "weight_decay",
                  "poly_power", "seed")


def write(folder, payload):
    os.makedirs(folder, exist_ok=True)
    (folder / runs.RUN_FILE).write_text(json.dumps(payload))
    return str(folder / runs.RUN_FILE)


def test_a_config_round_trips_through_run_json(tmp_path):
    from pit_keras.training import checkpoints  # the writer a run uses

    config = run_config(tmp_path, source="synthia", self_training=True, image_labels="teacher",
                        image_labels_prior="prior.json", image_label_confidence="agreement", st_class_portion=0.2,
                        recon_domains=("target",), benchmark_seed=3)
    assert (config.num_classes, config.class_set, config.num_units) == (16, "synthia16", 3)
    checkpoints.check_or_write_run_config(str(tmp_path), config)
    written = json.loads((tmp_path / runs.RUN_FILE).read_text())
    assert sorted(written) == sorted(f.name for f in dataclasses.fields(RunConfig))
    assert written["lse_r"] == [0.5, 1.0, 1.5] and written["source_size"] == [64, 32]
    assert runs.read_config(str(tmp_path)) == config
    assert RunConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_an_older_run_json_reads_with_the_values_its_run_was_trained_with(tmp_path):
    current = run_config(tmp_path).to_json()
    first = {key: current[key] for key in FIRST_RUN_KEYS}
    write(tmp_path / "first", first)
    config = runs.read_config(str(tmp_path / "first"))
    assert config.image_loss_reduction == "sum" and config.head_lr_multiplier == 1.0
    assert not config.self_training and config.image_labels_prior is None and config.st_class_portion == 0.0
    assert config.aspp_implementation == "matmul" and config.mixed_precision == "float32"
    # lse_normalize and interaction_lr_multiplier were recorded from the first run on, with their own values ...
    assert (config.lse_normalize, config.interaction_lr_multiplier) == (False, 1.0)
    # ... but a file without them predates their recorded defaults (the old defaults checkpoints.py recorded for them).
    oldest = {key: value for key, value in first.items() if key not in ("lse_normalize", "interaction_lr_multiplier")}
    write(tmp_path / "oldest", oldest)
    config = runs.read_config(str(tmp_path / "oldest"))
    assert (config.lse_normalize, config.interaction_lr_multiplier) == (False, 0.01)
    # Every setting a run.json may lack takes its listed value.
    bare = {key: value for key, value in current.items() if key not in MIGRATIONS}
    write(tmp_path / "bare", bare)
    config = runs.read_config(str(tmp_path / "bare"))
    assert {key: getattr(config, key) for key in MIGRATIONS} == MIGRATIONS


def test_unknown_and_missing_keys_are_refused_naming_the_file(tmp_path):
    current = run_config(tmp_path).to_json()
    path = write(tmp_path / "unknown", {**current, "lse_temperature": 2.0})
    with pytest.raises(UserError, match=f"^{path}: unknown setting 'lse_temperature'"):
        runs.read_config(str(tmp_path / "unknown"))
    path = write(tmp_path / "missing", {k: v for k, v in current.items() if k != "backbone"})
    with pytest.raises(UserError, match=f"^{path} lacks the setting 'backbone'"):
        runs.read_config(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="holds no training run"):
        runs.read_config(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("overrides,message", [
    ({"st_ema": 1.5}, "--st_ema=1.5: must be between 0.0 and 1.0."),
    ({"method": "adversarial"}, "--method=adversarial: expected one of pit, source_only, minent."),
    ({"learning_rate": float("nan")}, "--learning_rate=nan: must be a finite number, 0 or more."),
    ({"batch_size": 0}, "--batch_size=0: must be positive."),
    ({"batch_size": 2.5}, "--batch_size=2.5: expected an integer."),
    ({"lse_r": (1.0, -1.0)}, "--lse_r=1.0,-1.0: pit needs one or more positive values."),
    ({"recon_domains": ("source", "sky")}, "--recon_domains=source,sky: sky is not one of source, target."),
    ({"image_labels": None}, "--method=pit needs --image_labels"),
    ({"image_labels": "teacher"}, "--image_labels=teacher needs --self_training"),
    ({"method": "minent"}, "--image_labels is only used by --method=pit, not --method=minent."),
    ({"label_map": "map.json"}, "--label_map applies to --source=folder only, not --source=gta5."),
    ({"target_size": (64, 0)}, "--target_size=64,0: width and height must be positive."),
])
def test_an_invalid_value_is_refused_naming_the_flag(tmp_path, overrides, message):
    with pytest.raises(UserError) as raised:
        run_config(tmp_path, **overrides)
    assert str(raised.value).startswith(message), str(raised.value)


def test_derived_variants_and_run_json_files_are_checked_too(tmp_path):
    with pytest.raises(UserError, match="^--st_ema=2.0"):
        dataclasses.replace(run_config(tmp_path), st_ema=2.0)
    path = write(tmp_path / "bad", {**run_config(tmp_path).to_json(), "st_ema": 2.0})
    with pytest.raises(UserError, match=f"^{path}: --st_ema=2.0: must be between"):
        runs.read_config(str(tmp_path / "bad"))


PARSE = """
import json
from absl import flags
import pit_keras.train as train
flags.FLAGS(["train", "--model_dir=x", "--source=synthetic", "--target=synthetic", "--image_labels=ground_truth"])
print(json.dumps(train.parse_config().to_json()))
"""


def test_the_train_flags_defaults_are_the_configs():
    from pit_keras import flags as pit_flags

    result = subprocess.run([sys.executable, "-c", PARSE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    root = os.path.expanduser(pit_flags.DEFAULT_BENCHMARK_ROOT)
    expected = RunConfig(source="synthetic", source_root=root, target="synthetic", target_root=root,
                         image_labels="ground_truth").to_json()
    assert parsed == expected


def test_self_training_defaults_are_the_configs():
    # SelfTraining (for the library's own callers) and RunConfig (for runs) hold the same defaults.
    from pit_keras.training import runner
    from pit_keras.training.trainer import SelfTraining

    config = RunConfig(source="synthetic", source_root="x", target="synthetic", target_root="x",
                       self_training=True, image_labels="teacher")
    assert runner.self_training_settings(config) == SelfTraining(seed=config.seed)


def test_a_commands_dataset_defaults_to_its_runs_unless_the_flags_name_another():
    from pit_keras import flags as pit_flags

    run = run_config(benchmark_seed=3)
    pick = pit_flags.dataset_and_root
    # No run: the flags' own values (a synthetic dataset without a root: the benchmark of the given seed).
    assert pick("target", "synthetic", None, 0, set()) == (
        "synthetic", os.path.expanduser(pit_flags.DEFAULT_BENCHMARK_ROOT), 0)
    with pytest.raises(UserError, match="--target_root is required for --target=cityscapes"):
        pick("target", "cityscapes", None, 0, set())
    # A run: its dataset, root and benchmark seed where the flags are not given, or name the run's dataset.
    assert pick("target", "synthetic", None, 0, set(), run) == ("cityscapes", run.target_root, 3)
    assert pick("source", "gta5", None, 0, {"source"}, run) == ("gta5", run.source_root, 3)
    assert pick("target", "cityscapes", "~/x", 5, {"target_root", "benchmark_seed"}, run) == (
        "cityscapes", os.path.expanduser("~/x"), 5)
    # Another dataset than the run's needs its own root, and takes the flags' seed.
    with pytest.raises(UserError, match="--source_root is required for --source=synthia"):
        pick("source", "synthia", None, 0, {"source"}, run)
    assert pick("target", "synthetic", None, 2, {"target", "benchmark_seed"}, run) == (
        "synthetic", os.path.expanduser(pit_flags.DEFAULT_BENCHMARK_ROOT + "_seed2"), 2)
