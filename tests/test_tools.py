"""tools/results_table.py (aggregation, the page, resume) on fake finished runs, tools/figures.py on the shared
trained run (conftest.py) and an untrained one; every tool takes absl flags (the command lines the docs give
parse), refuses a bad one in one sentence, and none edits sys.path."""

import importlib
import json
import math
import os
import re
import shlex

import numpy as np
import pytest
from absl import flags
from PIL import Image

import figures
import results_table
from commands import flags_defined_within, run_tool_in_process
from conftest import REPO, run_config
from pit_keras.errors import UserError

CLASSES = ["road", "car", "train"]


def write_experiments(folder):
    """A small flags/experiments/ folder: a main table with a reference, a one-seed ablation, a regressor row."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "source_only": ["# row: source only", "# table: main", "# paper: 36.2 (Table 1)", "# order: 1",
                        "--flagfile=flags/base/benchmark.cfg", "--method=source_only"],
        "minent": ["# row: MinEnt", "# table: main", "# reference: source_only", "# order: 2",
                   "--flagfile=flags/base/benchmark.cfg", "--method=minent"],
        "pit_gt": ["# row: PIT-GT", "# table: main", "# paper: 52.9 (Table 5)", "# reference: source_only",
                   "# order: 3", "--flagfile=flags/base/benchmark.cfg", "--image_labels=ground_truth"],
        "pit_gt_no_lr": ["# row: without L_r", "# table: table3", "# reference: pit_gt", "# seeds: 1",
                         "--flagfile=flags/experiments/pit_gt.cfg", "--lambda_r=0"],
        "pit_regressor": ["# row: PIT-regressor", "# table: diagnostic", "# image_labels: regressor_standardize",
                          "--flagfile=flags/base/benchmark.cfg"],
    }
    for name, lines in files.items():
        (folder / f"{name}.cfg").write_text("\n".join(lines) + "\n")
    return results_table.load_experiments(folder)


def fake_run(output_dir, experiment, seed, miou, per_class, seconds=10.0):
    """A finished run folder as train and the tool leave it: eval_val.json and the tool's record."""
    folder = results_table.run_dir(str(output_dir), experiment.name, seed)
    results_table.write_json_atomic(f"{folder}/eval_val.json", {
        "miou": miou, "per_class_iou": dict(zip(CLASSES, per_class)), "classes": CLASSES, "num_images": 3})
    args = results_table.train_args(experiment, seed, str(output_dir))
    results_table.write_json_atomic(f"{folder}/{results_table.RUN_RECORD}", {
        "args": args, "flagfiles": results_table.args_flagfiles(args), "seconds": seconds, "returncode": 0})


def test_experiments_are_read_from_their_flagfile_headers(tmp_path):
    experiments = write_experiments(tmp_path / "experiments")
    assert list(experiments) == ["source_only", "minent", "pit_gt", "pit_gt_no_lr", "pit_regressor"]
    pit = experiments["pit_gt"]
    assert (pit.label, pit.table, pit.paper, pit.reference) == ("PIT-GT", "main", "52.9 (Table 5)", "source_only")
    assert experiments["pit_gt_no_lr"].seeds == 1 and results_table.seeds_of(experiments["pit_gt_no_lr"], [4, 5]) == [4]
    (tmp_path / "experiments" / "broken.cfg").write_text("# table: main\n--method=pit\n")
    with pytest.raises(UserError, match="broken.cfg: its header lacks '# row"):
        results_table.load_experiments(tmp_path / "experiments")


def test_every_shipped_experiment_has_a_header_and_the_demo_leads():
    experiments = results_table.load_experiments()
    assert list(experiments)[0] == "demo" and experiments["demo"].table == "main"
    for name in ("source_only", "minent", "bn_only", "pit_gt_shares", "source_only_st", "minent_st",
                 "pit_gt_presence", "pit_gt_printed_lse", "b1_demo", "b1_bn_only"):
        assert name in experiments, name
    bn_only = (REPO / "flags" / "experiments" / "bn_only.cfg").read_text()
    assert "--method=minent" in bn_only and "--lambda_ent=0" in bn_only


