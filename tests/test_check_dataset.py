"""tools/check_dataset.py finds what training would only skip: damaged files, size mismatches, foreign ids."""

import shutil

import numpy as np
from PIL import Image

from commands import run_tool_in_process


def check(*args):
    """`python tools/check_dataset.py ARGS`, run in this process (tests/commands.py)."""
    return run_tool_in_process("check_dataset", *args)


def test_a_clean_dataset_passes(tiny_benchmark):
    result = check("--dataset=gta5", f"--root={tiny_benchmark / 'gta5'}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "images: 6; without a label: 0" in result.stdout and "64x32 (6)" in result.stdout


def test_every_kind_of_damage_is_named(tiny_benchmark, tmp_path):
    root = tmp_path / "gta5"
    shutil.copytree(tiny_benchmark / "gta5", root)
    names = sorted(p.name for p in (root / "images").iterdir())
    # Damaged in its middle: header and end intact, only a full decode finds it.
    data = bytearray((root / "images" / names[0]).read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    (root / "images" / names[0]).write_bytes(bytes(data))
    Image.open(root / "labels" / names[1]).resize((32, 16)).save(root / "labels" / names[1])
    label = Image.fromarray(np.full((32, 64), 200, np.uint8))
    label.save(root / "labels" / names[2])
    result = check("--dataset=gta5", f"--root={root}")
    assert result.returncode == 1
    assert f"{root / 'images' / names[0]}: cannot be decoded" in result.stdout
    assert f"{root / 'labels' / names[1]}: label is 32x16 but its image is 64x32" in result.stdout
    assert f"{root / 'labels' / names[2]}: label values outside the gta5 table: [200]" in result.stdout
    assert "problems: 3" in result.stdout


def test_a_missing_folder_is_one_sentence(tmp_path):
    result = check("--dataset=cityscapes", f"--root={tmp_path}", "--split=val")
    assert result.returncode == 2 and "no such folder" in result.stderr and "Traceback" not in result.stderr
