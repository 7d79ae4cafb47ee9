"""The benchmark table: every experiment under flags/experiments/ on the embedded benchmark, several seeds each;
writes docs/results.md and a JSON of every number.

    python tools/results_table.py --output_dir=runs/results --seeds=0,1,2

One experiment is one flagfile, `flags/experiments/NAME.cfg`, which includes `flags/base/benchmark.cfg` (the
benchmark and schedule every row shares; PIT rows through `flags/base/benchmark_pit.cfg`), `flags/demo.cfg` or another experiment, and adds its flags. Its header says where it goes:

    # row: the label in the table
    # table: main | self_training | ablation | image_labels | table5 | table3 | table4 | lse_printed | lr |
    #     diagnostic | second_benchmark
    # paper: the paper's number and table (or -)
    # reference: the experiment its delta is taken against (optional)
    # seeds: 1 (optional: an ablation row on the first seed only; it quotes the main rows' spread)
    # image_labels: regressor | regressor_standardize | ... (a key of LABELS; optional: this tool writes each
    #   seed's target image labels with `python -m pit_keras.image_labels` on the backbone of the same seed's
    #   source_only run and passes them as --image_labels)
    # image_labels_prior: the same kinds, passed as --image_labels_prior (teacher labels blended in from them)
    # order: a number that sorts the rows of a table (optional; else by name)

Every (experiment, seed) is its own `python -m pit_keras.train --flagfile=flags/experiments/NAME.cfg` process in
OUTPUT_DIR/NAME/seed_S, so runs are isolated and identical but for the experiment's flags. A run whose
eval_val.json exists is done and skipped; a partial one resumes from its newest checkpoint (train resumes by
itself), so the tool can be stopped and started again. `--rows` takes experiment or table names. Run folders
record the train flags they were made with: asking the same folder for other flags is refused instead of
mixing settings in one table.
"""

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

import numpy as np
from absl import flags

from pit_keras import atomic
from pit_keras.errors import UserError, run_main
from pit_keras.flags import DEFAULT_BENCHMARK_ROOT

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = "flags/experiments"
RUN_RECORD = "results_table.json"  # in each run folder: the train flags it was made with, time, exit code
EVAL_FILE = "eval_val.json"
SOURCE_ONLY = "source_only"  # the experiment whose backbone the regressor reads
# header value -> (the `pit_keras.image_labels` flags of the regressor's features, what they are)
LABELS = {
    "regressor": ((), "pooled backbone features"),
    "regressor_standardize": (("--feature_alignment=standardize",), "features standardized per domain"),
    "regressor_whiten": (("--feature_alignment=whiten",), "features whitened per domain"),
    "regressor_adabn": (("--feature_alignment=adabn",),
                        "each domain's features with its own BatchNorm statistics (AdaBN)"),
    "regressor_adabn_standardize": (("--feature_alignment=adabn_standardize",),
                                    "AdaBN features, standardized per domain"),
    "regressor_adabn_pyramid": (("--feature_alignment=adabn_standardize", "--feature_pooling=pyramid"),
                                "each domain's features with its own BatchNorm statistics (AdaBN), standardized "
                                "per domain, pooled globally and over a 2x2 grid"),
    "regressor_adabn_pyramid_all": (("--feature_alignment=adabn_standardize", "--feature_pooling=pyramid",
                                     "--feature_stages=all"),
                                    "AdaBN, standardized per domain, pooled globally and over a 2x2 grid, from "
                                    "every stage of the backbone"),
}
# (table key, title); rows print in this order.
TABLES = (
    ("main", "Main rows"),
    ("self_training", "Self-training on each method"),
    ("ablation", "The unsupervised demo, each ingredient removed in turn, and one added"),
    ("image_labels", "Target image-level labels without target labels"),
    ("table5", "Weak image-level labels (paper Table 5)"),
    ("table3", "Ablations (paper Table 3), PIT with ground-truth target class shares"),
    ("table4", "Number of units (paper Table 4), PIT with ground-truth target class shares"),
    ("lse_printed", "Tables 3 and 4 with the LSE as printed (Eq. 1 without 1/r; diagnostic of the default)"),
    ("lr", "What L_r does: which branch it trains, and on what"),
    ("diagnostic", "Diagnostic rows (not in the paper)"),
    ("second_benchmark", "The same flags on a second benchmark (generator seed 1)"),
)
HEADER_KEYS = ("row", "table", "paper", "reference", "seeds", "image_labels", "image_labels_prior", "order")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One row of the table, read from its flagfile's header (see the module docstring)."""

    name: str
    label: str
    table: str
    paper: str = "-"
    reference: str = ""
    seeds: int = 0  # 0: every --seeds
    image_labels: str = ""
    order: float = 0.0
    image_labels_prior: str = ""

    @property
    def label_kinds(self):
        """The regressor labels this experiment needs written first."""
        return [kind for kind in (self.image_labels, self.image_labels_prior) if kind]

    @property
    def flagfile(self):
        return f"{EXPERIMENTS}/{self.name}.cfg"


