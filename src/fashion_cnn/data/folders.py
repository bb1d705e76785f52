"""Image-folder datasets: one subfolder per class, optionally under train/ and test/, in any
format Pillow reads. Decoded once (data.images.fit_image) into the cache, keyed by every
file's path, size and modification time; the manifest records each file's SHA-256 and the
files that could not be read (skipped with a warning naming them, or refused with `strict`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from .. import fileio
from ..errors import DataError
from .arrays import ImageData
from .fashion_mnist import cache_root
from .images import fit_image, is_gray

_FOLDER_CACHE_FORMAT = 1
_NAMED_WARNINGS = 10  # unreadable files named one by one in a warning; the rest are counted


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_split(root: Path, classes: list[str], extensions: set[str]) -> list[tuple]:
    """(class index, path relative to the dataset root's parent part, size, mtime_ns), in file
    name order across classes (so numbered files keep their numbering's order)."""
    entries = []
    for index, cls in enumerate(classes):
        for folder, dirs, files in os.walk(root / cls):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if name.startswith(".") or os.path.splitext(name)[1].lower() not in extensions:
                    continue
                path = Path(folder) / name
                st = path.stat()
                entries.append((index, path.relative_to(root).as_posix(), st.st_size,
                                st.st_mtime_ns))
    entries.sort(key=lambda e: (e[1].rsplit("/", 1)[-1], e[0], e[1]))
    return entries


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    # disable=None: shown only on a terminal, so logs and CI stay clean
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr,
                disable=None if enabled is None else not enabled, leave=False)


def _unreadable(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _survey(files: list[Path]) -> tuple[dict, dict]:
    """Header-only pass: {path: (width, height, gray)} of the readable files, and
    {path: reason} of those Pillow cannot even identify."""
    from PIL import Image

    sizes, bad = {}, {}
    for path in files:
        try:
            with Image.open(path) as image:
                sizes[path] = (image.width, image.height, is_gray(image.mode))
        except Exception as exc:  # Pillow raises many kinds on a bad file
            bad[path] = _unreadable(exc)
    return sizes, bad


def _choose_shape(sizes: dict, image_size: int, channels: int, root: Path) -> tuple[int, int]:
    if not sizes:
        raise DataError(f"{root}: no readable image in the class folders", setting="data.dataset")
    if not channels:
        channels = 1 if all(gray for _, _, gray in sizes.values()) else 3
    if not image_size:
        shapes = {(w, h) for w, h, _ in sizes.values()}
        if len(shapes) > 1 or next(iter(shapes))[0] != next(iter(shapes))[1]:
            listed = ", ".join(f"{w}x{h}" for w, h in sorted(shapes)[:4])
            raise DataError(f"{root}: the images have {'different sizes' if len(shapes) > 1 else 'a non-square size'} "
                            f"({listed}{', ...' if len(shapes) > 4 else ''}); set [data] "
                            f"image_size (e.g. --set data.image_size=64)",
                            setting="data.image_size")
        image_size = next(iter(shapes))[0]
    return image_size, channels


def load_image_folder(root: Path, *, image_size: int = 0, channels: int = 0,
                      fit: str = "letterbox", strict: bool = False, use_cache: bool = True,
                      progress: bool | None = None, class_names=None) -> ImageData:
    """A folder with one subfolder per class (optionally under train/ and test/), decoded once
    into the cache; the cache is keyed by every file's path, size and modification time, so a
    changed folder is decoded again. Files Pillow cannot read are skipped with a warning that
    names them, or refused with `strict`. The test part is empty without a test/ folder."""
    root = Path(root)
    train_root = root / "train" if (root / "train").is_dir() else root
    test_root = root / "test" if train_root != root and (root / "test").is_dir() else None
    classes = _class_folders(train_root)
    if class_names:  # Keras' class_names: the subfolders, in the order that numbers them
        missing = [c for c in class_names if c not in classes]
        extra = [c for c in classes if c not in class_names]
        if missing or extra:
            raise DataError(f"{train_root}: class_names must name its subfolders exactly "
                            f"({'no folder ' + repr(missing[0]) if missing else 'folder ' + repr(extra[0]) + ' not named'})",
                            setting="data.class_names")
        classes = list(class_names)
    if len(classes) < 2:
        raise DataError(f"{train_root}: an image folder needs one subfolder per class, at "
                        f"least 2 (found {len(classes)})", setting="data.dataset")
    if test_root is not None:
        extra = sorted(set(_class_folders(test_root)) - set(classes))
        if extra:
            raise DataError(f"{test_root / extra[0]}: a test class with no training folder",
                            setting="data.dataset")
    extensions = _image_extensions()
    listing = {"train": _list_split(train_root, classes, extensions),
               "test": _list_split(test_root, classes, extensions) if test_root else []}
    split_roots = {"train": train_root, "test": test_root}
    # One cache per folder and fit: the sizes asked for are checked against the manifest, so
    # asking for the size the data was decoded at (a run's own config) finds it.
    key = hashlib.sha256(json.dumps(
        [_FOLDER_CACHE_FORMAT, str(root.resolve()), fit, classes, listing],
        sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = cache_root() / "folders" / key
    data = _read_folder_cache(cache_dir, root, classes, image_size, channels) if use_cache else None
    if data is None:
        data, manifest = _decode_folder(root, split_roots, classes, listing, image_size,
                                        channels, fit, progress)
        if use_cache:
            _write_folder_cache(cache_dir, data, manifest)
    _report_skipped(data.skipped, strict)
    return data  # open_dataset checks the arrays (check_arrays)


def _report_skipped(skipped: list, strict: bool) -> None:
    if not skipped:
        return
    if strict:
        path, reason = skipped[0]
        raise DataError(f"{path}: cannot read as an image ({reason}); remove or replace it, "
                        f"or run without --strict to skip it", setting="data.strict")
    named = "; ".join(f"{path} ({reason})" for path, reason in skipped[:_NAMED_WARNINGS])
    more = f"; and {len(skipped) - _NAMED_WARNINGS} more" if len(skipped) > _NAMED_WARNINGS else ""
    warn(f"skipped {len(skipped)} unreadable image file(s): {named}{more}")


def _decode_folder(root, split_roots, classes, listing, image_size, channels, fit, progress):
    from PIL import Image

    all_paths = [split_roots[s] / rel for s in listing for _, rel, _, _ in listing[s]]
    bad: dict = {}
    if not (image_size and channels):
        sizes, bad = _survey(all_paths)
        image_size, channels = _choose_shape(sizes, image_size, channels, root)
    shape = (image_size, image_size) + ((3,) if channels == 3 else ())
    arrays, files, skipped = {}, [], []
    bar = _progress(len(all_paths), f"decoding {root.name}", progress)
    try:
        for split, entries in listing.items():
            images = np.empty((len(entries),) + shape, np.uint8)
            labels = np.empty(len(entries), np.int64)
            kept = 0
            for index, rel, size, _ in entries:
                path = split_roots[split] / rel
                bar.update(1)
                if path in bad:
                    skipped.append((str(path), bad[path]))
                    continue
                try:
                    raw = path.read_bytes()
                    with Image.open(io.BytesIO(raw)) as image:
                        image.load()
                        images[kept] = fit_image(image, image_size, channels, fit)
                except Exception as exc:  # unreadable or truncated: skipped, named below
                    skipped.append((str(path), _unreadable(exc)))
                    continue
                labels[kept] = index
                kept += 1
                files.append([split, rel, size, hashlib.sha256(raw).hexdigest()])
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[:kept], labels[:kept]
    finally:
        bar.close()
    data = ImageData(**arrays, source=root, verified_md5=False, class_names=classes,
                     name="image-folder", skipped=skipped)
    manifest = {"format": _FOLDER_CACHE_FORMAT, "root": str(root.resolve()), "classes": classes,
                "image_size": image_size, "channels": channels, "fit": fit, "files": files,
                "skipped": skipped}
    return data, manifest


def _write_folder_cache(cache_dir: Path, data: ImageData, manifest: dict) -> None:
    try:
        for key in ("train_images", "train_labels", "test_images", "test_labels"):
            array = getattr(data, key)
            fileio.write_with(cache_dir / f"{key}.npy",
                              lambda tmp, a=array: np.save(open(tmp, "wb"), a))
        fileio.write_json(cache_dir / "manifest.json", manifest)  # last: marks the set complete
    except Exception:
        pass  # the cache is an optimisation; a read-only home must not stop training


def _read_folder_cache(cache_dir: Path, root: Path, classes: list[str], image_size: int,
                       channels: int) -> ImageData | None:
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text())
        if (manifest.get("format") != _FOLDER_CACHE_FORMAT or manifest.get("classes") != classes
                or image_size not in (0, manifest.get("image_size"))
                or channels not in (0, manifest.get("channels"))):
            return None
        arrays = {key: np.load(cache_dir / f"{key}.npy", allow_pickle=False)
                  for key in ("train_images", "train_labels", "test_images", "test_labels")}
    except (OSError, ValueError, KeyError):
        return None  # no cache yet, or a damaged one: decoded again
    return ImageData(**arrays, source=root, from_cache=True, verified_md5=False,
                     class_names=classes, name="image-folder",
                     skipped=[tuple(s) for s in manifest.get("skipped", [])])