def test_aggregation_and_page(tmp_path):
    experiments = write_experiments(tmp_path / "experiments")
    out = tmp_path / "runs"
    source = {0: (20.0, [60.0, 10.0, None]), 1: (24.0, [64.0, 14.0, None]), 2: (25.0, [65.0, 20.0, None])}
    for seed, (miou, per_class) in source.items():
        fake_run(out, experiments["source_only"], seed, miou, per_class, seconds=10.0 + seed)
    fake_run(out, experiments["pit_gt"], 0, 40.0, [80.0, 30.0, None])
    fake_run(out, experiments["pit_gt"], 1, 44.0, [84.0, 34.0, None])
    fake_run(out, experiments["pit_gt_no_lr"], 0, 38.0, [78.0, 28.0, None])
    fake_run(out, experiments["pit_gt_no_lr"], 1, 99.0, [78.0, 28.0, None])  # not one of its seeds
    names = list(experiments)
    summary = results_table.summarize(str(out), names, experiments, [0, 1, 2])

    entry = summary["rows"]["source_only"]
    assert entry["num_seeds"] == 3 and entry["seeds"] == [0, 1, 2]
    assert entry["miou_mean"] == pytest.approx(np.mean([20, 24, 25]))
    assert entry["miou_std"] == pytest.approx(np.std([20, 24, 25], ddof=1))
    assert entry["per_class_iou_mean"]["car"] == pytest.approx(np.mean([10, 14, 20]))
    assert math.isnan(entry["per_class_iou_mean"]["train"])
    assert entry["seconds_mean"] == pytest.approx(11.0)
    assert summary["rows"]["pit_gt"]["num_seeds"] == 2
    assert summary["rows"]["pit_gt_no_lr"]["num_seeds"] == 1
    assert math.isnan(summary["rows"]["pit_gt_no_lr"]["miou_std"])  # one seed has no spread
    assert summary["rows"]["minent"]["num_seeds"] == 0

    notes = tmp_path / "notes.md"
    notes.write_text("PIT helps here.\n")
    md, js = tmp_path / "docs" / "results.md", tmp_path / "docs" / "results.json"
    results_table.write_results(summary, "python tools/results_table.py --output_dir=runs", [0, 1, 2],
                                {("minent", 0): "train exited with 1: boom"}, str(md), str(js), str(notes))
    page = md.read_text()
    assert "python tools/results_table.py --output_dir=runs" in page
    assert "CPU cores" in page
    assert "| source only | 23.0 ± 2.6 | 3 | 20.0, 24.0, 25.0 |  | 36.2 (Table 1) | `source_only` | 11 |" in page
    assert "| MinEnt | not run | 0 |" in page
    assert "| PIT-GT | 42.0 ± 2.8 | 2 | 40.0, 44.0 | +20.0 (seeds 0, 1) vs source_only |" in page
    # A one-seed row is compared with the same seed of its reference (40.0), not with its mean (42.0).
    assert "| without L_r | 38.0 (one seed) | 1 | 38.0 | -2.0 (seed 0) vs pit_gt |" in page
    assert page.index("## Main rows") < page.index("## Ablations (paper Table 3)")
    assert "| car | 14.7 | 32.0 |" in page and "| train | - | - |" in page
    assert "minent seed 0: train exited with 1: boom" in page
    assert page.rstrip().endswith("PIT helps here.")
    numbers = json.loads(js.read_text())
    assert numbers["rows"]["source_only"]["miou_per_seed"] == {"0": 20.0, "1": 24.0, "2": 25.0}
    assert numbers["rows"]["pit_gt_no_lr"]["miou_std"] is None
    assert numbers["machine"]["nproc"] >= 1


