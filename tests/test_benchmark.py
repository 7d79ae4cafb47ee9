"""tools/benchmark_train*.py and tools/benchmark_aspp.py, without timings: one in-process run (micro backbone,
32x32, 2 repeats) checking the JSON and report it writes, one case in its own process (peak memory), the case
names and flags; the benchmark builds what it measures with the library's functions (read in its source, and
compared with `runner.build_trainer`'s trainer), and its variants compute what they claim."""

import ast
import dataclasses
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import benchmark_aspp
import benchmark_train
import benchmark_train_cases as cases
from commands import run_tool_in_process
from conftest import REPO, micro_backbone
from pit_keras.errors import UserError
from pit_keras.models.network import build_network, interaction_weights
from pit_keras.training import runner
from pit_keras.training.trainer import PITTrainer

TRAIN_KEYS = {"case", "base", "policy", "xla", "joint", "pipeline", "cached", "steps_per_execution", "step_ms",
              "images_per_step", "images_per_s", "first_call_s", "compile_s", "timed_steps", "loss_finite", "terms",
              "parameters", "static_shapes", "wall_s"}
IN_PROCESS = ["self_training", "inference"]
SMALL = ("--size=32,32", "--batch_size=2", "--repeats=2", "--warmup=0", "--pipeline_window=2")


def run_tool(output, root, names, *extra, backbone="tiny"):
    """tools/benchmark_train.py on the tiny benchmark at the smallest sizes, in this process: (its
    CompletedProcess, the JSON it wrote)."""
    done = run_tool_in_process("benchmark_train", f"--backbone={backbone}", *SMALL, f"--data_root={root}",
                               f"--cases={','.join(names)}", f"--output={output}", *extra)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return done, json.loads(output.read_text())


@pytest.fixture(scope="module")
def in_process_run(tiny_benchmark, tmp_path_factory):
    """One in-process run: the interleaved self-training case (three trainers, traced and stepped) and the
    inference case, on the micro backbone (conftest.build_micro; the tool's JSON and report do not depend on the
    backbone; measured alone, side by side: 11.2-12.2 s with the tiny backbone, 3.9-4.3 s with micro). (The JSON's
    path, the CompletedProcess, the JSON.)"""
    output = tmp_path_factory.mktemp("benchmark") / "perf.json"
    with micro_backbone():
        done, data = run_tool(output, tiny_benchmark, IN_PROCESS, "--in_process", backbone="micro")
    return output, done, data


@pytest.mark.slow  # two minutes of tool benchmarking; the self-training and inference cases below run by default
def test_smoke_run_writes_every_section(tmp_path, tiny_benchmark):
    names = ["reference", "pit", "pit_no_lc", "ablation", "pipeline"]
    done, data = run_tool(tmp_path / "perf.json", tiny_benchmark, names, "--in_process")
    assert done.returncode == 0
    assert set(data) >= {"command", "machine", "load_average_start", "load_average_end", "other_training_processes",
                         "args", "results", "summary"}
    assert data["machine"]["nproc"] >= 1 and data["machine"]["cpu"]
    assert data["args"]["size"] == [32, 32] and data["args"]["cases"] == names
    results = {r["case"]: r for r in data["results"]}
    assert list(results) == names
    for name in ("reference", "pit", "pit_no_lc"):
        assert set(results[name]) >= TRAIN_KEYS, name
        assert results[name]["loss_finite"] and results[name]["timed_steps"] == 2
        assert len(results[name]["other_training_processes"]) == 2 and results[name]["other_cpu_cores"] >= 0
    assert results["pit"]["terms"] == ["img_src", "img_trg", "rec_src", "rec_trg", "seg_src"]
    assert results["pit_no_lc"]["terms"] == ["rec_src", "rec_trg", "seg_src"]
    assert results["reference"]["terms"] == ["seg_src"] and results["reference"]["images_per_step"] == 4
    assert results["pit"]["cpu_ms"] > 0 and results["pit"]["static_shapes"]
    members = results["ablation"]["members"]
    assert list(members) == ["reference", "reference_bwd", "pit", "pit_no_lc", "pit_no_lr"]
    assert all(set(m) >= TRAIN_KEYS - {"case", "base", "policy", "xla", "joint", "pipeline", "cached",
                                       "steps_per_execution", "wall_s"} for m in members.values())
    assert results["pipeline"]["images_per_s"] > 0
    summary = data["summary"]
    parts = {"two_domain_forward", "target_backward", "coarse_heads", "lse_pooling_and_image_loss", "reconstruction"}
    for view in ("interleaved", "interleaved_cpu"):
        assert set(summary[view]["shares_of_pit_step"]) == parts
        assert sum(summary[view]["shares_of_pit_step"].values()) == pytest.approx(1.0)
    assert "shares_of_pit_step" not in summary  # the separate cases lack reference_bwd and pit_no_lr
    assert summary["pit_over_reference"] == pytest.approx(results["pit"]["step_ms"] / results["reference"]["step_ms"])
    assert summary["pipeline_over_consumption"] is not None and summary["fine_over_plain_latency"] is None
    assert "| case | what |" in done.stdout and "| PIT step / two-domain forward reference |" in done.stdout
    assert "Interleaved in one process" in done.stdout


