"""Tests of the embedded two-domain benchmark (pit_keras.data.synthetic): files, encodings, statistics, safety."""

import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from pit_keras import atomic
from pit_keras.data import synthetic
from pit_keras.data.classes import CITYSCAPES_CLASSES, CITYSCAPES_LABEL_IDS, label_id_palette

SMALL = dict(num_source=3, num_target_train=3, num_target_val=2, size=(64, 32), seed=0)
# Label ids a scene may hold: the 19 training classes and the ego vehicle (an ignored id).
VALID_IDS = set(CITYSCAPES_LABEL_IDS) | {1}


def _files(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _shares_and_colours(domain, domain_id, n=40):
    """Per-image class shares `[n, 19]` and per-class mean colour {label id: rgb} over n scenes at 64x32."""
    shares, pixels = [], {}
    for k in range(n):
        img, ids = synthetic.render_scene(np.random.default_rng([7, domain_id, k]), (64, 32), domain)
        shares.append(np.bincount(ids.ravel(), minlength=256)[list(CITYSCAPES_LABEL_IDS)] / ids.size)
        for label_id in np.unique(ids):
            pixels.setdefault(int(label_id), []).append(img[ids == label_id])
    return np.array(shares), {k: np.concatenate(v).mean(0) for k, v in pixels.items()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "synthetic"
    synthetic.generate(root, **SMALL)
    return root


def test_files_are_in_the_official_layouts(bench):
    expected = {"benchmark.json"}
    expected |= {f"gta5/{kind}/{i:05d}.png" for kind in ("images", "labels") for i in (1, 2, 3)}
    for split, stems in (("train", ("synthtown_000000", "procburg_000000", "synthtown_000001")),
                         ("val", ("mockfurt_000000", "mockfurt_000001"))):
        for stem in stems:
            city = stem.split("_")[0]
            expected.add(f"cityscapes/leftImg8bit/{split}/{city}/{stem}_000019_leftImg8bit.png")
            expected.add(f"cityscapes/gtFine/{split}/{city}/{stem}_000019_gtFine_labelIds.png")
    assert set(_files(bench)) == expected
    assert not [n for n in os.listdir(bench.parent) if n != bench.name]  # no temporary folder left behind
    for path in bench.glob("**/*.png"):
        with Image.open(path) as image:
            assert image.size == (64, 32)
            if "images" in path.parts or "leftImg8bit" in path.parts:
                assert image.mode == "RGB"
    meta = json.loads((bench / "benchmark.json").read_text())
    assert meta["format_version"] == 1
    assert {k: meta[k] for k in SMALL} == {**SMALL, "size": [64, 32]}


def test_gta5_labels_are_palette_pngs_of_label_ids(bench):
    for i in (1, 2, 3):
        with Image.open(bench / "gta5" / "labels" / f"{i:05d}.png") as image:
            assert image.mode == "P"
            assert image.getpalette() == label_id_palette()
            ids = np.array(image)
        assert set(np.unique(ids)) <= VALID_IDS
        expected = synthetic.render_scene(np.random.default_rng([0, 0, i - 1]), (64, 32), "source")[1]
        np.testing.assert_array_equal(ids, expected)


def test_cityscapes_labels_are_greyscale_label_ids(bench):
    paths = sorted(bench.glob("cityscapes/gtFine/*/*/*_gtFine_labelIds.png"))
    assert len(paths) == 5
    for path in paths:
        with Image.open(path) as image:
            assert image.mode == "L"
            assert set(np.unique(np.array(image))) <= VALID_IDS
    with Image.open(bench / "cityscapes/gtFine/val/mockfurt/mockfurt_000001_000019_gtFine_labelIds.png") as image:
        expected = synthetic.render_scene(np.random.default_rng([0, 2, 1]), (64, 32), "target")[1]
        np.testing.assert_array_equal(np.array(image), expected)


def test_generation_is_deterministic_per_seed(bench, tmp_path):
    synthetic.generate(tmp_path / "again", **SMALL)
    assert _files(tmp_path / "again") == _files(bench)
    synthetic.generate(tmp_path / "other", **{**SMALL, "seed": 1})
    other = _files(tmp_path / "other")
    assert all(other[path] != data for path, data in _files(bench).items() if path.endswith(".png"))


def test_render_scene_shapes_and_domain_independent_layout():
    source_img, source_ids = synthetic.render_scene(np.random.default_rng(3), (48, 24), "source")
    target_img, target_ids = synthetic.render_scene(np.random.default_rng(3), (48, 24), "target")
    assert source_img.shape == target_img.shape == (24, 48, 3) and source_img.dtype == np.uint8
    assert source_ids.shape == (24, 48) and source_ids.dtype == np.uint8
    np.testing.assert_array_equal(source_ids, target_ids)  # the layout never depends on the domain
    assert np.abs(source_img.astype(int) - target_img).mean() > 10
    with pytest.raises(ValueError):
        synthetic.render_scene(np.random.default_rng(3), (48, 24), "real")


def test_domains_share_class_statistics_but_not_colours():
    source_shares, source_colours = _shares_and_colours("source", 0)
    target_shares, target_colours = _shares_and_colours("target", 1)
    assert np.abs(source_shares.mean(0) - target_shares.mean(0)).max() < 0.05
    ids = dict(zip(CITYSCAPES_CLASSES, CITYSCAPES_LABEL_IDS))
    for name in ("sidewalk", "vegetation", "sky", "car"):
        assert np.linalg.norm(source_colours[ids[name]] - target_colours[ids[name]]) > 25, name
    common = set(source_colours) & set(target_colours)
    assert np.median([np.linalg.norm(source_colours[k] - target_colours[k]) for k in common]) > 25


def test_class_shares_vary_from_image_to_image():
    shares, _ = _shares_and_colours("source", 0)
    present = shares > 0
    assert present.any(0).sum() >= 12  # a realistic subset of the 19 classes over the data set
    column = {name: shares[:, i] for i, name in enumerate(CITYSCAPES_CLASSES)}
    for name in ("car", "vegetation", "building", "person", "bus"):
        assert column[name].std() > 0.001, name
    for name in ("person", "bus"):  # present in some images only
        assert 0 < (column[name] > 0).sum() < len(shares), name


def test_ensure_reuses_a_complete_benchmark(tmp_path):
    root = tmp_path / "bench"
    paths = synthetic.ensure(root, **SMALL)
    assert paths == (str(root / "gta5"), str(root / "cityscapes"))
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("**/*")}
    os.utime(root / "benchmark.json", ns=(1, 1))  # a rewrite would move this back to the present
    stamps[root / "benchmark.json"] = 1
    assert synthetic.ensure(root, **SMALL) == paths
    assert {p: p.stat().st_mtime_ns for p in root.glob("**/*")} == stamps


def test_ensure_refuses_other_parameters_and_foreign_folders(tmp_path):
    root = tmp_path / "bench"
    synthetic.ensure(root, **SMALL)
    with pytest.raises(ValueError, match="bench"):
        synthetic.ensure(root, **{**SMALL, "seed": 1})
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="mine"):
        synthetic.ensure(foreign, **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="mine"):
        synthetic.generate(foreign, **SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    synthetic.ensure(empty, **SMALL)
    assert (empty / "benchmark.json").exists()


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    render, calls = synthetic.render_scene, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_scene", failing)
    root = tmp_path / "bench"
    with pytest.raises(RuntimeError, match="interrupted"):
        synthetic.ensure(root, **SMALL)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    # A hard kill cannot clean up: its hidden partial folder, even with a benchmark.json, must not count. The
    # next generation removes it once its process is gone (this host's); another host's stays.
    ended = subprocess.Popen(["true"])
    ended.wait()
    killed, elsewhere = (tmp_path / f"{atomic.staging_prefix('bench')}{ended.pid}-0a1b2c3d",
                         tmp_path / f".bench.partial-another-host-{ended.pid}")
    for partial in (killed, elsewhere):
        partial.mkdir()
        (partial / "benchmark.json").write_text("{}")
    lines = []
    synthetic.ensure(root, **SMALL, log=lines.append)
    assert json.loads((root / "benchmark.json").read_text())["num_source"] == 3
    assert sorted(os.listdir(tmp_path)) == sorted(["bench", elsewhere.name])
    assert lines == [f"removed {killed}, left by a generation that was stopped"]
    assert len(list((root / "gta5" / "images").iterdir())) == 3
