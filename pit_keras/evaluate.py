"""Evaluates a training run, or saved predictions, on a labelled target split: per-class IoU and results files.

    python -m pit_keras.evaluate --model_dir=runs/demo --target=synthetic --split=val
    python -m pit_keras.evaluate --predictions_dir=preds --target=cityscapes --target_root=data/cityscapes \
        --classes=13

--model_dir: the network is rebuilt from MODEL_DIR/run.json and its newest checkpoint; images are resized to
the run's --target_size (or the flag, if given) and predictions upsampled to label resolution. The run's own
--target and --target_root are the defaults.
--target=folder: the labelled set ROOT/SPLIT (ROOT/val/images with ROOT/val/labels, or a Cityscapes root in
ROOT/val; README: Datasets).
--predictions_dir: 8-bit PNGs of train ids (--prediction_classes) at label resolution, laid out as
PRED/CITY/NAME_leftImg8bit.png, or any one PRED/**/CITY_SSSSSS_FFFFFF*.png per image as cityscapesScripts
accepts.

--saved_model, --tflite: the results are written beside the export folder, never inside it:
EXPORT_pit_int8_eval_val.json for --tflite=EXPORT/pit_int8.tflite.

--classes=16 or 13 scores in SYNTHIA's 16 classes (19-class truth and predictions are mapped; terrain, truck
and train become unlabelled); 13 reports mIoU* (without wall, fence and pole) as the headline.

Writes the results JSON (--output): `metrics.summarize` (percent IoUs, null for classes absent from truth and
prediction, the confusion matrix) plus "num_classes" (the --classes scored), "target", "split" and
"checkpoint" or "predictions_dir"; beside it a per-class CSV and a row-normalised confusion heat map PNG.
"""

import os

from absl import flags

from pit_keras import flags as pit_flags
from pit_keras.errors import UserError, run_main

pit_flags.define_eval_flags()
flags.adopt_module_key_flags(pit_flags)  # --help lists this command's flags
FLAGS = flags.FLAGS


def label_space(prediction_classes):
    """The `scoring.LabelSpace` of --classes (default: the predictions' own classes)."""
    from pit_keras.evaluation import scoring

    num_classes = int(FLAGS.classes) if FLAGS.classes else prediction_classes
    try:
        return scoring.label_space(num_classes, prediction_classes)
    except ValueError as err:
        raise UserError(f"--classes={num_classes}: {err}") from None


def target_and_root(config=None):
    """(target, root, benchmark seed) of the labelled set: the flags, or with a run's `config` the run's own
    target, root and benchmark seed where the flags do not name them (`flags.dataset_and_root`)."""
    given = {name for name in ("target", "target_root", "benchmark_seed") if FLAGS[name].present}
    return pit_flags.dataset_and_root("target", FLAGS.target, FLAGS.target_root, FLAGS.benchmark_seed, given,
                                      config)


def labelled_pairs(target, root, seed):
    """(pairs, reader, images folder of a folder layout or None) of --split of the target."""
    from pit_keras.data import datasets

    pairs, reader, _ = datasets.target_pairs(target, root, FLAGS.split, require_labels=True, benchmark_seed=seed)
    image_dir = os.path.join(root, FLAGS.split, "images") if target == "folder" else None
    return pairs, reader, image_dir if image_dir and os.path.isdir(image_dir) else None


def score_run():
    """(result, space, default output, target) of the --checkpoint of --model_dir."""
    from pit_keras import runs
    from pit_keras.evaluation import scoring
    from pit_keras.evaluation import metrics

    config = runs.read_config(FLAGS.model_dir)
    space = label_space(config.num_classes)
    size = (pit_flags.parse_size("target_size", FLAGS.target_size) if FLAGS["target_size"].present
            else config.target_size)
    target, root, seed = target_and_root(config)
    pairs, reader, _ = labelled_pairs(target, root, seed)
    run = runs.load_run(FLAGS.model_dir, FLAGS.checkpoint)
    result = metrics.summarize(scoring.network_confusion(run.network, pairs, reader, space, size),
                               space.class_set)
    result["checkpoint"] = os.path.basename(run.checkpoint)
    output = scoring.run_output(FLAGS.model_dir, FLAGS.split, config, FLAGS.checkpoint, target, root)
    return result, space, output, target