def test_resume_trains_only_missing_runs_and_refuses_other_flags(tmp_path, monkeypatch):
    experiments = write_experiments(tmp_path / "experiments")
    out = tmp_path / "runs"
    fake_run(out, experiments["source_only"], 0, 20.0, [60.0, 10.0, None])
    calls = []

    def fake_call(command, cwd, stdout, stderr, env):
        args = command[3:]
        calls.append(args)
        model_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--model_dir="))
        results_table.write_json_atomic(f"{model_dir}/eval_val.json", {
            "miou": 30.0, "per_class_iou": dict(zip(CLASSES, [1.0, 2.0, None])), "classes": CLASSES})
        return 0

    monkeypatch.setattr(results_table.subprocess, "call", fake_call)
    failures = results_table.run_all(["source_only", "pit_gt", "pit_gt_no_lr"], experiments, [0, 1], str(out))
    assert failures == {}
    trained = sorted(next(a for a in args if a.startswith("--model_dir=")) for args in calls)
    assert trained == [f"--model_dir={out}/pit_gt/seed_0", f"--model_dir={out}/pit_gt/seed_1",
                       f"--model_dir={out}/pit_gt_no_lr/seed_0", f"--model_dir={out}/source_only/seed_1"]
    assert all(args[0].startswith("--flagfile=flags/experiments/") for args in calls)
    assert not any(a.startswith("--num_steps") for args in calls for a in args)

    calls.clear()
    assert results_table.run_all(["source_only", "pit_gt"], experiments, [0, 1], str(out)) == {}
    assert calls == []
    with pytest.raises(UserError, match="other flags"):
        results_table.run_all(["pit_gt"], experiments, [0], str(out), num_steps=3000)

    # A flagfile in the chain whose content changed since the run (here the included benchmark.cfg) is refused.
    real_repo, repo = results_table.REPO, tmp_path / "repo"
    chain = results_table.args_flagfiles(results_table.train_args(experiments["source_only"], 0, str(out)))
    assert set(chain) == {"flags/experiments/source_only.cfg", "flags/base/benchmark.cfg"}
    for path in chain:
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text((real_repo / path).read_text())
    monkeypatch.setattr(results_table, "REPO", repo)
    assert results_table.run_all(["source_only"], experiments, [0], str(out)) == {}
    with open(repo / "flags/base/benchmark.cfg", "a") as f:
        f.write("--num_steps=10\n")
    with pytest.raises(UserError, match="made before flags/base/benchmark.cfg changed"):
        results_table.run_all(["source_only"], experiments, [0], str(out))
    monkeypatch.setattr(results_table, "REPO", real_repo)

    def failing_call(command, cwd, stdout, stderr, env):
        stdout.write("error: something broke\n")
        return 2

    monkeypatch.setattr(results_table.subprocess, "call", failing_call)
    failures = results_table.run_all(["minent"], experiments, [0], str(out))
    assert failures == {("minent", 0): "train exited with 2: error: something broke"}


def test_rows_and_seeds_flags(tmp_path):
    experiments = write_experiments(tmp_path / "experiments")
    assert results_table.select_rows(["main"], experiments) == ["source_only", "minent", "pit_gt"]
    assert results_table.select_rows(["pit_gt_no_lr", "source_only"], experiments) == ["source_only", "pit_gt_no_lr"]
    assert results_table.select_rows(["all"], experiments) == list(experiments)
    with pytest.raises(UserError, match="unknown experiment or table 'pit_gt_r2'"):
        results_table.select_rows(["pit_gt_r2"], experiments)
    with pytest.raises(UserError, match="distinct"):
        results_table.parse_seeds(["0", "0"])
    assert results_table.recorded_command(["--output_dir=x", "--report_only"]) == (
        "python tools/results_table.py --output_dir=x")


