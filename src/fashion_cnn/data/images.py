"""One image file in, one model-sized uint8 array out: the rule an image-folder dataset is
decoded with and the rule `predict` applies to a run trained on one, so both see the same.

    fit = "letterbox"  the longer side brought to `size`, centred on a black square (default)
    fit = "crop"       the shorter side brought to `size`, the middle square kept
    fit = "stretch"    both sides brought to `size` (the aspect ratio changes; Keras' default)

An image already `size` x `size` is kept pixel for pixel. Resampling is Lanczos.
"""

from __future__ import annotations

import numpy as np

FITS = ("letterbox", "crop", "stretch")
# Pillow modes that hold one channel: such images load as (H, W), the rest as (H, W, 3).
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def is_gray(mode: str) -> bool:
    return mode in GRAY_MODES


def eight_bit(image):
    """Pillow's 16-bit and float grayscale modes as 8-bit L, where convert("L") would clip:
    16-bit values (above 255) divided by 257; floats taken as 0..1 where they fit, else
    0..255. Other modes pass unchanged."""
    from PIL import Image

    if image.mode.startswith("I"):  # 16-bit grayscale (PNG, TIFF)
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0.0) > 255:  # else 8-bit values kept in a wider mode
            values = values / 257.0
    elif image.mode == "F":  # float grayscale (TIFF)
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
    else:
        return image
    return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8))


def fit_image(image, size: int, channels: int, fit: str = "letterbox") -> np.ndarray:
    """A Pillow image as uint8 (size, size) for channels=1 or (size, size, 3) for channels=3."""
    from PIL import Image

    image = eight_bit(image).convert("L" if channels == 1 else "RGB")
    width, height = image.size
    if (width, height) != (size, size):
        lanczos = Image.Resampling.LANCZOS
        if fit == "stretch":
            image = image.resize((size, size), lanczos)
        elif fit == "crop":
            scale = size / min(width, height)
            resized = image.resize((max(size, round(width * scale)),
                                    max(size, round(height * scale))), lanczos)
            left, top = (resized.width - size) // 2, (resized.height - size) // 2
            image = resized.crop((left, top, left + size, top + size))
        else:
            scale = size / max(width, height)
            resized = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                   lanczos)
            canvas = Image.new(image.mode, (size, size), 0)
            # an odd margin puts its extra pixel at the top / left, as predict's 28x28 canvas
            canvas.paste(resized, ((size - resized.width + 1) // 2,
                                   (size - resized.height + 1) // 2))
            image = canvas
    return np.asarray(image, dtype=np.uint8)


def conform(images: np.ndarray, size: int, channels: int, fit: str) -> np.ndarray:
    """Arrays of images (N, H, W[, C]) brought to `size` and `channels` by fit_image's rules;
    returned unchanged (not copied) when they already are."""
    from PIL import Image

    have = 1 if images.ndim == 3 else images.shape[3]
    if images.ndim == 4 and have == 1:
        images, have = images[..., 0], 1
    if images.shape[1:3] == (size, size) and have == channels:
        return images
    out = np.empty((len(images), size, size) + ((3,) if channels == 3 else ()), np.uint8)
    for i, image in enumerate(images):
        out[i] = fit_image(Image.fromarray(image), size, channels, fit)
    return out


def write_image_folder(root, images: np.ndarray, labels: np.ndarray, class_names, *,
                       split: str | None = None, fmt: str = "png", start: int = 0,
                       quality: int = 95):
    """Write images (N, H, W) or (N, H, W, 3) uint8 as an image-folder dataset:
    ROOT[/split]/<class name>/<number>.<fmt>, numbered from `start` in array order with five
    digits (so the files' names keep the arrays' order). "/" in a class name becomes "-".
    JPEG files are written at `quality`. Returns the root as a Path."""
    import os
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    base = root / split if split else root
    folders = [str(name).replace("/", "-") for name in class_names]
    for folder in folders:
        (base / folder).mkdir(parents=True, exist_ok=True)
    options = {"quality": quality} if fmt.lower() in ("jpg", "jpeg") else {}
    kind = Image.registered_extensions().get("." + fmt.lower())
    if kind is None:
        from ..errors import UserError

        raise UserError(f"fmt {fmt!r}: not an image format Pillow writes (png, jpg, webp, ...)",
                        setting="fmt")
    for offset, (image, label) in enumerate(zip(images, labels)):
        path = base / folders[int(label)] / f"{start + offset:05d}.{fmt}"
        # renamed into place (a reader never sees half a file) but not fsynced one by one:
        # thousands of small files, and a crash leaves at worst files that a load skips
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(image).save(tmp, format=kind, **options)
        os.replace(tmp, path)
    return root
