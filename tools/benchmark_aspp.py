"""Benchmarks DeepLab-v2's ASPP classifier alone: its two implementations (`heads.ASPPClassifier`,
`implementation="conv"`: four dilated 3x3 convolutions; `"matmul"`: one matrix product and shifted sums, the
same function and weights), forward and backward, time and peak memory.

    python tools/benchmark_aspp.py --output=docs/perf_aspp_heads.json

Each setting runs once per implementation, each in its own Python process (so that its peak resident memory,
ru_maxrss, is its own): `--heads` ASPP classifiers to `--classes` classes on random features
`[--batch, H, W, --channels]`, one `tf.function` computing the sum of squares of all logits and its gradients
with respect to the features and every weight; the median wall time of `--repeats` calls after 2 warm-up calls.
The default settings are the heads of a DeepLab-v2 PIT step at 512x256 (64x32 features, fine + 3 coarse heads,
source + target as a batch of 2) and one head at the paper's 1280x640 (160x80 features) with its batch of 4.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pit_keras import atomic  # noqa: E402

RESULT_PREFIX = "ASPP_BENCHMARK_RESULT "
# name: (heads, batch, feature height, feature width)
SETTINGS = {
    "pit_step_512x256": (4, 2, 32, 64),
    "paper_1280x640_batch4": (1, 4, 80, 160),
}
IMPLEMENTATIONS = ("conv", "matmul")


def run_one(setting, implementation, channels, classes, repeats):
    """Times one setting and implementation in this process; returns its result dict."""
    import tensorflow as tf

    from pit_keras.models import heads

    count, batch, height, width = SETTINGS[setting]
    features = tf.random.normal((batch, height, width, channels), seed=0)
    layers = [heads.ASPPClassifier(classes, implementation=implementation) for _ in range(count)]
    for layer in layers:
        layer.build(features.shape)
    variables = [v for layer in layers for v in layer.trainable_variables]

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.add_n([tf.reduce_sum(tf.square(layer(x))) for layer in layers])
        return tape.gradient(loss, [x, *variables])

    start = time.perf_counter()
    step(features)[0].numpy()
    first = time.perf_counter() - start
    step(features)[0].numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(features)[0].numpy()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"setting": setting, "implementation": implementation, "heads": count, "batch": batch,
            "features": [height, width, channels], "classes": classes, "step_s": median,
            "compile_s": max(first - median, 0.0),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def report(data):
    lines = [f"`{data['command']}`", "",
             "| setting | heads | batch | features (H, W, C) | implementation | fwd + bwd (s) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        if "error" in r:
            lines.append(f"| {r['setting']} | | | | {r['implementation']} | failed: {r['error']} | |")
            continue
        lines.append(f"| {r['setting']} | {r['heads']} | {r['batch']} | {tuple(r['features'])} | "
                     f"{r['implementation']} | {r['step_s']:.3f} | {r['peak_rss_mb']:.0f} |")
    for setting in SETTINGS:
        rows = {r["implementation"]: r for r in data["results"] if r["setting"] == setting and "step_s" in r}
        if set(rows) == set(IMPLEMENTATIONS):
            lines.append(f"\n{setting}: matmul / conv time {rows['matmul']['step_s'] / rows['conv']['step_s']:.2f}, "
                         f"peak memory {rows['matmul']['peak_rss_mb'] / rows['conv']['peak_rss_mb']:.2f}")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"Comma-separated: {', '.join(SETTINGS)}.")
    parser.add_argument("--channels", type=int, default=2048, help="Feature channels (ResNet-101's conv5: 2048).")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="Write the results as JSON here.")
    parser.add_argument("--run_one", help=argparse.SUPPRESS)  # SETTING:IMPLEMENTATION, in a child process
    args = parser.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {', '.join(unknown)} (choose from {', '.join(SETTINGS)}).")
    if min(args.channels, args.classes, args.repeats) <= 0:
        parser.error("--channels, --classes and --repeats must be positive.")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.run_one:
        setting, implementation = args.run_one.split(":")
        print(RESULT_PREFIX + json.dumps(run_one(setting, implementation, args.channels, args.classes, args.repeats)))
        return 0
    results = []
    for setting in args.settings:
        for implementation in IMPLEMENTATIONS:
            child = subprocess.run(
                [sys.executable, os.path.abspath(__file__), f"--run_one={setting}:{implementation}",
                 f"--channels={args.channels}", f"--classes={args.classes}", f"--repeats={args.repeats}"],
                capture_output=True, text=True)
            lines = [l for l in child.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
            if child.returncode or not lines:
                tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({"setting": setting, "implementation": implementation, "error": tail[:300]})
            else:
                results.append(json.loads(lines[-1][len(RESULT_PREFIX):]))
    command = "python tools/benchmark_aspp.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {"command": command.strip(), "results": results}
    if args.output:
        atomic.write_text_atomic(args.output, json.dumps(data, indent=2) + "\n")
    print(report(data))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
