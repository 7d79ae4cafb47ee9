"""The paper's flagfiles compose (nested --flagfile= lines), parse with every flag known to its command, and
hold the paper's values (docs/method.md); each opens with the command, hardware, runtime and expected result."""

import json
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO

FLAGFILES = sorted(str(p.relative_to(REPO)) for p in (REPO / "flags").rglob("*.cfg"))
TRAIN_FILES = [f for f in FLAGFILES if not f.startswith(("flags/base/", "flags/image_labels_"))]
IMAGE_LABELS_FILES = [f for f in FLAGFILES if f.startswith("flags/image_labels_")]

# Parses each flagfile in one process: absl flags are global, so they are reset between files.
PARSE = """
import json, sys
from absl import flags
import pit_keras.{module} as cli
out = {{}}
for path in sys.argv[1:]:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["cli", "--flagfile=" + path])
    config = cli.parse_config()
    out[path] = config.to_json() if hasattr(config, "to_json") else config  # train's RunConfig, image_labels' dict
print(json.dumps(out))
"""


def parse(module, files):
    result = subprocess.run([sys.executable, "-c", PARSE.format(module=module), *files], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_train_flagfiles_parse_with_the_papers_settings():
    configs = parse("train", TRAIN_FILES)
    demo = configs.pop("flags/demo.cfg")
    assert demo["backbone"] == "tiny" and demo["cache_images"]
    # The demo reads no target label: its PIT takes the self-training teacher's image labels.
    assert (demo["method"], demo["image_labels"], demo["self_training"]) == ("pit", "teacher", True)
    weak = configs.pop("flags/demo_weak.cfg")
    assert (weak["image_labels"], weak["image_label_kind"]) == ("ground_truth", "presence")
    benchmark = {path: c for path, c in configs.items() if path.startswith("flags/experiments/")}
    assert benchmark and all(c["backbone"] == "tiny" and c["num_steps"] == 1500 for c in benchmark.values())
    for path, config in configs.items():
        if path in benchmark:
            continue
        assert not config["cache_images"], path  # GTAV decoded would not fit in memory
        assert (config["learning_rate"], config["momentum"], config["poly_power"]) == (2.5e-4, 0.9, 0.9), path
        assert (config["head_lr_multiplier"], config["interaction_lr_multiplier"]) == (10, 1), path
        assert (config["num_steps"], config["batch_size"]) == (200000, 4), path
        assert config["target_size"] == [1024, 512] and config["backbone_weights"] == "imagenet", path
    for name in ("gta2cs", "syn2cs"):
        full = configs[f"flags/{name}.cfg"]
        assert full["method"] == "pit" and full["lse_r"] == [0.5, 1.0, 1.5]
        assert (full["lambda_c"], full["lambda_r"], full["recon_domains"]) == (0.5, 0.5, ["source", "target"])
        assert full["backbone"] == "deeplabv2_resnet101"
        assert configs[f"flags/{name}_vgg16.cfg"]["backbone"] == "fcn8s_vgg16"
    assert configs["flags/gta2cs.cfg"]["source_size"] == [1280, 640]
    assert configs["flags/gta2cs.cfg"]["num_classes"] == 19
    syn = configs["flags/syn2cs.cfg"]
    assert syn["source_size"] == [1280, 760] and (syn["num_classes"], syn["class_set"]) == (16, "synthia16")
    ablations = {pathlib.Path(p).stem: c for p, c in configs.items() if "/ablations/" in p}
    assert ablations["gta2cs_no_lc"]["lambda_c"] == 0 and ablations["gta2cs_no_lr"]["lambda_r"] == 0
    assert ablations["gta2cs_lr_target_only"]["recon_domains"] == ["target"]
    assert ablations["gta2cs_units4"]["lse_r"] == [0.5, 1.0, 1.5, 2.0]
    assert ablations["gta2cs_weakly"]["image_labels"] == "ground_truth"
    assert ablations["syn2cs_source_only"]["method"] == "source_only"
    model_dirs = [[line for line in (REPO / p).read_text().splitlines() if line.startswith("--model_dir=")][-1]
                  for p in configs]
    assert len(set(model_dirs)) == len(model_dirs)  # no two experiments share a run folder


def test_image_labels_flagfiles_parse():
    configs = parse("image_labels", IMAGE_LABELS_FILES)
    assert configs["flags/image_labels_syn2cs.cfg"]["num_classes"] == 16
    for config in configs.values():
        assert (config["features"], config["features_weights"]) == ("InceptionResNetV2", "imagenet")


@pytest.mark.parametrize("path", [f for f in FLAGFILES if f != "flags/demo.cfg"])
def test_flagfiles_open_with_command_hardware_runtime_and_result(path):
    header = [line for line in (REPO / path).read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert (REPO / path).read_text().startswith("#")
    if not path.startswith("flags/base/"):
        assert "python -m pit_keras." in text and f"--flagfile={path}" in text
        assert "Expected result" in text or "Result:" in text
        assert "Hardware" in text or "hardware and runtime as" in text


def interaction_weights_below_a_tenth_of_the_heads(configs):
    """The PIT flagfiles whose w^k learn at less than a tenth of the heads' rate: the effective rates are
    lr * head_lr_multiplier * interaction_lr_multiplier (w^k) and lr * head_lr_multiplier (heads)."""
    slow = {}
    for path, config in configs.items():
        if config["method"] != "pit":
            continue
        heads = config["learning_rate"] * config.get("head_lr_multiplier", 1.0)
        w = heads * config["interaction_lr_multiplier"]
        if not w >= 0.1 * heads:
            slow[path] = (w, heads)
    return slow


@pytest.mark.parametrize("mistake", [None, "inherits_0.01"])
def test_every_train_flagfile_trains_the_interaction_weights(tmp_path, mistake):
    files = list(TRAIN_FILES)
    if mistake:
        # A paper flagfile that inherits the old --interaction_lr_multiplier=0.01 (the w^k frozen at 1/K).
        scratch = tmp_path / "gta2cs_frozen_w.cfg"
        scratch.write_text((REPO / "flags/gta2cs.cfg").read_text() + "--interaction_lr_multiplier=0.01\n")
        files.append(str(scratch))
    configs = parse("train", files)
    assert len(configs) == len(files)
    slow = interaction_weights_below_a_tenth_of_the_heads(configs)

    def check():
        assert not slow, f"w^k learn at less than a tenth of the heads' rate (w^k rate, heads' rate): {slow}"

    if mistake:
        with pytest.raises(AssertionError):
            check()
        assert list(slow) == [str(tmp_path / "gta2cs_frozen_w.cfg")], slow
    else:
        check()
