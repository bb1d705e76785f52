"""Datasets written to disk from Fashion-MNIST's own images, for the tests of other formats:
image folders (PNG, JPEG, tinted colour), an .npz, an MNIST-style IDX folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fashion_cnn.data import fashion_mnist as fdata
from fashion_cnn.data.images import write_image_folder

# A colour per class: a grayscale garment becomes that colour on a black background.
TINTS = np.array([[255, 80, 80], [80, 255, 80], [80, 80, 255], [255, 255, 80], [255, 80, 255],
                  [80, 255, 255], [255, 160, 40], [160, 40, 255], [40, 160, 120],
                  [200, 200, 200]], dtype=np.float32) / 255.0
COLOUR_NAMES = ["red-top", "green-trouser", "blue-pullover", "yellow-dress", "magenta-coat",
                "cyan-sandal", "orange-shirt", "violet-sneaker", "teal-bag", "grey-boot"]


def folder_names(class_names) -> list[str]:
    """Class names usable as folder names ("T-shirt/top" -> "T-shirt-top")."""
    return [name.replace("/", "-") for name in class_names]


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, class_names, *,
                 fmt: str = "png", split: str | None = None) -> Path:
    """ROOT[/split]/<class>/<index:05d>.<fmt>: the library's own writer."""
    return write_image_folder(root, images, labels, class_names, split=split, fmt=fmt)


def tinted(images: np.ndarray, labels: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 (N, 28, 28) -> (N, size, size, 3): each garment coloured by its class, centred."""
    out = np.zeros((len(images), size, size, 3), np.uint8)
    top = (size - 28) // 2
    coloured = images[..., None].astype(np.float32) * TINTS[labels.astype(int)][:, None, None, :]
    out[:, top:top + 28, top:top + 28] = np.clip(coloured, 0, 255).round().astype(np.uint8)
    return out


def write_idx_folder(directory: Path, train_images, train_labels, test_images, test_labels,
                     class_names=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fdata.write_idx(directory / "train-images-idx3-ubyte.gz", train_images)
    fdata.write_idx(directory / "train-labels-idx1-ubyte.gz", train_labels.astype(np.uint8))
    fdata.write_idx(directory / "t10k-images-idx3-ubyte.gz", test_images)
    fdata.write_idx(directory / "t10k-labels-idx1-ubyte.gz", test_labels.astype(np.uint8))
    if class_names:
        (directory / "classes.txt").write_text("\n".join(class_names) + "\n")
    return directory
