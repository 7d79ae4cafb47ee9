"""Trains a segmenter with PIT (or source-only / MinEnt) and evaluates it on the target's val split.

    python -m pit_keras.train --flagfile=flags/demo.cfg

Resumes from the newest checkpoint in --model_dir. `--help` lists its flags.
"""

import dataclasses
import os

from absl import flags

from pit_keras import flags as pit_flags
from pit_keras.config import RunConfig
from pit_keras.errors import UserError, run_main

pit_flags.define_train_flags()
flags.adopt_module_key_flags(pit_flags)  # --help lists this command's flags
FLAGS = flags.FLAGS


def parse_config():
    """The run's `RunConfig` from the flags, checked before any work starts: the flags' own syntax here (sizes,
    lists, dataset roots, paths), every value and combination by `RunConfig`."""
    if not FLAGS.model_dir:
        raise UserError("--model_dir is required (the run folder for checkpoints and logs).")
    for name in ("log_every", "keep_checkpoints"):
        if FLAGS[name].value <= 0:
            raise UserError(f"--{name}={FLAGS[name].value}: must be positive.")
    values = {field.name: FLAGS[field.name].value for field in dataclasses.fields(RunConfig) if field.name in FLAGS}
    values.update(
        source_root=pit_flags.dataset_root("source_root", FLAGS.source_root, FLAGS.source, FLAGS.benchmark_seed),
        target_root=pit_flags.dataset_root("target_root", FLAGS.target_root, FLAGS.target, FLAGS.benchmark_seed),
        label_map=FLAGS.label_map and os.path.abspath(os.path.expanduser(FLAGS.label_map)),
        source_size=pit_flags.parse_size("source_size", FLAGS.source_size),
        target_size=pit_flags.parse_size("target_size", FLAGS.target_size),
        lse_r=pit_flags.parse_floats("lse_r", FLAGS.lse_r), recon_domains=tuple(FLAGS.recon_domains),
        image_labels_prior=FLAGS.image_labels_prior and os.path.expanduser(FLAGS.image_labels_prior))
    return RunConfig(**values)  # num_classes and class_set: the source's


def check_folder_datasets(config, evaluate):
    """Lists and checks `folder` datasets (`--source=folder`, `--target=folder`) and the label map before
    TensorFlow is imported and anything is written, so a wrong root, a bad label map or missing labels fail in a
    second with one sentence. A target folder without a labelled val set is said once here: the run trains and
    is not evaluated."""
    from pit_keras.data import datasets, folder

    if config.source == "folder":
        pairs, _ = datasets.source_pairs("folder", config.source_root, label_map=config.label_map)
        print(f"source: {len(pairs)} labelled images in {config.source_root}")
    if config.target != "folder":
        return
    root = config.target_root
    if config.uses_target:
        print(f"target: {len(datasets.target_pairs('folder', root, 'train')[0])} unlabelled images in {root}")
    if evaluate:
        try:
            pairs, _, _ = datasets.target_pairs("folder", root, "val", require_labels=True,
                                                num_classes=config.num_classes)
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
    strategy = distribute.make_strategy(config.strategy, config.cpu_replicas)
    runner.run(config, FLAGS.model_dir, strategy=strategy, log_every=FLAGS.log_every,
                 image_every=FLAGS.image_every, checkpoint_every=FLAGS.checkpoint_every,
                 keep_checkpoints=FLAGS.keep_checkpoints, evaluate=FLAGS.evaluate, verbose=FLAGS.verbose,
                 eval_every=FLAGS.eval_every)


if __name__ == "__main__":
    run_main(main)
