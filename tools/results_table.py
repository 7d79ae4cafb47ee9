"""The benchmark table: PIT, its baselines and the ablations of the paper's Tables 3-5, several seeds each, on
the embedded benchmark with the demo's settings; writes docs/results.md and a JSON of every number.

    python tools/results_table.py --output_dir=runs/results --seeds=0,1,2

Every (row, seed) is its own `python -m pit_keras.train --flagfile=flags/demo.cfg` process in
OUTPUT_DIR/ROW/seed_S, so runs are isolated and identical but for the row's flags. A run whose eval_val.json
exists is done and skipped; a partial one resumes from its newest checkpoint (train resumes by itself), so the
tool can be stopped and started again. `--rows=main` runs the main rows only; a later run with the default
`--rows=all` adds the ablations. Run folders record the train flags they were made with: asking the same folder
for other flags (another `--num_steps`, say) is refused instead of mixing settings in one table.

The unsupervised row (`pit_regressor`) first writes each seed's target image labels with
`python -m pit_keras.image_labels`, from `--regressor_features` (the paper: ImageNet Inception-ResNet-v2;
`backbone`: the backbone of the same seed's source-only run), and reports their distance to the target truth
next to the source-mean prior. Diagnostic rows (`--rows=diagnostic`, not in the paper) separate effects the
paper's ablations confound on this benchmark: the weight of L_c against the number of units, and L_c's sum
over classes against a mean.
"""

