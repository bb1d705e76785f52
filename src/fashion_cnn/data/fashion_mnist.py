"""Fashion-MNIST: find, verify, decode, cache, split, scale and pad.

The four official IDX files are looked for, in order, in `data_dir`, `$FASHION_MNIST_DIR`,
the user cache (`~/.cache/fashion-cnn/fashion-mnist`) and `/usr/share/datasets/fashion-mnist`
(Debian's package `dataset-fashion-mnist`). Each is checked (gzip integrity, IDX magic,
dimensions, item counts, labels in 0-9, MD5 of the decoded bytes), then decoded once into
`.npy` arrays in the cache so that later loads take milliseconds.

>>> data = load_data()                       # doctest: +SKIP
>>> data.train_images.shape, data.train_images.dtype
((60000, 28, 28), dtype('uint8'))
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import fileio
from ..errors import DataError

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28

# name -> (kind, expected item count, MD5 of the decoded (uncompressed) IDX bytes).
# The MD5s are the published checksums of the uncompressed files (also used by torchvision);
# they hold whether the file is stored gzipped (any compressor) or not.
FILES = {
    "train_images": ("train-images-idx3-ubyte", 60000, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train_labels": ("train-labels-idx1-ubyte", 60000, "9018921c3c673c538a1fc5bad174d6f9"),
    "test_images": ("t10k-images-idx3-ubyte", 10000, "8181f5470baa50b63fa0f6fddb340f0a"),
    "test_labels": ("t10k-labels-idx1-ubyte", 10000, "15d484375f8d13e6eb1aabb0c3f46965"),
}
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FIX_HINT = ("reinstall the data (`apt-get install --reinstall dataset-fashion-mnist`, "
            "or `fashion-cnn data --download`)")
_CACHE_FORMAT = 1


def cache_root() -> Path:
    """Where decoded arrays (and downloaded files) live: $FASHION_CNN_CACHE or ~/.cache/fashion-cnn."""
    if os.environ.get("FASHION_CNN_CACHE"):
        return Path(os.environ["FASHION_CNN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fashion-cnn"


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    dirs = []
    if data_dir:
        return [Path(data_dir)]  # an explicit directory is the only place looked at
    if os.environ.get("FASHION_MNIST_DIR"):
        dirs.append(Path(os.environ["FASHION_MNIST_DIR"]))
    dirs += [cache_root() / "fashion-mnist", SYSTEM_DIR]
    return dirs


def _file_in(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The first directory that holds all four files (gzipped or not); DataError if none does."""
    dirs = candidate_dirs(data_dir)
    for directory in dirs:
        if all(_file_in(directory, stem) for stem, _, _ in FILES.values()):
            return directory
    if data_dir:
        missing = [stem for stem, _, _ in FILES.values() if not _file_in(Path(data_dir), stem)]
        raise DataError(f"{Path(data_dir) / missing[0]}[.gz]: file not found "
                        f"(the data directory must hold the four Fashion-MNIST IDX files)",
                        setting="data.data_dir")
    looked = ", ".join(str(d) for d in dirs)
    raise DataError(f"Fashion-MNIST not found (looked in {looked}); install it with "
                    f"`apt-get install dataset-fashion-mnist`, set FASHION_MNIST_DIR, "
                    f"or run `fashion-cnn data --download`")


