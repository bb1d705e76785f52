"""A dataset as arrays, and the model-ready tensors made from it.

Every dataset (Fashion-MNIST, an image folder, IDX files, an .npz) is loaded into one
`ImageData`: uint8 images, integer labels and the class names. `make_splits` turns it into
float tensors: scaled (the seed's x/128 - 0.5, or per-channel mean/std), padded and split
into training, validation (the LAST fraction, as Keras) and test.

Images are (N, H, W) for one channel and (N, H, W, 3) for colour, as Pillow and matplotlib
hold them; tensors are (N, C, H, W).

A dataset decoded from files is cached as `.npy` arrays beside a manifest.json that records
the source files' SHA-256 (`known_sha256`) and each array's check (`array_checksum`); the
helpers at the end of this file read and write such a cache.
"""

from __future__ import annotations

import json
import os
import stat
import time
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .. import fileio
from ..errors import DataError

SCALINGS = ("fixed", "mean_std")  # [data] normalize: x/128 - 0.5 | (x/255 - mean) / std


@dataclass
class ImageData:
    """A dataset's arrays, as stored: uint8 images (N, H, W) or (N, H, W, 3), integer labels
    (N,) in 0..len(class_names)-1, for the training and the test part."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: Path
    from_cache: bool = False
    verified_md5: bool = True
    class_names: list[str] | None = None   # None: "0", "1", ... from the labels
    name: str = "fashion-mnist"            # the dataset's kind or known name
    notes: list[str] = field(default_factory=list)  # what loading did (held out...)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) not readable

    def __post_init__(self):
        if self.class_names is None:
            top = max([int(a.max()) for a in (self.train_labels, self.test_labels) if a.size] or [1])
            self.class_names = [str(i) for i in range(top + 1)]
        self.class_names = [str(name) for name in self.class_names]

    @property
    def channels(self) -> int:
        return 1 if self.train_images.ndim == 3 else int(self.train_images.shape[3])

    @property
    def image_size(self) -> int:
        """The side of the (square) images."""
        return int(self.train_images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def channels_of(images: np.ndarray) -> int:
    return 1 if images.ndim == 3 else int(images.shape[3])


def check_arrays(data: ImageData, where: str) -> None:
    """The invariants every loader guarantees; DataError names `where` when one fails."""
    for part in ("train", "test"):
        images, labels = getattr(data, f"{part}_images"), getattr(data, f"{part}_labels")
        if images.dtype != np.uint8:
            raise DataError(f"{where}: {part} images must be uint8 (0-255), got {images.dtype}")
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
            raise DataError(f"{where}: {part} images must be (N, H, W) or (N, H, W, 3), "
                            f"got shape {images.shape}")
        if images.shape[1:3] != data.train_images.shape[1:3] or (
                channels_of(images) != channels_of(data.train_images)):
            raise DataError(f"{where}: test images are {images.shape[1:]} but training images "
                            f"{data.train_images.shape[1:]}")
        if len(labels) != len(images):
            raise DataError(f"{where}: {len(images)} {part} images but {len(labels)} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= data.num_classes):
            bad = int(labels.max() if labels.max() >= data.num_classes else labels.min())
            raise DataError(f"{where}: {part} label {bad} is outside 0-{data.num_classes - 1} "
                            f"({data.num_classes} class names)")
    if data.train_images.shape[1] != data.train_images.shape[2]:
        raise DataError(f"{where}: images are {data.train_images.shape[1]}x"
                        f"{data.train_images.shape[2]}, not square; set [data] image_size "
                        f"to bring them to a square", setting="data.image_size")
    if len(data.train_images) < 2:
        raise DataError(f"{where}: needs at least 2 training images, found "
                        f"{len(data.train_images)}")


# ----------------------------------------------------------------------------- tensors

def to_tensor(images: np.ndarray, pad: int = 0, pad_value: float = -0.5,
              dtype: torch.dtype = torch.float32, mean=None, std=None) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> (N, C, H+2*pad, W+2*pad) of `dtype`, scaled as the
    seed (x/128 - 0.5), or, with `mean` and `std` (per channel, of x/255), as (x/255 - mean)/std.

    Padding is added after scaling, with `pad_value` (the seed pads with -0.5, the background).
    """
    if images.ndim == 3:
        images = images[..., None]
    n, height, width, channels = images.shape
    # Written straight into the padded tensor: no unpadded float32 copy beside it (150 MB,
    # briefly, for the 48,000 training images padded to 36x36).
    x = torch.full((n, channels, height + 2 * pad, width + 2 * pad), pad_value, dtype=dtype)
    inner = x[:, :, pad:pad + height, pad:pad + width]  # a view (N, C, H, W)
    inner.copy_(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))
    if mean is None:
        inner.div_(128.0).sub_(0.5)
    else:
        mean_t = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1)
        inner.div_(255.0).sub_(mean_t).div_(std_t)
    return x


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of x/255 over `images` (N, H, W[, C])."""
    if len(images) == 0:
        raise DataError("no training images to compute the mean and std from")
    values = images[..., None] if images.ndim == 3 else images
    flat = values.reshape(-1, values.shape[-1])
    sums, squares = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
    for start in range(0, len(flat), 1 << 22):  # float64 sums, 4M pixels at a time
        chunk = flat[start:start + (1 << 22)].astype(np.float64) / 255.0
        sums += chunk.sum(0)
        squares += (chunk * chunk).sum(0)
    mean = sums / len(flat)
    std = np.sqrt(np.maximum(squares / len(flat) - mean * mean, 0.0))
    return [round(float(m), 6) for m in mean], [round(float(max(s, 1e-3)), 6) for s in std]


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


def fit_part(data: ImageData, subset: int | None, val_fraction: float) -> np.ndarray:
    """The training images the optimizer sees (the subset, less the validation part)."""
    images = data.train_images[:subset] if subset else data.train_images
    return images[validation_split(len(images), val_fraction)[0]]


def storage_dtype(pad_value: float, scaled_by_stats: bool = False) -> torch.dtype:
    """The dtype the training images are kept in: bfloat16 where it holds every value exactly,
    else float32. x/128 - 0.5 = (x - 64)/128 needs 8 significant bits for x in 0..255, which is
    bfloat16's precision; so only the padding value decides (mean/std scaling is not exact).
    Half the memory of float32: the 48,000 training images padded to 36x36 take 124 MB
    instead of 249 MB."""
    if scaled_by_stats:
        return torch.float32
    exact = torch.tensor(pad_value, dtype=torch.bfloat16).item() == pad_value
    return torch.bfloat16 if exact else torch.float32


@dataclass
class Splits:
    """Model-ready tensors: x (N, C, H, W) in channels_last memory, y int64 (N,).

    x_val and x_test are float32; x_train is kept in `storage_dtype(pad_value)` (bfloat16 when
    that is exact): take batches of it with `train_batch`, which returns float32.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device: torch.device | str) -> "Splits":
        """The splits on `device` (these same splits where they are there already)."""
        tensors = [getattr(self, f.name) for f in fields(self)]
        if all(t.device == torch.device(device) for t in tensors):
            return self
        return Splits(*(t.to(device) for t in tensors))

    def train_batch(self, index) -> torch.Tensor:
        """Training images `index` (a slice or an index tensor) as float32, channels_last."""
        return self.x_train[index].to(torch.float32).contiguous(
            memory_format=torch.channels_last)


