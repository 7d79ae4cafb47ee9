"""Evaluates a training run on a labelled target split: per-class IoU table and a results JSON.

    python -m pit_keras.evaluate --model_dir=runs/demo --target=synthetic --split=val

The network is rebuilt from MODEL_DIR/run.json and its newest checkpoint; images are resized to the run's
--target_size (or the flag, if given) and predictions upsampled to label resolution.
"""

import os

from absl import flags

from pit_keras import flags as pit_flags
from pit_keras.errors import UserError, run_main

pit_flags.define_eval_flags()
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    if not FLAGS.model_dir:
        raise UserError("--model_dir is required.")
    from pit_keras import checkpoints, evaluation, metrics
    from pit_keras.data import classes, datasets
    from pit_keras.models.network import build_network

    config = checkpoints.read_run_config(FLAGS.model_dir)
    size = (pit_flags.parse_size("target_size", FLAGS.target_size) if FLAGS["target_size"].present
            else tuple(config["target_size"]))
    root = pit_flags.dataset_root("target_root", FLAGS.target_root)
    pairs, reader, _ = datasets.target_pairs(FLAGS.target, root, FLAGS.split, require_labels=True)
    class_set = classes.CLASS_SETS[config["class_set"]]
    units = len(config["lse_r"]) if config["method"] == "pit" else 0
    network = build_network(config["backbone"], config["num_classes"], num_units=units)
    checkpoint = checkpoints.restore_network(network, FLAGS.model_dir)
    result = evaluation.evaluate(network, pairs, reader, class_set, size)
    result["checkpoint"] = os.path.basename(checkpoint)
    output = FLAGS.output or os.path.join(FLAGS.model_dir, f"eval_{FLAGS.split}.json")
    metrics.write_json(result, output)
    print(metrics.format_table(result))
    print(f"mIoU {result['miou']:.2f} over {result['num_images']} images of {FLAGS.target} {FLAGS.split} "
          f"({result['checkpoint']}); written to {output}")


if __name__ == "__main__":
    run_main(main)
