"""Prediction on image files with a trained run.

A run on another dataset (an image folder, IDX, .npz) brings each image to its size and
channels by the rule its folder was decoded with (data.images.fit_image). For a Fashion-MNIST
run, photos of clothing go through the steps that made Fashion-MNIST:

Fashion-MNIST was made from product photos: each was trimmed to the garment, its longer side
resized to 28 pixels, centred on a 28x28 canvas, negated (a light garment on black) and turned
to grayscale. A photo goes through the same steps here (`to_fashion_mnist`), so that the model
sees the kind of image it was trained on; `--save-inputs` writes those 28x28 views out to look
at. An image that is already 28x28 is taken pixel for pixel, inverted only where its border is
light (Fashion-MNIST's own images, saved as PNG, come back exactly).

>>> from fashion_cnn.predict import predict_files
>>> result = predict_files("runs/fast-20261130-101500", ["shirt.jpg"])   # doctest: +SKIP
>>> result[0].top(2)                                                     # doctest: +SKIP
[('Shirt', 0.81), ('T-shirt/top', 0.12)]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import fileio
from ..data.arrays import to_tensor
from ..data.fashion_mnist import CLASS_NAMES, IMAGE_SIZE
from ..data.images import eight_bit, fit_image, open_image
from ..errors import UserError, first_line

INVERT_CHOICES = ("auto", "yes", "no")
# A pixel belongs to the garment when it is this much brighter (0-255, after any inversion)
# than the background, estimated as the median of the image's border.
TRIM_THRESHOLD = 24
# The border used to estimate the background: this fraction of the shorter side, at least 1 px.
BORDER_FRACTION = 0.05


class ImageError(UserError):
    """An image file that cannot be read or used."""


@dataclass
class Prediction:
    """One image's result: class probabilities (softmax of the logits), or why it failed."""

    path: str
    probabilities: list[float] = field(default_factory=list)
    inverted: bool = False
    error: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)  # the uint8 model input
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES), repr=False)

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The k most probable classes, most probable first, as (name, probability)."""
        order = np.argsort(self.probabilities)[::-1][:k]
        return [(self.class_names[i], float(self.probabilities[i])) for i in order]

    def to_dict(self, k: int = 3) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "prediction": self.top(1)[0][0],
                "probability": self.top(1)[0][1],
                "top": [{"class": name, "probability": p} for name, p in self.top(k)],
                "inverted": self.inverted}


def load_image(path: str | os.PathLike):
    """The image at `path`, decoded by Pillow and turned upright (EXIF orientation); one clear
    ImageError when the file is missing, not a regular file, unreadable, not an image,
    truncated or above the pixel budget (data.images.open_image: checked from the header,
    before decoding)."""
    return open_image(path, upright=True, error=ImageError)


def _grayscale(image) -> np.ndarray:
    """(H, W) uint8 luminance; transparent parts count as a white background (product photos
    cut out of their background)."""
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":  # convert("L") would clip them
        return np.asarray(eight_bit(image), dtype=np.uint8)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _check_invert(invert: str) -> None:
    if invert not in INVERT_CHOICES:
        raise UserError(f"invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")


def _border(gray: np.ndarray) -> np.ndarray:
    width = max(1, int(round(min(gray.shape) * BORDER_FRACTION)))
    return np.concatenate([gray[:width].ravel(), gray[-width:].ravel(),
                           gray[:, :width].ravel(), gray[:, -width:].ravel()])


def to_fashion_mnist(image, invert: str = "auto") -> tuple[np.ndarray, bool]:
    """A Pillow image as Fashion-MNIST's (28, 28) uint8 format, and whether it was inverted.

    invert: "auto" negates the image when its border is light (median above 127: a garment
    photographed on a light background), "yes" always, "no" never. A 28x28 image is otherwise
    kept pixel for pixel. A larger or smaller one is trimmed to the pixels brighter than its
    background by TRIM_THRESHOLD, its background brought to black, its longer side resized to
    28 (Lanczos), its brightest pixel stretched to 255 and centred on a black 28x28 canvas.
    """
    from PIL import Image

    _check_invert(invert)
    gray = _grayscale(image)
    inverted = invert == "yes" or (invert == "auto" and float(np.median(_border(gray))) > 127)
    if inverted:
        gray = 255 - gray
    if gray.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return np.ascontiguousarray(gray), inverted
    background = float(np.median(_border(gray)))
    rows, cols = np.nonzero(gray.astype(np.int16) > background + TRIM_THRESHOLD)
    if len(rows):
        gray = gray[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    level = np.clip(gray.astype(np.float32) - background, 0, None)  # the background to black
    height, width = level.shape
    scale = IMAGE_SIZE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # (W, H) for Pillow
    resized = np.asarray(Image.fromarray(level).resize(size, Image.Resampling.LANCZOS))
    # Every Fashion-MNIST image spans the full range (its brightest pixel is 254 or 255): a
    # dark or colored garment, which comes out dim, is stretched the same way.
    peak = float(resized.max())
    resized = np.clip(resized * (255.0 / peak if peak > 0 else 1.0), 0, 255).round()
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    # an odd margin puts its extra pixel at the top / left, as in Fashion-MNIST's own images
    top, left = (IMAGE_SIZE - size[1] + 1) // 2, (IMAGE_SIZE - size[0] + 1) // 2
    canvas[top:top + size[1], left:left + size[0]] = resized.astype(np.uint8)
    return canvas, inverted


def model_input(image, config, invert: str = "auto") -> tuple[np.ndarray, bool]:
    """A Pillow image as the run's training images were stored, and whether it was inverted:
    Fashion-MNIST's 28x28 format (to_fashion_mnist) for a Fashion-MNIST run; for any other
    dataset its image_size and channels by its [data] fit rule, as its folder was decoded."""
    if config.data.dataset == "fashion-mnist":
        return to_fashion_mnist(image, invert)
    return fit_image(image, config.image_size, config.channels, config.data.fit), False


def image_input(path: str | os.PathLike, config, invert: str = "auto") -> tuple[np.ndarray, bool]:
    """The image file at `path` as the run's model input (model_input), and whether it was
    inverted; ImageError (one line naming the file) for any failure to read or convert it:
    Pillow decodes some modes that it cannot convert (LAB, La) and fails in many ways."""
    image = load_image(path)
    try:
        return model_input(image, config, invert)
    except MemoryError:
        raise ImageError(f"{path}: not enough memory to convert the image") from None
    except Exception as exc:
        raise ImageError(f"{path}: cannot convert the image from Pillow mode "
                         f"{getattr(image, 'mode', '?')} ({first_line(exc)})") from None


def predict_arrays(model: torch.nn.Module, config, images: np.ndarray,
                   tta: str | None = None) -> np.ndarray:
    """Class probabilities (N, classes) for uint8 images (N, H, W[, 3]) as the run's data
    stores them (Fashion-MNIST's (N, 28, 28)), scaled and padded as its training data was."""
    from ..training.loop import predict_logits

    mean, std = config.stats
    x = to_tensor(images, pad=config.pad, pad_value=config.data.pad_value, mean=mean, std=std)
    tta = config.train.tta if tta is None else tta
    logits = predict_logits(model, x, config.train.eval_batch_size, config.train.precision, tta)
    return torch.softmax(logits.float(), dim=1).numpy()


def predict_files(run_dir: str | os.PathLike, paths, *, checkpoint: str | None = None,
                  invert: str = "auto", tta: str | None = None,
                  device: str | None = None) -> list[Prediction]:
    """Predict each image file with a trained run's model (its final weights, or a checkpoint),
    on `device` (default: the run's own, or the CPU where that is not here).

    A file that cannot be used, for whatever reason (missing, not an image, truncated, over
    the pixel budget, a colour mode that cannot be converted), gets a Prediction with `error`
    set, one line naming it; the others are predicted all the same, in one batch.
    """
    from ..training.run import open_run

    _check_invert(invert)  # before the model loads, and whether or not any image does
    config, model, _ = open_run(run_dir, checkpoint, with_splits=False, device=device)
    results = []
    for path in paths:
        try:
            array, inverted = image_input(path, config, invert)
            results.append(Prediction(str(path), inverted=inverted, image=array,
                                      class_names=config.class_names))
        except ImageError as exc:
            results.append(Prediction(str(path), error=str(exc), class_names=config.class_names))
    usable = [r for r in results if r.error is None]
    if usable:
        probabilities = predict_arrays(model, config, np.stack([r.image for r in usable]), tta)
        for result, row in zip(usable, probabilities):
            result.probabilities = [float(p) for p in row]
    return results


def save_inputs(predictions: list[Prediction], folder: str | os.PathLike) -> list[Path]:
    """Write each predicted image's 28x28 model input as a PNG into `folder` (atomically):
    what the model saw. Names: the image's stem, with a counter where two stems collide."""
    from PIL import Image

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(fileio.describe_os_error(folder, exc)) from None
    written, used = [], set()
    for result in predictions:
        if result.image is None:
            continue
        stem, n = Path(result.path).stem or "image", 1
        name = f"{stem}.png"
        while name in used:
            n += 1
            name = f"{stem}-{n}.png"
        used.add(name)
        path = folder / name
        fileio.write_with(path, lambda tmp, a=result.image: Image.fromarray(a).save(tmp, format="PNG"))
        written.append(path)
    return written
