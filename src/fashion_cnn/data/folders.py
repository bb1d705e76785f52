"""Image-folder datasets: one subfolder per class, optionally under train/ and test/, in any
format Pillow reads. Decoded once (data.images.fit_image) into the cache, one per folder, fit
and pixel budget. Its manifest lists every file's path and SHA-256, and is used only while the
folder holds the same files with the same content: a file whose stat stamp is unchanged keeps
its recorded digest, any other is hashed again (arrays.known_sha256), so a file damaged in
place is noticed whatever its modification time says. The manifest also records the files
that could not be read or are over the pixel budget (skipped with a warning naming them, or
refused with `strict`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import DataError, first_line
from .arrays import (ImageData, known_sha256, load_cached_arrays, read_manifest,
                     save_cached_arrays, write_manifest)
from .fashion_mnist import cache_root
from .images import (check_image_memory, fit_image, image_array, image_header, is_gray,
                     max_image_pixels, open_image)

# 3: one cache per folder, fit and budget; each file's SHA-256 and stat stamp recorded
_FOLDER_CACHE_FORMAT = 3
_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
_NAMED_WARNINGS = 10  # unreadable files named one by one in a warning; the rest are counted


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_split(split: str, root: Path, classes: list[str], extensions: set[str],
                recorded: dict, stamps: dict, reasons: dict[str, str]) -> list[list]:
    """[class index, path relative to the split's root, SHA-256 of the bytes] of each image
    file, in file name order across classes (so numbered files keep their numbering's order).
    A file whose stat stamp is the one `recorded` ({"split/path": {"stamp", "sha256"}}) keeps
    its digest unread; its stamp now goes into `stamps`. A file that cannot be read (a FIFO, a
    device, no permission) gets digest None and its reason in `reasons`, by path."""
    entries = []
    for index, cls in enumerate(classes):
        top = str(root / cls)  # strings, not Paths: this runs once per file
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            below = (cls + folder[len(top):]).replace(os.sep, "/")  # "cls" or "cls/sub"
            for name in files:
                if name.startswith(".") or os.path.splitext(name)[1].lower() not in extensions:
                    continue
                path, rel = os.path.join(folder, name), f"{below}/{name}"
                try:
                    known = known_sha256(path, recorded.get(f"{split}/{rel}"), "an image file")
                except DataError as exc:
                    reasons[path] = _reason(exc, path)
                    entries.append([index, rel, None])
                    continue
                stamps[f"{split}/{rel}"] = known["stamp"]
                entries.append([index, rel, known["sha256"]])
    entries.sort(key=lambda e: (e[1].rsplit("/", 1)[-1], e[0], e[1]))
    return entries


def _recorded(manifest: dict | None) -> dict:
    """{"split/path": {"stamp", "sha256"}} from a cache's manifest, for known_sha256."""
    try:
        stamps = manifest["stamps"]
        return {f"{split}/{rel}": {"stamp": stamps.get(f"{split}/{rel}"), "sha256": digest}
                for split, entries in manifest["listing"].items() for _, rel, digest in entries}
    except (TypeError, KeyError, ValueError, AttributeError):
        return {}  # no cache, or a damaged manifest: every file is hashed


def _reason(exc: Exception, path: str | Path) -> str:
    """A library error's message about `path` without the path it starts with."""
    message = first_line(exc)
    return message.removeprefix(f"{path}: ")


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    # disable=None: shown only on a terminal, so logs and CI stay clean
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr,
                disable=None if enabled is None else not enabled, leave=False)


def _survey(files: list[Path]) -> tuple[dict, dict]:
    """Header-only pass: {path: (width, height, gray)} of the readable files, and
    {path: reason} of those Pillow cannot even identify or that are over the pixel budget."""
    sizes, bad = {}, {}
    for path in files:
        try:
            width, height, mode = image_header(path)
            sizes[path] = (width, height, is_gray(mode))
        except DataError as exc:
            bad[path] = _reason(exc, path)
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
    into the cache; the cache is used while the folder holds the same files with the same
    content (SHA-256, hashed again only for files whose stat stamp moved), so a changed folder
    is decoded again. Files Pillow cannot read are skipped with a warning that names them, or
    refused with `strict`. The test part is empty without a test/ folder."""
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
    # One cache per folder, fit and pixel budget (raising it decodes the images it skipped).
    # Its manifest's listing (every file's path and content) must match the folder's; the
    # sizes asked for are checked against the manifest, so asking for the size the data was
    # decoded at (a run's own config) finds it.
    key = hashlib.sha256(json.dumps(
        [_FOLDER_CACHE_FORMAT, str(root.resolve()), fit, classes, max_image_pixels()],
        sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = cache_root() / "folders" / key
    manifest = read_manifest(cache_dir, _FOLDER_CACHE_FORMAT) if use_cache else None
    recorded, stamps = _recorded(manifest), {}
    extensions = _image_extensions()
    reasons: dict[str, str] = {}  # path -> why it cannot be read, for the files listed
    listing = {split: _list_split(split, split_root, classes, extensions, recorded, stamps,
                                  reasons) if split_root else []
               for split, split_root in (("train", train_root), ("test", test_root))}
    split_roots = {"train": train_root, "test": test_root}
    data = None
    if manifest is not None:
        data = _read_folder_cache(cache_dir, manifest, root, classes, listing, stamps,
                                  image_size, channels)
    if data is None:
        data, manifest = _decode_folder(root, split_roots, classes, listing, reasons,
                                        image_size, channels, fit, progress)
        if use_cache:
            _write_folder_cache(cache_dir, data, dict(manifest, listing=listing, stamps=stamps))
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


def _decode_folder(root, split_roots, classes, listing, reasons, image_size, channels, fit,
                   progress):
    all_paths = [split_roots[s] / entry[1] for s in listing for entry in listing[s]
                 if entry[2] is not None]
    bad = {Path(path): reason for path, reason in reasons.items()}
    if not (image_size and channels):
        sizes, unusable = _survey(all_paths)
        bad.update(unusable)
        image_size, channels = _choose_shape(sizes, image_size, channels, root)
    # every split's images together, before any is allocated
    check_image_memory(sum(len(entries) for entries in listing.values()), image_size, channels)
    arrays, skipped = {}, []
    bar = _progress(sum(len(entries) for entries in listing.values()), f"decoding {root.name}",
                    progress)
    try:
        for split, entries in listing.items():
            images = image_array(len(entries), image_size, channels)
            labels = np.empty(len(entries), np.int64)
            kept = 0
            for index, rel, _ in entries:
                path = split_roots[split] / rel
                bar.update(1)
                if path in bad:
                    skipped.append((str(path), bad[path]))
                    continue
                try:
                    image = open_image(path, size=image_size)  # a JPEG decoded drafted
                    images[kept] = fit_image(image, image_size, channels, fit)
                except DataError as exc:  # unreadable, over budget or truncated: named below
                    skipped.append((str(path), _reason(exc, path)))
                    continue
                except Exception as exc:  # a mode Pillow cannot convert: named below
                    skipped.append((str(path), f"cannot convert the image ({first_line(exc)})"))
                    continue
                labels[kept] = index
                kept += 1
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[:kept], labels[:kept]
    finally:
        bar.close()
    data = ImageData(**arrays, source=root, verified_md5=False, class_names=classes,
                     name="image-folder", skipped=skipped)
    manifest = {"format": _FOLDER_CACHE_FORMAT, "root": str(root.resolve()), "classes": classes,
                "image_size": image_size, "channels": channels, "fit": fit, "skipped": skipped}
    return data, manifest


def _write_folder_cache(cache_dir: Path, data: ImageData, manifest: dict) -> None:
    try:
        entries = save_cached_arrays(cache_dir, {key: getattr(data, key) for key in _ARRAYS})
    except Exception:
        return  # the cache is an optimisation; a read-only home must not stop training
    write_manifest(cache_dir, dict(manifest, arrays=entries))  # last: marks the set complete


def _read_folder_cache(cache_dir: Path, manifest: dict, root: Path, classes: list[str],
                       listing: dict, stamps: dict, image_size: int,
                       channels: int) -> ImageData | None:
    """The cached arrays when the manifest lists the folder's files as `listing` does (paths,
    classes, content) for the sizes asked for, and each array passes its check; else None.
    A cache found good whose stamps moved is recorded again, so that the next load hashes
    nothing."""
    try:
        if (manifest.get("classes") != classes or manifest.get("listing") != listing
                or image_size not in (0, manifest.get("image_size"))
                or channels not in (0, manifest.get("channels"))
                or set(manifest["arrays"]) != set(_ARRAYS)):
            return None
        loaded = load_cached_arrays(cache_dir, manifest["arrays"])
        if loaded is None:
            return None  # a damaged cache file: decoded again
        skipped = [tuple(s) for s in manifest.get("skipped", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DataError):
        return None  # a damaged cache: decoded again
    arrays, entries = loaded
    if stamps != manifest.get("stamps") or entries != manifest["arrays"]:
        write_manifest(cache_dir, dict(manifest, stamps=stamps, arrays=entries))
    return ImageData(**arrays, source=root, from_cache=True, verified_md5=False,
                     class_names=classes, name="image-folder", skipped=skipped)
