"""Benchmarks every deployment format of a training run: file size, latency per image and target val mIoU.

    python tools/benchmark_export.py --model_dir=runs/demo --output=runs/demo/benchmark_export.json

Exports the run (unless --export_dir names an existing export) with .tflite models at --size, then for the
Keras network, the SavedModel and each .tflite variant measures:
- size: the model's files on disk (the SavedModel folder, or the .tflite file);
- latency: median wall time of one --size uint8 image over --repeats runs after --warmup runs, through the same
  predictor `python -m pit_keras.predict` uses (the SavedModel and Keras resize to the run's target_size inside;
  the .tflite models run the network at their fixed input size);
- mIoU: on the run's target val split, predictions at label resolution (as pit_keras.evaluate does).
Prints a Markdown table and writes the rows as JSON.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pit_keras import checkpoints, exporting, inference, metrics  # noqa: E402
from pit_keras.data import classes, datasets  # noqa: E402


def folder_size(path):
    return sum(exporting.file_sizes(path).values())


def latency_ms(predictor, image, warmup, repeats):
    """Median milliseconds of `predictor(image)` after `warmup` unmeasured runs."""
    for _ in range(warmup):
        predictor(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor(image)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def evaluate(predictor, pairs, reader, class_set):
    """Target val mIoU of a predictor (predictions at label resolution)."""
    matrix = metrics.ConfusionMatrix(class_set.num_classes)
    for image_path, label_path in pairs:
        label = reader(label_path)
        image = inference.read_image(image_path)
        prediction = predictor(image)
        if prediction.shape != label.shape:
            raise ValueError(f"{image_path}: the image and its label differ in size.")
        matrix.update(label, prediction)
    return metrics.summarize(matrix, class_set)["miou"]


def benchmark(model_dir, export_dir, size, warmup, repeats, threads, max_images):
    """The rows of the table: one dict per format."""
    config = checkpoints.read_run_config(model_dir)
    class_set = classes.CLASS_SETS[config["class_set"]]
    pairs, reader, _ = datasets.target_pairs(config["target"], config["target_root"], "val", require_labels=True)
    pairs = pairs[:max_images] if max_images else pairs
    image = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    target_size = tuple(config["target_size"])
    candidates = [("keras (model_dir)", model_dir, None, target_size),
                  ("saved_model", export_dir, folder_size(os.path.join(export_dir, "saved_model")), target_size)]
    for variant in exporting.TFLITE_VARIANTS:
        path = os.path.join(export_dir, exporting.tflite_filename(variant))
        if os.path.isfile(path):
            candidates.append((f"tflite {variant}", path, os.path.getsize(path), None))
    rows = []
    for name, path, size_bytes, network_size in candidates:
        predictor = inference.load_predictor(path, num_threads=threads)
        if network_size is None:
            network_size = (predictor.input_width, predictor.input_height)
        row = {"format": name, "size_mb": None if size_bytes is None else size_bytes / 1e6,
               "network_input": list(network_size),
               "latency_ms": latency_ms(predictor, image, warmup, repeats),
               "miou": evaluate(predictor, pairs, reader, class_set), "num_images": len(pairs)}
        print(f"{name}: {json.dumps(row)}", file=sys.stderr)
        rows.append(row)
    return rows


def table(rows, size):
    lines = [f"| format | size (MB) | network input | latency at {size[0]}x{size[1]} (ms, median) | target val mIoU |",
             "|---|---|---|---|---|"]
    for row in rows:
        size_mb = "-" if row["size_mb"] is None else f"{row['size_mb']:.2f}"
        lines.append(f"| {row['format']} | {size_mb} | {row['network_input'][0]}x{row['network_input'][1]} | "
                     f"{row['latency_ms']:.1f} | {row['miou']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="The training run folder.")
    parser.add_argument("--output", required=True, help="Where the JSON rows go.")
    parser.add_argument("--export_dir", help="An existing export of the run (default: export into a temporary "
                        "folder with .tflite models at --size).")
    parser.add_argument("--size", default="1024,512", help="W,H of the latency image and the .tflite input.")
    parser.add_argument("--warmup", type=int, default=3, help="Unmeasured runs before timing.")
    parser.add_argument("--repeats", type=int, default=20, help="Timed runs (the median is reported).")
    parser.add_argument("--threads", type=int, default=None, help="LiteRT interpreter threads.")
    parser.add_argument("--calibration_images", type=int, default=100, help="For the int8 export.")
    parser.add_argument("--max_images", type=int, default=0, help="Evaluate on the first N val images (0: all).")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split(","))
    with tempfile.TemporaryDirectory() as scratch:
        export_dir = args.export_dir
        if export_dir is None:
            export_dir = os.path.join(scratch, "export")
            exporting.export(args.model_dir, export_dir, tflite_size=size,
                             calibration_count=args.calibration_images, log=lambda line: print(line, file=sys.stderr))
        rows = benchmark(args.model_dir, export_dir, size, args.warmup, args.repeats, args.threads,
                         args.max_images)
    config = checkpoints.read_run_config(args.model_dir)
    metrics.write_json({"model_dir": os.path.abspath(args.model_dir), "backbone": config["backbone"],
                        "target_size": config["target_size"], "latency_size": list(size),
                        "cpu_count": os.cpu_count(), "rows": rows}, args.output)
    print(table(rows, size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
