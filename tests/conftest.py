"""Shared fixtures: a tiny generated benchmark on disk, and the path of the real Cityscapes frame in tests/data/."""

import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
CITYSCAPES_FRAME = REPO / "tests" / "data" / "cityscapes_frame"


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory):
    """A small two-domain benchmark (GTA5 + Cityscapes layouts) at 64x32; returns its root."""
    from pit_keras.data import synthetic

    root = tmp_path_factory.mktemp("bench") / "benchmark"
    synthetic.generate(root, num_source=6, num_target_train=6, num_target_val=3, size=(64, 32), seed=0)
    return root
