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


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def test_your_own_folders_are_checked_in_their_training_layouts(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "carla"
    for k, raw in enumerate((7, 8, 9)):
        save(source / "images" / "town" / f"{k}.png", rng.integers(0, 255, (16, 32, 3)))
        save(source / "labels" / "town" / f"{k}.png", np.full((16, 32), 7 if k < 2 else raw))
    (source / "map.json").write_text('{"7": 0, "8": 1}')
    mapped = check("--dataset=folder_source", f"--root={source}", f"--label_map={source / 'map.json'}")
    assert mapped.returncode == 0, mapped.stdout + mapped.stderr
    assert "images: 3; without a label: 0" in mapped.stdout
    assert "ids the label map does not list (ignored in training), with the number of labels holding each: 9 (1)" \
        in mapped.stdout
    # Without the map, an id that is no train id is named with its file.
    save(source / "labels" / "town" / "2.png", np.full((16, 32), 200))
    unmapped = check("--dataset=folder_source", f"--root={source}")
    assert unmapped.returncode == 1
    assert f"{source / 'labels' / 'town' / '2.png'}: label values outside the train ids: [200]" in unmapped.stdout

    camera = tmp_path / "camera"
    save(camera / "day" / "0001.png", rng.integers(0, 255, (20, 40, 3)))
    Image.fromarray(rng.integers(0, 255, (20, 40, 3)).astype(np.uint8)).save(camera / "0002.jpg")
    truncated = camera / "0002.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    for name, value in (("v1", 18), ("v2", 200)):
        save(camera / "val" / "images" / f"{name}.png", rng.integers(0, 255, (20, 40, 3)))
        save(camera / "val" / "labels" / f"{name}.png", np.full((20, 40), value))
    train = check("--dataset=folder_target", f"--root={camera}")
    assert train.returncode == 1
    assert "folder_target at" in train.stdout and "(train)" in train.stdout
    assert "images: 2; without a label: 2" in train.stdout  # the val set is left out, as training leaves it
    assert f"{truncated}: " in train.stdout and "problems: 1" in train.stdout
    val = check("--dataset=folder_target", f"--root={camera}", "--split=val")
    assert val.returncode == 1 and "images: 2; without a label: 0" in val.stdout, val.stdout + val.stderr
    assert f"{camera / 'val' / 'labels' / 'v2.png'}: label values outside the train ids: [200]" in val.stdout
    assert "problems: 1" in val.stdout
    refused = check("--dataset=gta5", f"--root={camera}", f"--label_map={source / 'map.json'}")
    assert refused.returncode == 2 and "--label_map applies to --dataset=folder_source only" in refused.stderr
