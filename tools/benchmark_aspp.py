"""Benchmarks DeepLab-v2's ASPP classifier alone: its two implementations (`heads.ASPPClassifier`,
`implementation="conv"`: four dilated 3x3 convolutions; `"matmul"`: one matrix product and shifted sums, the
same function and weights), forward and backward, time and peak memory.

    python tools/benchmark_aspp.py --output=docs/perf_aspp_heads.json

Each setting runs once per implementation, each in its own Python process (so that its peak resident memory,
ru_maxrss, is its own): the setting's number of ASPP classifiers to `--classes` classes on random features
`[batch, H, W, --channels]` (`SETTINGS`), one `tf.function` computing the sum of squares of all logits and its
gradients with respect to the features and every weight; the median wall time of `--repeats` calls after 2
warm-up calls.
The default settings are the heads of a DeepLab-v2 PIT step at 512x256 (64x32 features, fine + 3 coarse heads,
source + target as a batch of 2) and one head at the paper's 1280x640 (160x80 features) with its batch of 4.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import flags

from pit_keras import atomic
from pit_keras.errors import UserError, run_main

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


FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined when it runs (so tests can import the module)."""
    flags.DEFINE_list("settings", list(SETTINGS), f"Comma-separated: {', '.join(SETTINGS)}.")
    flags.DEFINE_integer("channels", 2048, "Feature channels (ResNet-101's conv5: 2048).")
    flags.DEFINE_integer("classes", 19, "Classes of each ASPP classifier.")
    flags.DEFINE_integer("repeats", 5, "Timed calls (the median is reported).")
    flags.DEFINE_string("output", None, "Write the results as JSON here.")
    flags.DEFINE_string("run_one", None, "Internal: SETTING:IMPLEMENTATION, timed in this process (each one of a "
                        "run is a child process of its own).")


def check_flags(settings, channels, classes, repeats):
    """The settings to run; a bad value is a `UserError` naming its flag."""
    settings = [s.strip() for s in settings if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise UserError(f"--settings: unknown {', '.join(unknown)} (choose from {', '.join(SETTINGS)}).")
    if min(channels, classes, repeats) <= 0:
        raise UserError("--channels, --classes and --repeats must be positive.")
    return settings


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    settings = check_flags(FLAGS.settings, FLAGS.channels, FLAGS.classes, FLAGS.repeats)
    if FLAGS.run_one:
        setting, _, implementation = FLAGS.run_one.partition(":")
        if setting not in SETTINGS or implementation not in IMPLEMENTATIONS:
            raise UserError(f"--run_one={FLAGS.run_one}: expected SETTING:IMPLEMENTATION.")
        print(RESULT_PREFIX + json.dumps(run_one(setting, implementation, FLAGS.channels, FLAGS.classes,
                                                 FLAGS.repeats)))
        return 0
    results = []
    for setting in settings:
        for implementation in IMPLEMENTATIONS:
            child = subprocess.run(
                [sys.executable, os.path.abspath(__file__), f"--run_one={setting}:{implementation}",
                 f"--channels={FLAGS.channels}", f"--classes={FLAGS.classes}", f"--repeats={FLAGS.repeats}"],
                capture_output=True, text=True)
            lines = [l for l in child.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
            if child.returncode or not lines:
                tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({"setting": setting, "implementation": implementation, "error": tail[:300]})
            else:
                results.append(json.loads(lines[-1][len(RESULT_PREFIX):]))
    command = "python tools/benchmark_aspp.py " + " ".join(sys.argv[1:])
    data = {"command": command.strip(), "results": results}
    if FLAGS.output:
        atomic.write_text_atomic(FLAGS.output, json.dumps(data, indent=2) + "\n")
    print(report(data))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    define_flags()
    run_main(main)
