"""Trains a segmenter with PIT (or source-only / MinEnt) and evaluates it on the target's val split.

    python -m pit_keras.train --flagfile=flags/demo.cfg

Resumes from the newest checkpoint in --model_dir. See `python -m pit_keras.train --helpfull`.
"""

import math
import os

from absl import flags

from pit_keras import flags as pit_flags
from pit_keras.errors import UserError, run_main

pit_flags.define_train_flags()
FLAGS = flags.FLAGS


def parse_config():
    """The run's configuration from the flags, checked before any work starts."""
    if not FLAGS.model_dir:
        raise UserError("--model_dir is required (the run folder for checkpoints and logs).")
    if FLAGS.method == "pit" and not FLAGS.image_labels:
        raise UserError("--method=pit needs --image_labels (a JSON file of target image labels, or ground_truth).")
    if FLAGS.method != "pit" and FLAGS.image_labels:
        raise UserError(f"--image_labels is only used by --method=pit, not --method={FLAGS.method}.")
    if FLAGS.image_labels == "teacher" and not FLAGS.self_training:
        raise UserError("--image_labels=teacher needs --self_training (the teacher estimates the labels).")
    if (FLAGS.image_labels_prior or FLAGS.image_label_confidence != "none") and FLAGS.image_labels != "teacher":
        name = "image_labels_prior" if FLAGS.image_labels_prior else "image_label_confidence"
        raise UserError(f"--{name} only applies with --image_labels=teacher, not --image_labels={FLAGS.image_labels}.")
    if FLAGS.image_label_confidence == "agreement" and not FLAGS.image_labels_prior:
        raise UserError("--image_label_confidence=agreement needs --image_labels_prior (the estimate the teacher "
                        "is compared with).")
    for name, low, high in (("st_ema", 0.0, 1.0), ("st_threshold", 0.0, 1.0), ("st_class_portion", 0.0, 1.0)):
        if not low <= FLAGS[name].value <= high:
            raise UserError(f"--{name}={FLAGS[name].value}: must be between {low} and {high}.")
    for name in ("st_start", "st_ramp"):
        if FLAGS[name].value < 0:
            raise UserError(f"--{name}={FLAGS[name].value}: must be 0 or more.")
    for name in ("batch_size", "num_steps", "log_every", "cpu_replicas"):
        if FLAGS[name].value <= 0:
            raise UserError(f"--{name}={FLAGS[name].value}: must be positive.")
    for name in ("learning_rate", "momentum", "weight_decay", "poly_power", "lambda_c", "lambda_r", "lambda_ent",
                 "lambda_st", "head_lr_multiplier", "interaction_lr_multiplier"):
        value = FLAGS[name].value
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--{name}={value}: must be a finite number, 0 or more.")
    if FLAGS.learning_rate == 0:
        raise UserError("--learning_rate=0: nothing would train; give a positive learning rate.")
    if FLAGS.label_map and FLAGS.source != "folder":
        raise UserError(f"--label_map applies to --source=folder only, not --source={FLAGS.source}.")
    if FLAGS.target == "folder" and FLAGS.image_labels == "ground_truth":
        raise UserError("--image_labels=ground_truth reads target training labels, which --target=folder does not "
                        "have; use --image_labels=teacher (with --self_training) or a JSON file.")
    lse_r = pit_flags.parse_floats("lse_r", FLAGS.lse_r)
    if FLAGS.method == "pit" and (not lse_r or any(r <= 0 for r in lse_r)):
        raise UserError(f"--lse_r={','.join(FLAGS.lse_r)}: pit needs one or more positive values.")
    return {
        "source": FLAGS.source, "source_root": pit_flags.dataset_root("source_root", FLAGS.source_root),
        "label_map": FLAGS.label_map and os.path.abspath(os.path.expanduser(FLAGS.label_map)),
        "target": FLAGS.target, "target_root": pit_flags.dataset_root("target_root", FLAGS.target_root),
        "source_size": pit_flags.parse_size("source_size", FLAGS.source_size),
        "target_size": pit_flags.parse_size("target_size", FLAGS.target_size),
        "backbone": FLAGS.backbone, "backbone_weights": FLAGS.backbone_weights,
        "num_classes": 16 if FLAGS.source == "synthia" else 19,
        "class_set": "synthia16" if FLAGS.source == "synthia" else "cityscapes19",
        "method": FLAGS.method, "lse_r": list(lse_r), "lse_normalize": FLAGS.lse_normalize,
        "lambda_c": FLAGS.lambda_c, "lambda_r": FLAGS.lambda_r, "lambda_ent": FLAGS.lambda_ent,
        "recon_domains": list(FLAGS.recon_domains), "loss_resolution": FLAGS.loss_resolution,
        "interaction_lr_multiplier": FLAGS.interaction_lr_multiplier, "image_labels": FLAGS.image_labels,
        "image_loss_reduction": FLAGS.image_loss_reduction, "head_lr_multiplier": FLAGS.head_lr_multiplier, "benchmark_seed": FLAGS.benchmark_seed,
        "recon_stop_gradient": FLAGS.recon_stop_gradient, "recon_space": FLAGS.recon_space,
        "image_label_kind": FLAGS.image_label_kind, "self_training": FLAGS.self_training,
        "lambda_st": FLAGS.lambda_st, "st_ema": FLAGS.st_ema, "st_threshold": FLAGS.st_threshold,
        "st_teacher_bn": FLAGS.st_teacher_bn, "st_classmix": FLAGS.st_classmix, "st_start": FLAGS.st_start,
        "st_ramp": FLAGS.st_ramp, "st_flip": FLAGS.st_flip, "st_class_portion": FLAGS.st_class_portion,
        "image_labels_prior": FLAGS.image_labels_prior and os.path.expanduser(FLAGS.image_labels_prior),
        "image_label_confidence": FLAGS.image_label_confidence,
        "batch_size": FLAGS.batch_size, "num_steps": FLAGS.num_steps, "learning_rate": FLAGS.learning_rate,
        "momentum": FLAGS.momentum, "weight_decay": FLAGS.weight_decay, "poly_power": FLAGS.poly_power,
        "seed": FLAGS.seed, "strategy": FLAGS.strategy, "cpu_replicas": FLAGS.cpu_replicas,
        "mixed_precision": FLAGS.mixed_precision, "jit_compile": FLAGS.jit_compile,
        "aspp_implementation": FLAGS.aspp_implementation, "cache_images": FLAGS.cache_images,
        "deterministic": FLAGS.deterministic,
    }


