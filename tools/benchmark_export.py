"""Benchmarks every deployment format of a training run: file size, latency per image and target val mIoU.

    python tools/benchmark_export.py --model_dir=runs/demo --output=runs/demo/benchmark_export.json
    python tools/benchmark_export.py --backbone=mobilenetv3_large --output=mobilenetv3_large.json

--model_dir benchmarks a trained run. --backbone instead builds an untrained run folder of that backbone
(`backbone_weights=none`, no coarse units; with a generated target domain at --size to calibrate the int8
model) with the library's functions and measures latency only (its mIoU would mean nothing).

Exports the run (unless --export_dir names an existing export) with .tflite models at --size, then measures:
- size: the model's files on disk (the SavedModel folder, or the .tflite file);
- latency: median wall time (and process CPU time, which contention on a shared machine does not inflate) of
  one --size uint8 image over --repeats runs after --warmup runs, through the same
  predictor `python -m pit_keras.predict` uses (the SavedModel and Keras resize to the run's target_size inside;
  the .tflite models run the network at their fixed input size, and the argmax of their logits is taken on the
  host). Each .tflite variant is timed with every --threads count, with LiteRT's XNNPACK delegate and with its
  builtin kernels only; Keras and the SavedModel (with --model_dir) with TensorFlow's own threading;
- mIoU (with --model_dir): on the run's target val split, predictions at label resolution (as
  pit_keras.evaluate does), for Keras, the SavedModel and each .tflite variant (2 threads, XNNPACK).
Prints a Markdown table and writes the rows as JSON.
"""

import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from absl import flags

