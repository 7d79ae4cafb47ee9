"""The cases of tools/benchmark_train.py: their names, the trainers they time (built by
`pit_keras.training.runner.build_trainer`, like a training run's), and the code that runs and times one case in
this process. See tools/benchmark_train.py for what each case measures.

TensorFlow is imported only by the functions that run a case: the report needs none of it.
"""

import dataclasses
import os
import re
import statistics
import time

from pit_keras.flags import DEFAULT_BENCHMARK_ROOT

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


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every case of a run shares: the tool's flags (checked by tools/benchmark_train.py)."""

    backbone: str = "tiny"
    size: tuple = (256, 128)  # W, H of source and target images
    batch_size: int = 4  # images per domain per step
    repeats: int = 20  # timed steps (pipeline: timed windows)
    warmup: int = 3  # untimed steps after the first
    learning_rate: float = 0.05
    data_root: str = os.path.expanduser(DEFAULT_BENCHMARK_ROOT)
    pipeline_window: int = 10  # batches per timed pipeline window


def parse_case(name):
    """`BASE+MOD+...` -> dict(base, policy, xla, joint, pipeline, cached, steps_per_execution); refuses unknown
    parts with a ValueError whose sentence names them."""
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


def case_config(args, case):
    """The `RunConfig` of a training case: the references train as source-only runs (their trainer adds the
    target forward)."""
    method, overrides, _, _ = TRAIN_BASES[case["base"]]
    trainer_method = "source_only" if method.startswith("reference") else method
    return dataclasses.replace(base_config(args, trainer_method), **overrides, jit_compile=case["xla"],
                               mixed_precision=case["policy"])


# === The trainers' variants: subclasses that change only what a step computes ===

def two_domain_reference(backward):
    """The `PITTrainer` class of the two-domain reference: a source-only step that also runs the target through
    the network. The target's term (the mean of its fine logits) enters the loss with weight 0, folded into the
    per-image source loss: its forward is always computed, its backward (through the target) with `backward`."""
    import tensorflow as tf

    from pit_keras import losses
    from pit_keras.training.trainer import PITTrainer

    class TwoDomainReference(PITTrainer):
        @property
        def uses_target(self):
            return True

        def compute_terms(self, batch, training=False, step=None):
            source = self.network(batch["source_image"], training=training)
            target = self.network(batch["target_image"], training=training)
            value = tf.reduce_mean(tf.cast(target["seg_feat"], tf.float32), axis=[1, 2, 3])
            if not backward:
                value = tf.stop_gradient(value)
            return {"seg_src": losses.pixel_cross_entropy(batch["source_label"], source["seg"]) + 0.0 * value}

    return TwoDomainReference


def joint_forward_pit(network, units):
    """The `PITTrainer` class of PIT with one backbone call on the concatenated source + target batch, for
    `network` with `units` coarse units.

    Only the logits at feature resolution are computed for both domains, and only the source's fine logits are
    upsampled (for L_f): slicing the network's input-resolution outputs instead would upsample the target's
    too, forward and backward, which costs more than the second backbone call saves. BatchNorm in training mode
    then normalises with both domains' statistics mixed, which changes training for the tiny and MobileNetV3
    backbones (not for DeepLab-v2's frozen BatchNorm)."""
    import keras
    import tensorflow as tf

    from pit_keras import losses
    from pit_keras.training.trainer import PITTrainer

    heads = {"seg_feat": "fine_head", **{f"cam_{k}_feat": f"coarse_head_{k}" for k in range(units)}}
    features = keras.Model(network.input, {key: network.get_layer(name).output for key, name in heads.items()})
    upsample = network.get_layer("seg")

    class JointForwardPIT(PITTrainer):
        def compute_terms(self, batch, training=False, step=None):
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

    return JointForwardPIT


def build_case_trainer(args, case):
    """`(config, network, trainer)` of a training case: the network built as the case asks, the trainer and its
    optimizer by `runner.build_trainer` (with the variant's class for the references and `joint`, and the
    case's steps_per_execution). Sets the case's dtype policy and the seed."""
    import keras

    from pit_keras.models.network import build_network
    from pit_keras.training import runner
    from pit_keras.training.trainer import PITTrainer

    method, _, units, _ = TRAIN_BASES[case["base"]]
    config = case_config(args, case)
    keras.mixed_precision.set_global_policy(case["policy"])
    keras.utils.set_random_seed(0)
    network = build_network(args.backbone, config.num_classes,
                            num_units=len(config.lse_r) if units is None else units,
                            aspp_implementation="conv" if case["asppconv"] else "matmul")
    trainer_class = PITTrainer
    if method.startswith("reference"):
        trainer_class = two_domain_reference(backward=method == "reference_bwd")
    elif case["joint"]:
        trainer_class = joint_forward_pit(network, len(config.lse_r))
    trainer = runner.build_trainer(config, network, trainer_class=trainer_class,
                                   steps_per_execution=case["steps_per_execution"])
    return config, network, trainer


_DOMAINS = {}


def pit_domains(args):
    """File lists and target image labels of a PIT run on the benchmark (`runner.load_domains`), read once."""
    import types

    from pit_keras.data import datasets
    from pit_keras.training import runner

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
        method = TRAIN_BASES[case["base"]][0]
        config, self.network, self.trainer = build_case_trainer(args, case)
        self.spe = case["steps_per_execution"]
        data = training_data(args, config, case, pit_domains(args))
        # Fixed shapes: batches of a fixed size (drop_remainder) resized to one size, so the step is traced once.
        self.static_shapes = all(spec.shape.is_fully_defined() for spec in data.element_spec.values())
        self.iterator = iter(data)
        self.trainer.make_train_function()
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


# === One case, in this process ===

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


# === The machine's load ===

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
