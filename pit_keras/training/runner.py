"""A training run from its `RunConfig`: data, network, trainer, optimizer, callbacks, final evaluation.

Kept apart from the CLI (`train.py`) so tests and tools run the same code without flags.
"""

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from pit_keras import atomic
from pit_keras.config import GROUND_TRUTH_LABELS, TEACHER_LABELS
from pit_keras.training import callbacks
from pit_keras.training import checkpoints
from pit_keras.training import distribute
from pit_keras.evaluation import scoring
from pit_keras.evaluation import reports
from pit_keras.data import datasets, integrity, memory, pipeline
from pit_keras.adaptation import soft_labels
from pit_keras.data.cityscapes import relative_key
from pit_keras.errors import UserError
from pit_keras.models.network import build_network, interaction_weights
from pit_keras.training.trainer import PITTrainer, SelfTraining


def target_image_labels(config, target_pairs, reader, target_root):
    """`[N, C]` image-level labels of the target training images, from JSON or ground truth."""
    path, flag = config.image_labels, "image_labels"
    if path == TEACHER_LABELS:  # computed in the training step, from a prior if there is one
        path, flag = config.image_labels_prior, "image_labels_prior"
        if not path:
            return np.zeros((len(target_pairs), config.num_classes), np.float32)
    if path == GROUND_TRUTH_LABELS:
        return soft_labels.from_ground_truth([l for _, l in target_pairs], reader, config.num_classes)
    keys = [relative_key(target_root, image) for image, _ in target_pairs]
    labels = soft_labels.load_json(os.path.expanduser(path), keys, config.num_classes, flag=flag)
    soft = labels[(labels > 0) & (labels < 1)]
    if config.image_label_kind == "presence" and soft.size:
        # Presence is "above 0": a regressor's or a soft prediction's shares are above 0 for every class.
        raise UserError(f"--{flag}={path} holds class shares or probabilities (e.g. {soft[0]:.3g}), and "
                        "--image_label_kind=presence would count every class above 0 as present: use "
                        "--image_label_kind=shares, or labels of 0 (absent) and 1 (present).")
    return labels


def self_training_settings(config):
    """The run's `SelfTraining`, or None without `self_training`."""
    if not config.self_training:
        return None
    return SelfTraining(weight=config.lambda_st, ema=config.st_ema, threshold=config.st_threshold,
                        teacher_bn=config.st_teacher_bn, classmix=config.st_classmix, start=config.st_start,
                        ramp=config.st_ramp, flip=config.st_flip, seed=config.seed,
                        class_portion=config.st_class_portion)


def build_trainer(config, network, trainer_class=PITTrainer, steps_per_execution=1):
    """The trainer (with its EMA teacher, for self-training) and its compiled SGD optimizer (poly decay over
    `num_steps`). Call inside the strategy's scope.

    `trainer_class`: `PITTrainer`, or a subclass whose only change is what a step computes (tools/benchmark_train's
    variants); `steps_per_execution`: train steps per call of the compiled train function (Keras' own)."""
    trainer = trainer_class(
        network, config.num_classes, method=config.method, lse_r=config.lse_r,
        lse_normalize=config.lse_normalize, lambda_c=config.lambda_c, lambda_r=config.lambda_r,
        lambda_ent=config.lambda_ent, recon_domains=config.recon_domains,
        loss_resolution=config.loss_resolution, interaction_lr_multiplier=config.interaction_lr_multiplier,
        image_loss_reduction=config.image_loss_reduction, head_lr_multiplier=config.head_lr_multiplier,
        image_label_kind=config.image_label_kind, self_training=self_training_settings(config),
        image_labels_from_teacher=config.teacher_image_labels, recon_stop_gradient=config.recon_stop_gradient,
        recon_space=config.recon_space, image_label_prior=bool(config.image_labels_prior),
        image_label_confidence=config.image_label_confidence)
    trainer.build_teacher()
    schedule = keras.optimizers.schedules.PolynomialDecay(
        config.learning_rate, decay_steps=config.num_steps, end_learning_rate=0.0, power=config.poly_power)
    optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum, weight_decay=config.weight_decay or None)
    if config.weight_decay and config.method == "pit":
        optimizer.exclude_from_weight_decay(var_list=[interaction_weights(network)])
    trainer.compile(optimizer=optimizer, jit_compile=config.jit_compile, steps_per_execution=steps_per_execution)
    return trainer