def make_splits(data: ImageData, *, subset: int | None = None, val_fraction: float = 0.2,
                pad: int = 0, pad_value: float = -0.5, mean=None, std=None) -> Splits:
    """Scale, pad and split. `subset` keeps the first N training images before the split;
    `mean`/`std` (per channel, of x/255) replace the seed's x/128 - 0.5."""
    train_images, train_labels = data.train_images, data.train_labels
    if subset is not None:
        if subset < 2:
            raise DataError(f"the subset must be at least 2 images, got {subset}",
                            setting="data.subset")
        train_images, train_labels = train_images[:subset], train_labels[:subset]
    fit, val = validation_split(len(train_images), val_fraction)

    def tensors(images, labels, dtype=torch.float32):
        x = to_tensor(images, pad, pad_value, dtype, mean, std).contiguous(
            memory_format=torch.channels_last)
        return x, torch.from_numpy(labels.astype(np.int64))

    x_train, y_train = tensors(train_images[fit], train_labels[fit],
                               storage_dtype(pad_value, mean is not None))
    x_val, y_val = tensors(train_images[val], train_labels[val])
    x_test, y_test = tensors(data.test_images, data.test_labels)
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test)


def class_counts(labels: np.ndarray, n_classes: int = 10) -> list[int]:
    return np.bincount(labels, minlength=n_classes).tolist()


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the held-out test images: `fraction` of each class (at least one of
    a class with two or more images), drawn with a fixed seed. Same labels, same mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = int(round(fraction * len(members)))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        else:
            count = 0
        mask[rng.permutation(members)[:count]] = True
    return mask