def check_folder_datasets(config, evaluate):
    """Lists and checks `folder` datasets (`--source=folder`, `--target=folder`) and the label map before
    TensorFlow is imported and anything is written, so a wrong root, a bad label map or missing labels fail in a
    second with one sentence. A target folder without a labelled val set is said once here: the run trains and
    is not evaluated."""
    from pit_keras.data import datasets, folder

    if config["source"] == "folder":
        pairs, _ = datasets.source_pairs("folder", config["source_root"], label_map=config["label_map"])
        print(f"source: {len(pairs)} labelled images in {config['source_root']}")
    if config["target"] != "folder":
        return
    root = config["target_root"]
    if config["method"] != "source_only" or config["self_training"]:
        print(f"target: {len(datasets.target_pairs('folder', root, 'train')[0])} unlabelled images in {root}")
    if evaluate:
        try:
            pairs, _, _ = datasets.target_pairs("folder", root, "val", require_labels=True,
                                                num_classes=config["num_classes"])
            print(f"target val: {len(pairs)} labelled images in {os.path.join(root, 'val')}")
        except folder.NoLabelledSplit as err:
            print(f"{err} The run will not be evaluated.")


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    config = parse_config()
    check_folder_datasets(config, FLAGS.evaluate or FLAGS.eval_every > 0)
    # TensorFlow is imported only once the flags are known to be good, so a typo fails in a second; the
    # strategy comes first, before anything initialises TensorFlow's devices.
    from pit_keras.training import distribute
    from pit_keras.training import runner
    strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.cpu_replicas)
    runner.run(config, FLAGS.model_dir, strategy=strategy, log_every=FLAGS.log_every,
                 image_every=FLAGS.image_every, checkpoint_every=FLAGS.checkpoint_every,
                 keep_checkpoints=FLAGS.keep_checkpoints, evaluate=FLAGS.evaluate, verbose=FLAGS.verbose,
                 eval_every=FLAGS.eval_every)


if __name__ == "__main__":
    run_main(main)