def test_regressor_rows_get_their_own_labels(tmp_path):
    experiments = write_experiments(tmp_path / "experiments")
    args = results_table.train_args(experiments["pit_regressor"], 1, "out")
    labels = os.path.join("out", "image_labels_regressor_standardize", "seed_1", "image_labels.json")
    assert f"--image_labels={labels}" in args
    made = results_table.regressor_args("out", 1, "regressor_standardize")
    assert f"--output={labels}" in made and "--feature_alignment=standardize" in made
    assert f"--model_dir={os.path.join('out', 'source_only', 'seed_1')}" in made
    assert not any(a.startswith("--feature_alignment") for a in results_table.regressor_args("out", 1))
    # A row whose teacher labels are blended in from a prior gets the prior's labels as --image_labels_prior.
    (tmp_path / "experiments" / "demo_prior.cfg").write_text(
        "# row: demo from a prior\n# table: ablation\n# image_labels_prior: regressor_adabn_pyramid\n"
        "--flagfile=flags/demo.cfg\n")
    prior_row = results_table.load_experiments(tmp_path / "experiments")["demo_prior"]
    assert prior_row.label_kinds == ["regressor_adabn_pyramid"]
    prior = os.path.join("out", "image_labels_regressor_adabn_pyramid", "seed_2", "image_labels.json")
    args = results_table.train_args(prior_row, 2, "out")
    assert f"--image_labels_prior={prior}" in args and not any(a.startswith("--image_labels=") for a in args)
    assert "--feature_pooling=pyramid" in results_table.regressor_args("out", 2, "regressor_adabn_pyramid")


@pytest.fixture(scope="module")
def tiny_runs(trained_run, tiny_benchmark, tmp_path_factory):
    """The shared PIT run (three units, trained on the tiny benchmark; conftest.py), and an untrained source-only
    run folder (run.json and a checkpoint of its initial weights)."""
    import keras

    from pit_keras.training import checkpoints
    from pit_keras.models.network import build_network

    baseline = run_config(tiny_benchmark, method="source_only", image_labels=None, lse_r=(0.5, 1.0),
                          interaction_lr_multiplier=0.01, image_loss_reduction="sum", batch_size=2, num_steps=2)
    root = tmp_path_factory.mktemp("tool_runs")
    runs = {"pit": trained_run[0], "source_only": root / "source_only"}
    checkpoints.check_or_write_run_config(str(runs["source_only"]), baseline)
    optimizer = keras.optimizers.SGD()
    checkpoints.manager(build_network("tiny", 19, num_units=0), optimizer, str(runs["source_only"])).save()
    return runs


def test_figures_from_tiny_runs(tiny_runs, tmp_path):
    written = figures.make_figures(str(tiny_runs["pit"]), str(tmp_path), compare_dir=str(tiny_runs["source_only"]),
                                   num_images=2, classes=["car"], num_classes=2)
    assert [p.rsplit("/", 1)[1] for p in written] == ["fig2_predictions.png", "fig3_cams.png"]
    panel_w, panel_h = 64, 32 + figures.CAPTION_HEIGHT
    with Image.open(written[0]) as fig2:
        # Two images; image, truth, source-only and PIT side by side.
        assert fig2.size == (4 * panel_w + 3 * figures.GAP, 2 * panel_h + figures.GAP)
        fig2 = np.asarray(fig2)
    # The truth panel of the first image (val #0 of 3) shows its label file in the palette.
    from pit_keras import runs
    config = runs.read_config(str(tiny_runs["pit"]))
    pairs, reader = figures.target_split(config, "val")
    from pit_keras import visualize
    from pit_keras.data import classes
    truth = visualize.colorize(reader(pairs[0][1]), classes.CITYSCAPES19)
    top, left = figures.CAPTION_HEIGHT, panel_w + figures.GAP
    np.testing.assert_array_equal(fig2[top:top + 32, left:left + 64], truth)
    with Image.open(written[1]) as fig3:
        # Up to two classes of the first image; the image, then one heat map per unit (three).
        assert len(config.lse_r) == 3 and fig3.size[0] == 4 * panel_w + 3 * figures.GAP
        assert fig3.size[1] in (panel_h, 2 * panel_h + figures.GAP)
        assert np.asarray(fig3).std() > 0


