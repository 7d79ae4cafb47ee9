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
`make_joint_forward_trainer`), `spe<N>` (Keras steps_per_execution=N), `pipeline` (fed by the real tf.data
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
"""

import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pit_keras import atomic, console  # noqa: E402
from pit_keras.flags import DEFAULT_BENCHMARK_ROOT  # noqa: E402

RESULT_PREFIX = "BENCHMARK_CASE_RESULT "
# The classifier of each backbone (models/backbones.py: BACKBONES[name].head), without importing TensorFlow here.
BACKBONE_HEADS = {"tiny": "conv1x1", "mobilenetv3_small": "conv1x1", "mobilenetv3_large": "conv1x1",
                  "deeplabv2_resnet101": "aspp", "fcn8s_vgg16": "conv1x1"}

TRAIN_BASES = {
    # name: (method, config overrides, network units (None: K from lse_r), what it is)
    "source_only": ("source_only", {}, 0, "source only"),
    "reference": ("reference", {}, 0, "two-domain forward (reference): source + target, L_f only"),
    "reference_bwd": ("reference_bwd", {}, 0, "two-domain forward + target backward (zero-weighted target term)"),
    "minent": ("minent", {}, 0, "MinEnt"),
    "pit": ("pit", {}, None, "PIT"),
    "pit_no_lc": ("pit", {"lambda_c": 0.0}, None, "PIT, lambda_c = 0 (no LSE pooling)"),
    "pit_no_lr": ("pit", {"lambda_r": 0.0}, None, "PIT, lambda_r = 0 (no reconstruction)"),
    "pit_input": ("pit", {"loss_resolution": "input"}, None, "PIT, L_c and L_r at input resolution"),
    "source_only_st": ("source_only", {"self_training": True}, 0, "source only + self-training (EMA teacher, "
                       "ClassMix)"),
    "minent_st": ("minent", {"self_training": True}, 0, "MinEnt + self-training"),
    "pit_st": ("pit", {"self_training": True, "image_labels": "teacher"}, None,
               "PIT + self-training, teacher image labels (the demo)"),
}
# The interleaved `ablation` case: PIT, its ablations and the two references, in one process.
ABLATION = ("reference", "reference_bwd", "pit", "pit_no_lc", "pit_no_lr")
# The interleaved `self_training` case: the self-training steps against the PIT step, in one process.
SELF_TRAINING = ("pit", "source_only_st", "pit_st")
INTERLEAVED = {"ablation": ABLATION, "self_training": SELF_TRAINING}
OTHER_BASES = {
    "ablation": f"{', '.join(ABLATION)}, stepped in turn in one process",
    "self_training": f"{', '.join(SELF_TRAINING)}, stepped in turn in one process",
    "pipeline": "input pipeline alone",
    "inference": "exported fine branch of a PIT network against a plain segmenter",
}
POLICIES = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
FLAG_MODIFIERS = ("xla", "joint", "pipeline", "cached", "asppconv")

DEFAULT_CASES = (
    "source_only", "reference", "reference_bwd", "minent", "pit", "pit_no_lc", "pit_no_lr", "pit_input",
    "pit+joint", "pit+spe10", "pit+pipeline", "pit+pipeline+cached",
    "reference+xla", "pit+xla", "reference+bf16", "pit+bf16", "reference+bf16+xla", "pit+bf16+xla",
    "reference+fp16", "pit+fp16", "reference+fp16+xla", "pit+fp16+xla",
    "source_only_st", "minent_st", "pit_st",
    "ablation", "self_training", "pipeline", "pipeline+cached", "inference",
)


def parse_case(name):
    """`BASE+MOD+...` -> dict(base, policy, xla, joint, pipeline, cached, steps_per_execution); refuses unknown
    parts with a sentence naming them."""
    base, *modifiers = name.split("+")
    if base not in TRAIN_BASES and base not in OTHER_BASES:
        raise ValueError(f"case {name!r}: {base!r} is not one of {', '.join([*TRAIN_BASES, *OTHER_BASES])}.")
    case = {"name": name, "base": base, "policy": "float32", "steps_per_execution": 1,
            **{m: False for m in FLAG_MODIFIERS}}
    for modifier in modifiers:
        spe = re.fullmatch(r"spe(\d+)", modifier)
        if modifier in POLICIES:
            case["policy"] = POLICIES[modifier]
        elif modifier in FLAG_MODIFIERS:
            case[modifier] = True
        elif spe and int(spe.group(1)) > 0:
            case["steps_per_execution"] = int(spe.group(1))
        else:
            raise ValueError(f"case {name!r}: unknown modifier {modifier!r} (xla, bf16, fp16, joint, pipeline, "
                             "cached, asppconv, spe<N>).")
    if base == "pipeline" and (modifiers and modifiers != ["cached"]):
        raise ValueError(f"case {name!r}: the pipeline case takes only the cached modifier.")
    if base in ("inference", *INTERLEAVED) and modifiers:
        raise ValueError(f"case {name!r}: the {base} case takes no modifier.")
    if case["joint"] and base != "pit":
        raise ValueError(f"case {name!r}: joint is measured for pit (at feature resolution) only.")
    if case["cached"] and not (case["pipeline"] or base == "pipeline"):
        raise ValueError(f"case {name!r}: cached needs pipeline (it is an option of the input pipeline).")
    return case


def base_config(args, method):
    """A `RunConfig` like `train.parse_config` makes (the train flags' defaults), with the demo's optimizer
    settings."""
    from pit_keras.config import RunConfig

    size = tuple(args.size)
    return RunConfig(
        source="gta5", source_root=os.path.join(args.data_root, "gta5"),
        target="cityscapes", target_root=os.path.join(args.data_root, "cityscapes"),
        source_size=size, target_size=size, backbone=args.backbone, backbone_weights="none", method=method,
        image_labels="ground_truth" if method == "pit" else None, batch_size=args.batch_size,
        num_steps=200000, learning_rate=args.learning_rate, momentum=0.9, weight_decay=0.0001, poly_power=0.9,
        seed=0)


# === One case, in this process ===

def compile_like_build_trainer(trainer, config):
    """Compiles a trainer built here with the optimizer `runner.build_trainer` gives a run."""
    import keras

    from pit_keras.models.network import interaction_weights

    schedule = keras.optimizers.schedules.PolynomialDecay(
        config.learning_rate, decay_steps=config.num_steps, end_learning_rate=0.0, power=config.poly_power)
    optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum, weight_decay=config.weight_decay or None)
    if config.weight_decay and trainer.method == "pit":
        optimizer.exclude_from_weight_decay(var_list=[interaction_weights(trainer.network)])
    trainer.compile(optimizer=optimizer, jit_compile=config.jit_compile)
    return trainer


def trainer_kwargs(config):
    """The `PITTrainer` arguments `runner.build_trainer` takes from a config."""
    keys = ("method", "lse_r", "lse_normalize", "lambda_c", "lambda_r", "lambda_ent", "recon_domains",
            "loss_resolution", "interaction_lr_multiplier", "image_loss_reduction")
    return {k: getattr(config, k) for k in keys}


def make_reference_trainer(network, config, backward):
    """The two-domain reference: a source-only trainer that also runs the target through the network."""
    import keras
    import tensorflow as tf

    from pit_keras import losses
    from pit_keras.training.trainer import PITTrainer

    class TwoDomainReference(PITTrainer):
        @property
        def uses_target(self):
            return True

        def compute_terms(self, batch, training=False):
            source = self.network(batch["source_image"], training=training)
            target = self.network(batch["target_image"], training=training)
            terms = {"seg_src": losses.pixel_cross_entropy(batch["source_label"], source["seg"])}
            value = tf.reduce_mean(tf.cast(target["seg_feat"], tf.float32), axis=[1, 2, 3])
            # Weight 0: the forward is kept (its value is tracked), the backward only on request.
            terms["trg_ref"] = value if backward else tf.stop_gradient(value)
            return terms

    trainer = TwoDomainReference(network, config.num_classes, **trainer_kwargs(config))
    trainer.term_weights["trg_ref"] = 0.0
    trainer.trackers["trg_ref"] = keras.metrics.Mean(name="trg_ref")
    return compile_like_build_trainer(trainer, config)


def make_joint_forward_trainer(network, config):
    """PIT with one backbone call on the concatenated source + target batch.

    Only the logits at feature resolution are computed for both domains, and only the source's fine logits are
    upsampled (for L_f): slicing the network's input-resolution outputs instead would upsample the target's
    too, forward and backward, which costs more than the second backbone call saves. BatchNorm in training mode
    then normalises with both domains' statistics mixed, which changes training for the tiny and MobileNetV3
    backbones (not for DeepLab-v2's frozen BatchNorm)."""
    import keras
    import tensorflow as tf

    from pit_keras import losses
    from pit_keras.training.trainer import PITTrainer

    units = len(config.lse_r)
    heads = {"seg_feat": "fine_head", **{f"cam_{k}_feat": f"coarse_head_{k}" for k in range(units)}}
    features = keras.Model(network.input, {key: network.get_layer(name).output for key, name in heads.items()})
    upsample = network.get_layer("seg")

    class JointForwardPIT(PITTrainer):
        def compute_terms(self, batch, training=False):
            images = batch["source_image"]
            both = features(tf.concat([images, batch["target_image"]], axis=0), training=training)
            count = tf.shape(images)[0]
            source = {key: value[:count] for key, value in both.items()}
            target = {key: value[count:] for key, value in both.items()}
            source["seg"] = upsample([source["seg_feat"], images])
            terms = {"seg_src": losses.pixel_cross_entropy(batch["source_label"], source["seg"])}
            source_labels = losses.image_level_labels(batch["source_label"], self.num_classes)
            terms.update(self._pit_terms(source, source_labels, "source"))
            terms.update(self._pit_terms(target, batch["target_image_labels"], "target"))
            return terms

    trainer = JointForwardPIT(network, config.num_classes, **trainer_kwargs(config))
    return compile_like_build_trainer(trainer, config)


_DOMAINS = {}


def pit_domains(args):
    """File lists and target image labels of a PIT run on the benchmark (`runner.load_domains`), read once."""
    import types

    from pit_keras.training import runner
    from pit_keras.data import datasets

    if not os.path.isdir(os.path.join(args.data_root, "gta5")):
        datasets.benchmark_roots(args.data_root)  # generates the embedded benchmark on first use
    if args.data_root not in _DOMAINS:
        _DOMAINS[args.data_root] = runner.load_domains(base_config(args, "pit"),
                                                         types.SimpleNamespace(uses_target=True))
    return _DOMAINS[args.data_root]


def training_data(args, config, case, domains):
    """The dataset a training case is fed: the real pipeline, or one real batch repeated from memory."""
    import tensorflow as tf

    from pit_keras.training import runner

    if case["pipeline"]:
        return runner.build_dataset(dataclasses.replace(config, cache_images=case["cached"]), domains,
                                    args.batch_size)
    batch = next(iter(runner.build_dataset(config, domains, args.batch_size)))
    return tf.data.Dataset.from_tensors(batch).repeat()


class TrainingSteps:
    """One training case, built and traced: `call()` runs one execution of its compiled train function."""

    def __init__(self, args, case):
        import keras

        from pit_keras.training import runner
        from pit_keras.models.network import build_network

        method, overrides, units, _ = TRAIN_BASES[case["base"]]
        trainer_method = "source_only" if method.startswith("reference") else method
        config = dataclasses.replace(base_config(args, trainer_method), **overrides, jit_compile=case["xla"],
                                     mixed_precision=case["policy"])
        keras.mixed_precision.set_global_policy(case["policy"])
        keras.utils.set_random_seed(0)
        self.network = build_network(args.backbone, config.num_classes,
                                     num_units=len(config.lse_r) if units is None else units,
                                     aspp_implementation="conv" if case["asppconv"] else "matmul")
        if method.startswith("reference"):
            trainer = make_reference_trainer(self.network, config, backward=method == "reference_bwd")
        elif case["joint"]:
            trainer = make_joint_forward_trainer(self.network, config)
        else:
            trainer = runner.build_trainer(config, self.network)
        self.spe = case["steps_per_execution"]
        if self.spe != 1:
            trainer.compile(optimizer=trainer.optimizer, jit_compile=case["xla"], steps_per_execution=self.spe)
        data = training_data(args, config, case, pit_domains(args))
        # Fixed shapes: batches of a fixed size (drop_remainder) resized to one size, so the step is traced once.
        self.static_shapes = all(spec.shape.is_fully_defined() for spec in data.element_spec.values())
        self.iterator = iter(data)
        trainer.make_train_function()
        self.trainer = trainer
        self.images = args.batch_size * (1 if method == "source_only" else 2)
        self.times, self.cpu_times, self.losses = [], [], []
        self.first = self.call(record=False)

    def call(self, record=True):
        start, start_cpu = time.perf_counter(), time.process_time()
        logs = self.trainer.train_function(self.iterator)
        loss = float(logs["loss"])  # the host sync a logging callback would make
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        if record:
            self.times.append(seconds / self.spe)
            self.cpu_times.append(cpu_seconds / self.spe)
            self.losses.append(loss)
        return seconds

    def result(self):
        step = statistics.median(self.times)
        return {"step_ms": 1000 * step, "step_ms_min": 1000 * min(self.times), "step_ms_max": 1000 * max(self.times),
                "cpu_ms": 1000 * statistics.median(self.cpu_times), "images_per_step": self.images,
                "images_per_s": self.images / step, "first_call_s": self.first,
                "compile_s": max(self.first - self.spe * step, 0.0), "timed_steps": len(self.times) * self.spe,
                "loss_finite": all(v == v and abs(v) != float("inf") for v in self.losses),
                "terms": sorted(self.trainer.term_weights), "parameters": int(self.network.count_params()),
                "static_shapes": self.static_shapes}


def run_train_case(args, case):
    steps = TrainingSteps(args, case)
    for _ in range(args.warmup):
        steps.call(record=False)
    for _ in range(max(args.repeats // steps.spe, 2) if steps.spe > 1 else args.repeats):
        steps.call()
    return steps.result()


def run_ablation_case(args, case):
    """The cases of `ABLATION` (or `SELF_TRAINING`) built in one process and stepped in turn (the order
    rotating every round), so that a load that comes and goes weighs on all of them alike: their differences
    are PIT's parts (or self-training's cost)."""
    members = {name: TrainingSteps(args, parse_case(name)) for name in INTERLEAVED[case["base"]]}
    for _ in range(args.warmup):
        for steps in members.values():
            steps.call(record=False)
    names = list(members)
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            members[name].call()
    return {"members": {name: steps.result() for name, steps in members.items()}}


def run_pipeline_case(args, case):
    config = base_config(args, "pit")
    data = training_data(args, config, {"pipeline": True, "cached": case["cached"]}, pit_domains(args))
    iterator = iter(data)
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter() - start
    for _ in range(max(args.warmup, 2)):
        next(iterator)
    images = 2 * args.batch_size * args.pipeline_window
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.pipeline_window):
            next(iterator)
        rates.append(images / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates), "images_per_s_min": min(rates),
            "images_per_s_max": max(rates), "first_batch_s": first, "window_batches": args.pipeline_window,
            "num_source_images": len(pit_domains(args)["source"][0])}


def run_inference_case(args, case):
    """The exported fine branch of a PIT network against a plain segmenter: latency, timed alternately in one
    process so both see the same machine, and whether their traced graphs hold the same operations."""
    import collections

    import keras
    import numpy as np
    import tensorflow as tf

    from pit_keras.models.network import build_network, fine_segmenter

    keras.mixed_precision.set_global_policy("float32")
    image = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, args.size[1], args.size[0], 3)), tf.float32)
    predictors, graphs = {}, {}
    for name, units in (("fine", 3), ("plain", 0)):
        keras.utils.set_random_seed(0)
        model = fine_segmenter(build_network(args.backbone, 19, num_units=units))
        predict = tf.function(lambda x, model=model: model(x, training=False), autograph=False)
        graph = predict.get_concrete_function(image).graph
        graphs[name] = collections.Counter(op.type for op in graph.get_operations())
        predictors[name] = predict
    for _ in range(args.warmup + 1):
        for predict in predictors.values():
            predict(image).numpy()
    times = {name: [] for name in predictors}
    for repeat in range(args.repeats):
        # Alternating which model goes first cancels any advantage of the position in the pair.
        for name, predict in list(predictors.items())[::1 if repeat % 2 else -1]:
            start = time.perf_counter()
            predict(image).numpy()
            times[name].append(time.perf_counter() - start)
    result = {"same_operations": graphs["fine"] == graphs["plain"]}
    for name in predictors:
        result[f"latency_{name}_ms"] = 1000 * statistics.median(times[name])
        result[f"latency_{name}_ms_min"] = 1000 * min(times[name])
        result[f"operations_{name}"] = sum(graphs[name].values())
    return result


