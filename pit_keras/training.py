"""A training run from a configuration dict: data, network, trainer, optimizer, callbacks, final evaluation.

Kept apart from the CLI (`train.py`) so tests and tools run the same code without flags.
"""

import math
import os
import time

import keras
import numpy as np

from pit_keras import callbacks, checkpoints, evaluation, metrics
from pit_keras.data import classes, datasets, pipeline, soft_labels
from pit_keras.data.cityscapes import relative_key
from pit_keras.errors import UserError
from pit_keras.models.network import build_network, interaction_weights
from pit_keras.trainer import PITTrainer


def target_image_labels(config, target_pairs, reader, target_root):
    """`[N, C]` image-level labels of the target training images, from JSON or ground truth."""
    if config["image_labels"] == "ground_truth":
        return soft_labels.from_ground_truth([l for _, l in target_pairs], reader, config["num_classes"])
    keys = [relative_key(target_root, image) for image, _ in target_pairs]
    return soft_labels.load_json(os.path.expanduser(config["image_labels"]), keys, config["num_classes"])


def build_trainer(config, network):
    """The trainer and its compiled SGD optimizer (poly decay over `num_steps`)."""
    trainer = PITTrainer(
        network, config["num_classes"], method=config["method"], lse_r=config["lse_r"],
        lse_normalize=config["lse_normalize"], lambda_c=config["lambda_c"], lambda_r=config["lambda_r"],
        lambda_ent=config["lambda_ent"], recon_domains=config["recon_domains"],
        loss_resolution=config["loss_resolution"], interaction_lr_multiplier=config["interaction_lr_multiplier"])
    schedule = keras.optimizers.schedules.PolynomialDecay(
        config["learning_rate"], decay_steps=config["num_steps"], end_learning_rate=0.0, power=config["poly_power"])
    optimizer = keras.optimizers.SGD(schedule, momentum=config["momentum"],
                                     weight_decay=config["weight_decay"] or None)
    if config["weight_decay"] and config["method"] == "pit":
        optimizer.exclude_from_weight_decay(var_list=[interaction_weights(network)])
    trainer.compile(optimizer=optimizer)
    return trainer


def build_dataset(config, trainer):
    """The zipped training dataset of the run."""
    source_pairs, source_reader = datasets.source_pairs(config["source"], config["source_root"])
    source = pipeline.source_dataset(source_pairs, source_reader, config["source_size"], config["batch_size"],
                                     seed=config["seed"])
    target = None
    if trainer.uses_target:
        target_pairs, reader, root = datasets.target_pairs(
            config["target"], config["target_root"], "train",
            require_labels=config["image_labels"] == "ground_truth")
        if config["method"] == "pit":
            labels = target_image_labels(config, target_pairs, reader, root)
            origin = ("ground truth (the weakly supervised setting)" if config["image_labels"] == "ground_truth"
                      else config["image_labels"])
            print(f"target image-level labels of {len(target_pairs)} images: {origin}")
        else:
            labels = np.zeros((len(target_pairs), config["num_classes"]), np.float32)
        target = pipeline.target_dataset([i for i, _ in target_pairs], labels, config["target_size"],
                                         config["batch_size"], seed=config["seed"])
    return pipeline.training_dataset(source, target)


def run(config, model_dir, log_every=100, image_every=1000, checkpoint_every=1000, keep_checkpoints=3,
        evaluate=True, verbose=1):
    """Trains (or resumes) the run in `model_dir` to `config["num_steps"]` steps; returns the val results
    dict (None if not evaluated)."""
    class_set = classes.CLASS_SETS[config["class_set"]]
    checkpoints.check_or_write_run_config(model_dir, config)
    keras.utils.set_random_seed(config["seed"])
    network = build_network(config["backbone"], config["num_classes"],
                            num_units=len(config["lse_r"]) if config["method"] == "pit" else 0,
                            backbone_weights=config["backbone_weights"])
    trainer = build_trainer(config, network)
    dataset = build_dataset(config, trainer)

    manager = checkpoints.manager(network, trainer.optimizer, model_dir, max_to_keep=keep_checkpoints)
    resumed = checkpoints.restore_latest(manager, trainer.optimizer, network.trainable_variables)
    step = int(trainer.optimizer.iterations.numpy())
    if resumed:
        print(f"resumed from {resumed} at step {step}")
    start = time.time()
    if step < config["num_steps"]:
        sample = next(iter(dataset))
        trainer.fit(
            dataset, epochs=math.ceil(config["num_steps"] / log_every), initial_epoch=step // log_every,
            steps_per_epoch=log_every, verbose=verbose, shuffle=False,
            callbacks=[callbacks.StopAtStep(config["num_steps"]),
                       callbacks.Checkpointer(manager, checkpoint_every),
                       callbacks.TensorBoardLogger(os.path.join(model_dir, "logs"), sample, class_set, image_every)])
    print(f"trained to step {int(trainer.optimizer.iterations.numpy())} in {time.time() - start:.0f} s")
    if not evaluate:
        return None
    return evaluate_run(config, network, model_dir, class_set)


def evaluate_run(config, network, model_dir, class_set, split="val"):
    """Evaluates a trained network on the target split if it has labels; prints and writes the results."""
    try:
        pairs, reader, _ = datasets.target_pairs(config["target"], config["target_root"], split,
                                                 require_labels=True)
    except UserError as err:  # a target without val labels is normal in UDA
        print(f"not evaluated: {err}")
        return None
    result = evaluation.evaluate(network, pairs, reader, class_set, config["target_size"])
    print(metrics.format_table(result))
    print(f"target {split} mIoU: {result['miou']:.2f} ({result['num_images']} images)")
    metrics.write_json(result, os.path.join(model_dir, f"eval_{split}.json"))
    return result
