"""Shared fixtures: tiny synthetic IDX files, and the real dataset when installed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fashion_cnn.data import fashion_mnist as fdata

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


def pytest_configure(config):
    """The whole session decodes into its own cache; the user's cache is never touched."""
    os.environ["FASHION_CNN_CACHE"] = tempfile.mkdtemp(prefix="fashion-cnn-test-cache-")
    os.environ.pop("FASHION_MNIST_DIR", None)


def make_idx_dir(directory: Path, n_train: int = 60, n_test: int = 20, gz: bool = True,
                 seed: int = 0) -> Path:
    """Write four small, valid IDX files with random images and balanced labels."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        fdata.write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
        fdata.write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return directory


@pytest.fixture
def tiny_idx(tmp_path) -> Path:
    return make_idx_dir(tmp_path / "idx")


@pytest.fixture(scope="session")
def real_data():
    if not (REAL_DIR / "train-images-idx3-ubyte.gz").exists() and not (REAL_DIR / "train-images-idx3-ubyte").exists():
        pytest.skip("the real Fashion-MNIST files are not installed")
    return fdata.load_data(REAL_DIR)
