"""Training-run state on disk: the run's configuration (`run.json`) and TF checkpoints of the network and the
optimizer (whose `iterations` is the step counter, so the learning-rate schedule resumes with it)."""

import json
import os

import tensorflow as tf

from pit_keras.errors import UserError

RUN_FILE = "run.json"
# Settings that change the network's variables: a run folder cannot be resumed or evaluated with others.
ARCHITECTURE_KEYS = ("backbone", "num_classes", "lse_r")


def write_json_atomic(path, payload):
    """Writes JSON to a temporary name in the same folder, then renames it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_run_config(model_dir):
    """The `run.json` of a training run folder."""
    path = os.path.join(model_dir, RUN_FILE)
    if not os.path.isfile(path):
        raise UserError(f"--model_dir={model_dir} holds no training run ({RUN_FILE} is missing).")
    with open(path) as f:
        return json.load(f)


def check_or_write_run_config(model_dir, config):
    """Records a new run's configuration, or checks that an existing run has the same architecture."""
    path = os.path.join(model_dir, RUN_FILE)
    if os.path.isfile(path):
        previous = read_run_config(model_dir)
        for key in ARCHITECTURE_KEYS:
            if previous.get(key) != config[key]:
                raise UserError(f"--model_dir={model_dir} holds a run with {key}={previous.get(key)}, not "
                                f"{config[key]}; use another --model_dir.")
    os.makedirs(model_dir, exist_ok=True)
    write_json_atomic(path, config)


def manager(network, optimizer, model_dir, max_to_keep=3):
    """A `tf.train.CheckpointManager` over the network and the optimizer under `MODEL_DIR/checkpoints`."""
    checkpoint = tf.train.Checkpoint(network=network, optimizer=optimizer)
    return tf.train.CheckpointManager(checkpoint, os.path.join(model_dir, "checkpoints"), max_to_keep=max_to_keep,
                                      checkpoint_name="ckpt")


def latest_checkpoint(model_dir):
    """The newest checkpoint prefix of a run folder, or None."""
    return tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))


def restore_latest(network, optimizer, model_dir):
    """Restores network and optimizer from the newest checkpoint of `model_dir`, if any, and returns its path
    (None for a fresh run). The optimizer must be built, so that its slot variables exist to be filled."""
    path = latest_checkpoint(model_dir)
    if path is None:
        return None
    tf.train.Checkpoint(network=network, optimizer=optimizer).restore(path).assert_existing_objects_matched()
    return path


def restore_network(network, model_dir):
    """Loads the newest checkpoint's network weights (for evaluation and export); returns the path."""
    checkpoint = tf.train.Checkpoint(network=network)
    path = latest_checkpoint(model_dir)
    if path is None:
        raise UserError(f"--model_dir={model_dir} holds no checkpoint yet.")
    checkpoint.restore(path).expect_partial()
    return path
