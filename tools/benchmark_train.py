"""Benchmarks training speed for one backbone and image size: every method, PIT's own overhead, the input
pipeline, peak memory, XLA and mixed precision, all measured in one run on one machine.

    python tools/benchmark_train.py --backbone=tiny --size=256,128 --batch_size=4 --repeats=20 \\
        --output=docs/perf_tiny.json

Each measurement ("case") runs in its own Python process, so its peak resident memory (ru_maxrss) is its own
and no case inherits another's threads, caches or compiled functions. A case is a name, `BASE[+MODIFIER...]`:

training steps (one batch of real benchmark images, held in memory and fed again every step):
- `source_only`, `minent`, `pit`: the methods, as `pit_keras.training.runner.build_trainer` builds them;
- `reference`: the two-domain forward: source and target through the backbone and the fine head, L_f only (the
  target's fine logits are computed, but no gradient flows back through them);
- `reference_bwd`: the same, with a backward pass through the target too (a zero-weighted term on the target's
  fine logits): what any loss on the target costs, before PIT adds its coarse heads;
- `pit_no_lc`, `pit_no_lr`: PIT with lambda_c = 0 (no LSE pooling, no image-level loss) or lambda_r = 0 (no
  reconstruction); `pit_input`: PIT with `loss_resolution=input`.
modifiers: `xla` (compile(jit_compile=True)), `bf16` / `fp16` (the mixed_bfloat16 / mixed_float16 policies),
`joint` (pit only: one backbone call on the concatenated source+target batch, see
`benchmark_train_cases.joint_forward_pit`), `spe<N>` (Keras steps_per_execution=N), `pipeline` (fed by the real tf.data
pipeline instead of from memory), `cached` (that pipeline with its in-memory cache of decoded files,
`--cache_images`), `asppconv` (ASPP heads computed as four dilated convolutions, `--aspp_implementation=conv`,
instead of the default matrix product; changes only backbones with ASPP heads).

A training case times `--repeats` calls of the trainer's compiled train function after `--warmup` untimed ones
and reports the median step time; the first call (tracing, compilation and one step) is reported apart, as
`compile_s` (first call minus the median step). Images per second count every image a step pushes through the
network: the batch for source_only, source + target for the others.

other cases:
- `ablation`: reference, reference_bwd, pit, pit_no_lc and pit_no_lr built in one process and stepped in turn,
  so that a load that comes and goes weighs on all of them alike (their small differences are PIT's parts);
- `pipeline`, `pipeline+cached`: the training input pipeline alone (`runner.build_dataset`: decode, resize,
  shuffle, batch, zip, prefetch), images per second (source + target) over windows of `--pipeline_window`
  batches, median over `--repeats` windows;
- `inference`: latency of one image through the exported fine branch of a PIT network
  (`network.fine_segmenter(build_network(..., num_units=3))`) and through a plain segmenter of the same
  backbone (`num_units=0`), timed alternately in one process, and whether their graphs hold the same ops.

Data: the embedded benchmark (`--data_root`, generated on first use; read through its GTA5 and Cityscapes
layouts), resized to `--size` for both domains; PIT's target image labels are the benchmark's ground truth.
Prints one Markdown report and writes the numbers as JSON. The report names the machine, its load average and
the other training processes that ran: timings taken while other jobs run are not comparable.

Every trainer is built by `runner.build_trainer`, as a training run's is (the references and `joint` pass it a
`PITTrainer` subclass that changes only what a step computes). The cases live in benchmark_train_cases.py, the
report in benchmark_train_report.py; this file holds the flags and runs the cases.
"""


import json
import os
import platform
import resource
import subprocess
import sys
import time

from absl import flags

import benchmark_train_cases as cases
import benchmark_train_report as reporting
from pit_keras import atomic
from pit_keras.errors import UserError, run_main
from pit_keras.flags import DEFAULT_BENCHMARK_ROOT