def test_an_in_process_run_writes_its_json_and_report(in_process_run):
    output, done, data = in_process_run
    assert done.returncode == 0, data["results"]
    assert set(data) >= {"command", "machine", "load_average_start", "load_average_end", "other_training_processes",
                         "args", "results", "summary"}
    assert data["command"].startswith("python tools/benchmark_train.py --backbone=micro --size=32,32")
    assert data["args"]["backbone"] == "micro"
    assert data["machine"]["nproc"] >= 1 and data["machine"]["cpu"]
    assert data["args"]["size"] == [32, 32] and data["args"]["cases"] == IN_PROCESS
    assert data["args"]["in_process"] and data["args"]["learning_rate"] == 0.05
    assert [r["case"] for r in data["results"]] == IN_PROCESS
    assert all(len(r["other_training_processes"]) == 2 and r["wall_s"] > 0 for r in data["results"])
    # The report again, from the JSON: the run printed the same one.
    again = run_tool_in_process("benchmark_train", f"--report={output}")
    assert again.returncode == 0 and again.stdout.startswith("`python tools/benchmark_train.py")
    assert done.stdout.strip().endswith(again.stdout.strip())  # the run's output starts with the data's notes


@pytest.mark.parametrize("content,message", [("{not json", "cannot be read as JSON"),
                                             ('{"results": [{"step_ms": 1}]}', "not a JSON written by benchmark_train")])
def test_report_of_a_foreign_file_is_one_sentence(tmp_path, content, message):
    path = tmp_path / "other.json"
    path.write_text(content)
    done = run_tool_in_process("benchmark_train", f"--report={path}")
    assert done.returncode == 2 and done.stderr.strip() == done.stderr.strip().splitlines()[0]
    assert done.stderr.startswith(f"error: --report={path}: {message}")


def test_self_training_steps_are_measured_against_the_pit_step(in_process_run):
    _, done, data = in_process_run
    members = data["results"][0]["members"]
    assert list(members) == ["pit", "source_only_st", "pit_st"]
    assert all(set(m) >= TRAIN_KEYS - {"case", "base", "policy", "xla", "joint", "pipeline", "cached",
                                       "steps_per_execution", "wall_s"} for m in members.values())
    assert members["pit"]["terms"] == ["img_src", "img_trg", "rec_src", "rec_trg", "seg_src"]
    assert members["source_only_st"]["terms"] == ["seg_src", "st_trg"]
    assert members["pit_st"]["terms"] == ["img_src", "img_trg", "rec_src", "rec_trg", "seg_src", "st_trg"]
    assert all(m["loss_finite"] and m["timed_steps"] == 2 and m["static_shapes"] for m in members.values())
    assert members["pit"]["images_per_step"] == 4 and members["pit"]["cpu_ms"] > 0
    assert "| pit_st |" in done.stdout and "Self-training against the PIT step" in done.stdout