import dataclasses
import datetime
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
FLAGFILE = "flags/demo.cfg"
RUN_RECORD = "results_table.json"  # in each run folder: the train flags it was made with, time, exit code
EVAL_FILE = "eval_val.json"
REGRESSOR_ROW = "pit_regressor"
ALIGNED_ROW = "pit_regressor_aligned"
LABELS_ROWS = {"none": REGRESSOR_ROW, "standardize": ALIGNED_ROW}  # where each alignment's labels are kept
BACKBONE_FEATURES = "backbone"


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table.

    Args:
        name: folder name and `--rows` key.
        label: what the table calls it.
        overrides: train flags after the demo flagfile.
        group: "main", "table3" or "table4" (the section it is printed in, and a `--rows` key).
        paper: the paper's number for this row (ResNet-101, GTAV -> Cityscapes), for orientation only.
        regressor_labels: trains on the regressor's target image labels (those of the pit_regressor row).
        alignment: the regressor's `--feature_alignment` (labels of another alignment than "none" are kept in
            the first row that uses them: `image_labels_path`).
        reference: the row a diagnostic row is compared with.
    """

    name: str
    label: str
    overrides: tuple
    group: str
    paper: str
    regressor_labels: bool = False
    reference: str = "pit_gt"
    alignment: str = "none"


ROWS = (
    Row("source_only", "source only", ("--method=source_only", "--image_labels="), "main", "36.2"),
    Row("minent", "MinEnt (ADVENT, lambda 0.001)", ("--method=minent", "--image_labels="), "main", "-"),
    Row("pit_gt", "PIT, ground-truth target image labels (weakly supervised)", (), "main", "52.9 (Table 5)"),
    # Its --image_labels is added per seed (`train_args`).
    Row(REGRESSOR_ROW, "PIT, regressor image labels (unsupervised)", (), "main", "50.6", regressor_labels=True),
    Row("pit_gt_no_lc", "without L_c (lambda_c = 0)", ("--lambda_c=0",), "table3", "40.8"),
    Row("pit_gt_no_lr", "without L_r (lambda_r = 0)", ("--lambda_r=0",), "table3", "38.0"),
    Row("pit_gt_rec_target", "L_r on target only", ("--recon_domains=target",), "table3", "38.5"),
    Row("pit_gt_r0.5", "one unit, r = 0.5", ("--lse_r=0.5",), "table3", "44.9"),
    Row("pit_gt_r1", "one unit, r = 1", ("--lse_r=1",), "table3", "45.2"),
    Row("pit_gt_r1.5", "one unit, r = 1.5", ("--lse_r=1.5",), "table3", "45.7"),
    Row("pit_gt_units2", "2 units (r = 0.5, 1)", ("--lse_r=0.5,1",), "table4", "48.2"),
    Row("pit_gt_units4", "4 units (r = 0.5, 1, 1.5, 2)", ("--lse_r=0.5,1,1.5,2",), "table4", "50.7"),
    # L_c sums over the units, so K units also weigh L_c K times: this row separates the two effects.
    Row("pit_gt_lc_per_unit", "3 units, lambda_c = 0.5 / 3 (L_c weighed as one unit's)", ("--lambda_c=0.166667",),
        "diagnostic", "-"),
    # The paper sums L_c over classes; a mean over classes (PyTorch's default reduction) is lambda_c / C.
    Row("pit_gt_lc_mean", "PIT-GT, L_c averaged over classes", ("--image_loss_reduction=mean",), "diagnostic",
        "-"),
    Row("pit_regressor_lc_mean", "PIT-regressor, L_c averaged over classes", ("--image_loss_reduction=mean",),
        "diagnostic", "-", regressor_labels=True, reference=REGRESSOR_ROW),
    # The regressor on features standardized per domain (image_labels --feature_alignment=standardize).
    Row(ALIGNED_ROW, "PIT-regressor, regressor features standardized per domain", (), "diagnostic", "-",
        regressor_labels=True, reference=REGRESSOR_ROW, alignment="standardize"),
    # Compared with the same L_c without the alignment, so that its delta is the alignment's alone.
    Row("pit_regressor_aligned_lc_mean", "PIT-regressor, features standardized per domain, L_c averaged over "
        "classes", ("--image_loss_reduction=mean",), "diagnostic", "-", regressor_labels=True,
        reference="pit_regressor_lc_mean", alignment="standardize"),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}
# Table 4 (number of units) shares runs with rows above: 1 unit is r = 0.5, 3 units is the full setting.
TABLE4 = (("1 (r = 0.5)", "pit_gt_r0.5", "44.9"), ("2 (r = 0.5, 1)", "pit_gt_units2", "48.2"),
          ("3 (r = 0.5, 1, 1.5)", "pit_gt", "50.6"), ("4 (r = 0.5, 1, 1.5, 2)", "pit_gt_units4", "50.7"))
REFERENCE_NAMES = {"pit_gt": "PIT-GT", REGRESSOR_ROW: "PIT-regressor", ALIGNED_ROW: "PIT-regressor-standardized",
                   "pit_regressor_lc_mean": "PIT-regressor with the mean L_c"}
MAIN_ROWS = tuple(row.name for row in ROWS if row.group == "main")
GROUPS = {"all": tuple(ROWS_BY_NAME), "main": MAIN_ROWS,
          "table3": ("pit_gt",) + tuple(r.name for r in ROWS if r.group == "table3"),
          "table4": tuple(name for _, name, _ in TABLE4),
          "diagnostic": ("pit_gt", REGRESSOR_ROW) + tuple(r.name for r in ROWS if r.group == "diagnostic")}

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined when it runs (so tests can import the module)."""
    flags.DEFINE_string("output_dir", None, "Folder of the runs (OUTPUT_DIR/ROW/seed_S).")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: every row runs once per seed.")
    flags.DEFINE_integer("num_steps", 1500, "Training steps of every run (the demo's 1500 by default).")
    flags.DEFINE_list("rows", ["all"], "Rows to run, by name or group (" + ", ".join(GROUPS) + "): "
                      + ", ".join(ROWS_BY_NAME) + ".")
    flags.DEFINE_string("regressor_features", "InceptionResNetV2",
                        "Features of the image-level regressor of the pit_regressor row: a keras.applications "
                        "model with ImageNet weights (the paper's), or backbone (the same seed's source-only "
                        "run).")
    flags.DEFINE_string("markdown", "docs/results.md", "The results page to write.")
    flags.DEFINE_string("json", "docs/results.json", "The JSON of every number to write.")
    flags.DEFINE_string("notes", "docs/results_notes.md",
                        "Markdown written by a person after reading the numbers, copied in as the reading "
                        "(skipped if missing).")
    flags.DEFINE_boolean("report_only", False,
                         "Only aggregate the finished runs and write the results; train nothing.")


