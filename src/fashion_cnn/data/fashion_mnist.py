"""Fashion-MNIST: find, verify, decode, cache, split, scale and pad.

The four official IDX files are looked for, in order, in `data_dir`, `$FASHION_MNIST_DIR`,
the user cache (`~/.cache/fashion-cnn/fashion-mnist`) and `/usr/share/datasets/fashion-mnist`
(Debian's package `dataset-fashion-mnist`). Each is checked (gzip integrity, IDX magic,
dimensions, item counts, labels in 0-9, MD5 of the decoded bytes), then decoded once into
`.npy` arrays in the cache, so that later loads read the arrays instead of decoding again.
The cache holds the SHA-256 of the files it was decoded from and is used only while they
still have that content (never judged by timestamps alone: arrays.known_sha256). An IDX file
is read in chunks and refused as soon as it holds more than its header announces.

>>> data = load_data()                       # doctest: +SKIP
>>> data.train_images.shape, data.train_images.dtype
((60000, 28, 28), dtype('uint8'))
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import struct
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import fileio
from ..errors import DataError
from ..perf import machine_memory_bytes
from .arrays import (ImageData, Splits, class_counts, make_splits, storage_dtype,  # noqa: F401
                     to_tensor, validation_split)
from .arrays import (file_stamp, known_sha256, load_cached_arrays, read_manifest,
                     save_cached_arrays, write_manifest)

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
# 3: one cache per source folder; the sources' SHA-256 and each file's stat stamp recorded
_CACHE_FORMAT = 3


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
    """The raw or gzipped file, the first that is a regular file; else the first entry of
    either name (a FIFO, a directory: reading it then refuses it by name); else None."""
    entries = [directory / name for name in (stem, stem + ".gz")]
    for path in entries:
        if path.is_file():
            return path
    return next((path for path in entries if path.exists()), None)


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


# DEFLATE (gzip, zip) inflates at most about 1032 bytes per stored byte (a 258-byte match
# coded in 2 bits): an IDX header announcing more than that cannot be honest and is refused
# before anything is allocated.
MAX_INFLATE_RATIO = 1032
_READ_CHUNK = 1 << 20  # bytes asked of the (gzip) stream per read: memory beyond the array


@dataclass
class IdxFile:
    """One IDX file as read: its array and the digests asked for."""

    array: np.ndarray
    decoded_md5: str | None  # MD5 of the decoded bytes (header and payload): the published sums
    stored: dict[str, str]   # algorithm -> hex digest of the bytes as stored (gzipped or not)


class _HashingReader:
    """A binary file read through, updating digests of the bytes as they are read."""

    def __init__(self, handle, hashers):
        self.handle, self.hashers = handle, hashers

    def read(self, size: int = -1) -> bytes:
        block = self.handle.read(size)
        for hasher in self.hashers:
            hasher.update(block)
        return block


def check_declared_size(path: Path, declared: int, stored: int, compressed: bool,
                        announced: str, fix_hint: str) -> None:
    """Refuse, before allocating, a payload of `declared` bytes that a file of `stored` bytes
    cannot hold (`compressed`: through DEFLATE) or that exceeds the machine's memory.
    `announced` says what the header declares, for the message."""
    memory = machine_memory_bytes()
    if compressed and declared > MAX_INFLATE_RATIO * stored:
        raise DataError(f"{path}: {announced} ({declared:,} bytes), more than a {stored:,}-byte "
                        f"compressed file can hold; {fix_hint}")
    if memory and declared > memory:
        raise DataError(f"{path}: {announced} ({declared / 2**30:,.1f} GiB), more than this "
                        f"machine's memory ({memory / 2**30:,.1f} GiB); {fix_hint}")


def read_idx(path: str | os.PathLike, expect_ndim: int, image_size: int | None = IMAGE_SIZE,
             fix_hint: str = FIX_HINT, *, decoded_md5: bool = False,
             stored_digests: tuple[str, ...] = ()) -> IdxFile:
    """An IDX file (gzipped or not; magic 0x00000801 for labels, 0x00000803 for images) as a
    uint8 array, read in chunks: the header is checked first, the array allocated only when
    the file can hold what it announces, and reading stops as soon as the data runs past the
    announced size (a small .gz that would inflate to gigabytes is refused after the announced
    bytes). DataError names the file on any problem.

    >>> read_idx("t10k-labels-idx1-ubyte.gz", expect_ndim=1).array.shape   # doctest: +SKIP
    (10000,)
    """
    path = Path(path)
    with fileio.open_regular_file(path, "an IDX file", DataError) as handle:
        stored_size = os.fstat(handle.fileno()).st_size
        gzipped = handle.read(2) == b"\x1f\x8b"
        handle.seek(0)
        if not gzipped and path.suffix == ".gz":
            raise DataError(f"{path}: not a gzip file (bad gzip header); {fix_hint}")
        hashers = {name: hashlib.new(name) for name in stored_digests}
        reader = _HashingReader(handle, list(hashers.values()))
        stream = gzip.GzipFile(fileobj=reader, mode="rb") if gzipped else reader
        try:
            array, md5 = _read_idx_stream(stream, path, stored_size, gzipped, expect_ndim,
                                          image_size, fix_hint, decoded_md5)
            while reader.read(_READ_CHUNK):
                pass  # the stored digests cover the whole file
        except EOFError:
            raise DataError(f"{path}: gzip stream is truncated; {fix_hint}") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise DataError(f"{path}: gzip stream is corrupt ({exc}); {fix_hint}") from None
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return IdxFile(array, md5, {name: h.hexdigest() for name, h in hashers.items()})


def _read_up_to(stream, size: int) -> bytes:
    """Up to `size` bytes; fewer only at the end of the stream (a gzip stream returns what
    one inflation step gives)."""
    parts, have = [], 0
    while have < size:
        block = stream.read(size - have)
        if not block:
            break
        parts.append(block)
        have += len(block)
    return b"".join(parts)


def _read_idx_stream(stream, path: Path, stored_size: int, gzipped: bool, expect_ndim: int,
                     image_size: int | None, fix_hint: str, want_md5: bool):
    start = _read_up_to(stream, 4)
    if len(start) < 4:
        raise DataError(f"{path}: file is too short to be an IDX file ({len(start)} bytes); "
                        f"{fix_hint}")
    zero, dtype_code, ndim = struct.unpack(">HBB", start)
    magic = struct.unpack(">I", start)[0]
    if zero != 0 or dtype_code != 0x08 or ndim != expect_ndim:
        raise DataError(f"{path}: wrong IDX magic number 0x{magic:08x} "
                        f"(expected 0x{0x800 + expect_ndim:08x}); {fix_hint}")
    dims_raw = _read_up_to(stream, 4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header; {fix_hint}")
    header = start + dims_raw
    dims = struct.unpack(">" + "I" * ndim, dims_raw)
    if ndim == 3 and image_size and dims[1:] != (image_size, image_size):
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected "
                        f"{image_size}x{image_size}; {fix_hint}")
    expected = math.prod(dims)  # exact: numpy's prod would wrap around at 2**63
    shape = "x".join(map(str, dims[1:]))
    announced = f"header announces {dims[0]} items" + (f" of {shape}" if shape else "")
    if not gzipped and stored_size - len(header) != expected:
        payload = stored_size - len(header)
        raise DataError(f"{path}: header announces {dims[0]} items but the file holds "
                        f"{payload / max(1, expected // max(1, dims[0])):g} "
                        f"({payload} data bytes, expected {expected}); {fix_hint}")
    check_declared_size(path, expected + len(header), stored_size, gzipped, announced, fix_hint)
    try:
        array = np.empty(expected, dtype=np.uint8)
    except MemoryError:  # under a memory limit (ulimit -v, a container's)
        raise DataError(f"{path}: {announced} ({expected:,} bytes), more memory than this "
                        f"process may take; {fix_hint}") from None
    view, filled = memoryview(array), 0
    while filled < expected:
        block = stream.read(min(_READ_CHUNK, expected - filled))
        if not block:
            raise DataError(f"{path}: header announces {dims[0]} items but the data ends after "
                            f"{filled} of the {expected} bytes announced; {fix_hint}")
        view[filled:filled + len(block)] = block
        filled += len(block)
    if stream.read(1):  # one byte more tells; a bomb is never inflated past it
        raise DataError(f"{path}: header announces {dims[0]} items but the file holds more "
                        f"data than the {expected} bytes announced; {fix_hint}")
    md5 = None
    if want_md5:
        digest = hashlib.md5(header)
        digest.update(view)
        md5 = digest.hexdigest()
    return array.reshape(dims), md5


def parse_idx(raw: bytes, path: Path, expect_ndim: int, image_size: int | None = IMAGE_SIZE,
              fix_hint: str = FIX_HINT) -> np.ndarray:
    """Decode IDX bytes already in memory (not gzipped) into a uint8 array; read_idx reads a
    file."""
    array, _ = _read_idx_stream(io.BytesIO(raw), Path(path), len(raw), False, expect_ndim,
                                image_size, fix_hint, False)
    return array


def _verify_file(key: str, path: Path, check_md5: bool) -> IdxFile:
    stem, expected_count, md5 = FILES[key]
    idx = read_idx(path, expect_ndim=3 if key.endswith("images") else 1,
                   decoded_md5=check_md5, stored_digests=("sha256",))
    array = idx.array
    if key.endswith("labels") and array.size and array.max() > NUM_CLASSES - 1:
        bad = int(np.argmax(array > NUM_CLASSES - 1))
        raise DataError(f"{path}: label {int(array[bad])} at index {bad} is outside 0-9; {FIX_HINT}")
    if check_md5:
        if len(array) != expected_count:
            raise DataError(f"{path}: holds {len(array)} items, expected {expected_count}; {FIX_HINT}")
        if idx.decoded_md5 != md5:
            raise DataError(f"{path}: MD5 mismatch (decoded bytes have {idx.decoded_md5}, "
                            f"expected {md5}); {FIX_HINT}")
    return idx


# Fashion-MNIST loads as any dataset does (arrays.ImageData); the name stays for old callers.
FashionMNIST = ImageData


def _cache_dir(directory: Path) -> Path:
    key = json.dumps([_CACHE_FORMAT, str(directory.resolve())])
    return cache_root() / "decoded" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _read_cache(cache_dir: Path, paths: dict[str, Path], check_md5: bool) -> dict | None:
    """The cached arrays when the manifest's sources are the files at `paths` (their SHA-256,
    by known_sha256) and each array passes its check (a damaged cache file is decoded again);
    else None. A cache found good whose stamps moved is recorded again, so that the next load
    hashes nothing."""
    manifest = read_manifest(cache_dir, _CACHE_FORMAT)
    if manifest is None or (check_md5 and not manifest.get("md5_checked")):
        return None  # no cache yet: the decode hashes the files as it reads them
    try:
        recorded = manifest["sources"]
        sources = {key: dict(known_sha256(path, recorded.get(key), "an IDX file"),
                             name=path.name) for key, path in paths.items()}
        if any(sources[key]["sha256"] != recorded[key]["sha256"] for key in FILES):
            return None
        if set(manifest["arrays"]) != set(FILES):
            return None
        loaded = load_cached_arrays(cache_dir, manifest["arrays"])
        if loaded is None or any(a.dtype != np.uint8 for a in loaded[0].values()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DataError):
        return None  # a damaged cache, or a source that cannot be read: decoded again
    arrays, entries = loaded
    if sources != recorded or entries != manifest["arrays"]:
        write_manifest(cache_dir, dict(manifest, sources=sources, arrays=entries))
    return {"arrays": arrays, "md5_checked": bool(manifest["md5_checked"])}


def _write_cache(cache_dir: Path, arrays: dict, sources: dict, check_md5: bool,
                 directory: Path) -> None:
    try:
        entries = save_cached_arrays(cache_dir, arrays)
    except Exception:
        return  # the cache is an optimisation; a read-only home must not stop training
    write_manifest(cache_dir, {  # last: marks the set complete
        "format": _CACHE_FORMAT, "source_dir": str(directory), "sources": sources,
        "md5_checked": check_md5, "arrays": entries})


def load_data(data_dir: str | os.PathLike | None = None, *, check_md5: bool = True,
              use_cache: bool = True) -> ImageData:
    """Find, verify and decode the dataset; a warm call reads the cached `.npy` arrays.

    The cache records the SHA-256 of the source files it was decoded from and each array's
    CRC-32. A warm call hashes only the files whose stat stamp (inode, size, modification and
    change times) moved since, and checks by CRC-32 only the arrays whose stamp moved; a
    file damaged in place is noticed whatever its modification time says, since its change
    time moves (arrays.known_sha256).
    `check_md5=False` accepts IDX files other than the official ones (your own data in the
    same format); the structure is still verified. Raises DataError with a one-line message.
    """
    directory = find_data_dir(data_dir)
    paths = {key: _file_in(directory, stem) for key, (stem, _, _) in FILES.items()}
    if use_cache:
        cached = _read_cache(_cache_dir(directory), paths, check_md5)
        if cached is not None:
            return ImageData(**cached["arrays"], source=directory, from_cache=True,
                             verified_md5=cached["md5_checked"], class_names=list(CLASS_NAMES))
    stamps = {key: file_stamp(path) for key, path in paths.items()}  # before the reads
    files = {key: _verify_file(key, path, check_md5) for key, path in paths.items()}
    arrays = {key: idx.array for key, idx in files.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"{paths[f'{split}_labels']}: holds {n_lab} labels but "
                            f"{paths[f'{split}_images'].name} holds {n_img} images; {FIX_HINT}")
    if use_cache:
        # the digests of the bytes just decoded, should a file change meanwhile
        sources = {key: {"stamp": stamps[key], "sha256": idx.stored["sha256"],
                         "name": paths[key].name} for key, idx in files.items()}
        _write_cache(_cache_dir(directory), arrays, sources, check_md5, directory)
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
