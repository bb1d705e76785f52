"""Shared fixtures: tiny synthetic IDX files, and the real dataset when installed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from fashion_cnn.data import fashion_mnist as fdata
from fashion_cnn.devices import EMULATED_BF16_ENV

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


# Hypothesis: "ci" (the default, inside `make test`) keeps each property suite to a few
# seconds; HYPOTHESIS_PROFILE=long is the by-hand run whose counts go into closing notes.
# Registered once, here, so that the budget does not depend on which test file loads first.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    """The whole session decodes into its own cache; the user's cache is never touched. bf16
    is allowed on CPUs that only emulate it: the tests check what bf16 computes, not its speed
    (tests/test_devices.py checks the refusal itself)."""
    os.environ["FASHION_CNN_CACHE"] = tempfile.mkdtemp(prefix="fashion-cnn-test-cache-")
    os.environ.pop("FASHION_MNIST_DIR", None)
    os.environ[EMULATED_BF16_ENV] = "1"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest -n 2 on 2 cores: one thread per worker (and per process it starts), or the
        # OpenMP threads of two workers would wait for each other at every operation
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where torch sees a CUDA GPU, and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU here (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """In-process runs set torch's thread count (train.threads); put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_idx(tmp_path) -> Path:
    return make_idx_dir(tmp_path / "idx")


@pytest.fixture(scope="session")
def real_data():
    if not (REAL_DIR / "train-images-idx3-ubyte.gz").exists() and not (REAL_DIR / "train-images-idx3-ubyte").exists():
        pytest.skip("the real Fashion-MNIST files are not installed")
    return fdata.load_data(REAL_DIR)