def select_rows(names):
    """Row names in table order from `--rows` entries (row names or group names)."""
    chosen = set()
    for name in names:
        if name in GROUPS:
            chosen.update(GROUPS[name])
        elif name in ROWS_BY_NAME:
            chosen.add(name)
        else:
            raise UserError(f"--rows: unknown row {name!r} (rows: {', '.join(ROWS_BY_NAME)}; groups: "
                            f"{', '.join(GROUPS)}).")
    return [row.name for row in ROWS if row.name in chosen]


def parse_seeds(values):
    try:
        seeds = [int(v) for v in values]
    except ValueError:
        raise UserError(f"--seeds={','.join(values)}: expected a comma list of integers.") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds={','.join(values)}: expected distinct seeds.")
    return seeds


def run_dir(output_dir, row, seed):
    return os.path.join(output_dir, row, f"seed_{seed}")


def image_labels_path(output_dir, seed, alignment="none"):
    return os.path.join(run_dir(output_dir, LABELS_ROWS[alignment], seed), "image_labels.json")


def train_args(row, seed, output_dir, num_steps):
    """The flags of one training run (after `python -m pit_keras.train`)."""
    args = [f"--flagfile={FLAGFILE}", f"--model_dir={run_dir(output_dir, row, seed)}", f"--seed={seed}",
            f"--num_steps={num_steps}", "--evaluate=true", "--verbose=0", *ROWS_BY_NAME[row].overrides]
    if ROWS_BY_NAME[row].regressor_labels:
        args.append(f"--image_labels={image_labels_path(output_dir, seed, ROWS_BY_NAME[row].alignment)}")
    return args


def regressor_args(output_dir, seed, features, alignment="none"):
    """The flags of the `pit_keras.image_labels` run that writes a seed's target image labels."""
    args = ["--source=synthetic", "--target=synthetic",
            f"--output={image_labels_path(output_dir, seed, alignment)}", f"--seed={seed}", f"--features={features}"]
    if alignment != "none":
        args.append(f"--feature_alignment={alignment}")
    if features == BACKBONE_FEATURES:
        args += [f"--model_dir={run_dir(output_dir, 'source_only', seed)}", "--image_size=256,128"]
    return args


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


def check_record(folder, args):
    """Refuses a run folder made with other flags (a finished run would otherwise be reused silently)."""
    record = read_record(folder)
    if record is not None and record["args"] != args:
        raise UserError(f"{folder} was made with other flags ({' '.join(record['args'])}), not "
                        f"{' '.join(args)}; use another --output_dir or remove that folder.")


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


def train_one(row, seed, output_dir, num_steps):
    """Trains and evaluates one (row, seed) unless it is done; returns None on success, else the reason."""
    folder = run_dir(output_dir, row, seed)
    args = train_args(row, seed, output_dir, num_steps)
    check_record(folder, args)
    if is_done(folder):
        return None
    previous = read_record(folder) or {}
    print(f"[{time.strftime('%H:%M:%S')}] training {row} seed {seed} -> {folder}", flush=True)
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(os.path.join(folder, RUN_RECORD), {"args": args, "seconds": None, "returncode": None})
    code, seconds = run_module("pit_keras.train", args, folder, "train.log")
    # A resumed run's time adds up its attempts.
    seconds += previous.get("seconds") or 0.0
    write_json_atomic(os.path.join(folder, RUN_RECORD), {"args": args, "seconds": seconds, "returncode": code})
    if code != 0 or not is_done(folder):
        reason = f"train exited with {code}: {log_tail(folder, 'train.log')}"
        print(f"  failed: {reason}", flush=True)
        return reason
    print(f"  done in {seconds:.0f} s", flush=True)
    return None