RESULT_PREFIX = "BENCHMARK_CASE_RESULT "

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined when it runs (so tests can import the module)."""
    flags.DEFINE_string("backbone", "tiny", "A backbone of the registry (weights: none).")
    flags.DEFINE_string("size", "256,128", "W,H of source and target images.")
    flags.DEFINE_integer("batch_size", 4, "Images per domain per step.")
    flags.DEFINE_integer("repeats", 20, "Timed steps (pipeline: timed windows).")
    flags.DEFINE_integer("warmup", 3, "Untimed steps after the first.")
    flags.DEFINE_float("learning_rate", 0.05,
                       "SGD learning rate of every training case: the demo's 0.05 by default; a step must keep the "
                       "loss finite to be timed honestly (DeepLab-v2 without ImageNet weights diverges at 0.05: use "
                       "the paper's 2.5e-5).")
    flags.DEFINE_list("cases", list(cases.DEFAULT_CASES),
                      "Comma-separated cases, BASE[+MODIFIER...] (see the module docstring).")
    flags.DEFINE_string("data_root", DEFAULT_BENCHMARK_ROOT, "The embedded benchmark's folder.")
    flags.DEFINE_integer("pipeline_window", 10, "Batches per timed pipeline window.")
    flags.DEFINE_boolean("in_process", False, "Run every case in this process (faster; no per-case peak memory).")
    flags.DEFINE_string("output", None, "Where the JSON goes.")
    flags.DEFINE_string("report", None, "Print the report of an existing JSON (summary recomputed) and exit.")
    flags.DEFINE_string("run_case", None, "Internal: run this one case here and print its result as a line of "
                        "JSON (each case of a run is a process of its own).")


def parse_settings(backbone="tiny", size="256,128", batch_size=4, repeats=20, warmup=3, learning_rate=0.05,
                   case_names=cases.DEFAULT_CASES, data_root=DEFAULT_BENCHMARK_ROOT, pipeline_window=10):
    """`(cases.Settings, case names)` from the flags' values; a bad value is a `UserError` naming its flag."""
    try:
        size_values = tuple(int(v) for v in size.split(","))
        assert len(size_values) == 2 and min(size_values) > 0
    except (ValueError, AssertionError):
        raise UserError(f"--size={size}: expected W,H (two positive integers).") from None
    names = [c.strip() for c in case_names if c.strip()]
    for name in names:
        try:
            case = cases.parse_case(name)
        except ValueError as err:
            raise UserError(f"--cases: {err}") from None
        if case["asppconv"] and cases.BACKBONE_HEADS.get(backbone) != "aspp":
            raise UserError(f"--cases: case {name!r}: asppconv changes only backbones with ASPP heads, not "
                            f"{backbone}.")
    if min(batch_size, repeats, pipeline_window) <= 0 or warmup < 0:
        raise UserError("--batch_size, --repeats and --pipeline_window must be positive, --warmup not negative.")
    settings = cases.Settings(backbone=backbone, size=size_values, batch_size=batch_size, repeats=repeats,
                              warmup=warmup, learning_rate=learning_rate,
                              data_root=os.path.expanduser(data_root), pipeline_window=pipeline_window)
    return settings, names


def settings_from_flags():
    """`parse_settings` of the parsed flags."""
    return parse_settings(FLAGS.backbone, FLAGS.size, FLAGS.batch_size, FLAGS.repeats, FLAGS.warmup,
                          FLAGS.learning_rate, FLAGS.cases, FLAGS.data_root, FLAGS.pipeline_window)


# === The run: every case in a subprocess ===

def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case_in_subprocess(args, name):
    """Runs one case in a fresh Python process; its result with the process's peak resident memory."""
    command = [sys.executable, os.path.abspath(__file__), f"--run_case={name}", f"--backbone={args.backbone}",
               f"--size={args.size[0]},{args.size[1]}", f"--batch_size={args.batch_size}",
               f"--repeats={args.repeats}", f"--warmup={args.warmup}", f"--data_root={args.data_root}",
               f"--pipeline_window={args.pipeline_window}", f"--learning_rate={args.learning_rate!r}",
               f"--cases={name}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = "\n".join(done.stderr.strip().splitlines()[-5:])
    return {"case": name, "error": f"exit {done.returncode}: {tail}"}


def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import keras
    import tensorflow as tf

    return {"cpu": model, "nproc": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__}


def print_report(path):
    """Prints the report of an existing JSON, its summary recomputed."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"--report={path}: cannot be read as JSON ({err}).") from None
    try:
        data["summary"] = reporting.summarize(data["results"])
        text = reporting.report(data)
    except (KeyError, TypeError, AttributeError) as err:
        raise UserError(f"--report={path}: not a JSON written by benchmark_train (no {err} where expected)."
                        ) from None
    print(text)


def run_one_case(args, name):
    """`--run_case`: one case, its result (or why it failed) on stdout as a line of JSON."""
    try:
        result = cases.run_case(args, name)
    except Exception as err:  # reported as the case's row, in one line
        result = {"case": name, "error": cases.error_line(err)}
    result["peak_rss_mb"] = peak_rss_mb()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_all(args, names, in_process):
    """Every case, each in its own process (or all in this one): their results."""
    results = []
    for name in names:
        start = time.perf_counter()
        if in_process:
            import keras

            keras.backend.clear_session()
            try:
                result = cases.run_case(args, name)
            except Exception as err:  # one failing case (e.g. an XLA limitation) must not lose the others
                result = {"case": name, "error": cases.error_line(err)}
        else:
            result = case_in_subprocess(args, name)
        result["wall_s"] = time.perf_counter() - start
        print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
        results.append(result)
    return results


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    if FLAGS.report:
        print_report(FLAGS.report)
        return 0
    args, names = settings_from_flags()
    if FLAGS.run_case:
        run_one_case(args, FLAGS.run_case)
        return 0
    command = "python tools/benchmark_train.py " + " ".join(sys.argv[1:])
    load_start, running = os.getloadavg(), cases.other_training_processes()
    if running:
        print(f"warning: {len(running)} other training processes are running; timings are taken under load.",
              file=sys.stderr)
    results = run_all(args, names, FLAGS.in_process)
    data = {"command": command, "machine": machine(), "load_average_start": list(load_start),
            "load_average_end": list(os.getloadavg()), "other_training_processes": running,
            "args": {"backbone": args.backbone, "size": list(args.size), "batch_size": args.batch_size,
                     "repeats": args.repeats, "warmup": args.warmup, "cases": names,
                     "in_process": FLAGS.in_process, "pipeline_window": args.pipeline_window,
                     "learning_rate": args.learning_rate},
            "results": results}
    data["summary"] = reporting.summarize(results)
    if FLAGS.output:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        atomic.write_text_atomic(FLAGS.output, json.dumps(data, indent=2) + "\n")
    print(reporting.report(data))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    define_flags()
    run_main(main)