def checked(pairs, domain, skipped):
    """The pairs whose files pass the start-up checks; the others are added to `skipped` and counted."""
    good, problems = integrity.check_pairs(pairs)
    if problems:
        path, reason = problems[0]
        print(f"skipped {len(problems)} of {len(pairs)} {domain} files that cannot be used, e.g. {path}: {reason}")
        skipped.extend(problems)
    if not good:
        raise UserError(f"no usable {domain} images: all {len(pairs)} failed the checks, e.g. {path}: {reason}.")
    return good


def load_domains(config, trainer):
    """File lists and target image labels of the run, read once: `{"source": (pairs, reader),
    "target": (image paths, [N, C] labels) or None, "skipped": [(path, reason)]}`."""
    skipped = []
    source_pairs, source_reader = datasets.source_pairs(config.source, config.source_root,
                                                        benchmark_seed=config.benchmark_seed,
                                                        label_map=config.label_map)
    source_pairs = checked(source_pairs, "source", skipped)
    domains = {"source": (source_pairs, source_reader), "target": None, "skipped": skipped}
    if trainer.uses_target:
        target_pairs, reader, root = datasets.target_pairs(
            config.target, config.target_root, "train",
            require_labels=config.image_labels == GROUND_TRUTH_LABELS, num_classes=config.num_classes,
            benchmark_seed=config.benchmark_seed)
        target_pairs = checked(target_pairs, "target", skipped)
        if config.method == "pit":
            labels = target_image_labels(config, target_pairs, reader, root)
            origin = {GROUND_TRUTH_LABELS: "ground truth (the weakly supervised setting)",
                      TEACHER_LABELS: "the self-training teacher's class shares (no target label is read)" + (
                          f", blended in from {config.image_labels_prior}" if config.image_labels_prior
                          else "")}.get(config.image_labels, config.image_labels)
            print(f"target image-level labels of {len(target_pairs)} images: {origin}")
        else:
            labels = np.zeros((len(target_pairs), config.num_classes), np.float32)
        domains["target"] = ([i for i, _ in target_pairs], labels)
    return domains


def build_dataset(config, domains, batch_size, shard=None, skip_batches=0):
    """The zipped training dataset: batches of `batch_size` per domain, from one shard of the files, starting
    after `skip_batches` batches (a resumed run continues the data order of an uninterrupted one); with
    `config.cache_images` each file is decoded once and kept in memory (the same batches)."""
    pairs, reader = domains["source"]
    cache = config.cache_images
    source = pipeline.source_dataset(pairs, reader, config.source_size, batch_size, seed=config.seed,
                                     shard=shard, skip_batches=skip_batches, cache=cache,
                                     on_error=domains.get("on_skip"))
    target = None
    if domains["target"] is not None:
        paths, labels = domains["target"]
        target = pipeline.target_dataset(paths, labels, config.target_size, batch_size, seed=config.seed,
                                         shard=shard, skip_batches=skip_batches, cache=cache,
                                         on_error=domains.get("on_skip"))
    return pipeline.training_dataset(source, target)


def worker_dataset_fn(config, domains, step):
    """The input function of a multi-worker run (`distribute_datasets_from_function`): each worker's shard of
    the files, in batches of the per-replica size, from `step` on. A worker's pipeline feeds each of its local
    replicas in turn, so a step takes as many of its batches as the worker has replicas."""
    def dataset(context):
        local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
        return build_dataset(config, domains, context.get_per_replica_batch_size(config.batch_size),
                             shard=(context.num_input_pipelines, context.input_pipeline_id),
                             skip_batches=step * local_replicas)
    return dataset