def test_figures_of_a_baseline_run_have_no_cams(tiny_runs, tmp_path):
    written = figures.make_figures(str(tiny_runs["source_only"]), str(tmp_path), num_images=1)
    assert [p.rsplit("/", 1)[1] for p in written] == ["fig2_predictions.png"]
    with pytest.raises(UserError, match="outside the split"):
        figures.make_figures(str(tiny_runs["source_only"]), str(tmp_path), images=["7"])
    with pytest.raises(UserError, match="'cat' is not a class"):
        figures.make_figures(str(tiny_runs["pit"]), str(tmp_path / "none"), classes=["cat"])
    assert not (tmp_path / "none").exists()


def test_pick_images_spreads_over_the_split():
    assert figures.pick_images(100, 3, []) == [16, 50, 83]
    assert figures.pick_images(2, 5, []) == [0, 1]
    assert figures.pick_images(10, 3, ["4", "2"]) == [4, 2]


# === Every tool ===

TOOLS = sorted(path.stem for path in (REPO / "tools").glob("*.py"))
COMMANDS = ["benchmark_aspp", "benchmark_export", "benchmark_train", "check_dataset", "count_params", "figures",
            "results_table"]


def test_every_command_is_an_absl_tool_that_leaves_sys_path_alone():
    assert set(COMMANDS) <= set(TOOLS)
    for name in TOOLS:
        source = (REPO / "tools" / f"{name}.py").read_text()
        assert "sys.path" not in source and "argparse" not in source, name
        if name in COMMANDS:
            assert "def define_flags():" in source and "def main(argv):" in source, name
            assert source.rstrip().endswith("define_flags()\n    run_main(main)"), name


def documented_commands():
    """`(tool, args)` of every `python tools/NAME.py ...` in README.md, docs/*.md and the tools' docstrings, less
    the placeholder arguments (`--size=W,H`, `--output=FILE.json`)."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "tools").glob("*.py"))]:
        text = re.sub(r"\\+\n", " ", path.read_text())
        for match in re.finditer(r"python tools/(\w+)\.py((?:[ \t]+--\w+(?:=[^\s`|\]]*)?)*)", text):
            args = [a for a in shlex.split(match.group(2)) if not re.search(r"=[A-Z]", a)]
            found.append((match.group(1), args))
    return found


def test_the_documented_command_lines_parse():
    commands = documented_commands()
    assert {name for name, _ in commands} >= {"benchmark_train", "benchmark_aspp", "benchmark_export",
                                               "check_dataset", "count_params", "results_table", "figures"}
    for name, args in commands:
        with flags_defined_within() as FLAGS:
            tool = importlib.import_module(name)
            tool.define_flags()
            try:
                FLAGS([f"tools/{name}.py", *args])  # absl refuses an unknown flag or a bad value
                if name == "benchmark_train":  # the case names too
                    tool.settings_from_flags()
            except (flags.Error, UserError) as err:
                raise AssertionError(f"python tools/{name}.py {shlex.join(args)}: {err}") from None


@pytest.mark.parametrize("name, args, message", [
    ("benchmark_train", ["--size=256"], "--size=256: expected W,H"),
    ("benchmark_aspp", ["--repeats=0"], "--channels, --classes and --repeats must be positive."),
    ("benchmark_export", ["--model_dir=runs/x", "--backbone=tiny", "--output=x.json"], "give one of --model_dir"),
    ("benchmark_export", ["--backbone=tiny", "--output=x.json", "--threads=1,x"], "--size=1024,512 --threads=1,x"),
    ("check_dataset", ["--root=data"], "--dataset is required"),
    ("count_params", ["--backbones=tiny,nope"], "--backbones: nope not in"),
    ("count_params", ["extra"], "unexpected argument 'extra'"),
])
def test_a_bad_flag_is_one_sentence(name, args, message):
    done = run_tool_in_process(name, *args)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {message}"), done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