from pit_keras.errors import UserError, run_main

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined when it runs (so tests can import the module)."""
    flags.DEFINE_string("model_dir", None, "The training run folder.")
    flags.DEFINE_string("backbone", None, "Benchmark an untrained run of this backbone (latency only).")
    flags.DEFINE_string("output", None, "Where the JSON rows go.")
    flags.DEFINE_string("export_dir", None, "An existing export of the run (default: export into a temporary "
                        "folder with .tflite models at --size).")
    flags.DEFINE_string("size", "1024,512", "W,H of the latency image and the .tflite input.")
    flags.DEFINE_integer("warmup", 3, "Unmeasured runs before timing.")
    flags.DEFINE_integer("repeats", 20, "Timed runs (the median is reported).")
    flags.DEFINE_list("threads", ["1", "2"], "LiteRT interpreter thread counts, comma-separated.")
    flags.DEFINE_integer("calibration_images", 100, "For the int8 export.")
    flags.DEFINE_integer("max_images", 0, "Evaluate on the first N val images (0: all).")


def folder_size(path):
    from pit_keras.deploy import exporting

    return sum(exporting.file_sizes(path).values())


def latency_ms(predictor, image, warmup, repeats):
    """(median wall milliseconds, median process CPU milliseconds) of `predictor(image)` after `warmup`
    unmeasured runs. The CPU time (all threads of the process) is what the run cost, whatever else shares the
    machine; on a busy machine the wall time also holds the waits for a core."""
    for _ in range(warmup):
        predictor(image)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        predictor(image)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def evaluate(predictor, pairs, reader, class_set):
    """Target val mIoU of a predictor (predictions at label resolution)."""
    from pit_keras.data import images
    from pit_keras.evaluation import metrics

    matrix = metrics.ConfusionMatrix(class_set.num_classes)
    for image_path, label_path in pairs:
        label = reader(label_path)
        image = images.read_image(image_path)
        prediction = predictor(image)
        if prediction.shape != label.shape:
            raise ValueError(f"{image_path}: the image and its label differ in size.")
        matrix.update(label, prediction)
    return metrics.summarize(matrix, class_set)["miou"]


def untrained_run(backbone, size, folder, calibration_count):
    """A run folder of an untrained `backbone` (no coarse units, `backbone_weights=none`) at `size` (W, H), with a
    generated Cityscapes-layout target whose `calibration_count` train images calibrate the int8 export."""
    from pit_keras.config import RunConfig
    from pit_keras.data import classes, synthetic
    from pit_keras.models.network import build_network
    from pit_keras.training import checkpoints

    root = os.path.join(folder, "benchmark")
    synthetic.generate(root, num_source=1, num_target_train=calibration_count, num_target_val=1, size=size, seed=0)
    run_dir = os.path.join(folder, f"untrained_{backbone}")
    network = build_network(backbone, classes.CITYSCAPES19.num_classes, num_units=0, backbone_weights="none")
    config = RunConfig(backbone=backbone, backbone_weights="none", method="source_only", lse_r=(),
                       source_root=os.path.join(root, "gta5"), target="cityscapes",
                       target_root=os.path.join(root, "cityscapes"), target_size=size)
    checkpoints.check_or_write_run_config(run_dir, config)
    checkpoints.manager(network, None, run_dir).save(checkpoint_number=0)
    return run_dir


def benchmark(model_dir, export_dir, size, warmup, repeats, threads, max_images, with_miou):
    """The rows of the table: one dict per format and, for .tflite models, per thread count and kernel set."""
    from pit_keras import runs
    from pit_keras.data import datasets
    from pit_keras.deploy import exporting, predictors

    config = runs.read_config(model_dir)
    class_set = config.classes
    pairs = reader = None
    if with_miou:
        pairs, reader, _ = datasets.target_pairs(config.target, config.target_root, "val", require_labels=True,
                                                 num_classes=config.num_classes,
                                                 benchmark_seed=config.benchmark_seed)
        pairs = pairs[:max_images] if max_images else pairs
    image = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    target_size = config.target_size
    candidates = []
    if with_miou:
        candidates += [("keras (model_dir)", model_dir, None, target_size),
                       ("saved_model", export_dir, folder_size(os.path.join(export_dir, "saved_model")), target_size)]
    for variant in exporting.TFLITE_VARIANTS:
        path = os.path.join(export_dir, exporting.tflite_filename(variant))
        if os.path.isfile(path):
            candidates.append((f"tflite {variant}", path, os.path.getsize(path), None))
    rows = []
    for name, path, size_bytes, network_size in candidates:
        settings = [(None, None)] if network_size is not None else [
            (count, xnnpack) for xnnpack in (True, False) for count in threads]
        for count, xnnpack in settings:
            predictor = predictors.load_predictor(path, num_threads=count, xnnpack=xnnpack is not False)
            row = {"backbone": config.backbone, "format": name,
                   "size_mb": None if size_bytes is None else size_bytes / 1e6,
                   "network_input": list(network_size or (predictor.input_width, predictor.input_height)),
                   "threads": count, "xnnpack": xnnpack,
                   "miou": None, "num_images": 0}
            row["latency_ms"], row["cpu_ms"] = latency_ms(predictor, image, warmup, repeats)
            if with_miou and (network_size is not None or (xnnpack and count == max(threads))):
                row["miou"] = evaluate(predictor, pairs, reader, class_set)
                row["num_images"] = len(pairs)
            print(f"{name}: {json.dumps(row)}", file=sys.stderr)
            rows.append(row)
    return rows


def table(rows, size, threads):
    """A Markdown table: one line per backbone and format, one latency column per thread count and kernel set."""
    settings = [(count, xnnpack) for xnnpack in (True, False) for count in threads]
    columns = [f"{count} thread{'s' if count > 1 else ''}, {'XNNPACK' if xnnpack else 'builtin'}"
               for count, xnnpack in settings]
    lines = [f"| backbone | format | size (MB) | network input | TensorFlow | {' | '.join(columns)} | "
             "target val mIoU |",
             "|---|---|---|---|---|" + "---|" * len(columns) + "---|"]
    groups = {}
    for row in rows:
        groups.setdefault((row["backbone"], row["format"]), []).append(row)
    for (backbone, name), group in groups.items():
        first = group[0]
        size_mb = "-" if first["size_mb"] is None else f"{first['size_mb']:.2f}"
        by_setting = {(r["threads"], r["xnnpack"]): f"{r['latency_ms']:.0f} ({r['cpu_ms']:.0f})" for r in group}
        tf_latency = by_setting.get((None, None))
        cells = [by_setting.get(s, "-") for s in settings]
        miou = [r["miou"] for r in group if r["miou"] is not None]
        lines.append(f"| {backbone} | {name} | {size_mb} | {first['network_input'][0]}x{first['network_input'][1]} | "
                     f"{tf_latency or '-'} | {' | '.join(cells)} | "
                     f"{f'{miou[0]:.2f}' if miou else '-'} |")
    return "\n".join(lines) + (f"\n\nLatency: median wall ms of one {size[0]}x{size[1]} image (in brackets: median "
                                "CPU ms of the process, all threads).")


def parse_flags():
    """`(size, threads)` from the flags; a bad value is a `UserError` naming its flag."""
    from pit_keras.models.backbones import BACKBONES

    if bool(FLAGS.model_dir) == bool(FLAGS.backbone):
        raise UserError("give one of --model_dir (a trained run) and --backbone (an untrained one, latency only).")
    if not FLAGS.output:
        raise UserError("--output is required (where the JSON rows go).")
    try:
        size = tuple(int(v) for v in FLAGS.size.split(","))
        threads = tuple(int(v) for v in FLAGS.threads)
        if len(size) != 2 or min(size) <= 0 or not threads or min(threads) <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f"--size={FLAGS.size} --threads={','.join(FLAGS.threads)}: expected W,H and a list of "
                        "positive counts.") from None
    if FLAGS.backbone and FLAGS.backbone not in BACKBONES:
        raise UserError(f"--backbone={FLAGS.backbone}: choose from {', '.join(BACKBONES)}.")
    return size, threads


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    size, threads = parse_flags()
    from pit_keras import runs
    from pit_keras.deploy import exporting
    from pit_keras.evaluation import reports

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = FLAGS.model_dir or untrained_run(FLAGS.backbone, size, scratch,
                                                     min(FLAGS.calibration_images, 4))
        export_dir = FLAGS.export_dir
        if export_dir is None:
            export_dir = os.path.join(scratch, "export")
            formats = exporting.FORMATS if FLAGS.model_dir else exporting.TFLITE_VARIANTS
            exporting.export(model_dir, export_dir, tflite_size=size, calibration_count=FLAGS.calibration_images,
                             formats=formats, log=lambda line: print(line, file=sys.stderr))
        rows = benchmark(model_dir, export_dir, size, FLAGS.warmup, FLAGS.repeats, threads, FLAGS.max_images,
                         with_miou=bool(FLAGS.model_dir))
        config = runs.read_config(model_dir)
    reports.write_json({"model_dir": os.path.abspath(FLAGS.model_dir) if FLAGS.model_dir else None,
                        "backbone": config.backbone, "untrained": bool(FLAGS.backbone),
                        "target_size": list(config.target_size), "latency_size": list(size), "threads": list(threads),
                        "warmup": FLAGS.warmup, "repeats": FLAGS.repeats, "cpu_count": os.cpu_count(),
                        "rows": rows}, FLAGS.output)
    print(table(rows, size, threads))
    return 0


if __name__ == "__main__":
    define_flags()
    run_main(main)