def run(config, model_dir, strategy=None, log_every=100, image_every=1000, checkpoint_every=1000,
        keep_checkpoints=3, evaluate=True, verbose=1, eval_every=0):
    """Trains (or resumes) the run in `model_dir` to `config.num_steps` steps.

    Args:
        config: the run's `RunConfig` (see `train.parse_config`).
        model_dir: the run folder.
        strategy: a `tf.distribute.Strategy` (`distribute.make_strategy`); None for the default one.
        log_every: steps per logged epoch.
        image_every: steps between TensorBoard pictures.
        checkpoint_every: steps between checkpoints.
        keep_checkpoints: how many checkpoints are kept.
        evaluate: evaluate on the target val split at the end.
        verbose: progress output (`callbacks.Progress`): 0 none, 1 redrawn on a terminal, 2 plain lines.
        eval_every: steps between evaluations on the target val split (0: only at the end); the best
            checkpoint by val mIoU is kept beside the last ones.

    Returns:
        `(trainer, results)`: the trained `PITTrainer` and the val results dict (None if not evaluated, and
        on workers other than the chief).
    """
    strategy = strategy or tf.distribute.get_strategy()
    chief = distribute.is_chief(strategy)
    class_set = config.classes
    if chief:  # checked now, written once the data has passed its checks: a refused start leaves no run.json
        checkpoints.check_or_write_run_config(model_dir, config, write=False)
    keras.mixed_precision.set_global_policy(config.mixed_precision)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    # A run that resumes takes every weight from its checkpoint: the pretrained backbone weights are not read, so
    # a weights file moved since, or a node without internet access for `imagenet`, does not stop a resume.
    backbone_weights = "none" if checkpoints.resumes(model_dir) else config.backbone_weights
    with strategy.scope():
        network = build_network(config.backbone, config.num_classes, num_units=config.num_units,
                                backbone_weights=backbone_weights,
                                aspp_implementation=config.aspp_implementation)
        trainer = build_trainer(config, network)  # in the scope: the optimizer's slots are mirrored
    distribute.per_replica_batch(config.batch_size, strategy)
    domains = load_domains(config, trainer)
    if config.cache_images:
        memory.check_cache_fits(domains, shards=distribute.num_workers(strategy))
    if chief:
        checkpoints.check_or_write_run_config(model_dir, config)

    resumed = checkpoints.restore_latest(trainer.network, trainer.optimizer, model_dir, teacher=trainer.teacher)
    step = int(trainer.optimizer.iterations.numpy())
    if resumed:
        print(f"resumed from {resumed} at step {step}")
    if chief and domains["skipped"]:
        write_skipped(model_dir, domains["skipped"])
    # A file the input pipeline fails to decode (damaged past its header) is added to the same list.
    domains["on_skip"] = integrity.SkippedFiles(os.path.join(model_dir, "skipped_files.txt") if chief else None,
                                                domains["skipped"]).add
    # Workers other than the chief write their (identical) checkpoints to a scratch folder that is discarded.
    save_dir = model_dir if chief else tempfile.mkdtemp(prefix="pit_keras_worker_")
    manager = checkpoints.manager(network, trainer.optimizer, save_dir, max_to_keep=keep_checkpoints,
                                  teacher=trainer.teacher)
    start = time.time()
    try:
        if step < config.num_steps:
            checkpointer = callbacks.Checkpointer(manager, checkpoint_every)
            # Order matters: divergence is caught before a checkpoint of that step could be written.
            run_callbacks = [callbacks.DivergenceGuard(manager), callbacks.StopAtStep(config.num_steps), checkpointer,
                             callbacks.GracefulStop(checkpointer)]
            if chief:
                validation = eval_every and validation_callback(config, network, model_dir, class_set, eval_every)
                if validation:
                    run_callbacks.append(validation)
                # Without the cache: filling it would decode every file for one batch of pictures.
                sample = next(iter(build_dataset(dataclasses.replace(config, cache_images=False), domains, 2)))
                run_callbacks.append(callbacks.TensorBoardLogger(os.path.join(model_dir, "logs"), sample, class_set,
                                                                 image_every))
                if verbose:  # steps, not Keras' "Epoch 1/15"; verbose=2: plain lines only
                    run_callbacks.append(callbacks.Progress(config.num_steps, log_every,
                                                            interactive=None if verbose == 1 else False))
            fit_args = dict(epochs=math.ceil(config.num_steps / log_every), initial_epoch=step // log_every,
                            steps_per_epoch=log_every, verbose=0, callbacks=run_callbacks)
            if distribute.is_multi_worker(strategy):
                data = strategy.distribute_datasets_from_function(worker_dataset_fn(config, domains, step))
                distribute.fit_custom_loop(trainer, data, strategy, **fit_args)
            else:
                trainer.fit(build_dataset(config, domains, config.batch_size, skip_batches=step), shuffle=False,
                            **fit_args)
    finally:
        if not chief:
            shutil.rmtree(save_dir, ignore_errors=True)
    print(f"trained to step {int(trainer.optimizer.iterations.numpy())} in {time.time() - start:.0f} s")
    if not (evaluate and chief):
        return trainer, None
    return trainer, evaluate_run(config, network, model_dir, class_set)


