"""tools/benchmark_train.py: a smoke run (tiny backbone, 32x32, 2 repeats) checking the JSON it writes, no
timings; the case names; the benchmark's joint source+target forward computes what the trainer does."""

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from pit_keras.models.network import build_network
from pit_keras.training.trainer import PITTrainer
from test_tools import load_tool

benchmark_train = load_tool("benchmark_train")

TRAIN_KEYS = {"case", "base", "policy", "xla", "joint", "pipeline", "cached", "steps_per_execution", "step_ms",
              "images_per_step", "images_per_s", "first_call_s", "compile_s", "timed_steps", "loss_finite", "terms",
              "parameters", "static_shapes", "wall_s"}


def run_tool(tmp_path, root, cases, *extra):
    output = tmp_path / "perf.json"
    code = benchmark_train.main(["--backbone=tiny", "--size=32,32", "--batch_size=2", "--repeats=2", "--warmup=0",
                                 f"--data_root={root}", f"--cases={','.join(cases)}", f"--output={output}", *extra])
    return code, json.loads(output.read_text())


@pytest.mark.slow  # two minutes of tool benchmarking; the self-training and memory cases below run by default
def test_smoke_run_writes_every_section(tmp_path, tiny_benchmark, capsys):
    cases = ["reference", "pit", "pit_no_lc", "ablation", "pipeline"]
    code, data = run_tool(tmp_path, tiny_benchmark, cases, "--in_process")
    assert code == 0
    assert set(data) >= {"command", "machine", "load_average_start", "load_average_end", "other_training_processes",
                         "args", "results", "summary"}
    assert data["machine"]["nproc"] >= 1 and data["machine"]["cpu"]
    assert data["args"]["size"] == [32, 32] and data["args"]["cases"] == cases
    results = {r["case"]: r for r in data["results"]}
    assert list(results) == cases
    for name in ("reference", "pit", "pit_no_lc"):
        assert set(results[name]) >= TRAIN_KEYS, name
        assert results[name]["loss_finite"] and results[name]["timed_steps"] == 2
        assert len(results[name]["other_training_processes"]) == 2 and results[name]["other_cpu_cores"] >= 0
    assert results["pit"]["terms"] == ["img_src", "img_trg", "rec_src", "rec_trg", "seg_src"]
    assert results["pit_no_lc"]["terms"] == ["rec_src", "rec_trg", "seg_src"]
    assert results["reference"]["terms"] == ["seg_src", "trg_ref"] and results["reference"]["images_per_step"] == 4
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
    printed = capsys.readouterr().out
    assert "| case | what |" in printed and "| PIT step / two-domain forward reference |" in printed
    assert "Interleaved in one process" in printed
    assert benchmark_train.main([f"--report={tmp_path / 'perf.json'}"]) == 0  # the report again, from the JSON
    again = capsys.readouterr().out.strip()
    assert again.startswith("`python tools/benchmark_train.py") and printed.strip().endswith(again)


def test_a_case_in_its_own_process_reports_its_peak_memory(tmp_path, tiny_benchmark):
    code, data = run_tool(tmp_path, tiny_benchmark, ["inference"])
    assert code == 0, data["results"]
    (result,) = data["results"]
    assert result["case"] == "inference" and result["peak_rss_mb"] > 10
    assert result["latency_fine_ms"] > 0 and result["latency_plain_ms"] > 0
    # The exported fine branch is the plain segmenter's graph: the coarse units leave nothing behind.
    assert result["same_operations"] and data["summary"]["fine_and_plain_same_operations"]
    assert data["summary"]["fine_over_plain_latency"] > 0


def test_case_names_parse_and_bad_ones_are_refused():
    for name in benchmark_train.DEFAULT_CASES:
        benchmark_train.parse_case(name)
    case = benchmark_train.parse_case("pit+bf16+xla+spe5+joint")
    assert (case["policy"], case["xla"], case["steps_per_execution"], case["joint"]) == ("mixed_bfloat16", True, 5,
                                                                                           True)
    assert benchmark_train.parse_case("pit+asppconv")["asppconv"] and not case["asppconv"]
    with pytest.raises(SystemExit):  # argparse's error: asppconv on a backbone without ASPP heads
        benchmark_train.parse_args(["--backbone=tiny", "--cases=pit+asppconv"])
    assert benchmark_train.parse_args(["--backbone=deeplabv2_resnet101", "--cases=pit+asppconv"]).cases


def test_backbone_heads_table_matches_the_registry():
    from pit_keras.models import backbones

    assert benchmark_train.BACKBONE_HEADS == {name: spec.head for name, spec in backbones.BACKBONES.items()}
    for bad in ("pit+turbo", "nope", "pit+cached", "pipeline+xla", "reference+joint"):
        with pytest.raises(ValueError, match="case"):
            benchmark_train.parse_case(bad)


def test_joint_forward_variant_computes_the_same_terms_without_batch_statistics():
    # In inference mode BatchNorm uses its moving statistics, so the benchmark's one-call-on-both-domains variant
    # must give the terms of the trainer's call per domain; in training mode they differ by design.
    rng = np.random.default_rng(0)
    batch = {"source_image": tf.constant(rng.uniform(0, 255, (2, 32, 32, 3)), tf.float32),
             "source_label": tf.constant(rng.integers(0, 4, (2, 32, 32)), tf.uint8),
             "target_image": tf.constant(rng.uniform(0, 255, (2, 32, 32, 3)), tf.float32),
             "target_image_labels": tf.constant(rng.dirichlet(np.ones(4), 2), tf.float32)}
    keras.utils.set_random_seed(0)
    network = build_network("tiny", 4, num_units=3)
    config = dataclasses.replace(benchmark_train.base_config(benchmark_train.parse_args(["--size=32,32"]), "pit"),
                                 num_classes=4)
    separate = PITTrainer(network, 4, **benchmark_train.trainer_kwargs(config)).compute_terms(batch)
    joint = benchmark_train.make_joint_forward_trainer(network, config).compute_terms(batch)
    assert set(joint) == set(separate) == {"seg_src", "img_src", "img_trg", "rec_src", "rec_trg"}
    for name in separate:
        np.testing.assert_allclose(joint[name].numpy(), separate[name].numpy(), rtol=1e-4, atol=1e-6)


def test_aspp_benchmark_runs_both_implementations_in_their_own_processes(tmp_path):
    benchmark_aspp = load_tool("benchmark_aspp")
    output = tmp_path / "aspp.json"
    assert benchmark_aspp.main(["--channels=8", "--classes=3", "--repeats=1", f"--output={output}"]) == 0
    data = json.loads(output.read_text())
    assert [(r["setting"], r["implementation"]) for r in data["results"]] == [
        (s, i) for s in benchmark_aspp.SETTINGS for i in ("conv", "matmul")]
    assert all(r["step_s"] > 0 and r["peak_rss_mb"] > 10 for r in data["results"])
    with pytest.raises(SystemExit):
        benchmark_aspp.parse_args(["--settings=huge"])


def test_self_training_steps_are_measured_against_the_pit_step(tmp_path, tiny_benchmark, capsys):
    code, data = run_tool(tmp_path, tiny_benchmark, ["self_training"], "--in_process")
    assert code == 0
    members = data["results"][0]["members"]
    assert list(members) == ["pit", "source_only_st", "pit_st"]
    assert members["source_only_st"]["terms"] == ["seg_src", "st_trg"]
    assert members["pit_st"]["terms"] == ["img_src", "img_trg", "rec_src", "rec_trg", "seg_src", "st_trg"]
    assert all(m["loss_finite"] for m in members.values())
    assert "| pit_st |" in capsys.readouterr().out