def make_image_labels(seed, output_dir, num_steps, features, alignment="none"):
    """Writes a seed's regressor image labels (training the source-only run first if the features need it);
    returns None on success, else the reason."""
    path = image_labels_path(output_dir, seed, alignment)
    folder = os.path.dirname(path)
    args = regressor_args(output_dir, seed, features, alignment)
    record_path = os.path.join(folder, "image_labels_record.json")
    if os.path.isfile(record_path):
        with open(record_path) as f:
            if json.load(f)["args"] != args:
                raise UserError(f"{path} was made with other flags; use another --output_dir or remove {folder}.")
        if os.path.isfile(path):
            return None
    if features == BACKBONE_FEATURES:
        reason = train_one("source_only", seed, output_dir, num_steps)
        if reason:
            return f"its source-only run failed ({reason})"
    print(f"[{time.strftime('%H:%M:%S')}] image labels of seed {seed} ({features} features) -> {path}", flush=True)
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(record_path, {"args": args})
    code, seconds = run_module("pit_keras.image_labels", args, folder, "image_labels.log")
    if code != 0 or not os.path.isfile(path):
        reason = f"image_labels exited with {code}: {log_tail(folder, 'image_labels.log')}"
        print(f"  failed: {reason}", flush=True)
        return reason
    print(f"  done in {seconds:.0f} s", flush=True)
    return None


def run_all(rows, seeds, output_dir, num_steps, regressor_features):
    """Trains every missing (row, seed), rows in table order; returns `{(row, seed): reason}` of failures."""
    failures = {}
    for row in rows:
        for seed in seeds:
            if ROWS_BY_NAME[row].regressor_labels:
                reason = make_image_labels(seed, output_dir, num_steps, regressor_features, ROWS_BY_NAME[row].alignment)
                if reason:
                    failures[(row, seed)] = f"no image labels: {reason}"
                    continue
            reason = train_one(row, seed, output_dir, num_steps)
            if reason:
                failures[(row, seed)] = reason
    return failures


# --- Aggregation ---


def mean_std(values):
    """Mean and sample standard deviation (ddof 1; NaN for one value) of the finite values; NaN if none."""
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def collect_row(output_dir, row, seeds):
    """The finished runs of a row: `{"seeds", "miou", "per_class_iou", "seconds", ...}`."""
    per_seed, per_class, seconds, classes = {}, {}, [], None
    for seed in seeds:
        folder = run_dir(output_dir, row, seed)
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
    return {"row": row, "label": ROWS_BY_NAME[row].label, "paper": ROWS_BY_NAME[row].paper,
            "group": ROWS_BY_NAME[row].group, "seeds": sorted(per_seed), "miou_per_seed": per_seed,
            "miou_mean": mean, "miou_std": std, "num_seeds": len(per_seed), "classes": classes,
            "per_class_iou_mean": class_means, "seconds_mean": mean_std(seconds)[0]}


def read_target_truth_shares(output_dir, seed, alignment="none"):
    """Distances of a seed's regressor labels to the target truth, next to the source-mean prior (or None)."""
    path = image_labels_path(output_dir, seed, alignment)
    if not os.path.isfile(path):
        return None
    # Imported only when there is something to measure: these pull in TensorFlow.
    from pit_keras import regressor
    from pit_keras.data import datasets, soft_labels
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


def summarize(output_dir, rows, seeds, regressor_distances=True):
    """Every number of the table: `{"rows": {name: collect_row(...)}, "regressor": {...}}`."""
    summary = {"rows": {row: collect_row(output_dir, row, seeds) for row in rows}, "regressor": {},
               "regressor_aligned": {}}
    for alignment, key in (("none", "regressor"), ("standardize", "regressor_aligned")):
        if LABELS_ROWS[alignment] in rows and regressor_distances:
            for seed in seeds:
                report = read_target_truth_shares(output_dir, seed, alignment)
                if report is not None:
                    summary[key][seed] = report
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
    if not (entry["num_seeds"] and reference and reference["num_seeds"]):
        return "-"
    return f"{entry['miou_mean'] - reference['miou_mean']:+.1f}"