def error_line(err):
    """One line saying why a case failed: TensorFlow's graph errors put the cause last, before the node names."""
    lines = [line.strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line and not line.startswith("[[")] or [""]
    cause = re.sub(r", metadata=\{.*?\}", "", lines[-1])
    return f"{type(err).__name__}: {cause[:400]}"


def run_case(args, name):
    """One case in this process: its measurements as a dict, with how many other training processes ran at its
    start and end, how many cores other processes kept busy meanwhile, and the load average at its end (a case
    timed under load is not comparable)."""
    case = parse_case(name)
    running, before = len(other_training_processes()), safe(cpu_counters)
    if case["base"] in TRAIN_BASES:
        result = run_train_case(args, case)
    elif case["base"] in INTERLEAVED:
        result = run_ablation_case(args, case)
    elif case["base"] == "pipeline":
        result = run_pipeline_case(args, case)
    else:
        result = run_inference_case(args, case)
    return {"case": name, **{k: case[k] for k in ("base", "policy", "xla", "joint", "pipeline", "cached",
                                                   "asppconv", "steps_per_execution")}, **result,
            "other_training_processes": [running, len(other_training_processes())],
            "other_cpu_cores": other_cpu_cores(before, safe(cpu_counters)), "load_average_end": os.getloadavg()[0]}


