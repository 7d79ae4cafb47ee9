"""A trained run folder, loaded: its configuration (`run.json`, a `RunConfig`) and its network at a checkpoint.

The one place that reads `run.json` and rebuilds a run's network from it, for evaluation, export, prediction,
image-level estimates and figures. Training itself (`training/runner.py`) builds its network from the flags'
configuration and resumes the optimizer with it (`checkpoints.restore_latest`).
"""

import json
import os
import typing

from pit_keras.config import RunConfig
from pit_keras.errors import UserError

RUN_FILE = "run.json"


class LoadedRun(typing.NamedTuple):
    """A run rebuilt from its folder: `config` (`RunConfig`), `network` (`network.build_network`'s model, its
    weights restored) and `checkpoint` (the path of the restored checkpoint)."""

    config: RunConfig
    network: typing.Any
    checkpoint: str


def read_config(model_dir):
    """The `RunConfig` of a training run folder (its `run.json`; older files are migrated,
    `RunConfig.from_json`)."""
    path = os.path.join(model_dir, RUN_FILE)
    if not os.path.isfile(path):
        raise UserError(f"--model_dir={model_dir} holds no training run ({RUN_FILE} is missing).")
    try:
        with open(path) as f:
            payload = json.load(f)
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err}).") from None
    return RunConfig.from_json(payload, path)


def load_run(model_dir, which="last", aspp_implementation="matmul"):
    """The run in `model_dir` with its network rebuilt from `run.json` and restored from a checkpoint.

    Args:
        model_dir: a training run folder (`run.json` and `checkpoints/`).
        which: "last" (the newest checkpoint) or "best" (the best on target val, kept by `--eval_every`).
        aspp_implementation: how ASPP heads compute (`heads.ASPPClassifier`; the same function and weights):
            exports use "conv".

    Returns:
        A `LoadedRun`. The network is built without pretrained backbone weights: the checkpoint holds them all.
    """
    from pit_keras.models.network import build_network
    from pit_keras.training import checkpoints

    config = read_config(model_dir)
    network = build_network(config.backbone, config.num_classes, num_units=config.num_units,
                            backbone_weights="none", aspp_implementation=aspp_implementation)
    checkpoint = checkpoints.restore_network(network, model_dir, which)
    return LoadedRun(config, network, checkpoint)