def markdown(summary, command, machine_info, seeds, num_steps, failures, notes=None, waiting=None,
             regressor_features=None):
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
        f"times are indicative. Written {datetime.date.today().isoformat()}.",
        "",
        f"Every run: `python -m pit_keras.train --flagfile={FLAGFILE}` (tiny backbone, 256x128, batch 4 + 4, "
        f"SGD lr 0.05 with poly decay, weight decay 1e-4) for {num_steps} steps, then the row's flags; the same "
        f"data and step count for every row, seeds {', '.join(map(str, seeds))}. Target mIoU (%) on the "
        "benchmark's 100 target val images: mean ± sample standard deviation over seeds. The paper's column "
        "(ResNet-101, GTAV -> Cityscapes) is for orientation only: another backbone, other data.",
        "",
        "## Main rows",
        "",
        "| method | target mIoU | seeds | per seed | paper | wall time per run (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name in MAIN_ROWS:
        if name not in rows:
            continue
        entry = rows[name]
        lines.append(f"| {entry['label']} | {fmt_miou(entry)} | {entry['num_seeds']} | {fmt_seeds(entry)} | "
                     f"{entry['paper']} | {fmt(entry['seconds_mean'], 0)} |")
    if waiting:
        lines += ["", f"*PIT, regressor image labels*: {waiting}"]
    reference = rows.get("pit_gt")
    table3 = [name for name in GROUPS["table3"] if name in rows and name != "pit_gt"]
    if table3:
        lines += ["", "## Ablations (paper Table 3), on PIT with ground-truth target image labels", "",
                  "| setting | target mIoU | seeds | per seed | vs full | paper |", "|---|---|---|---|---|---|"]
        if reference:
            lines.append(f"| full (3 units, L_c, L_r on both domains) | {fmt_miou(reference)} | "
                         f"{reference['num_seeds']} | {fmt_seeds(reference)} | | 50.6 |")
        for name in table3:
            entry = rows[name]
            lines.append(f"| {entry['label']} | {fmt_miou(entry)} | {entry['num_seeds']} | {fmt_seeds(entry)} | "
                         f"{delta(entry, reference)} | {entry['paper']} |")
    table4 = [(units, name, paper) for units, name, paper in TABLE4 if name in rows]
    if any(name != "pit_gt" for _, name, _ in table4):
        lines += ["", "## Number of units (paper Table 4), on PIT with ground-truth target image labels", "",
                  "| units | target mIoU | seeds | per seed | vs 3 units | paper |", "|---|---|---|---|---|---|"]
        for units, name, paper in table4:
            entry = rows[name]
            lines.append(f"| {units} | {fmt_miou(entry)} | {entry['num_seeds']} | {fmt_seeds(entry)} | "
                         f"{'' if name == 'pit_gt' else delta(entry, reference)} | {paper} |")
    diagnostic = [r for r in ROWS if r.group == "diagnostic" and r.name in rows]
    if diagnostic:
        lines += ["", "## Diagnostic rows (not in the paper)", "",
                  "| setting | target mIoU | seeds | per seed | vs its reference |", "|---|---|---|---|---|"]
        for row in diagnostic:
            entry = rows[row.name]
            lines.append(f"| {entry['label']} | {fmt_miou(entry)} | {entry['num_seeds']} | {fmt_seeds(entry)} | "
                         f"{delta(entry, rows.get(row.reference))} vs {REFERENCE_NAMES[row.reference]} |")
    main = [rows[name] for name in MAIN_ROWS if name in rows and rows[name]["num_seeds"]]
    if main:
        classes = main[0]["classes"]
        lines += ["", "## Per-class IoU of the main rows (mean over seeds)", "",
                  "| class | " + " | ".join(e["label"].split(" (")[0] for e in main) + " |",
                  "|---|" + "---|" * len(main)]
        for name in classes:
            lines.append(f"| {name} | " + " | ".join(fmt(e["per_class_iou_mean"].get(name)) for e in main) + " |")
        lines.append("| **mIoU** | " + " | ".join(fmt(e["miou_mean"]) for e in main) + " |")
    if summary["regressor"] or summary.get("regressor_aligned"):
        source = ("the backbone of the same seed's source-only run (global-average pooled)"
                  if regressor_features == BACKBONE_FEATURES else f"{regressor_features} with ImageNet weights")
        lines += ["", "## The regressor's target image labels", "",
                  f"Each seed's labels come from `python -m pit_keras.image_labels` (its default training) on "
                  f"features of {source}.", ""]
    if summary["regressor"]:
        lines += ["Mean distance to the true class shares of the 400 target training images (lower is better):", "",
                  "| seed | regressor chi-squared | source-mean prior chi-squared | regressor L1 | prior L1 |",
                  "|---|---|---|---|---|"]
        for seed, report in sorted(summary["regressor"].items()):
            lines.append(f"| {seed} | {report['regressor']['chi2']:.3f} | {report['source-mean prior']['chi2']:.3f} "
                         f"| {report['regressor']['l1']:.3f} | {report['source-mean prior']['l1']:.3f} |")
    if summary.get("regressor_aligned"):
        lines += ["", f"The same regressor on features standardized per domain (`--feature_alignment=standardize`, "
                  f"rows {ALIGNED_ROW}*):", "",
                  "| seed | regressor chi-squared | source-mean prior chi-squared | regressor L1 | prior L1 |",
                  "|---|---|---|---|---|"]
        for seed, report in sorted(summary["regressor_aligned"].items()):
            lines.append(f"| {seed} | {report['regressor']['chi2']:.3f} | {report['source-mean prior']['chi2']:.3f} "
                         f"| {report['regressor']['l1']:.3f} | {report['source-mean prior']['l1']:.3f} |")
    if failures:
        lines += ["", "## Runs that failed", ""]
        lines += [f"- {row} seed {seed}: {reason}" for (row, seed), reason in sorted(failures.items())]
    if notes:
        lines += ["", "## Reading", "", notes.strip()]
    return "\n".join(lines) + "\n"


