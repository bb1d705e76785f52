import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fashion_cnn.data import fashion_mnist as fdata
from fashion_cnn.errors import DataError

from conftest import make_idx_dir


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fashion_cnn", *args], capture_output=True,
                          text=True, env=env)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(1).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    fdata.write_idx(path, images)
    raw = path.read_bytes()
    if gz:
        raw = gzip.decompress(raw)
    assert raw[:4] == b"\x00\x00\x08\x03"
    decoded = fdata.parse_idx(raw, path, expect_ndim=3)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, images)


def test_load_synthetic_without_md5(tiny_idx):
    data = fdata.load_data(tiny_idx, check_md5=False)
    assert data.train_images.shape == (60, 28, 28) and data.test_labels.shape == (20,)
    again = fdata.load_data(tiny_idx, check_md5=False)
    assert again.from_cache and np.array_equal(again.train_images, data.train_images)


def test_synthetic_fails_md5_check(tiny_idx):
    with pytest.raises(DataError, match="MD5 mismatch|expected 60000"):
        fdata.load_data(tiny_idx)


def _corrupt(directory, kind):
    """Apply one corruption; return (file name, expected message fragment)."""
    if kind == "truncated gzip":
        p = directory / "train-images-idx3-ubyte.gz"
        p.write_bytes(p.read_bytes()[:200])
        return p.name, "gzip stream is truncated"
    if kind == "wrong magic":
        p = directory / "t10k-images-idx3-ubyte.gz"
        raw = bytearray(gzip.decompress(p.read_bytes()))
        raw[3] = 0x02
        p.write_bytes(gzip.compress(bytes(raw)))
        return p.name, "wrong IDX magic number"
    if kind == "wrong count":
        p = directory / "train-labels-idx1-ubyte.gz"
        raw = bytearray(gzip.decompress(p.read_bytes()))
        raw[4:8] = (59).to_bytes(4, "big")  # header says 59 labels, file holds 60
        p.write_bytes(gzip.compress(bytes(raw)))
        return p.name, "header announces 59 items"
    if kind == "label 11":
        p = directory / "t10k-labels-idx1-ubyte.gz"
        labels = np.zeros(20, dtype=np.uint8)
        labels[5] = 11
        fdata.write_idx(p, labels)
        return p.name, "label 11 at index 5 is outside 0-9"
    if kind == "missing file":
        (directory / "t10k-labels-idx1-ubyte.gz").unlink()
        return "t10k-labels-idx1-ubyte", "file not found"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated gzip", "wrong magic", "wrong count", "label 11",
                                  "missing file"])
def test_each_corruption_gives_one_line_and_exit_2(tiny_idx, kind):
    name, fragment = _corrupt(tiny_idx, kind)
    result = run_cli("data", "--data-dir", str(tiny_idx), "--no-checksum")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0] and fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_md5_mismatch_on_official_names(tmp_path):
    # Right names and a valid structure, 60000/10000 items, but not the official bytes.
    directory = tmp_path / "fake"
    directory.mkdir()
    zeros = np.zeros((60000, 28, 28), dtype=np.uint8)
    fdata.write_idx(directory / "train-images-idx3-ubyte", zeros)
    fdata.write_idx(directory / "train-labels-idx1-ubyte", np.zeros(60000, np.uint8))
    fdata.write_idx(directory / "t10k-images-idx3-ubyte", zeros[:10000])
    fdata.write_idx(directory / "t10k-labels-idx1-ubyte", np.zeros(10000, np.uint8))
    result = run_cli("data", "--data-dir", str(directory))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MD5 mismatch" in lines[0] and "train-images-idx3-ubyte" in lines[0]


def test_search_order_env_var(tiny_idx, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tiny_idx))
    assert fdata.find_data_dir() == tiny_idx
    assert fdata.find_data_dir(tiny_idx) == tiny_idx


def test_validation_split_takes_last_fraction():
    fit, val = fdata.validation_split(60000, 0.2)
    assert (fit.start, fit.stop, val.start, val.stop) == (0, 48000, 48000, 60000)
    # The split happens before any shuffling: the validation labels are the last ones in order.
    data = fdata.FashionMNIST(np.zeros((10, 28, 28), np.uint8), np.arange(10, dtype=np.uint8),
                              np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8), source=None)
    splits = fdata.make_splits(data, val_fraction=0.2)
    assert splits.y_val.tolist() == [8, 9] and splits.y_train.tolist() == list(range(8))


def test_scaling_and_padding_as_the_seed():
    images = np.array([[[0, 128, 255] + [0] * 25] * 28], dtype=np.uint8)
    x = fdata.to_tensor(images)
    assert x.shape == (1, 1, 28, 28)
    assert x[0, 0, 0, :3].tolist() == [-0.5, 0.5, 255 / 128 - 0.5]
    padded = fdata.to_tensor(images, pad=4, pad_value=-0.5)
    assert padded.shape == (1, 1, 36, 36)
    border = torch.cat([padded[0, 0, :4].flatten(), padded[0, 0, -4:].flatten(),
                        padded[0, 0, :, :4].flatten(), padded[0, 0, :, -4:].flatten()])
    assert torch.all(border == -0.5)
    assert torch.equal(padded[0, 0, 4:-4, 4:-4], x[0, 0])