def read_header(path):
    """`{key: value}` of the `# key: value` comment lines at the top of a flagfile."""
    header = {}
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            key, _, value = line[1:].strip().partition(":")
            if key.strip() in HEADER_KEYS and value.strip():
                header[key.strip()] = value.strip()
    return header


def load_experiments(folder=None):
    """`{name: Experiment}` of every flagfile in flags/experiments/, in table order."""
    folder = pathlib.Path(folder or REPO / EXPERIMENTS)
    tables = [key for key, _ in TABLES]
    found = []
    for path in sorted(folder.glob("*.cfg")):
        header = read_header(path)
        missing = [key for key in ("row", "table") if key not in header]
        if missing:
            raise UserError(f"{path}: its header lacks '# {missing[0]}: ...'.")
        if header["table"] not in tables:
            raise UserError(f"{path}: table {header['table']!r} is not one of {', '.join(tables)}.")
        for key in ("image_labels", "image_labels_prior"):
            if header.get(key, "") not in ("", *LABELS):
                raise UserError(f"{path}: {key} {header[key]!r} is not one of {', '.join(LABELS)}.")
        found.append(Experiment(path.stem, header["row"], header["table"], header.get("paper", "-"),
                                header.get("reference", ""), int(header.get("seeds", 0)),
                                header.get("image_labels", ""), float(header.get("order", 0)),
                                header.get("image_labels_prior", "")))
    found.sort(key=lambda e: (tables.index(e.table), e.order, e.name))
    experiments = {e.name: e for e in found}
    for e in found:
        if e.reference and e.reference not in experiments:
            raise UserError(f"{folder}/{e.name}.cfg: reference {e.reference!r} is not an experiment.")
    return experiments


FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined when it runs (so tests can import the module)."""
    flags.DEFINE_string("output_dir", None, "Folder of the runs (OUTPUT_DIR/NAME/seed_S).")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: every experiment runs once per seed (those whose header "
                      "says '# seeds: 1' on the first only).")
    flags.DEFINE_integer("num_steps", None, "Override every experiment's training steps (a quick check; the "
                         "table is made with the experiments' own).")
    flags.DEFINE_list("rows", ["all"], "Experiments to run, by name (flags/experiments/NAME.cfg) or table: "
                      + ", ".join(key for key, _ in TABLES) + ", or all.")
    flags.DEFINE_string("markdown", "docs/results.md", "The results page to write.")
    flags.DEFINE_string("json", "docs/results.json", "The JSON of every number to write.")
    flags.DEFINE_string("notes", "docs/results_notes.md",
                        "Markdown written by a person after reading the numbers, copied in as the reading "
                        "(skipped if missing).")
    flags.DEFINE_boolean("report_only", False,
                         "Only aggregate the finished runs and write the results; train nothing.")


def select_rows(names, experiments):
    """Experiment names in table order from `--rows` entries (experiment or table names, or all)."""
    chosen = set()
    for name in names:
        if name == "all":
            chosen.update(experiments)
        elif name in dict(TABLES):
            chosen.update(e.name for e in experiments.values() if e.table == name)
        elif name in experiments:
            chosen.add(name)
        else:
            raise UserError(f"--rows: unknown experiment or table {name!r} (tables: "
                            f"{', '.join(key for key, _ in TABLES)}; experiments: {', '.join(experiments)}).")
    return [name for name in experiments if name in chosen]


def parse_seeds(values):
    try:
        seeds = [int(v) for v in values]
    except ValueError:
        raise UserError(f"--seeds={','.join(values)}: expected a comma list of integers.") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds={','.join(values)}: expected distinct seeds.")
    return seeds


def seeds_of(experiment, seeds):
    return seeds[:experiment.seeds] if experiment.seeds else seeds


def run_dir(output_dir, row, seed):
    return os.path.join(output_dir, row, f"seed_{seed}")


def image_labels_path(output_dir, seed, kind="regressor"):
    return os.path.join(output_dir, f"image_labels_{kind}", f"seed_{seed}", "image_labels.json")


def train_args(experiment, seed, output_dir, num_steps=None):
    """The flags of one training run (after `python -m pit_keras.train`)."""
    args = [f"--flagfile={experiment.flagfile}", f"--model_dir={run_dir(output_dir, experiment.name, seed)}",
            f"--seed={seed}", "--evaluate=true", "--verbose=0"]
    if num_steps:
        args.append(f"--num_steps={num_steps}")
    if experiment.image_labels:
        args.append(f"--image_labels={image_labels_path(output_dir, seed, experiment.image_labels)}")
    if experiment.image_labels_prior:
        args.append(f"--image_labels_prior={image_labels_path(output_dir, seed, experiment.image_labels_prior)}")
    return args


def regressor_args(output_dir, seed, kind="regressor"):
    """The flags of the `pit_keras.image_labels` run that writes a seed's target image labels, on the backbone
    of the same seed's source_only run."""
    args = ["--source=synthetic", "--target=synthetic", f"--output={image_labels_path(output_dir, seed, kind)}",
            f"--seed={seed}", "--features=backbone", f"--model_dir={run_dir(output_dir, SOURCE_ONLY, seed)}",
            "--image_size=256,128"]
    return args + list(LABELS[kind][0])


def is_done(folder):
    return os.path.isfile(os.path.join(folder, EVAL_FILE))