def json_payload(summary, command, machine_info, seeds, num_steps, failures):
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean({"command": command, "machine": machine_info, "seeds": seeds, "num_steps": num_steps,
                  "flagfile": FLAGFILE, "rows": summary["rows"], "regressor_distances": summary["regressor"],
                  "regressor_distances_aligned": summary.get("regressor_aligned", {}),
                  "failures": {f"{row}/seed_{seed}": reason for (row, seed), reason in failures.items()}})


def write_results(summary, command, seeds, num_steps, failures, markdown_path, json_path, notes_path=None,
                  waiting=None, regressor_features=None):
    info = machine()
    notes = None
    if notes_path and os.path.isfile(notes_path):
        with open(notes_path) as f:
            notes = f.read()
    write_text_atomic(markdown_path, markdown(summary, command, info, seeds, num_steps, failures, notes, waiting,
                                              regressor_features))
    write_json_atomic(json_path, json_payload(summary, command, info, seeds, num_steps, failures))


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected argument {argv[1]!r} (flags are written --name=value).")
    if not FLAGS.output_dir:
        raise UserError("--output_dir is required (the folder of the runs).")
    if FLAGS.num_steps <= 0:
        raise UserError(f"--num_steps={FLAGS.num_steps}: must be positive.")
    seeds = parse_seeds(FLAGS.seeds)
    rows = select_rows(FLAGS.rows)
    command = recorded_command(sys.argv[1:])
    os.chdir(REPO)
    failures = {}
    if not FLAGS.report_only:
        failures = run_all(rows, seeds, FLAGS.output_dir, FLAGS.num_steps, FLAGS.regressor_features)
    # Every row with finished runs in the folder is reported, also those not asked for this time.
    reported = [row.name for row in ROWS if row.name in rows or any(
        is_done(run_dir(FLAGS.output_dir, row.name, s)) for s in seeds)]
    summary = summarize(FLAGS.output_dir, reported, seeds)
    waiting = None
    regressor_failures = [reason for (row, _), reason in failures.items() if row == REGRESSOR_ROW]
    if REGRESSOR_ROW not in reported:
        waiting = "not run (add it with `--rows=pit_regressor`)."
    elif regressor_failures:
        waiting = f"waits for the regressor: {regressor_failures[0]}"
    write_results(summary, command, seeds, FLAGS.num_steps, failures, FLAGS.markdown, FLAGS.json, FLAGS.notes,
                  waiting, FLAGS.regressor_features)
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
