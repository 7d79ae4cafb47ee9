"""pit_keras.atomic: complete files or the previous ones, never a partial file or a leftover temporary one; and
the call sites built on it (same bytes as before, no temporary file after a failure)."""

import contextlib
import errno
import io
import json
import os
import re
import stat

import numpy as np
import pytest
from PIL import Image

from pit_keras import atomic
from pit_keras.evaluation import reports
from pit_keras.adaptation import soft_labels


def names(folder):
    return sorted(p.name for p in folder.iterdir())


@contextlib.contextmanager
def umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writes_the_whole_file_through_a_temporary_name_in_the_same_folder(tmp_path):
    path = tmp_path / "out.bin"
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert not path.exists()  # nothing visible under the final name while writing
        with open(tmp, "wb") as f:
            f.write(b"complete")

    atomic.atomic_write(path, write)
    assert path.read_bytes() == b"complete"
    assert len(seen) == 1 and re.fullmatch(rf"{re.escape(str(path))}\.tmp-{os.getpid()}-[0-9a-f]{{8}}", seen[0])
    assert names(tmp_path) == ["out.bin"]


def test_replaces_an_existing_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    atomic.write_text_atomic(str(path), "new\n")
    assert path.read_text() == "new\n"
    assert names(tmp_path) == ["out.txt"]


class DiskFull(OSError):
    def __init__(self):
        super().__init__(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("error", [DiskFull, KeyboardInterrupt, ValueError])
def test_a_write_failing_midway_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, error):
    path = tmp_path / "out.json"
    path.write_text("old content")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new")
            f.flush()
            raise error()

    with pytest.raises(error):
        atomic.atomic_write(path, write)
    assert path.read_text() == "old content"
    assert names(tmp_path) == ["out.json"]


def test_a_failing_first_write_leaves_nothing(tmp_path):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise DiskFull()

    with pytest.raises(OSError, match="No space left"):
        atomic.atomic_write(tmp_path / "new.bin", write)
    assert names(tmp_path) == []


def test_a_write_failing_before_creating_the_file_propagates_its_own_error(tmp_path):
    def write(tmp):
        raise RuntimeError("before any byte")

    with pytest.raises(RuntimeError, match="before any byte"):
        atomic.atomic_write(tmp_path / "new.bin", write)
    assert names(tmp_path) == []


def test_a_failing_rename_removes_the_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic.write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert names(tmp_path) == ["out.txt"]


def test_the_suffix_lets_np_savez_write_the_exact_path(tmp_path):
    path = tmp_path / "features.npz"
    atomic.atomic_write(path, lambda tmp: np.savez(tmp, x=np.arange(3)), suffix=".npz")
    assert names(tmp_path) == ["features.npz"]
    with np.load(path) as loaded:
        np.testing.assert_array_equal(loaded["x"], np.arange(3))


def test_the_suffix_lets_pil_pick_the_format(tmp_path):
    path = tmp_path / "picture.png"
    seen = []

    def write(tmp):
        seen.append(tmp)
        Image.new("RGB", (4, 3), (1, 2, 3)).save(tmp)

    atomic.atomic_write(path, write, suffix=".png")
    assert len(seen) == 1 and re.fullmatch(rf"{re.escape(str(path))}\.tmp-{os.getpid()}-[0-9a-f]{{8}}\.png", seen[0])
    assert names(tmp_path) == ["picture.png"]
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (4, 3)


def test_write_json_atomic_writes_what_checkpoints_always_wrote(tmp_path):
    payload = {"b": [1, 2.5, None], "a": {"z": "ü", "y": True}}
    path = tmp_path / "run.json"
    atomic.write_json_atomic(path, payload)
    expected = io.StringIO()
    json.dump(payload, expected, indent=2, sort_keys=True)
    expected.write("\n")
    assert path.read_text() == expected.getvalue()


def test_checkpoints_still_exports_write_json_atomic():
    from pit_keras.training import checkpoints

    assert checkpoints.write_json_atomic is atomic.write_json_atomic


def test_an_unserializable_payload_keeps_the_old_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("{}\n")
    with pytest.raises(TypeError):
        atomic.write_json_atomic(path, {"a": 1, "b": object()})
    assert path.read_text() == "{}\n"
    assert names(tmp_path) == ["run.json"]


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_permissions_follow_the_umask(tmp_path, mask, expected):
    with umask(mask):
        reports.write_json({"miou": 1.0}, tmp_path / "eval.json")
        atomic.write_text_atomic(tmp_path / "text.txt", "x")
        atomic.atomic_write(tmp_path / "a.npz", lambda tmp: np.savez(tmp, x=np.zeros(1)), suffix=".npz")
    assert mode(tmp_path / "eval.json") == expected
    assert mode(tmp_path / "text.txt") == expected
    assert mode(tmp_path / "a.npz") == expected


def test_metrics_write_json_failing_midway_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    path.write_text("old")

    def failing_fsync(fd):
        raise DiskFull()

    monkeypatch.setattr(reports.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        reports.write_json({"miou": 1.0}, path)
    assert path.read_text() == "old"
    assert names(tmp_path) == ["eval.json"]


def test_soft_labels_write_json_keeps_its_format(tmp_path):
    path = tmp_path / "labels.json"
    soft_labels.write_json(path, ["b.png", "a.png"], np.array([[0.25, 0.75], [1.0, 0.0]], np.float32))
    table = {"b.png": [0.25, 0.75], "a.png": [1.0, 0.0]}
    assert path.read_text() == json.dumps(table, indent=1, sort_keys=True)  # no trailing newline, as before
    assert names(tmp_path) == ["labels.json"]


def test_results_table_json_refuses_nan_without_leaving_a_temporary_file(tmp_path):
    import results_table  # tools/ is on the tests' path (setup.cfg)

    path = tmp_path / "sub" / "summary.json"
    results_table.write_json_atomic(path, {"b": 1, "a": [1.5]})
    assert path.read_text() == '{\n  "b": 1,\n  "a": [\n    1.5\n  ]\n}\n'  # insertion order, not sorted
    with pytest.raises(ValueError):
        results_table.write_json_atomic(path, {"a": 1, "miou": float("nan")})
    assert names(path.parent) == ["summary.json"]
    assert json.loads(path.read_text()) == {"b": 1, "a": [1.5]}


def test_figures_save_png_writes_the_exact_path(tmp_path, capsys):
    import figures

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    figures.save_png(picture, str(tmp_path / "fig.png"), max_kb=1)  # noise is over 1 KB: palette
    assert names(tmp_path) == ["fig.png"]
    with Image.open(tmp_path / "fig.png") as image:
        assert image.format == "PNG" and image.mode == "P"
    assert "written with a 256-colour palette" in capsys.readouterr().out