def safe(read):
    try:
        return read()
    except (OSError, ValueError, IndexError):
        return None


def cpu_counters():
    """(CPU seconds the whole machine was busy, CPU seconds of this process, wall seconds)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic()


def other_cpu_cores(before, after):
    """How many cores other processes kept busy on average between two `cpu_counters()` (load from anything:
    training runs, test suites, builds), or None where /proc/stat is not readable."""
    if before is None or after is None:
        return None
    busy, own, wall = (b - a for a, b in zip(before, after))
    return max(busy - own, 0.0) / wall if wall > 0 else None


# === The run: every case in a subprocess ===

def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case_in_subprocess(args, name):
    """Runs one case in a fresh Python process; its result with the process's peak resident memory."""
    command = [sys.executable, os.path.abspath(__file__), f"--run_case={name}", f"--backbone={args.backbone}",
               f"--size={args.size[0]},{args.size[1]}", f"--batch_size={args.batch_size}",
               f"--repeats={args.repeats}", f"--warmup={args.warmup}", f"--data_root={args.data_root}",
               f"--pipeline_window={args.pipeline_window}", f"--learning_rate={args.learning_rate!r}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = "\n".join(done.stderr.strip().splitlines()[-5:])
    return {"case": name, "error": f"exit {done.returncode}: {tail}"}


def other_training_processes():
    """Command lines of the other training processes (`python -m pit_keras.train`): they distort timings."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "pit_keras.train" in cmdline:
            found.append(cmdline)
    return found


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


def by_name(results):
    return {r["case"]: r for r in results if "error" not in r}


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def step_ratios(cases, key):
    """PIT's step against the references and baselines, and the shares of its step, by wall or CPU time."""
    step = {name: r[key] for name, r in cases.items() if key in r}
    pit, ref, ref_bwd = step.get("pit"), step.get("reference"), step.get("reference_bwd")
    ratios = {"pit_over_reference": ratio(pit, ref), "pit_over_reference_bwd": ratio(pit, ref_bwd),
              "pit_over_minent": ratio(pit, step.get("minent")),
              "pit_over_source_only": ratio(pit, step.get("source_only"))}
    for suffix in ("+xla", "+bf16", "+bf16+xla", "+fp16", "+fp16+xla"):
        ratios[f"pit_over_reference{suffix}"] = ratio(step.get(f"pit{suffix}"), step.get(f"reference{suffix}"))
    ratios["pit_fed_by_pipeline_over_memory"] = ratio(step.get("pit+pipeline"), pit)
    ratios["pit_fed_by_cached_pipeline_over_memory"] = ratio(step.get("pit+pipeline+cached"), pit)
    if None not in (pit, ref, ref_bwd, step.get("pit_no_lc"), step.get("pit_no_lr")):
        # T(pit) = T(ref_bwd) + heads + lse + recon; dropping L_c removes lse, dropping L_r removes recon.
        lse, recon = pit - step["pit_no_lc"], pit - step["pit_no_lr"]
        ratios["shares_of_pit_step"] = {
            "two_domain_forward": ref / pit, "target_backward": (ref_bwd - ref) / pit,
            "coarse_heads": (pit - ref_bwd - lse - recon) / pit, "lse_pooling_and_image_loss": lse / pit,
            "reconstruction": recon / pit}
    return ratios


def summarize(results):
    """Derived numbers: PIT's overhead ratios and the shares of its step (by wall time; by CPU time under
    `cpu`; from the interleaved `ablation` case under `interleaved` and `interleaved_cpu`), pipeline headroom,
    export latency."""
    cases = by_name(results)
    summary = step_ratios(cases, "step_ms")
    summary["cpu"] = step_ratios(cases, "cpu_ms")
    members = cases.get("ablation", {}).get("members")
    if members:
        summary["interleaved"] = step_ratios(members, "step_ms")
        summary["interleaved_cpu"] = step_ratios(members, "cpu_ms")
    pipeline = cases.get("pipeline", {}).get("images_per_s")
    cached = cases.get("pipeline+cached", {}).get("images_per_s")
    # What PIT consumes: its faster measurement (alone or interleaved), the harder bar for the pipeline.
    consumed = max([r["images_per_s"] for r in (cases.get("pit"), (members or {}).get("pit")) if r] or [None],
                   key=lambda v: v or 0)
    summary["pit_consumes_images_per_s"] = consumed
    summary["pipeline_over_consumption"] = ratio(pipeline, consumed)
    summary["cached_pipeline_over_consumption"] = ratio(cached, consumed)
    inference = cases.get("inference", {})
    summary["fine_over_plain_latency"] = ratio(inference.get("latency_fine_ms"), inference.get("latency_plain_ms"))
    summary["fine_and_plain_same_operations"] = inference.get("same_operations")
    return summary


def fmt(value, spec=".1f", none="-"):
    return none if value is None else format(value, spec)


def report(data):
    """The Markdown report of a run's JSON."""
    args, results, summary = data["args"], data["results"], data["summary"]
    cases = by_name(results)
    m = data["machine"]
    lines = [f"`{data['command']}`", "",
             f"{m['cpu']}, {m['nproc']} CPU threads, TensorFlow {m['tensorflow']}, Keras {m['keras']}; "
             f"load average {data['load_average_start'][0]:.2f} at the start, {data['load_average_end'][0]:.2f} at "
             f"the end; {len(data['other_training_processes'])} other training processes at the start.", "",
             f"Backbone `{args['backbone']}`, {args['size'][0]}x{args['size'][1]}, batch {args['batch_size']} per "
             f"domain; medians of {args['repeats']} steps after {args['warmup']} warm-up steps; SGD learning rate "
             f"{args.get('learning_rate', 0.05):g}.", ""]
    diverged = [r["case"] for r in results if r.get("loss_finite") is False]
    if diverged:
        lines += [f"**Warning: the loss was not finite in {', '.join(diverged)}**: those steps ran on NaN or infinite "
                  "values, and their times may not be a healthy step's (lower --learning_rate).", ""]
    lines += [
             "| case | what | policy | XLA | step (ms) | CPU (ms) | images/s | vs reference | compile (s) | "
             "peak RSS (MB) | other load (cores) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            error = r["error"] if len(r["error"]) <= 150 else r["error"][:150] + "... (the JSON has it all)"
            lines.append(f"| {r['case']} | failed: {error} | | | | | | | | | |")
            continue
        if "step_ms" not in r:
            continue
        what = TRAIN_BASES[r["base"]][3]
        extras = [x for x, on in (("joint forward", r["joint"]), ("pipeline-fed", r["pipeline"]),
                                  ("cached", r["cached"]),
                                  ("ASPP as dilated convolutions", r.get("asppconv", False))) if on]
        if r["steps_per_execution"] > 1:
            extras.append(f"steps_per_execution={r['steps_per_execution']}")
        if extras:
            what += f" ({', '.join(extras)})"
        suffix = "".join(s for s, on in (("+bf16", r["policy"] == "mixed_bfloat16"),
                                         ("+fp16", r["policy"] == "mixed_float16"), ("+xla", r["xla"]),
                                         ("+asppconv", r.get("asppconv", False))) if on)
        reference = cases.get(f"reference{suffix}", {}).get("step_ms")
        lines.append(f"| {r['case']} | {what} | {r['policy']} | {'on' if r['xla'] else 'off'} | "
                     f"{r['step_ms']:.1f} | {fmt(r.get('cpu_ms'))} | {r['images_per_s']:.1f} | "
                     f"{fmt(ratio(r['step_ms'], reference), '.2f')} | {r['compile_s']:.1f} | "
                     f"{fmt(r.get('peak_rss_mb'), '.0f')} | {fmt(r.get('other_cpu_cores'))} |")
    if "ablation" in cases:
        lines += ["", f"Interleaved in one process (`ablation`: each round steps every member once, in a rotating "
                  f"order; medians of {args['repeats']} rounds; other load "
                  f"{fmt(cases['ablation'].get('other_cpu_cores'))} cores):", "",
                  "| member | step (ms) | CPU (ms) | vs reference (wall) | (CPU) |", "|---|---|---|---|---|"]
        members = cases["ablation"]["members"]
        for name, r in members.items():
            lines.append(f"| {name} | {r['step_ms']:.1f} | {r['cpu_ms']:.1f} | "
                         f"{fmt(ratio(r['step_ms'], members['reference']['step_ms']), '.2f')} | "
                         f"{fmt(ratio(r['cpu_ms'], members['reference']['cpu_ms']), '.2f')} |")
    if "self_training" in cases and "members" in cases["self_training"]:
        members = cases["self_training"]["members"]
        goals = {"source_only_st": "<= 1.5", "pit_st": "<= 2"}
        lines += ["", f"Self-training against the PIT step, interleaved in one process (`self_training`; medians of "
                  f"{args['repeats']} rounds; other load {fmt(cases['self_training'].get('other_cpu_cores'))} "
                  "cores):", "", "| member | step (ms) | CPU (ms) | vs PIT (wall) | (CPU) | goal |",
                  "|---|---|---|---|---|---|"]
        for name, r in members.items():
            lines.append(f"| {name} | {r['step_ms']:.1f} | {r['cpu_ms']:.1f} | "
                         f"{fmt(ratio(r['step_ms'], members['pit']['step_ms']), '.2f')} | "
                         f"{fmt(ratio(r['cpu_ms'], members['pit']['cpu_ms']), '.2f')} | {goals.get(name, '')} |")
    columns = [(label, summary.get(key, {}).get("shares_of_pit_step") if key else summary.get("shares_of_pit_step"))
               for label, key in (("separate processes, wall", None), ("separate, CPU", "cpu"),
                                  ("interleaved, wall", "interleaved"), ("interleaved, CPU", "interleaved_cpu"))]
    columns = [(label, shares) for label, shares in columns if shares]
    if columns:
        lines += ["", "Where a PIT step goes (float32, XLA off), by ablation: reference; reference_bwd - reference; "
                  "pit - pit_no_lc (L_c); pit - pit_no_lr (L_r); the rest of pit - reference_bwd (coarse heads):", "",
                  "| part | " + " | ".join(label for label, _ in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        labels = {"two_domain_forward": "two-domain forward + source backward (reference)",
                  "target_backward": "backward through the target",
                  "coarse_heads": "K coarse heads, forward + backward",
                  "lse_pooling_and_image_loss": "LSE pooling and image-level loss (L_c)",
                  "reconstruction": "reconstruction (L_r)"}
        for key, label in labels.items():
            lines.append(f"| {label} | " + " | ".join(f"{100 * shares[key]:.1f} %" for _, shares in columns) + " |")
    pipe = [cases[n] for n in ("pipeline", "pipeline+cached") if n in cases]
    if pipe:
        lines += ["", "| input pipeline | images/s (source + target) | first batch (s) | peak RSS (MB) | "
                  "vs what PIT consumes | other load (cores) |", "|---|---|---|---|---|---|"]
        for r in pipe:
            lines.append(f"| {r['case']} | {r['images_per_s']:.1f} | {r['first_batch_s']:.2f} | "
                         f"{fmt(r.get('peak_rss_mb'), '.0f')} | "
                         f"{fmt(ratio(r['images_per_s'], summary['pit_consumes_images_per_s']), '.1f')}x | "
                         f"{fmt(r.get('other_cpu_cores'))} |")
    if "inference" in cases:
        r = cases["inference"]
        lines += ["", f"| inference, 1 image at {args['size'][0]}x{args['size'][1]} (other load "
                  f"{fmt(r.get('other_cpu_cores'))} cores) | latency (ms, median) | (min) | graph operations |",
                  "|---|---|---|---|",
                  f"| exported fine branch of a PIT network | {r['latency_fine_ms']:.2f} | "
                  f"{r['latency_fine_ms_min']:.2f} | {r['operations_fine']} |",
                  f"| plain segmenter (num_units=0) | {r['latency_plain_ms']:.2f} | {r['latency_plain_ms_min']:.2f} | "
                  f"{r['operations_plain']} |", "",
                  f"The two graphs hold {'the same' if r['same_operations'] else 'different'} operations."]
    views = [summary, summary["cpu"], summary.get("interleaved", {}), summary.get("interleaved_cpu", {})]
    goals = [("PIT step / two-domain forward reference", "pit_over_reference", "<= 1.15"),
             ("PIT step / reference with target backward", "pit_over_reference_bwd", "-"),
             ("PIT step / MinEnt step", "pit_over_minent", "-"),
             ("PIT fed by the pipeline / fed from memory (step time)", "pit_fed_by_pipeline_over_memory", "-"),
             ("PIT fed by the cached pipeline / fed from memory", "pit_fed_by_cached_pipeline_over_memory", "-")]
    lines += ["", "| ratio | separate processes, wall | separate, CPU | interleaved, wall | interleaved, CPU | goal |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {label} | " + " | ".join(fmt(view.get(key), ".2f") for view in views) + f" | {goal} |"
              for label, key, goal in goals]
    lines += [f"| {label} | {fmt(summary.get(key), '.2f')} | | | | {goal} |" for label, key, goal in (
        ("input pipeline / what PIT consumes", "pipeline_over_consumption", ">= 3"),
        ("cached input pipeline / what PIT consumes", "cached_pipeline_over_consumption", ">= 3"),
        ("exported fine branch / plain segmenter (latency)", "fine_over_plain_latency", "1.00"))]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny", help="A backbone of the registry (weights: none).")
    parser.add_argument("--size", default="256,128", help="W,H of source and target images.")
    parser.add_argument("--batch_size", type=int, default=4, help="Images per domain per step.")
    parser.add_argument("--repeats", type=int, default=20, help="Timed steps (pipeline: timed windows).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps after the first.")
    parser.add_argument("--learning_rate", type=float, default=0.05,
                        help="SGD learning rate of every training case: the demo's 0.05 by default; a step must "
                             "keep the loss finite to be timed honestly (DeepLab-v2 without ImageNet weights "
                             "diverges at 0.05: use the paper's 2.5e-5).")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help="Comma-separated cases, BASE[+MODIFIER...] (see the module docstring).")
    parser.add_argument("--data_root", default=DEFAULT_BENCHMARK_ROOT, help="The embedded benchmark's folder.")
    parser.add_argument("--pipeline_window", type=int, default=10, help="Batches per timed pipeline window.")
    parser.add_argument("--in_process", action="store_true",
                        help="Run every case in this process (faster; no per-case peak memory).")
    parser.add_argument("--output", help="Where the JSON goes.")
    parser.add_argument("--report", help="Print the report of an existing JSON (summary recomputed) and exit.")
    parser.add_argument("--run_case", help=argparse.SUPPRESS)
    parser.add_argument("--tf_logs", action="store_true", help=console.TF_LOGS_HELP)
    args = parser.parse_args(argv)
    try:
        args.size = tuple(int(v) for v in args.size.split(","))
        assert len(args.size) == 2 and min(args.size) > 0
    except (ValueError, AssertionError):
        parser.error(f"--size={args.size}: expected W,H (two positive integers).")
    args.data_root = os.path.expanduser(args.data_root)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for name in args.cases:
        try:
            case = parse_case(name)
        except ValueError as err:
            parser.error(str(err))
        if case["asppconv"] and not args.report and BACKBONE_HEADS.get(args.backbone) != "aspp":
            parser.error(f"case {name!r}: asppconv changes only backbones with ASPP heads, not {args.backbone}.")
    if min(args.batch_size, args.repeats, args.pipeline_window) <= 0 or args.warmup < 0:
        parser.error("--batch_size, --repeats and --pipeline_window must be positive, --warmup not negative.")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            data = json.load(f)
        data["summary"] = summarize(data["results"])
        print(report(data))
        return 0
    if args.run_case:
        try:
            result = run_case(args, args.run_case)
        except Exception as err:  # reported as the case's row, in one line
            result = {"case": args.run_case, "error": error_line(err)}
        result["peak_rss_mb"] = peak_rss_mb()
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    command = "python tools/benchmark_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_start, running = os.getloadavg(), other_training_processes()
    if running:
        print(f"warning: {len(running)} other training processes are running; timings are taken under load.",
              file=sys.stderr)
    results = []
    for name in args.cases:
        start = time.perf_counter()
        if args.in_process:
            import keras

            keras.backend.clear_session()
            try:
                result = run_case(args, name)
            except Exception as err:  # one failing case (e.g. an XLA limitation) must not lose the others
                result = {"case": name, "error": error_line(err)}
        else:
            result = case_in_subprocess(args, name)
        result["wall_s"] = time.perf_counter() - start
        print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
        results.append(result)
    data = {"command": command, "machine": machine(), "load_average_start": list(load_start),
            "load_average_end": list(os.getloadavg()), "other_training_processes": running,
            "args": {"backbone": args.backbone, "size": list(args.size), "batch_size": args.batch_size,
                     "repeats": args.repeats, "warmup": args.warmup, "cases": args.cases,
                     "in_process": args.in_process, "pipeline_window": args.pipeline_window,
                     "learning_rate": args.learning_rate},
            "results": results}
    data["summary"] = summarize(results)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        atomic.write_text_atomic(args.output, json.dumps(data, indent=2) + "\n")
    print(report(data))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    console.configure_from_argv()
    sys.exit(main())
