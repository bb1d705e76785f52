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
from pathlib import Path

import numpy as np

from .. import fileio
from ..errors import DataError
from .arrays import (ImageData, Splits, class_counts, make_splits, storage_dtype,  # noqa: F401
                     to_tensor, validation_split)

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
    return unzip_idx(raw, path)


def unzip_idx(raw: bytes, path: Path, fix_hint: str = FIX_HINT) -> bytes:
    """An IDX file's bytes as stored -> its decoded bytes (gunzipped where gzipped);
    DataError names the file when the gzip stream is truncated or corrupt."""
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            reason = "truncated" if isinstance(exc, EOFError) else f"corrupt ({exc})"
            raise DataError(f"{path}: gzip stream is {reason}; {fix_hint}") from None
    if path.suffix == ".gz":
        raise DataError(f"{path}: not a gzip file (bad gzip header); {fix_hint}")
    return raw


def parse_idx(raw: bytes, path: Path, expect_ndim: int, image_size: int | None = IMAGE_SIZE,
              fix_hint: str = FIX_HINT) -> np.ndarray:
    """Decode IDX bytes (magic 0x00000801 for labels, 0x00000803 for images) into uint8 arrays."""
    if len(raw) < 4:
        raise DataError(f"{path}: file is too short to be an IDX file ({len(raw)} bytes); {fix_hint}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    magic = struct.unpack(">I", raw[:4])[0]
    if zero != 0 or dtype_code != 0x08 or ndim != expect_ndim:
        raise DataError(f"{path}: wrong IDX magic number 0x{magic:08x} "
                        f"(expected 0x{0x800 + expect_ndim:08x}); {fix_hint}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; {fix_hint}")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    if ndim == 3 and image_size and dims[1:] != (image_size, image_size):
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected "
                        f"{image_size}x{image_size}; {fix_hint}")
    expected_bytes = int(np.prod(dims))
    payload = len(raw) - header
    if payload != expected_bytes:
        raise DataError(f"{path}: header announces {dims[0]} items but the file holds "
                        f"{payload / max(1, expected_bytes // max(1, dims[0])):g} "
                        f"({payload} data bytes, expected {expected_bytes}); {fix_hint}")
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


# Fashion-MNIST loads as any dataset does (arrays.ImageData); the name stays for old callers.
FashionMNIST = ImageData


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_data(data_dir: str | os.PathLike | None = None, *, check_md5: bool = True,
              use_cache: bool = True) -> ImageData:
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
                    return ImageData(**arrays, source=directory, from_cache=True,
                                     verified_md5=manifest["md5_checked"],
                                     class_names=list(CLASS_NAMES))
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
    return ImageData(**arrays, source=directory, from_cache=False, verified_md5=check_md5,
                     class_names=list(CLASS_NAMES))


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


def timed_load(data_dir=None, **kwargs) -> tuple[ImageData, float]:
    start = time.perf_counter()
    data = load_data(data_dir, **kwargs)
    return data, time.perf_counter() - start