# ----------------------------------------------------------------------------- the cache

# A file keeps the SHA-256 the cache recorded for it while its stamp is unchanged: os.stat's
# device, inode, size, modification and change times. The change time (ctime) moves on every
# write and cannot be set back (os.utime sets only the access and modification times), so a
# file rewritten in place with its old mtime restored gets a new stamp and is hashed again. A
# file changed within SETTLE_NS before it is stamped could change again within the same
# timestamp tick (a second on some file systems) without its stamp moving: its stamp is not
# recorded, and the next load hashes it again (git treats "racily clean" files the same way).
SETTLE_NS = 2 * 10**9


def file_stamp(path: str | os.PathLike) -> list[int] | None:
    """os.stat's (device, inode, size, mtime_ns, ctime_ns) of a regular file, as the cache
    records it; None for anything else, or for a file changed within SETTLE_NS."""
    now = time.time_ns()
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode) or max(st.st_mtime_ns, st.st_ctime_ns) > now - SETTLE_NS:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def known_sha256(path: str | os.PathLike, recorded, what: str) -> dict:
    """{"stamp": file_stamp, "sha256": hex digest} of the file at `path`: the digest in
    `recorded` (such a dict, from a cache's manifest) when the file's stamp is still the one
    recorded with it, without reading a byte; else read and hashed (stamped before it is read,
    so that a change while it is read moves the stamp). DataError names the file when it
    cannot be read; a FIFO never blocks.

    >>> known_sha256("train-images-idx3-ubyte.gz", None, "an IDX file")   # doctest: +SKIP
    {'stamp': [64769, 1311, 26421880, ...], 'sha256': '3aede38d...'}
    """
    stamp = file_stamp(path)
    if (stamp is not None and isinstance(recorded, dict) and recorded.get("stamp") == stamp
            and isinstance(recorded.get("sha256"), str)):
        return {"stamp": stamp, "sha256": recorded["sha256"]}
    return {"stamp": stamp, "sha256": fileio.sha256_file(path, what=what, error=DataError)}


def array_checksum(array: np.ndarray) -> str:
    """A cached array's check: its dtype, shape and the CRC-32 of its bytes. CRC-32 (not a
    cryptographic hash, and cheaper) is enough for damage: whoever could forge a cache file
    could rewrite its manifest too."""
    crc = zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return f"{array.dtype.str}{list(array.shape)}:{crc:08x}"


def load_npy(path: Path) -> np.ndarray:
    """A cached .npy array, never unpickled; OSError or ValueError when it cannot be used."""
    with fileio.open_regular_file(path, "a cached array", DataError) as handle:
        return np.load(handle, allow_pickle=False)


def load_cached_arrays(cache_dir: Path, recorded: dict) -> tuple[dict, dict] | None:
    """The arrays a cache's manifest lists ({name: {"check": array_checksum, "stamp":
    file_stamp}}) and their entries as they should now be recorded; None when one is damaged.
    An array whose file has the stamp recorded with it is checked for its dtype and shape
    only; another (rewritten, or stamped too soon after it was written) is checked by CRC-32."""
    arrays, entries = {}, {}
    for key, entry in recorded.items():
        path = cache_dir / f"{key}.npy"
        stamp = file_stamp(path)
        array = load_npy(path)
        check = entry["check"]
        if stamp is not None and stamp == entry.get("stamp"):
            ok = check.startswith(f"{array.dtype.str}{list(array.shape)}:")
        else:
            ok = array_checksum(array) == check
        if not ok:
            return None
        arrays[key], entries[key] = array, {"check": check, "stamp": stamp}
    return arrays, entries


def save_cached_arrays(cache_dir: Path, arrays: dict) -> dict:
    """Write each array as cache_dir/<name>.npy; the manifest's entries for them."""
    entries = {}
    for key, array in arrays.items():
        path = cache_dir / f"{key}.npy"
        fileio.write_with(path, lambda tmp, a=array: np.save(open(tmp, "wb"), a))
        entries[key] = {"check": array_checksum(array), "stamp": file_stamp(path)}
    return entries


def read_manifest(cache_dir: Path, cache_format: int) -> dict | None:
    """A cache's manifest.json when it is of `cache_format`; else None."""
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == cache_format \
        else None


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    """Write a cache's manifest.json, last (it marks the set complete); a failure to write
    costs the cache only."""
    try:
        fileio.write_json(cache_dir / "manifest.json", manifest)
    except Exception:
        pass  # the cache is an optimisation; a read-only home must not stop training