def test_training_images_kept_in_bfloat16_only_where_exact():
    # every byte value 0..255, scaled and padded, survives bfloat16 storage unchanged
    images = (np.arange(28 * 28 * 2) % 256).astype(np.uint8).reshape(2, 28, 28)
    data = fdata.FashionMNIST(np.tile(images, (5, 1, 1)), np.zeros(10, np.uint8),
                              images, np.zeros(2, np.uint8), source=None)
    splits = fdata.make_splits(data, val_fraction=0.2, pad=4, pad_value=-0.5)
    assert splits.x_train.dtype == torch.bfloat16 and splits.x_test.dtype == torch.float32
    batch = splits.train_batch(torch.tensor([0, 1]))
    assert batch.dtype == torch.float32 and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, fdata.to_tensor(images, pad=4, pad_value=-0.5))
    assert torch.equal(splits.train_batch(slice(0, 2)), batch)
    # a padding value bfloat16 would round: float32 storage instead
    odd = fdata.make_splits(data, val_fraction=0.2, pad=4, pad_value=0.1)
    assert odd.x_train.dtype == torch.float32
    assert odd.train_batch(slice(0, 1))[0, 0, 0, 0].item() == torch.tensor(0.1).item()


def test_subset_keeps_first_images_then_splits():
    data = fdata.FashionMNIST(np.zeros((100, 28, 28), np.uint8), (np.arange(100) % 10).astype(np.uint8),
                              np.zeros((5, 28, 28), np.uint8), np.zeros(5, np.uint8), source=None)
    splits = fdata.make_splits(data, subset=50, val_fraction=0.2)
    assert len(splits.y_train) == 40 and len(splits.y_val) == 10
    assert splits.y_val.tolist() == [i % 10 for i in range(40, 50)]


def test_real_data_verified(real_data):
    assert real_data.train_images.shape == (60000, 28, 28)
    assert fdata.class_counts(real_data.train_labels) == [6000] * 10
    assert fdata.class_counts(real_data.test_labels) == [1000] * 10


def test_data_command_prints_counts(real_data):
    result = run_cli("data")
    assert result.returncode == 0, result.stderr
    assert "MD5 verified" in result.stdout and "Ankle boot" in result.stdout
    assert "60000" in result.stdout and "10000" in result.stdout


def _counting(monkeypatch, module, name):
    """Replace module.name by a wrapper that records the first argument of each call."""
    calls, real = [], getattr(module, name)

    def wrapper(first, *args, **kwargs):
        calls.append(first)
        return real(first, *args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _rewrite_in_place(path, flip_at=None):
    """Rewrite the file (one byte flipped at `flip_at`, or the same bytes), keeping its size and
    modification time: only its change time (ctime) moves."""
    st = path.stat()
    raw = bytearray(path.read_bytes())
    if flip_at is not None:
        raw[flip_at] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_warm_load_hashes_and_checks_only_files_whose_stamp_moved(tmp_path, monkeypatch):
    from fashion_cnn import fileio
    from fashion_cnn.data import arrays

    monkeypatch.setattr(arrays, "SETTLE_NS", 0)  # stamp files at once, however new they are
    hashed = _counting(monkeypatch, fileio, "sha256_file")
    checked = _counting(monkeypatch, arrays, "array_checksum")
    directory = make_idx_dir(tmp_path / "raw", n_train=12, n_test=4, gz=False)
    first = fdata.load_data(directory, check_md5=False)
    assert not first.from_cache and not hashed  # hashed while decoded, not read twice
    checked.clear()
    warm = fdata.load_data(directory, check_md5=False)
    assert warm.from_cache and hashed == [] and checked == []  # no source read, no CRC
    time.sleep(0.05)  # past the file system's timestamp tick: the writes below move ctime
    _rewrite_in_place(directory / "t10k-labels-idx1-ubyte")  # same bytes, new ctime
    assert fdata.load_data(directory, check_md5=False).from_cache
    assert [p.name for p in hashed] == ["t10k-labels-idx1-ubyte"]
    hashed.clear()
    assert fdata.load_data(directory, check_md5=False).from_cache and hashed == []  # recorded
    _rewrite_in_place(directory / "train-images-idx3-ubyte", flip_at=16 + 3)
    again = fdata.load_data(directory, check_md5=False)
    assert [p.name for p in hashed] == ["train-images-idx3-ubyte"] and not again.from_cache
    assert again.train_images[0, 0, 3] == first.train_images[0, 0, 3] ^ 0xFF
    # a cache file rewritten in place is checked by CRC-32, and decoded again when damaged
    cached = next(m.parent / "train_images.npy"
                  for m in fdata.cache_root().glob("decoded/*/manifest.json")
                  if json.loads(m.read_text())["source_dir"] == str(directory))
    time.sleep(0.05)
    _rewrite_in_place(cached, flip_at=cached.stat().st_size - 1)
    damaged = fdata.load_data(directory, check_md5=False)
    assert not damaged.from_cache and np.array_equal(damaged.train_images, again.train_images)


def test_a_regular_file_wins_over_a_directory_or_fifo_of_the_raw_name(tmp_path):
    directory = make_idx_dir(tmp_path / "idx", n_train=12, n_test=4, gz=True)
    (directory / "train-images-idx3-ubyte").mkdir()
    os.mkfifo(directory / "t10k-labels-idx1-ubyte")
    data = fdata.load_data(directory, check_md5=False, use_cache=False)
    assert data.train_images.shape == (12, 28, 28) and data.test_labels.shape == (4,)