def test_the_exported_fine_branch_is_the_plain_segmenter(in_process_run):
    _, done, data = in_process_run
    result = data["results"][1]
    assert result["latency_fine_ms"] > 0 and result["latency_plain_ms"] > 0
    # The coarse units leave nothing behind in the exported fine branch.
    assert result["same_operations"] and result["operations_fine"] == result["operations_plain"]
    assert data["summary"]["fine_and_plain_same_operations"] and data["summary"]["fine_over_plain_latency"] > 0
    assert "The two graphs hold the same operations." in done.stdout


def test_a_case_in_its_own_process_reports_its_peak_memory(tmp_path, tiny_benchmark):
    # The one case run as users run them, in a process of its own: the two-domain reference.
    done, data = run_tool(tmp_path / "perf.json", tiny_benchmark, ["reference"])
    assert done.returncode == 0, data["results"]
    (result,) = data["results"]
    assert result["case"] == "reference" and result["peak_rss_mb"] > 10 and not data["args"]["in_process"]
    assert set(result) >= TRAIN_KEYS and result["loss_finite"] and result["timed_steps"] == 2
    # Its target term is folded into the source's loss with weight 0: the trainer's only term is L_f.
    assert result["terms"] == ["seg_src"] and result["images_per_step"] == 4 and result["static_shapes"]
    assert "| reference | two-domain forward (reference): source + target, L_f only | float32 | off |" in done.stdout


def test_case_names_parse_and_bad_ones_are_refused():
    for name in cases.DEFAULT_CASES:
        cases.parse_case(name)
    case = cases.parse_case("pit+bf16+xla+spe5+joint")
    assert (case["policy"], case["xla"], case["steps_per_execution"], case["joint"]) == ("mixed_bfloat16", True, 5,
                                                                                           True)
    assert cases.parse_case("pit+asppconv")["asppconv"] and not case["asppconv"]
    for bad in ("pit+turbo", "nope", "pit+cached", "pipeline+xla", "reference+joint", "ablation+xla"):
        with pytest.raises(ValueError, match="case"):
            cases.parse_case(bad)
        with pytest.raises(UserError, match="^--cases: case"):
            benchmark_train.parse_settings(case_names=[bad])
    with pytest.raises(UserError, match="asppconv changes only backbones with ASPP heads, not tiny"):
        benchmark_train.parse_settings(backbone="tiny", case_names=["pit+asppconv"])
    settings, names = benchmark_train.parse_settings(backbone="deeplabv2_resnet101", size="64,32",
                                                     case_names=["pit+asppconv", " ", "inference"])
    assert names == ["pit+asppconv", "inference"] and settings.size == (64, 32)
    for kwargs in ({"size": "64"}, {"size": "0,32"}, {"repeats": 0}, {"warmup": -1}):
        with pytest.raises(UserError, match="^--"):
            benchmark_train.parse_settings(**kwargs)
    done = run_tool_in_process("benchmark_train", "--cases=pit+turbo")  # one sentence, exit code 2
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("error: --cases: case 'pit+turbo': unknown modifier 'turbo' (xla, bf16, fp16, "
                                   "joint, pipeline, cached, asppconv, spe<N>).")


def test_backbone_heads_table_matches_the_registry():
    from pit_keras.models import backbones

    assert cases.BACKBONE_HEADS == {name: spec.head for name, spec in backbones.BACKBONES.items()}


# === The benchmark builds what it measures with the library's functions ===

ALLOWED_METHODS = {"compute_terms", "uses_target"}
PROTECTED = {"term_weights", "trackers"}
MUTATORS = {"update", "pop", "popitem", "setdefault", "clear", "__setitem__", "__delitem__"}


def _name(node):
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)