def read_record(folder):
    path = os.path.join(folder, RUN_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json_atomic(path, payload):
    """JSON in insertion order (unlike checkpoints.write_json_atomic's sorted keys); NaN is refused."""
    write_text_atomic(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")


def write_text_atomic(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic.write_text_atomic(path, text)


def flagfile_chain(path, seen=None):
    """`{path: sha256}` of a flagfile and every flagfile it includes (paths relative to the repo root), so that
    a run records the content it was made with, not only the flagfile's name."""
    seen = {} if seen is None else seen
    full = REPO / path
    if path in seen or not full.is_file():
        return seen
    text = full.read_text()
    seen[path] = hashlib.sha256(text.encode()).hexdigest()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("--flagfile="):
            flagfile_chain(line.split("=", 1)[1], seen)
    return seen


def args_flagfiles(args):
    chain = {}
    for arg in args:
        if arg.startswith("--flagfile="):
            flagfile_chain(arg.split("=", 1)[1], chain)
    return chain


def check_record(folder, args):
    """Refuses a run folder made with other flags or with flagfiles whose content has changed since (a finished
    run would otherwise be reused silently)."""
    record = read_record(folder)
    if record is None:
        return
    if record["args"] != args:
        raise UserError(f"{folder} was made with other flags ({' '.join(record['args'])}), not "
                        f"{' '.join(args)}; use another --output_dir or remove that folder.")
    changed = sorted(path for path, digest in args_flagfiles(args).items()
                     if record.get("flagfiles", {}).get(path) != digest)
    if changed:
        raise UserError(f"{folder} was made before {', '.join(changed)} changed; use another --output_dir or "
                        "remove that folder.")


def run_module(module, args, folder, log_name):
    """Runs `python -m MODULE ARGS` from the repo root with its output in FOLDER/LOG_NAME; returns
    `(exit code, seconds)`."""
    os.makedirs(folder, exist_ok=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.time()
    with open(os.path.join(folder, log_name), "a") as log:
        log.write(f"$ python -m {module} {shlex.join(args)}\n")
        log.flush()
        code = subprocess.call([sys.executable, "-m", module, *args], cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT, env=env)
    return code, time.time() - start


def log_tail(folder, log_name, lines=1):
    path = os.path.join(folder, log_name)
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        kept = [line.strip() for line in f if line.strip()]
    return " / ".join(kept[-lines:])


def train_one(experiment, seed, output_dir, num_steps=None):
    """Trains and evaluates one (experiment, seed) unless it is done; returns None on success, else the
    reason."""
    folder = run_dir(output_dir, experiment.name, seed)
    args = train_args(experiment, seed, output_dir, num_steps)
    check_record(folder, args)
    if is_done(folder):
        return None
    previous = read_record(folder) or {}
    print(f"[{time.strftime('%H:%M:%S')}] training {experiment.name} seed {seed} -> {folder}", flush=True)
    os.makedirs(folder, exist_ok=True)
    chain = args_flagfiles(args)
    write_json_atomic(os.path.join(folder, RUN_RECORD),
                      {"args": args, "flagfiles": chain, "seconds": None, "returncode": None})
    code, seconds = run_module("pit_keras.train", args, folder, "train.log")
    # A resumed run's time adds up its attempts.
    seconds += previous.get("seconds") or 0.0
    write_json_atomic(os.path.join(folder, RUN_RECORD),
                      {"args": args, "flagfiles": chain, "seconds": seconds, "returncode": code})
    if code != 0 or not is_done(folder):
        reason = f"train exited with {code}: {log_tail(folder, 'train.log')}"
        print(f"  failed: {reason}", flush=True)
        return reason
    print(f"  done in {seconds:.0f} s", flush=True)
    return None


def make_image_labels(seed, output_dir, experiments, num_steps=None, kind="regressor"):
    """Writes a seed's regressor image labels (training the source_only run first); returns None on success,
    else the reason."""
    path = image_labels_path(output_dir, seed, kind)
    folder = os.path.dirname(path)
    args = regressor_args(output_dir, seed, kind)
    record_path = os.path.join(folder, "image_labels_record.json")
    if os.path.isfile(record_path):
        with open(record_path) as f:
            if json.load(f)["args"] != args:
                raise UserError(f"{path} was made with other flags; use another --output_dir or remove {folder}.")
        if os.path.isfile(path):
            return None
    reason = train_one(experiments[SOURCE_ONLY], seed, output_dir, num_steps)
    if reason:
        return f"its source-only run failed ({reason})"
    print(f"[{time.strftime('%H:%M:%S')}] image labels of seed {seed} ({kind}) -> {path}", flush=True)
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(record_path, {"args": args})
    code, seconds = run_module("pit_keras.image_labels", args, folder, "image_labels.log")
    if code != 0 or not os.path.isfile(path):
        reason = f"image_labels exited with {code}: {log_tail(folder, 'image_labels.log')}"
        print(f"  failed: {reason}", flush=True)
        return reason
    print(f"  done in {seconds:.0f} s", flush=True)
    return None


def run_all(names, experiments, seeds, output_dir, num_steps=None):
    """Trains every missing (experiment, seed), in table order; returns `{(name, seed): reason}` of failures."""
    failures = {}
    for name in names:
        experiment = experiments[name]
        for seed in seeds_of(experiment, seeds):
            reasons = [make_image_labels(seed, output_dir, experiments, num_steps, kind)
                       for kind in experiment.label_kinds]
            reason = next((r for r in reasons if r), None)
            if reason:
                failures[(name, seed)] = f"no image labels: {reason}"
                continue
            reason = train_one(experiment, seed, output_dir, num_steps)
            if reason:
                failures[(name, seed)] = reason
    return failures


# --- Aggregation ---


def mean_std(values):
    """Mean and sample standard deviation (ddof 1; NaN for one value) of the finite values; NaN if none."""
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def collect_row(output_dir, experiment, seeds):
    """The finished runs of an experiment: `{"seeds", "miou", "per_class_iou", "seconds", ...}`."""
    per_seed, per_class, seconds, classes = {}, {}, [], None
    for seed in seeds_of(experiment, seeds):
        folder = run_dir(output_dir, experiment.name, seed)
        if not is_done(folder):
            continue
        with open(os.path.join(folder, EVAL_FILE)) as f:
            result = json.load(f)
        per_seed[seed] = result["miou"]
        classes = classes or result["classes"]
        for name, iou in result["per_class_iou"].items():
            per_class.setdefault(name, []).append(iou)
        record = read_record(folder) or {}
        if record.get("seconds") is not None:
            seconds.append(record["seconds"])
    mean, std = mean_std(per_seed.values())
    class_means = {name: mean_std(values)[0] for name, values in per_class.items()}
    return {"row": experiment.name, "label": experiment.label, "paper": experiment.paper,
            "table": experiment.table, "reference": experiment.reference, "flagfile": experiment.flagfile,
            "seeds": sorted(per_seed), "miou_per_seed": per_seed, "miou_mean": mean, "miou_std": std,
            "num_seeds": len(per_seed), "classes": classes, "per_class_iou_mean": class_means,
            "seconds_mean": mean_std(seconds)[0]}


def read_target_truth_shares(output_dir, seed, kind="regressor"):
    """Distances of a seed's regressor labels to the target truth, next to the source-mean prior (or None)."""
    path = image_labels_path(output_dir, seed, kind)
    if not os.path.isfile(path):
        return None
    # Imported only when there is something to measure: these pull in TensorFlow.
    from pit_keras.adaptation import regressor
    from pit_keras.data import datasets
    from pit_keras.adaptation import soft_labels
    from pit_keras.data.cityscapes import relative_key

    with open(path) as f:
        estimates = json.load(f)
    benchmark = os.path.expanduser(DEFAULT_BENCHMARK_ROOT)
    pairs, reader, root = datasets.target_pairs("synthetic", benchmark, "train", num_classes=19)
    source_pairs, source_reader = datasets.source_pairs("synthetic", benchmark)
    truth = np.stack([soft_labels.shares(reader(label), 19) for _, label in pairs])
    estimate = np.asarray([estimates[relative_key(root, image)] for image, _ in pairs], np.float64)
    source = np.stack([soft_labels.shares(source_reader(label), 19) for _, label in source_pairs])
    prior = source[source.sum(axis=1) > 0].mean(axis=0)
    keep = truth.sum(axis=1) > 0
    return regressor.distance_report(truth[keep], {
        "regressor": estimate[keep], "source-mean prior": np.broadcast_to(prior, (int(keep.sum()), 19))})


def summarize(output_dir, names, experiments, seeds, regressor_distances=True):
    """Every number of the table: `{"rows": {name: collect_row(...)}, "regressor": {kind: {seed: ...}}}`."""
    summary = {"rows": {name: collect_row(output_dir, experiments[name], seeds) for name in names},
               "regressor": {}}
    kinds = sorted({kind for name in names for kind in experiments[name].label_kinds})
    for kind in kinds if regressor_distances else ():
        reports = {seed: read_target_truth_shares(output_dir, seed, kind) for seed in seeds}
        summary["regressor"][kind] = {seed: r for seed, r in reports.items() if r is not None}
    return summary


def machine():
    """nproc, the CPU model and the library versions, as the results page states them."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    versions = {}
    for package in ("tensorflow", "keras"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(), **versions}


# --- Writing ---


def fmt(value, digits=1):
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def fmt_miou(entry):
    if entry["num_seeds"] == 0:
        return "not run"
    if entry["num_seeds"] == 1:
        return f"{fmt(entry['miou_mean'])} (one seed)"
    return f"{fmt(entry['miou_mean'])} ± {fmt(entry['miou_std'])}"


def fmt_seeds(entry):
    return ", ".join(fmt(entry["miou_per_seed"][s]) for s in entry["seeds"]) or "-"


def delta(entry, reference):
    """The mean difference over the seeds both rows have (a one-seed row against its reference's same seed)."""
    if not (entry["num_seeds"] and reference and reference["num_seeds"]):
        return "-"
    shared = [s for s in entry["seeds"] if s in reference["seeds"]]
    if not shared:
        return "-"
    value = np.mean([entry["miou_per_seed"][s] - reference["miou_per_seed"][s] for s in shared])
    return f"{value:+.1f}" + ("" if len(shared) == reference["num_seeds"] else f" (seed {shared[0]})"
                              if len(shared) == 1 else f" (seeds {', '.join(map(str, shared))})")


def markdown(summary, command, machine_info, seeds, failures, notes=None):
    """The results page."""
    rows = summary["rows"]
    lines = [
        "# Benchmark results on the embedded benchmark",
        "",
        "Written by `tools/results_table.py`; do not edit by hand (the reading comes from the `--notes` file).",
        "",
        "Command (from the repository root):",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {machine_info['nproc']} CPU cores ({machine_info['cpu']}), Python {machine_info['python']}, "
        f"TensorFlow {machine_info['tensorflow']}, Keras {machine_info['keras']}; shared with other jobs, so run "
        f"times are indicative.",
        "",
        f"Every row is `python -m pit_keras.train --flagfile={EXPERIMENTS}/NAME.cfg --seed=S` (its flagfile is "
        "named in the row): `flags/base/benchmark.cfg` (tiny backbone, 256x128, batch 4 + 4, SGD lr 0.05 with "
        "poly decay, weight decay 1e-4, 1500 steps; PIT rows through `flags/base/benchmark_pit.cfg`, the w^k at a "
        "tenth of the heads' rate) and the experiment's flags; the same data, step count and "
        "evaluation (the last checkpoint, no selection on target val) for every row, seeds "
        f"{', '.join(map(str, seeds))} unless the row says one seed. Target mIoU (%) on the benchmark's 100 target "
        "val images: mean ± sample standard deviation over seeds; a row's delta to its reference is taken over "
        "the seeds both have (a one-seed row against the same seed of its reference). The paper's column "
        "(ResNet-101, GTAV -> Cityscapes) is for orientation only: another backbone, other data.",
    ]
    for table, title in TABLES:
        entries = [entry for entry in rows.values() if entry["table"] == table]
        if not entries:
            continue
        lines += ["", f"## {title}", "",
                  "| setting | target mIoU | seeds | per seed | vs reference | paper | flagfile | s per run |",
                  "|---|---|---|---|---|---|---|---|"]
        for entry in entries:
            reference = rows.get(entry["reference"])
            versus = (f"{delta(entry, reference)} vs {reference['row']}" if reference else "")
            lines.append(f"| {entry['label']} | {fmt_miou(entry)} | {entry['num_seeds']} | {fmt_seeds(entry)} | "
                         f"{versus} | {entry['paper']} | `{entry['row']}` | {fmt(entry['seconds_mean'], 0)} |")
    main = [entry for entry in rows.values() if entry["table"] == "main" and entry["num_seeds"]]
    if main:
        classes = main[0]["classes"]
        lines += ["", "## Per-class IoU of the main rows (mean over seeds)", "",
                  "| class | " + " | ".join(f"`{e['row']}`" for e in main) + " |", "|---|" + "---|" * len(main)]
        for name in classes:
            lines.append(f"| {name} | " + " | ".join(fmt(e["per_class_iou_mean"].get(name)) for e in main) + " |")
        lines.append("| **mIoU** | " + " | ".join(fmt(e["miou_mean"]) for e in main) + " |")
    for kind, reports in summary["regressor"].items():
        if not reports:
            continue
        lines += ["", f"## The regressor's target image labels ({kind})", "",
                  "Each seed's labels come from `python -m pit_keras.image_labels --features=backbone` on the "
                  f"backbone of the same seed's `source_only` run ({LABELS[kind][1]}; "
                  f"`{' '.join(LABELS[kind][0]) or 'no extra flag'}`). Mean distance "
                  "to the true class shares of the 400 target training images (lower is better):", "",
                  "| seed | regressor chi-squared | source-mean prior chi-squared | regressor L1 | prior L1 |",
                  "|---|---|---|---|---|"]
        for seed, report in sorted(reports.items()):
            lines.append(f"| {seed} | {report['regressor']['chi2']:.3f} | {report['source-mean prior']['chi2']:.3f} "
                         f"| {report['regressor']['l1']:.3f} | {report['source-mean prior']['l1']:.3f} |")
    if failures:
        lines += ["", "## Runs that failed", ""]
        lines += [f"- {row} seed {seed}: {reason}" for (row, seed), reason in sorted(failures.items())]
    if notes:
        lines += ["", "## Reading", "", notes.strip()]
    return "\n".join(lines) + "\n"


def json_payload(summary, command, machine_info, seeds, failures):
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean({"command": command, "machine": machine_info, "seeds": seeds, "rows": summary["rows"],
                  "regressor_distances": summary["regressor"],
                  "failures": {f"{row}/seed_{seed}": reason for (row, seed), reason in failures.items()}})


def write_results(summary, command, seeds, failures, markdown_path, json_path, notes_path=None):
    info = machine()
    notes = None
    if notes_path and os.path.isfile(notes_path):
        with open(notes_path) as f:
            notes = f.read()
    write_text_atomic(markdown_path, markdown(summary, command, info, seeds, failures, notes))
    write_json_atomic(json_path, json_payload(summary, command, info, seeds, failures))


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    if not FLAGS.output_dir:
        raise UserError("--output_dir is required (the folder of the runs).")
    if FLAGS.num_steps is not None and FLAGS.num_steps <= 0:
        raise UserError(f"--num_steps={FLAGS.num_steps}: must be positive.")
    seeds = parse_seeds(FLAGS.seeds)
    experiments = load_experiments()
    names = select_rows(FLAGS.rows, experiments)
    command = recorded_command(sys.argv[1:])
    os.chdir(REPO)
    failures = {}
    if not FLAGS.report_only:
        failures = run_all(names, experiments, seeds, FLAGS.output_dir, FLAGS.num_steps)
    # Every experiment with finished runs in the folder is reported, also those not asked for this time.
    reported = [name for name in experiments if name in names or any(
        is_done(run_dir(FLAGS.output_dir, name, s)) for s in seeds)]
    summary = summarize(FLAGS.output_dir, reported, experiments, seeds)
    write_results(summary, command, seeds, failures, FLAGS.markdown, FLAGS.json, FLAGS.notes)
    print(f"wrote {FLAGS.markdown} and {FLAGS.json}")
    if failures:
        print(f"{len(failures)} run(s) failed; see the logs in their folders and rerun to retry.")
        return 1
    return 0


def recorded_command(args):
    """The command line the page records: the flags as typed, less --report_only (the same command without
    it skips every finished run and writes the same page)."""
    kept = [a for a in args if a.split("=")[0] not in ("--report_only", "--noreport_only")]
    return "python tools/results_table.py " + shlex.join(kept)


if __name__ == "__main__":
    define_flags()
    run_main(main)
