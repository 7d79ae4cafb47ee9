"""Estimates the target images' image-level labels y_t with the paper's regressor and writes them as JSON.

    python -m pit_keras.image_labels --source=gta5 --source_root=GTA5 --target=cityscapes \\
        --target_root=CITYSCAPES --output=runs/gta2cs_image_labels.json

One softmax layer on frozen Inception-ResNet-v2 features (ImageNet), trained on the source images' class shares,
then applied to the target training images. The JSON feeds `python -m pit_keras.train --image_labels=`. Where
the target has labels, the chi-squared distance to their true shares is printed next to two priors (the source
mean, uniform): an estimate no closer than the source-mean prior carries no information.

With `--features=backbone` (a trained run's backbone), `--feature_alignment=adabn`, `--feature_pooling=pyramid`
and `--feature_stages=all` choose other features of it (`pit_keras.adaptation.regressor`, docs/method.md).
With a run (`--model_dir`), the run's own --source, --target, their roots and --label_map are the defaults:

    python -m pit_keras.image_labels --features=soft_predictions --model_dir=runs/demo --output=shares.json
"""

import os

from absl import flags

from pit_keras import atomic
from pit_keras import flags as pit_flags
from pit_keras import runs
from pit_keras.errors import UserError, run_main

pit_flags.define_image_labels_flags()
flags.adopt_module_key_flags(pit_flags)  # --help lists this command's flags
FLAGS = flags.FLAGS


def parse_config():
    """The command's settings from the flags, checked before TensorFlow is imported."""
    if not FLAGS.output:
        raise UserError("--output is required (the image-labels JSON to write).")
    if os.path.isdir(os.path.expanduser(FLAGS.output)):
        raise UserError(f"--output={FLAGS.output} is a folder; name the JSON file to write.")
    if FLAGS.epochs < 0:
        raise UserError(f"--epochs={FLAGS.epochs}: must be zero or more.")
    if FLAGS.features in ("predictions", "soft_predictions") and FLAGS.feature_alignment != "none":
        raise UserError(f"--feature_alignment={FLAGS.feature_alignment} does not apply to --features=predictions "
                        "(no regressor is trained).")
    if FLAGS.features != "backbone":
        for flag, value, applies in (("feature_alignment", FLAGS.feature_alignment,
                                      not FLAGS.feature_alignment.startswith("adabn")),
                                     ("feature_pooling", FLAGS.feature_pooling, FLAGS.feature_pooling == "global"),
                                     ("feature_stages", FLAGS.feature_stages, FLAGS.feature_stages == "last")):
            if not applies:
                raise UserError(f"--{flag}={value} needs --features=backbone (a trained run's backbone), not "
                                f"--features={FLAGS.features}.")
    run = None
    if FLAGS.features in ("backbone", "predictions", "soft_predictions"):
        if not FLAGS.model_dir:
            raise UserError(f"--features={FLAGS.features} needs --model_dir (a training run folder).")
        if FLAGS["features_weights"].present:
            raise UserError(f"--features_weights does not apply to --features={FLAGS.features} (the run's "
                            "checkpoint is used).")
        run = runs.read_config(FLAGS.model_dir)
    (source, source_root, seed), (target, target_root, _) = _dataset("source", run), _dataset("target", run)
    label_map = FLAGS.label_map
    if run is not None and source == run.source and not FLAGS["label_map"].present:
        label_map = run.label_map
    if label_map and source != "folder":
        raise UserError(f"--label_map applies to --source=folder only, not --source={source}.")
    weights = FLAGS.features_weights
    weights = None if weights == "none" else weights if weights == "imagenet" else os.path.expanduser(weights)
    return {
        "source": source, "source_root": source_root,
        "label_map": label_map and os.path.abspath(os.path.expanduser(label_map)),
        "target": target, "target_root": target_root, "benchmark_seed": seed,
        "num_classes": 16 if source == "synthia" else 19,
        "features": FLAGS.features, "features_weights": weights,
        "image_size": pit_flags.parse_size("image_size", FLAGS.image_size), "epochs": FLAGS.epochs,
        "model_dir": FLAGS.model_dir, "cache_dir": os.path.expanduser(FLAGS.cache_dir), "seed": FLAGS.seed,
        "feature_alignment": FLAGS.feature_alignment, "feature_pooling": FLAGS.feature_pooling,
        "feature_stages": FLAGS.feature_stages,
    }


def _dataset(domain, run):
    """(dataset, root, benchmark seed) of `domain` ("source" or "target"): the flags, or with a run's config
    (`--model_dir`) the run's own dataset, root and seed where the flags do not name them
    (`flags.dataset_and_root`, as `evaluate` does)."""
    given = {name for name in (domain, f"{domain}_root", "benchmark_seed") if FLAGS[name].present}
    return pit_flags.dataset_and_root(domain, FLAGS[domain].value, FLAGS[f"{domain}_root"].value,
                                      FLAGS.benchmark_seed, given, run)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    config = parse_config()
    output = os.path.expanduser(FLAGS.output)
    folder = os.path.dirname(os.path.abspath(output))  # made once the labels are estimated
    _, existing = atomic.missing_folders(folder)
    if not os.path.isdir(existing):
        raise UserError(f"--output={FLAGS.output}: {existing} is a file, so the folder cannot be made.")
    from pit_keras.adaptation import features, regressor
    from pit_keras.adaptation import soft_labels

    result = regressor.estimate_target_labels(**config)
    os.makedirs(folder, exist_ok=True)
    soft_labels.write_json(output, result["keys"], result["labels"])
    origin = (f"predicted by {config['model_dir']}" if config["features"] in (features.PREDICTION_FEATURES,
                                                                               features.SOFT_PREDICTION_FEATURES)
              else f"regressor trained on {result['num_source']} source images")
    print(f"wrote image-level labels of {result['num_target']} target images ({config['num_classes']} classes, "
          f"{origin}) to {output}")
    report = result["report"]
    if report is None:
        print("the target training images have no labels: no distance to the truth to report")
        return
    print(f"distance to the true shares of {report['num_images']} labelled target images (lower is better):")
    print(f"  {'estimate':20} {'chi-squared':>12} {'L1':>8}")
    estimate = ("predictions" if config["features"] in (features.PREDICTION_FEATURES,
                                                         features.SOFT_PREDICTION_FEATURES) else "regressor")
    for name in ("regressor", "source-mean prior", "uniform prior"):
        print(f"  {estimate if name == 'regressor' else name:20} {report[name]['chi2']:>12.4f} "
              f"{report[name]['l1']:>8.4f}")
    if report["regressor"]["chi2"] >= report["source-mean prior"]["chi2"]:
        print(f"warning: the {estimate} are no closer to the target truth than the source-mean prior; these "
              "labels carry no information about the target images.")


if __name__ == "__main__":
    run_main(main)