def setup_violations(source):
    """`(line, what)` of every place `source` sets up a trainer or an optimizer of its own: a `.compile(` call,
    `keras.optimizers` (or any `optimizers` module), a `PITTrainer(...)` construction (or one of a subclass), a
    `PITTrainer` subclass (direct or not) with a method other than `compute_terms` and `uses_target`, and any
    assignment, deletion or in-place change of a `term_weights` or `trackers` attribute."""
    tree = ast.parse(source)
    found = []
    trainers = {"PITTrainer"}
    for node in ast.walk(tree):  # subclasses of subclasses, in the order they are written
        if isinstance(node, ast.ClassDef) and any(_name(base) in trainers for base in node.bases):
            trainers.add(node.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _name(node.func)
            if isinstance(node.func, ast.Attribute) and name == "compile":
                found.append((node.lineno, ".compile("))
            if name in trainers:  # PITTrainer or a subclass, built here rather than by runner.build_trainer
                found.append((node.lineno, f"{name}("))
            if isinstance(node.func, ast.Attribute) and name in MUTATORS and _name(node.func.value) in PROTECTED:
                found.append((node.lineno, f"{_name(node.func.value)}.{name}("))
            if name == "setattr" and len(node.args) > 1 and getattr(node.args[1], "value", None) in PROTECTED:
                found.append((node.lineno, f"setattr {node.args[1].value}"))
        elif isinstance(node, (ast.Attribute, ast.Name)) and _name(node) == "optimizers":
            found.append((node.lineno, "optimizers"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            if any("optimizers" in module.split(".") for module in modules):
                found.append((node.lineno, "import optimizers"))
        elif isinstance(node, ast.ClassDef) and node.name in trainers:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name not in ALLOWED_METHODS:
                    found.append((item.lineno, f"{node.name}.{item.name}"))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if any(isinstance(sub, ast.Attribute) and sub.attr in PROTECTED for sub in ast.walk(target)):
                    found.append((node.lineno, "term_weights/trackers assigned"))
    return found


MISTAKES = [
    "trainer.compile(optimizer=trainer.optimizer, steps_per_execution=10)",
    "import keras\nschedule = keras.optimizers.schedules.PolynomialDecay(0.1, 10)",
    "from keras import optimizers\noptimizer = optimizers.SGD(0.1)",
    "from keras.optimizers import SGD",
    "import keras.optimizers",
    "from pit_keras.training.trainer import PITTrainer\ntrainer = PITTrainer(network, 19)",
    "from pit_keras.training import trainer\nt = trainer.PITTrainer(network, 19)",
    "class Variant(PITTrainer):\n    def compute_terms(self, batch):\n        return {}\n\ntrainer = Variant(network, 19)",
    "class Variant(PITTrainer):\n    def __init__(self, *args):\n        super().__init__(*args)",
    "class Variant(trainer.PITTrainer):\n    def train_step(self, batch):\n        return {}",
    "class A(PITTrainer):\n    def compute_terms(self, batch):\n        return {}\n\n"
    "class B(A):\n    def _term_weights(self, *args):\n        return {}",
    "trainer.term_weights['trg_ref'] = 0.0",
    "trainer.trackers['trg_ref'] = keras.metrics.Mean(name='trg_ref')",
    "trainer.term_weights.update(trg_ref=0.0)",
    "self.trackers = {}",
    "trainer.term_weights['seg_src'] *= 0.0",
    "del trainer.trackers['loss']",
    "setattr(trainer, 'term_weights', {})",
]


@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_setup_check_finds_each_mistake(mistake):
    assert setup_violations(mistake), mistake


def test_the_setup_check_lets_the_library_build_trainers():
    allowed = ("trainer = runner.build_trainer(config, network, trainer_class=Variant, steps_per_execution=2)\n"
               "terms = sorted(trainer.term_weights)\nloss = trainer.trackers['loss'].result()\n"
               "class Variant(PITTrainer):\n    @property\n    def uses_target(self):\n        return True\n\n"
               "    def compute_terms(self, batch, training=False, step=None):\n        return {}\n"
               "class TrainingSteps:\n    def call(self):\n        return self.trainer.train_function(it)\n")
    assert setup_violations(allowed) == []


def test_the_benchmark_has_no_trainer_or_optimizer_setup_of_its_own():
    files = sorted((REPO / "tools").glob("benchmark_train*.py"))
    assert [f.name for f in files] == ["benchmark_train.py", "benchmark_train_cases.py", "benchmark_train_report.py"]
    found = {f.name: setup_violations(f.read_text()) for f in files}
    assert not any(found.values()), f"build trainers with runner.build_trainer: {found}"


@pytest.mark.parametrize("name", ["pit", "minent", "reference_bwd", "pit+joint", "pit_no_lc+xla+spe3"])
def test_the_benchmark_trainer_is_the_one_build_trainer_gives(name):
    case = cases.parse_case(name)
    settings = cases.Settings(size=(32, 32), batch_size=2)
    config, network, trainer = cases.build_case_trainer(settings, case)
    assert config == cases.case_config(settings, case)
    reference = runner.build_trainer(config, network)  # the same RunConfig, as a training run builds it
    variant = case["joint"] or case["base"].startswith("reference")  # a subclass that changes only the step
    assert isinstance(trainer, PITTrainer) and (type(trainer) is not PITTrainer) == variant
    assert type(trainer.optimizer) is type(reference.optimizer)
    # Every setting (schedule, momentum, weight decay, ...) but the name Keras makes unique per optimizer.
    assert {**trainer.optimizer.get_config(), "name": None} == {**reference.optimizer.get_config(), "name": None}
    variables = network.trainable_variables
    assert [trainer.optimizer._use_weight_decay(v) for v in variables] == [
        reference.optimizer._use_weight_decay(v) for v in variables]
    assert [trainer.learning_rate_multiplier(v) for v in variables] == [
        reference.learning_rate_multiplier(v) for v in variables]
    assert trainer.jit_compile == reference.jit_compile == case["xla"]
    assert trainer.steps_per_execution == case["steps_per_execution"] and reference.steps_per_execution == 1
    assert trainer.term_weights == reference.term_weights and trainer.method == config.method
    if config.method == "pit":  # PIT's interaction weights learn without weight decay, at their own rate
        assert config.weight_decay and not trainer.optimizer._use_weight_decay(interaction_weights(network))
        assert trainer.learning_rate_multiplier(interaction_weights(network)) == config.interaction_lr_multiplier


# === The variants compute what they claim ===

def random_batch(classes=4, size=32):
    rng = np.random.default_rng(0)
    return {"source_image": tf.constant(rng.uniform(0, 255, (2, size, size, 3)), tf.float32),
            "source_label": tf.constant(rng.integers(0, classes, (2, size, size)), tf.uint8),
            "target_image": tf.constant(rng.uniform(0, 255, (2, size, size, 3)), tf.float32),
            "target_image_labels": tf.constant(rng.dirichlet(np.ones(classes), 2), tf.float32)}


def case_at_32(case, num_units):
    """A random batch, a seeded tiny network with `num_units` and the run config of benchmark case `case`, at
    32x32 in 4 classes."""
    keras.utils.set_random_seed(0)
    network = build_network("tiny", 4, num_units=num_units)
    config = dataclasses.replace(cases.case_config(cases.Settings(size=(32, 32)), cases.parse_case(case)),
                                 num_classes=4)
    return random_batch(), network, config


def test_the_references_compute_the_source_loss_and_run_the_target():
    batch, network, config = case_at_32("reference", num_units=0)
    source_only = runner.build_trainer(config, network).compute_terms(batch)
    for backward in (False, True):
        trainer = runner.build_trainer(config, network, trainer_class=cases.two_domain_reference(backward))
        assert trainer.uses_target and trainer.term_weights == {"seg_src": 1.0}
        with tf.GradientTape() as tape:
            tape.watch(batch["target_image"])
            terms = trainer.compute_terms(batch)
        assert list(terms) == ["seg_src"]
        np.testing.assert_allclose(terms["seg_src"].numpy(), source_only["seg_src"].numpy(), rtol=1e-6)
        gradient = tape.gradient(terms["seg_src"], batch["target_image"])
        # The target's forward is in the loss; its backward runs (zeros, weight 0) only for reference_bwd.
        assert (gradient is None) != backward
        if backward:
            assert not np.any(gradient.numpy())


def test_joint_forward_variant_computes_the_same_terms_without_batch_statistics():
    # In inference mode BatchNorm uses its moving statistics, so the benchmark's one-call-on-both-domains variant
    # must give the terms of the trainer's call per domain; in training mode they differ by design.
    batch, network, config = case_at_32("pit+joint", num_units=3)
    separate = runner.build_trainer(config, network).compute_terms(batch)
    joint = runner.build_trainer(config, network, trainer_class=cases.joint_forward_pit(network, 3)).compute_terms(
        batch)
    assert set(joint) == set(separate) == {"seg_src", "img_src", "img_trg", "rec_src", "rec_trg"}
    for name in separate:
        np.testing.assert_allclose(joint[name].numpy(), separate[name].numpy(), rtol=1e-4, atol=1e-6)


# === tools/benchmark_aspp.py ===

def test_aspp_benchmark_runs_both_implementations_in_child_processes(tmp_path, monkeypatch):
    # Each child is timed here, in this process, by the code a child runs (`run_one`), on one small head per
    # setting; one child's whole command line runs below, on its setting's real shapes.
    children = []
    monkeypatch.setattr(benchmark_aspp, "SETTINGS", {name: (1, 1, 8, 8) for name in benchmark_aspp.SETTINGS})

    def child(command, capture_output, text):
        assert command[:2] == [sys.executable, str(REPO / "tools" / "benchmark_aspp.py")]
        values = dict(arg[2:].split("=", 1) for arg in command[2:])
        children.append(values.pop("run_one"))
        setting, implementation = children[-1].split(":")
        result = benchmark_aspp.run_one(setting, implementation, int(values["channels"]), int(values["classes"]),
                                        int(values["repeats"]))
        return subprocess.CompletedProcess(command, 0, benchmark_aspp.RESULT_PREFIX + json.dumps(result) + "\n", "")

    monkeypatch.setattr(subprocess, "run", child)
    output = tmp_path / "aspp.json"
    done = run_tool_in_process("benchmark_aspp", "--channels=4", "--classes=3", "--repeats=1", f"--output={output}")
    monkeypatch.undo()
    assert done.returncode == 0, done.stderr
    assert children == [f"{s}:{i}" for s in benchmark_aspp.SETTINGS for i in ("conv", "matmul")]
    data = json.loads(output.read_text())
    assert data["command"] == f"python tools/benchmark_aspp.py --channels=4 --classes=3 --repeats=1 --output={output}"
    assert [(r["setting"], r["implementation"]) for r in data["results"]] == [
        (s, i) for s in benchmark_aspp.SETTINGS for i in ("conv", "matmul")]
    assert all(r["step_s"] > 0 and r["peak_rss_mb"] > 10 for r in data["results"])
    assert "matmul / conv time" in done.stdout

    one = run_tool_in_process("benchmark_aspp", "--run_one=paper_1280x640_batch4:conv", "--channels=4",
                              "--classes=3", "--repeats=1")
    assert one.returncode == 0 and one.stdout.startswith(benchmark_aspp.RESULT_PREFIX)
    result = json.loads(one.stdout[len(benchmark_aspp.RESULT_PREFIX):])
    assert (result["heads"], result["batch"], result["features"], result["implementation"]) == (1, 4, [80, 160, 4],
                                                                                                "conv")

    bad = run_tool_in_process("benchmark_aspp", "--settings=huge")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --settings: unknown huge")