def score_predictions():
    """(result, space, default output, target) of the PNGs in --predictions_dir."""
    if FLAGS["target_size"].present:
        raise UserError("--target_size applies to --model_dir only; saved predictions are scored at label size.")
    space = label_space(int(FLAGS.prediction_classes))
    from pit_keras.evaluation import scoring
    from pit_keras.evaluation import metrics

    target, root, seed = target_and_root()
    pairs, reader, image_dir = labelled_pairs(target, root, seed)
    paths = scoring.find_predictions(pairs, FLAGS.predictions_dir, image_dir=image_dir)
    result = metrics.summarize(scoring.predictions_confusion(pairs, reader, paths, space), space.class_set)
    predictions_dir = os.path.abspath(FLAGS.predictions_dir)
    result["predictions_dir"] = predictions_dir
    # Named after the folder, so the scores of two prediction folders side by side do not overwrite each other.
    output = f"{predictions_dir}_eval_{FLAGS.split}.json"
    return result, space, output, target


def score_deployed(path):
    """(result, space, default output, target) of an exported SavedModel or .tflite model; the output is
    beside its export folder, never inside it."""
    if FLAGS["target_size"].present:
        raise UserError("--target_size applies to --model_dir only; a deployed model resizes as it was exported.")
    from pit_keras.evaluation import scoring

    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder.")
    if FLAGS.output:
        scoring.check_output_outside_export(FLAGS.output, path)
    target, root, seed = target_and_root()
    pairs, reader, _ = labelled_pairs(target, root, seed)
    from pit_keras.deploy import predictors
    from pit_keras.evaluation import metrics

    predictor = predictors.load_predictor(path, flag="tflite" if FLAGS.tflite else "saved_model")
    space = label_space(predictor.class_set.num_classes)
    result = metrics.summarize(scoring.predictor_confusion(predictor, pairs, reader, space), space.class_set)
    result["model"] = os.path.abspath(path)
    return result, space, scoring.deployed_output(path, FLAGS.split), target


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    sources = [name for name in ("model_dir", "saved_model", "tflite", "predictions_dir") if FLAGS[name].value]
    if len(sources) != 1:
        raise UserError("Give exactly one of --model_dir (a training run), --saved_model, --tflite (an export) "
                        "or --predictions_dir (saved PNGs).")
    if not FLAGS.predictions_dir and FLAGS["prediction_classes"].present:
        raise UserError("--prediction_classes applies to --predictions_dir only; a model predicts its own classes.")
    if FLAGS.output and os.path.isdir(FLAGS.output):  # refused now, not once every image is scored
        raise UserError(f"--output={FLAGS.output} is a folder; give the path of the results JSON file.")
    from pit_keras.evaluation import metrics, reports

    if FLAGS.model_dir:
        result, space, output, target = score_run()
    elif FLAGS.predictions_dir:
        result, space, output, target = score_predictions()
    else:
        result, space, output, target = score_deployed(FLAGS.saved_model or FLAGS.tflite)
    result.update({"num_classes": space.num_classes, "target": target, "split": FLAGS.split})
    written = reports.write_results(result, FLAGS.output or output)
    print(reports.format_table(result))
    headline = "mIoU*" if space.num_classes == 13 else "mIoU"
    print(f"{headline} {metrics.select_miou(result, space.num_classes):.2f} ({space.num_classes} classes) over "
          f"{result['num_images']} images of {target} {FLAGS.split} "
          f"({result.get('checkpoint') or result.get('model') or result['predictions_dir']}); written to "
          f"{', '.join(written)}")


if __name__ == "__main__":
    run_main(main)
