"""Datasets other than Fashion-MNIST: a folder of IDX files, an .npz file (a folder of images by
class is folders.py's); and `open_dataset`, which loads whichever a config's `[data] dataset`
names.

    dataset = "fashion-mnist"        the default (fashion_mnist.py: verified, cached)
    dataset = "data/kmnist"          a folder holding the four IDX files of the MNIST family
    dataset = "data/digits.npz"      x_train, y_train, x_test, y_test (and class_names)
    dataset = "data/flowers"         one subfolder per class, optionally under train/ and test/

Without a test part (an image folder with no test/), a seeded, stratified `test_fraction` of
each class is held out as the test set; the same files and settings hold out the same images.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .. import fileio
from ..errors import DataError, first_line
from .arrays import ImageData, check_arrays, stratified_holdout
from .fashion_mnist import check_declared_size, load_data, read_idx
from .folders import load_image_folder
from .images import FITS, conform

ORDERS = ("auto", "shuffle", "stored")

# IDX files of the MNIST family: the file names (any prefix, gzipped or not) and, for known
# releases, the published MD5 of each file as distributed (gzipped) with the class names.
IDX_PARTS = {"train_images": ("train-images-idx3-ubyte",),
             "train_labels": ("train-labels-idx1-ubyte",),
             "test_images": ("t10k-images-idx3-ubyte", "test-images-idx3-ubyte"),
             "test_labels": ("t10k-labels-idx1-ubyte", "test-labels-idx1-ubyte")}
KNOWN_IDX = {
    "mnist": ({"train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
               "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
               "test_images": "9fb629c4189551a2d022fa330f9573f3",
               "test_labels": "ec29112dd5afa0611ce80d1b7f02629c"},
              [str(i) for i in range(10)]),
    "kmnist": ({"train_images": "bdb82020997e1d708af4cf47b453dcf7",
                "train_labels": "e144d726b3acfaa3e44228e80efcd344",
                "test_images": "5c965bf0a639b31b8f53240b1b52f4d7",
                "test_labels": "7320c461ea6c1c855c0b718fb2a4b134"},
               ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]),
}
CHECKSUM_FILES = ("SHA256SUMS", "sha256sums.txt", "MD5SUMS", "md5sums.txt", "checksums.txt")


def _read_class_names(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the class names ({exc})") from None
    names = [n for n in names if n]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: a class name appears twice")
    return names


# ----------------------------------------------------------------------------- IDX folders

def _idx_file(directory: Path, key: str) -> Path | None:
    found = []
    for stem in IDX_PARTS[key]:
        found += [p for p in directory.iterdir()
                  if not p.is_dir() and p.name.endswith((stem, stem + ".gz"))]
    if len(found) > 1:
        raise DataError(f"{directory}: several files could be the {key.replace('_', ' ')} "
                        f"({', '.join(sorted(p.name for p in found))}); keep one set per folder",
                        setting="data.dataset")
    return found[0] if found else None


def is_idx_folder(directory: Path) -> bool:
    return directory.is_dir() and _idx_file(directory, "train_images") is not None


def _user_checksums(directory: Path) -> dict[str, str]:
    """File name -> hex digest from a `sha256sum`/`md5sum` style list beside the files."""
    sums = {}
    for name in CHECKSUM_FILES:
        path = directory / name
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.strip().split()
                if len(parts) == 2 and len(parts[0]) in (32, 64):
                    sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def load_idx_folder(directory: Path) -> ImageData:
    """The four IDX files of an MNIST-family release in `directory`, verified for structure
    (magic, dimensions, counts, label range) and checksums where known or given."""
    paths = {}
    for key in IDX_PARTS:
        path = _idx_file(directory, key)
        if path is None:
            raise DataError(f"{directory}: no {IDX_PARTS[key][0]}[.gz] file (an IDX dataset "
                            f"needs train and t10k images and labels)", setting="data.dataset")
        paths[key] = path
    arrays, stored = {}, {}
    for key, path in paths.items():
        idx = read_idx(path, 3 if key.endswith("images") else 1, image_size=None,
                       fix_hint="replace the file", stored_digests=("md5", "sha256"))
        arrays[key], stored[key] = idx.array, idx.stored
    given = _user_checksums(directory)
    for key, path in paths.items():
        if path.name in given:
            expected = given[path.name]
            if stored[key]["md5" if len(expected) == 32 else "sha256"] != expected:
                raise DataError(f"{path}: checksum mismatch with the list beside it; "
                                f"replace the file")
    name, class_names = "idx", None
    digests = {key: sums["md5"] for key, sums in stored.items()}
    for known, (sums, names) in KNOWN_IDX.items():
        matching = [key for key in sums if digests[key] == sums[key]]
        if matching and len(matching) < len(sums):
            bad = next(key for key in sums if key not in matching)
            raise DataError(f"{paths[bad]}: MD5 mismatch ({known} release: the other files "
                            f"match it, this one does not); replace the file")
        if matching:
            name, class_names = known, list(names)
    if (directory / "classes.txt").is_file():
        class_names = _read_class_names(directory / "classes.txt")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(f"{paths['test_images']}: images are {arrays['test_images'].shape[1:]}, "
                        f"the training images {arrays['train_images'].shape[1:]}")
    data = ImageData(**{k: v.astype(np.int64) if k.endswith("labels") else v
                        for k, v in arrays.items()},
                     source=directory, verified_md5=name != "idx" or bool(given),
                     class_names=class_names, name=name)
    return data  # open_dataset checks the arrays (check_arrays)


# ----------------------------------------------------------------------------- .npz

NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
# Without class names, the classes are 0..largest label: a bound keeps that list (and a
# model's last layer) finite when a label is absurd. ImageNet-21k has about 21,800 classes.
MAX_CLASSES = 100_000
_NPZ_HINT = "write it with numpy.savez or numpy.savez_compressed"


def _check_npz_members(handle, path: Path) -> None:
    """Refuse, before numpy allocates anything, what an .npz's own headers show to be wrong:
    a member that would inflate past what DEFLATE can give, an array announcing more bytes
    than its member holds, an object (pickled) array, all arrays together beyond memory."""
    total, archive_size = 0, os.fstat(handle.fileno()).st_size
    with zipfile.ZipFile(handle) as archive:
        for info in archive.infolist():
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise DataError(f"{path}: member {info.filename} is compressed with zip method "
                                f"{info.compress_type}; {_NPZ_HINT}")
            stored = info.compress_type == zipfile.ZIP_STORED
            if info.compress_size > archive_size or (stored and
                                                     info.file_size != info.compress_size):
                raise DataError(f"{path}: member {info.filename} announces {info.file_size:,} "
                                f"bytes, which its {info.compress_size:,} stored bytes in a "
                                f"{archive_size:,}-byte file cannot be; {_NPZ_HINT}")
            check_declared_size(path, info.file_size, info.compress_size, not stored,
                                f"member {info.filename} announces", _NPZ_HINT)
            with archive.open(info) as member:
                if member.read(6) != b"\x93NUMPY":
                    continue  # not an array: never read (load_npz reads the arrays it needs)
                member.seek(0)
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(member)
            if dtype.hasobject:
                raise DataError(f"{path}: {info.filename} holds Python objects, which are never "
                                f"unpickled; store numbers (uint8 images, integer labels)")
            size = math.prod(shape) * dtype.itemsize
            if size > info.file_size:
                raise DataError(f"{path}: {info.filename} announces shape {tuple(shape)} of "
                                f"{dtype} ({size:,} bytes) but holds {info.file_size:,} bytes; "
                                f"{_NPZ_HINT}")
            total += size
    check_declared_size(path, total, total, False, "its arrays announce", _NPZ_HINT)


def load_npz(path: Path) -> ImageData:
    """x_train, y_train, x_test, y_test (uint8 images (N, H, W[, C]), integer labels) and an
    optional class_names array, read without unpickling anything; headers that announce more
    than the file can hold are refused before anything is allocated."""
    try:
        with fileio.open_regular_file(path, "an .npz dataset", DataError) as handle:
            if handle.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
                raise DataError(f"{path}: not an .npz file (not a zip archive); {_NPZ_HINT}")
            handle.seek(0)
            _check_npz_members(handle, path)
            handle.seek(0)
            with np.load(handle, allow_pickle=False) as npz:
                wanted = [key for key in (*NPZ_ARRAYS, "class_names") if key in npz.files]
                arrays = {key: npz[key] for key in wanted}
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile, RuntimeError,
            NotImplementedError) as exc:
        # zipfile and numpy's format reader raise all these on a damaged archive
        raise DataError(f"{path}: not a readable .npz file ({first_line(exc)})") from None
    except MemoryError:  # under a memory limit (ulimit -v, a container's)
        raise DataError(f"{path}: its arrays need more memory than this process may take") \
            from None
    not_arrays = [key for key, value in arrays.items() if not isinstance(value, np.ndarray)]
    if not_arrays:
        raise DataError(f"{path}: {not_arrays[0]} is not a numpy array (.npy) member; {_NPZ_HINT}")
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{path}: no array {missing[0]!r} (an .npz dataset holds x_train, "
                        f"y_train, x_test, y_test; found {', '.join(sorted(arrays)) or 'none'})")
    out = {}
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.dtype != np.uint8:
            if not np.issubdtype(x.dtype, np.integer) or (x.size and (x.min() < 0 or x.max() > 255)):
                raise DataError(f"{path}: x_{part} must hold 8-bit pixels (uint8, 0-255), "
                                f"got {x.dtype}")
            x = x.astype(np.uint8)
        if x.ndim == 4 and x.shape[3] == 1:
            x = x[..., 0]
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y_{part} must be integer class indices (N,), got "
                            f"{y.dtype} {y.shape}")
        if "class_names" not in arrays and y.size and int(y.max()) >= MAX_CLASSES:
            raise DataError(f"{path}: y_{part} holds label {int(y.max())}; without a class_names "
                            f"array labels must be below {MAX_CLASSES:,}")
        out[f"{part}_images"], out[f"{part}_labels"] = x, y.astype(np.int64)
    names = None
    if "class_names" in arrays:
        if arrays["class_names"].ndim != 1:
            raise DataError(f"{path}: class_names must be one name per class (N,), got shape "
                            f"{arrays['class_names'].shape}")
        names = [str(n) for n in arrays["class_names"].tolist()]
    # open_dataset checks the arrays (check_arrays)
    return ImageData(**out, source=path, verified_md5=False, class_names=names, name="npz")


# ----------------------------------------------------------------------------- any dataset

def dataset_kind(dataset: str) -> str:
    """fashion-mnist | npz | idx | image-folder, from the name or what the path holds."""
    if dataset == "fashion-mnist":
        return dataset
    path = Path(dataset).expanduser()
    if not path.exists():
        raise DataError(f"{dataset}: no such dataset (give fashion-mnist, a folder of images "
                        f"by class, a folder of IDX files or an .npz file)",
                        setting="data.dataset")
    if path.is_dir():
        return "idx" if is_idx_folder(path) else "image-folder"
    kind = fileio.special_file_kind(path.stat().st_mode)
    if kind is not None:  # a FIFO would block whoever opened it
        raise DataError(f"{dataset}: is {kind}, not a regular file (expected a folder or an "
                        f".npz file)", setting="data.dataset")
    if path.suffix.lower() == ".npz":
        return "npz"
    raise DataError(f"{dataset}: a dataset file must be an .npz (x_train, y_train, "
                    f"x_test, y_test)", setting="data.dataset")


def open_dataset(dataset: str = "fashion-mnist", *, data_dir: str = "", image_size: int = 0,
                 channels: int = 0, fit: str = "letterbox", order: str = "auto",
                 test_fraction: float = 0.2, split_seed: int = 0, strict: bool = False,
                 class_names=None, progress: bool | None = None) -> ImageData:
    """Load the dataset a config names, brought to `image_size` and `channels` (0: the data's
    own), its training part ordered (`order`) and, when it has no test part, a stratified
    `test_fraction` held out as the test set. `class_names`: for an image folder, its
    subfolders in the order that numbers the classes (default: sorted, as Keras); for other
    data, names for its labels 0, 1, ... DataError names the file and the setting."""
    if fit not in FITS:
        raise DataError(f"fit must be one of {', '.join(FITS)}, got {fit!r}", setting="data.fit")
    if order not in ORDERS:
        raise DataError(f"order must be one of {', '.join(ORDERS)}, got {order!r}",
                        setting="data.order")
    kind = dataset_kind(dataset)
    if kind == "fashion-mnist":
        data = load_data(data_dir or None)
    elif kind == "npz":
        data = load_npz(Path(dataset).expanduser())
    elif kind == "idx":
        data = load_idx_folder(Path(dataset).expanduser())
    else:
        data = load_image_folder(Path(dataset).expanduser(), image_size=image_size,
                                 channels=channels, fit=fit, strict=strict, progress=progress,
                                 class_names=class_names)
    if class_names and kind != "image-folder":
        if len(class_names) != data.num_classes:
            raise DataError(f"{dataset}: {len(class_names)} class_names for "
                            f"{data.num_classes} classes", setting="data.class_names")
        data.class_names = list(class_names)
    if kind != "image-folder" and (image_size or channels):
        size = image_size or data.image_size
        want = channels or data.channels
        for part in ("train", "test"):
            setattr(data, f"{part}_images",
                    conform(getattr(data, f"{part}_images"), size, want, fit))
    if len(data.test_images) == 0:
        held = stratified_holdout(data.train_labels, test_fraction, split_seed)
        if not held.any():
            raise DataError(f"{dataset}: no test/ folder and test_fraction {test_fraction} "
                            f"holds out no image", setting="data.test_fraction")
        data.test_images, data.test_labels = data.train_images[held], data.train_labels[held]
        data.train_images, data.train_labels = data.train_images[~held], data.train_labels[~held]
        data.notes.append(f"held out {int(held.sum())} images ({test_fraction:g} of each "
                          f"class, seed {split_seed}) as the test set")
    if order == "shuffle" or (order == "auto" and kind == "image-folder"):
        # Keras' image_dataset_from_directory shuffles the files (seeded) before the
        # validation split takes the last part; file order would put whole classes there.
        perm = np.random.default_rng(split_seed).permutation(len(data.train_labels))
        data.train_images, data.train_labels = data.train_images[perm], data.train_labels[perm]
    check_arrays(data, dataset)
    return data