def _read_raw(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            reason = "truncated" if isinstance(exc, EOFError) else f"corrupt ({exc})"
            raise DataError(f"{path}: gzip stream is {reason}; {FIX_HINT}") from None
    if path.suffix == ".gz":
        raise DataError(f"{path}: not a gzip file (bad gzip header); {FIX_HINT}")
    return raw


def parse_idx(raw: bytes, path: Path, expect_ndim: int) -> np.ndarray:
    """Decode IDX bytes (magic 0x00000801 for labels, 0x00000803 for images) into uint8 arrays."""
    if len(raw) < 4:
        raise DataError(f"{path}: file is too short to be an IDX file ({len(raw)} bytes); {FIX_HINT}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    magic = struct.unpack(">I", raw[:4])[0]
    if zero != 0 or dtype_code != 0x08 or ndim != expect_ndim:
        raise DataError(f"{path}: wrong IDX magic number 0x{magic:08x} "
                        f"(expected 0x{0x800 + expect_ndim:08x}); {FIX_HINT}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; {FIX_HINT}")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    if ndim == 3 and dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected "
                        f"{IMAGE_SIZE}x{IMAGE_SIZE}; {FIX_HINT}")
    expected_bytes = int(np.prod(dims))
    payload = len(raw) - header
    if payload != expected_bytes:
        raise DataError(f"{path}: header announces {dims[0]} items but the file holds "
                        f"{payload / max(1, expected_bytes // max(1, dims[0])):g} "
                        f"({payload} data bytes, expected {expected_bytes}); {FIX_HINT}")
    # a writable copy: torch.from_numpy warns on the read-only view of `raw`
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _verify_file(key: str, path: Path, check_md5: bool) -> np.ndarray:
    stem, expected_count, md5 = FILES[key]
    raw = _read_raw(path)
    array = parse_idx(raw, path, expect_ndim=3 if key.endswith("images") else 1)
    if key.endswith("labels") and array.size and array.max() > NUM_CLASSES - 1:
        bad = int(np.argmax(array > NUM_CLASSES - 1))
        raise DataError(f"{path}: label {int(array[bad])} at index {bad} is outside 0-9; {FIX_HINT}")
    if check_md5:
        if len(array) != expected_count:
            raise DataError(f"{path}: holds {len(array)} items, expected {expected_count}; {FIX_HINT}")
        actual = hashlib.md5(raw).hexdigest()
        if actual != md5:
            raise DataError(f"{path}: MD5 mismatch (decoded bytes have {actual}, expected {md5}); "
                            f"{FIX_HINT}")
    return array


@dataclass
class FashionMNIST:
    """The four arrays, as stored: uint8 images (N, 28, 28) and uint8 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: Path
    from_cache: bool = False
    verified_md5: bool = True


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_data(data_dir: str | os.PathLike | None = None, *, check_md5: bool = True,
              use_cache: bool = True) -> FashionMNIST:
    """Find, verify and decode the dataset; a warm call reads the cached `.npy` arrays.

    `check_md5=False` accepts IDX files other than the official ones (your own data in the
    same format); the structure is still verified. Raises DataError with a one-line message.
    """
    directory = find_data_dir(data_dir)
    paths = {key: _file_in(directory, stem) for key, (stem, _, _) in FILES.items()}
    stamps = {key: _stamp(p) for key, p in paths.items()}
    cache_dir = cache_root() / "decoded" / hashlib.sha1(
        json.dumps(stamps, sort_keys=True).encode()).hexdigest()[:16]
    manifest_path = cache_dir / "manifest.json"
    if use_cache and manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("stamps") == stamps and manifest.get("format") == _CACHE_FORMAT and (
                    manifest.get("md5_checked") or not check_md5):
                arrays = {key: np.load(cache_dir / f"{key}.npy", allow_pickle=False)
                          for key in FILES}
                if all(a.dtype == np.uint8 for a in arrays.values()):
                    return FashionMNIST(**arrays, source=directory, from_cache=True,
                                        verified_md5=manifest["md5_checked"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    arrays = {key: _verify_file(key, path, check_md5) for key, path in paths.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{paths[f'{split}_labels']}: holds {n_lab} labels but "
                            f"{paths[f'{split}_images'].name} holds {n_img} images; {FIX_HINT}")
    if use_cache:
        try:
            for key, array in arrays.items():
                fileio.write_with(cache_dir / f"{key}.npy",
                                  lambda tmp, a=array: np.save(open(tmp, "wb"), a))
            fileio.write_json(manifest_path, {"format": _CACHE_FORMAT, "stamps": stamps,
                                              "md5_checked": check_md5})
        except Exception:
            pass  # the cache is an optimisation; a read-only home must not stop training
    return FashionMNIST(**arrays, source=directory, from_cache=False, verified_md5=check_md5)


def download(dest: str | os.PathLike | None = None, mirror: str = MIRROR) -> Path:
    """Fetch the four gzipped files from the dataset's official mirror into the cache."""
    dest = Path(dest) if dest else cache_root() / "fashion-mnist"
    for stem, _, _ in FILES.values():
        url = mirror + stem + ".gz"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                fileio.write_bytes(dest / (stem + ".gz"), response.read())
        except OSError as exc:
            raise DataError(f"{url}: download failed ({exc}); no network? install "
                            f"`dataset-fashion-mnist` or set FASHION_MNIST_DIR instead") from None
    return dest


# ----------------------------------------------------------------------------- tensors

def to_tensor(images: np.ndarray, pad: int = 0, pad_value: float = -0.5,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 28, 28) -> (N, 1, 28+2*pad, 28+2*pad) of `dtype`, scaled as the seed:
    x/128 - 0.5.

    Padding is added after scaling, with `pad_value` (the seed pads with -0.5, the background).
    """
    n, height, width = images.shape
    # Written straight into the padded tensor: no unpadded float32 copy beside it (150 MB,
    # briefly, for the 48,000 training images padded to 36x36).
    x = torch.full((n, 1, height + 2 * pad, width + 2 * pad), pad_value, dtype=dtype)
    inner = x[:, 0, pad:pad + height, pad:pad + width]  # a view (N, H, W)
    inner.copy_(torch.from_numpy(np.ascontiguousarray(images))).div_(128.0).sub_(0.5)
    return x


def validation_split(n: int, fraction: float) -> tuple[slice, slice]:
    """Keras semantics: the LAST `fraction` of the arrays, taken before any shuffling.

    Keras computes the split index as int(n * (1 - fraction)).
    >>> validation_split(60000, 0.2)
    (slice(0, 48000, None), slice(48000, 60000, None))
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation_split must be in [0, 1), got {fraction}")
    split_at = int(n * (1.0 - fraction))
    return slice(0, split_at), slice(split_at, n)


def storage_dtype(pad_value: float) -> torch.dtype:
    """The dtype the training images are kept in: bfloat16 where it holds every value exactly,
    else float32. x/128 - 0.5 = (x - 64)/128 needs 8 significant bits for x in 0..255, which is
    bfloat16's precision; so only the padding value decides. Half the memory of float32: the
    48,000 training images padded to 36x36 take 124 MB instead of 249 MB."""
    exact = torch.tensor(pad_value, dtype=torch.bfloat16).item() == pad_value
    return torch.bfloat16 if exact else torch.float32


@dataclass
class Splits:
    """Model-ready tensors: x (N, 1, H, W) in channels_last memory, y int64 (N,).

    x_val and x_test are float32; x_train is kept in `storage_dtype(pad_value)` (bfloat16 when
    that is exact): take batches of it with `train_batch`, which returns float32.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def train_batch(self, index) -> torch.Tensor:
        """Training images `index` (a slice or an index tensor) as float32, channels_last."""
        return self.x_train[index].to(torch.float32).contiguous(
            memory_format=torch.channels_last)


def make_splits(data: FashionMNIST, *, subset: int | None = None, val_fraction: float = 0.2,
                pad: int = 0, pad_value: float = -0.5) -> Splits:
    """Scale, pad and split. `subset` keeps the first N training images before the split."""
    train_images, train_labels = data.train_images, data.train_labels
    if subset is not None:
        if subset < 2:
            raise DataError(f"the subset must be at least 2 images, got {subset}",
                            setting="data.subset")
        train_images, train_labels = train_images[:subset], train_labels[:subset]
    fit, val = validation_split(len(train_images), val_fraction)

    def tensors(images, labels, dtype=torch.float32):
        x = to_tensor(images, pad, pad_value, dtype).contiguous(memory_format=torch.channels_last)
        return x, torch.from_numpy(labels.astype(np.int64))

    x_train, y_train = tensors(train_images[fit], train_labels[fit], storage_dtype(pad_value))
    x_val, y_val = tensors(train_images[val], train_labels[val])
    x_test, y_test = tensors(data.test_images, data.test_labels)
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test)


def class_counts(labels: np.ndarray) -> list[int]:
    return np.bincount(labels, minlength=NUM_CLASSES).tolist()


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz). Used by tests."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim,
                                                                    *array.shape)
    raw = header + array.tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        raw = gzip.compress(raw, mtime=0)
    fileio.write_bytes(path, raw)


def timed_load(data_dir=None, **kwargs) -> tuple[FashionMNIST, float]:
    start = time.perf_counter()
    data = load_data(data_dir, **kwargs)
    return data, time.perf_counter() - start
