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
from typing import NamedTuple

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


class Placement(NamedTuple):
    """Where a model input came from: the box of the photo (left, top, right, bottom, in the
    decoded, upright photo's pixels) that was resized into `input_box` of the model input
    (the same, in its pixels); the rest of the input is padding. Explanations use it to draw
    a heatmap of the input back onto the photo."""

    photo_box: tuple[float, float, float, float]
    input_box: tuple[float, float, float, float]


def to_fashion_mnist(image, invert: str = "auto") -> tuple[np.ndarray, bool]:
    """A Pillow image as Fashion-MNIST's (28, 28) uint8 format, and whether it was inverted.

    invert: "auto" negates the image when its border is light (median above 127: a garment
    photographed on a light background), "yes" always, "no" never. A 28x28 image is otherwise
    kept pixel for pixel. A larger or smaller one is trimmed to the pixels brighter than its
    background by TRIM_THRESHOLD, its background brought to black, its longer side resized to
    28 (Lanczos), its brightest pixel stretched to 255 and centred on a black 28x28 canvas.
    """
    canvas, inverted, _ = _fashion_mnist(image, invert)
    return canvas, inverted


def _fashion_mnist(image, invert: str) -> tuple[np.ndarray, bool, Placement]:
    """to_fashion_mnist, and the Placement of its trimmed box on the canvas."""
    from PIL import Image

    _check_invert(invert)
    gray = _grayscale(image)
    inverted = invert == "yes" or (invert == "auto" and float(np.median(_border(gray))) > 127)
    if inverted:
        gray = 255 - gray
    whole = (0.0, 0.0, float(gray.shape[1]), float(gray.shape[0]))
    if gray.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return np.ascontiguousarray(gray), inverted, Placement(whole, whole)
    background = float(np.median(_border(gray)))
    rows, cols = np.nonzero(gray.astype(np.int16) > background + TRIM_THRESHOLD)
    box = whole
    if len(rows):
        gray = gray[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
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
    placed = (float(left), float(top), float(left + size[0]), float(top + size[1]))
    return canvas, inverted, Placement(box, placed)


def _fit_placement(width: int, height: int, size: int, fit: str) -> Placement:
    """The Placement of data.images.fit_image's resize (the same arithmetic)."""
    whole = (0.0, 0.0, float(width), float(height))
    if (width, height) == (size, size) or fit == "stretch":
        return Placement(whole, (0.0, 0.0, float(size), float(size)))
    if fit == "crop":  # the middle square of the resized image
        scale = size / min(width, height)
        rw, rh = max(size, round(width * scale)), max(size, round(height * scale))
        left, top = (rw - size) // 2, (rh - size) // 2
        sx, sy = width / rw, height / rh
        return Placement((left * sx, top * sy, (left + size) * sx, (top + size) * sy),
                         (0.0, 0.0, float(size), float(size)))
    scale = size / max(width, height)  # letterbox: the whole image, centred
    rw, rh = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (size - rw + 1) // 2, (size - rh + 1) // 2
    return Placement(whole, (float(left), float(top), float(left + rw), float(top + rh)))


def model_input(image, config, invert: str = "auto") -> tuple[np.ndarray, bool]:
    """A Pillow image as the run's training images were stored, and whether it was inverted:
    Fashion-MNIST's 28x28 format (to_fashion_mnist) for a Fashion-MNIST run; for any other
    dataset its image_size and channels by its [data] fit rule, as its folder was decoded."""
    array, inverted, _ = _placed_input(image, config, invert)
    return array, inverted


def _placed_input(image, config, invert: str) -> tuple[np.ndarray, bool, Placement]:
    """model_input, and where in the image the input came from."""
    if config.data.dataset == "fashion-mnist":
        return _fashion_mnist(image, invert)
    array = fit_image(image, config.image_size, config.channels, config.data.fit)
    return array, False, _fit_placement(image.width, image.height, config.image_size,
                                        config.data.fit)


def image_input(path: str | os.PathLike, config, invert: str = "auto") -> tuple[np.ndarray, bool]:
    """The image file at `path` as the run's model input (model_input), and whether it was
    inverted; ImageError (one line naming the file) for any failure to read or convert it:
    Pillow decodes some modes that it cannot convert (LAB, La) and fails in many ways."""
    array, inverted, _ = _convert(load_image(path), path, config, invert)
    return array, inverted


def _convert(image, path, config, invert: str) -> tuple[np.ndarray, bool, Placement]:
    """_placed_input of a loaded image; any failure an ImageError naming the file."""
    try:
        return _placed_input(image, config, invert)
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

    x = input_tensor(config, images)
    tta = config.train.tta if tta is None else tta
    logits = predict_logits(model, x, config.train.eval_batch_size, config.train.precision, tta)
    return torch.softmax(logits.float(), dim=1).numpy()


def input_tensor(config, images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W[, 3]) as the run's model sees them: float32 (N, C, H + 2 pad,
    W + 2 pad), scaled and padded as its training data was."""
    mean, std = config.stats
    return to_tensor(images, pad=config.pad, pad_value=config.data.pad_value, mean=mean, std=std)


def predict_files(run_dir: str | os.PathLike, paths, *, checkpoint: str | None = None,
                  invert: str = "auto", tta: str | None = None,
                  device: str | None = None) -> list[Prediction]:
    """Predict each image file with a trained run's model (its final weights, or a checkpoint),
    on `device` (default: the run's own, or the CPU where that is not here).

    A file that cannot be used, for whatever reason (missing, not an image, truncated, over
    the pixel budget, a colour mode that cannot be converted), gets a Prediction with `error`
    set, one line naming it; the others are predicted all the same, in one batch.
    """
    from ..training.reload import open_run

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


def _make_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(fileio.describe_os_error(folder, exc)) from None
    return folder


def _unique_stems(paths) -> list[str]:
    """A file name stem for each path: its own, with a counter ("shirt-2") where two
    collide, so that no output overwrites another."""
    stems, used = [], set()
    for path in paths:
        stem, n = Path(path).stem or "image", 1
        name = stem
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        stems.append(name)
    return stems


def _write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    fileio.write_with(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
    return path


def save_inputs(predictions: list[Prediction], folder: str | os.PathLike) -> list[Path]:
    """Write each predicted image's 28x28 model input as a PNG into `folder` (atomically):
    what the model saw. Names: the image's stem, with a counter where two stems collide."""
    folder = _make_folder(folder)
    kept = [result for result in predictions if result.image is not None]
    return [_write_png(folder / f"{stem}.png", result.image)
            for result, stem in zip(kept, _unique_stems(r.path for r in kept))]


INPUT_SCALE = 8          # the model input drawn 8x (nearest): 28x28 becomes 224x224
PHOTO_SIDES = (224, 1024)  # the photo's longer side drawn within these pixels


@dataclass
class Explanation:
    """One image's explanation files, or why it has none."""

    path: str
    files: list[Path] = field(default_factory=list)  # <stem>-input.png, <stem>-photo.png
    prediction: str | None = None  # the class explained: the predicted one
    probability: float | None = None
    method: str = ""               # "Grad-CAM of conv2d_2" or "SmoothGrad saliency (...)"
    error: str | None = None


def _photo_rgb(image) -> np.ndarray:
    """The decoded photo as (H, W, 3) uint8 to draw on, its longer side brought within
    PHOTO_SIDES (an integer factor up, nearest, so small images stay sharp; Lanczos down);
    transparent parts white, as _grayscale counts them."""
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":
        image = eight_bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    longest = max(image.size)
    if longest < PHOTO_SIDES[0]:
        factor = -(-PHOTO_SIDES[0] // longest)
        image = image.resize((image.width * factor, image.height * factor),
                             Image.Resampling.NEAREST)
    elif longest > PHOTO_SIDES[1]:
        scale = PHOTO_SIDES[1] / longest
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def _photo_overlay(photo: np.ndarray, heat: np.ndarray, placement: Placement,
                   photo_size: tuple[int, int]) -> np.ndarray:
    """The input's heatmap (h, w) drawn back onto the photo as shown (H, W, 3): the part of
    the input that came from the photo (placement.input_box) resized (bilinear) onto the box
    it came from; the rest of the photo (the background trimmed away, or cropped off) as it
    is, since the model never saw it."""
    from PIL import Image

    from ..analysis.explain import overlay_heatmap

    height, width = photo.shape[:2]
    sx, sy = width / photo_size[0], height / photo_size[1]
    left, top, right, bottom = placement.photo_box
    x0, y0 = max(0, round(left * sx)), max(0, round(top * sy))
    x1, y1 = min(width, round(right * sx)), min(height, round(bottom * sy))
    out = photo.copy()
    if x1 > x0 and y1 > y0:
        part = Image.fromarray(heat.astype(np.float32), mode="F").resize(
            (x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=placement.input_box)
        out[y0:y1, x0:x1] = overlay_heatmap(photo[y0:y1, x0:x1], np.asarray(part))
    return out


def explain_files(run_dir: str | os.PathLike, paths, out_dir: str | os.PathLike, *,
                  checkpoint: str | None = None, invert: str = "auto", layer: int | None = None,
                  device: str | None = None, tta: str | None = None) -> list[Explanation]:
    """Explain the run's prediction for each image file: write two PNGs into `out_dir`
    (atomically), named by the image's stem (with a counter where two collide):

    - `<stem>-input.png`: the model input it saw, drawn 8x (nearest), the heatmap over it;
    - `<stem>-photo.png`: the heatmap drawn back onto the original photo (upright, its longer
      side within 224-1024 px): through to_fashion_mnist's trim, resize and centring for a
      Fashion-MNIST run, through the [data] fit rule for another; the parts of the photo the
      model never saw (the background trimmed away, the sides a crop cut off) left as they
      are.

    The heatmap is Grad-CAM of the last Conv2D layer (or `layer`: an index among them), for
    the predicted class (with the run's test-time augmentation, or `tta`); SmoothGrad
    saliency for a model without a Conv2D (where `layer` is refused). A file that cannot be
    used gets an Explanation with `error` set, one line naming it; the others are explained
    all the same. Model and checkpoint as predict_files.

    >>> [e.files for e in explain_files("runs/fast", ["shirt.jpg"], "why")]   # doctest: +SKIP
    [[PosixPath('why/shirt-input.png'), PosixPath('why/shirt-photo.png')]]
    """
    from ..analysis.explain import conv_layer, explain_maps, overlay_heatmap
    from ..training.reload import open_run

    _check_invert(invert)
    config, model, _ = open_run(run_dir, checkpoint, with_splits=False, device=device)
    if layer is not None:
        conv_layer(model, layer)  # refused before any image is read
    results, inputs = [], []
    for path in paths:
        try:
            image = load_image(path)
            array, inverted, placement = _convert(image, path, config, invert)
            try:
                photo = _photo_rgb(image)
            except Exception as exc:  # Pillow's conversions fail in many ways
                raise ImageError(f"{path}: cannot convert the image to RGB ({first_line(exc)})") \
                    from None
            results.append(Explanation(str(path)))
            inputs.append((array, placement, photo, image.size))
        except ImageError as exc:
            results.append(Explanation(str(path), error=str(exc)))
    usable = [r for r in results if r.error is None]
    if not usable:
        return results
    images = np.stack([a for a, _, _, _ in inputs])
    probabilities = predict_arrays(model, config, images, tta)
    predicted = probabilities.argmax(1)
    maps, method = explain_maps(model, input_tensor(config, images),
                                torch.as_tensor(predicted), layer)
    pad, size = config.pad, images.shape[1]
    maps = maps[:, pad:pad + size, pad:pad + size].numpy()  # (N, size, size): the padding off
    folder = _make_folder(out_dir)
    stems = _unique_stems(r.path for r in usable)
    for k, (result, stem) in enumerate(zip(usable, stems)):
        array, placement, photo, photo_size = inputs[k]
        result.prediction = config.class_names[int(predicted[k])]
        result.probability = float(probabilities[k, predicted[k]])
        result.method = method
        big = np.repeat(np.repeat(array, INPUT_SCALE, axis=0), INPUT_SCALE, axis=1)
        result.files = [_write_png(folder / f"{stem}-input.png", overlay_heatmap(big, maps[k])),
                        _write_png(folder / f"{stem}-photo.png",
                                   _photo_overlay(photo, maps[k], placement, photo_size))]
    return results
