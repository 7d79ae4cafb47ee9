"""Training-run state on disk: the run's configuration (`run.json`) and TF checkpoints of the network and the
optimizer (whose `iterations` is the step counter, so the learning-rate schedule resumes with it)."""

import os

import tensorflow as tf

from pit_keras import runs
from pit_keras.atomic import write_json_atomic  # also imported from here by other modules and tests
from pit_keras.errors import UserError

# Settings that change the network's variables: a run folder cannot be resumed or evaluated with others.
ARCHITECTURE_KEYS = ("backbone", "num_classes", "lse_r")
# Settings that change the objective: resuming a run with others would mix two methods in one run. A run.json
# without one of them holds the value it was trained with (`config.MIGRATIONS`).
METHOD_KEYS = ("method", "lse_normalize", "image_loss_reduction", "interaction_lr_multiplier", "head_lr_multiplier",
               "image_label_kind", "self_training", "image_labels_prior", "image_label_confidence",
               "st_class_portion")


def _shown(value):
    return list(value) if isinstance(value, tuple) else value


def check_or_write_run_config(model_dir, config, write=True):
    """Records a new run's configuration (a `RunConfig`) as its `run.json`, or checks that an existing run has
    the same architecture and objective; with `write=False` only checks (a run checks first and writes once its
    data has passed)."""
    path = os.path.join(model_dir, runs.RUN_FILE)
    if os.path.isfile(path):
        previous = runs.read_config(model_dir)
        for key in ARCHITECTURE_KEYS:
            if getattr(previous, key) != getattr(config, key):
                raise UserError(f"--model_dir={model_dir} holds a run with {key}={_shown(getattr(previous, key))}, "
                                f"not {_shown(getattr(config, key))}; use another --model_dir.")
        for key in METHOD_KEYS:
            if getattr(previous, key) != getattr(config, key):
                raise UserError(f"--model_dir={model_dir} holds a run trained with {key}="
                                f"{getattr(previous, key)}, not {getattr(config, key)}; resume it with the same "
                                "flags or use another --model_dir.")
    if write:
        os.makedirs(model_dir, exist_ok=True)
        write_json_atomic(path, config.to_json())


def _checkpoint(network, optimizer=None, teacher=None, seeds=False):
    objects = {"network": network, "optimizer": optimizer, "teacher": teacher and teacher.checkpoint(),
               "seeds": _seeds(network) if seeds else None}
    return tf.train.Checkpoint(**{name: value for name, value in objects.items() if value is not None})


def _seeds(network):
    """The state of the network's random-number generators (Dropout's masks: FCN-8s' fc6 and fc7), which a
    checkpoint of the network alone leaves out; None without any."""
    states = [v for v in network.non_trainable_variables if v.path.endswith("seed_generator_state")]
    return tf.train.Checkpoint(**{f"state_{i}": v for i, v in enumerate(states)}) if states else None


def manager(network, optimizer, model_dir, max_to_keep=3, folder="checkpoints", teacher=None):
    """A `tf.train.CheckpointManager` over the network, the optimizer and the self-training teacher (if any)
    under `MODEL_DIR/folder` ("checkpoints" for the newest ones, "best" for the best on target val, network
    only)."""
    checkpoint = _checkpoint(network, optimizer, teacher, seeds=True)
    return tf.train.CheckpointManager(checkpoint, os.path.join(model_dir, folder), max_to_keep=max_to_keep,
                                      checkpoint_name="ckpt")


def latest_checkpoint(model_dir):
    """The newest checkpoint prefix of a run folder, or None."""
    return tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))


def _newest_first(model_dir):
    state = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints"))
    if state is None:
        return []
    return list(reversed(state.all_model_checkpoint_paths)) or [state.model_checkpoint_path]


def resumes(model_dir):
    """Whether a run in `model_dir` resumes from a checkpoint (`restore_latest` then restores every variable of
    the network, or refuses to start), so that pretrained backbone weights would never be used."""
    return bool(_newest_first(model_dir))


def restore_latest(network, optimizer, model_dir, teacher=None):
    """Restores network, optimizer, teacher and the network's random-number generators from the newest readable
    checkpoint of `model_dir` and returns its path (None for a fresh run).

    A checkpoint that cannot be read (a file truncated by a crash) is reported and the previous one used.
    The optimizer must be built, so that its slot variables exist to be filled.
    """
    candidates = _newest_first(model_dir)
    for path in candidates:
        try:
            _checkpoint(network, optimizer, teacher).restore(path).assert_existing_objects_matched()
            # The generators' state goes on where the run was (none in a checkpoint written without it).
            seeds = _seeds(network)
            if seeds:
                tf.train.Checkpoint(seeds=seeds).restore(path).expect_partial()
            return path
        except Exception as err:  # noqa: BLE001 -- a damaged file fails in many ways (IndexError, DataLoss, ...)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"warning: checkpoint {path} is unreadable ({reason}); trying the previous one.")
    if candidates:
        raise UserError(f"--model_dir={model_dir}: none of its {len(candidates)} checkpoints can be read.")
    return None


def restore_network(network, model_dir, which="last"):
    """Loads the network weights of the newest checkpoint (`which="last"`) or of the best one on target val
    (`"best"`, kept by `--eval_every`), for evaluation and export; returns the path."""
    checkpoint = tf.train.Checkpoint(network=network)
    if which not in ("last", "best"):
        raise UserError(f"--checkpoint={which}: expected last or best.")
    path = latest_checkpoint(model_dir) if which == "last" else tf.train.latest_checkpoint(
        os.path.join(model_dir, "best"))
    if path is None:
        raise UserError(f"--model_dir={model_dir} holds no {which} checkpoint"
                        + (" (train with --eval_every to keep one)." if which == "best" else " yet."))
    checkpoint.restore(path).expect_partial()
    return path