def evaluate_run(config, network, model_dir, class_set, split="val"):
    """Evaluates a trained network on the target split if it has labels; prints and writes the results."""
    try:
        pairs, reader, _ = datasets.target_pairs(config.target, config.target_root, split,
                                                 require_labels=True, num_classes=config.num_classes,
                                                 benchmark_seed=config.benchmark_seed)
    except UserError as err:  # a target without val labels is normal in UDA
        print(f"not evaluated: {err}")
        return None
    result = scoring.evaluate(network, pairs, reader, class_set, config.target_size)
    result["checkpoint"] = os.path.basename(checkpoints.latest_checkpoint(model_dir) or "")
    print(reports.format_table(result))
    print(f"target {split} mIoU: {result['miou']:.2f} ({result['num_images']} images, last checkpoint)")
    best_file = os.path.join(model_dir, "best", "best.json")
    if os.path.isfile(best_file):
        with open(best_file) as f:
            result["best"] = json.load(f)
        print(f"best on target {split} during training: {result['best']['miou']:.2f} at step "
              f"{result['best']['step']} (MODEL_DIR/best; selected with target labels, as most peers do)")
    reports.write_json(result, os.path.join(model_dir, f"eval_{split}.json"))
    if result["checkpoint"]:  # TensorBoard: the final mIoU at the last step
        callbacks.write_scalar(os.path.join(model_dir, "logs"), f"{split}/miou", result["miou"],
                               int(result["checkpoint"].rsplit("-", 1)[1]))
    return result


def write_skipped(model_dir, skipped):
    """Lists every file the run skips, one `path: reason` a line, in MODEL_DIR/skipped_files.txt."""
    path = os.path.join(model_dir, "skipped_files.txt")
    atomic.write_text_atomic(path, "".join(f"{p}: {reason}\n" for p, reason in skipped))
    print(f"the {len(skipped)} skipped files are listed in {path}")


def validation_callback(config, network, model_dir, class_set, every):
    """`callbacks.Validation` on the target val split, or None (with a note) if it has no labels."""
    try:
        pairs, reader, _ = datasets.target_pairs(config.target, config.target_root, "val",
                                                 require_labels=True, num_classes=config.num_classes,
                                                 benchmark_seed=config.benchmark_seed)
    except UserError as err:
        print(f"--eval_every ignored: {err}")
        return None
    best = checkpoints.manager(network, None, model_dir, max_to_keep=1, folder="best")
    return callbacks.Validation(
        lambda: scoring.evaluate(network, pairs, reader, class_set, config.target_size, progress=False),
        best, os.path.join(model_dir, "logs"), every)
