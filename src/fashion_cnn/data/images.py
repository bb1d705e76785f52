"""One image file in, one model-sized uint8 array out: the rule an image-folder dataset is
decoded with and the rule `predict` applies to a run trained on one, so both see the same.

    fit = "letterbox"  the longer side brought to `size`, centred on a black square (default)
    fit = "crop"       the shorter side brought to `size`, the middle square kept
    fit = "stretch"    both sides brought to `size` (the aspect ratio changes; Keras' default)

An image already `size` x `size` is kept pixel for pixel. Resampling is Lanczos.

Every image file is opened by `open_image`: a FIFO or a device is refused before it is read,
and an image larger than the pixel budget (`max_image_pixels`) is refused from its header,
before a pixel is decoded. A JPEG is decoded at a reduced scale (1/2 to 1/8, by the decoder
itself) where the size it is brought to or the budget allows, and the budget applies to the
size it is decoded at.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np

from .. import fileio
from ..errors import DataError, UserError, first_line
from ..perf import machine_memory_bytes

FITS = ("letterbox", "crop", "stretch")
# The pixel budget (width x height) of one decoded image. Images are brought to a model's
# size (28 x 28 for Fashion-MNIST), so no input needs more than a camera's usual photo (12 MP
# from a phone, 24 MP from most cameras). Decoding and converting an image takes several
# bytes per pixel, most on predict's photo path, and the budget keeps one image within the
# memory a command may take (docs/limits.md) with torch loaded; Pillow's own limit is several
# times higher and lets a small PNG take gigabytes. A JPEG is decoded at a reduced scale where
# that brings it within the budget (a full-resolution 48-61 MP phone photo at half scale);
# another format above it is refused in one line that says how to raise the budget.
DEFAULT_MAX_IMAGE_PIXELS = 24_000_000
# Where the size an image is brought to is known, a JPEG is decoded at the smallest scale that
# keeps both sides at least this many times that size, so that the Lanczos resampling after
# it still averages over several decoded pixels per output pixel.
DRAFT_FACTOR = 4
JPEG_SCALES = (1, 2, 4, 8)  # the reductions libjpeg decodes at (Pillow's Image.draft)
MAX_IMAGE_PIXELS_ENV = "FASHION_CNN_MAX_IMAGE_PIXELS"
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
        with np.errstate(invalid="ignore"):  # a signalling NaN (damaged file) warns when cast
            values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
    else:
        return image
    return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8))


def max_image_pixels() -> int:
    """The pixel budget: $FASHION_CNN_MAX_IMAGE_PIXELS where set (a whole number of pixels),
    else DEFAULT_MAX_IMAGE_PIXELS."""
    text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"{MAX_IMAGE_PIXELS_ENV}={text}: not a positive whole number of pixels "
                        f"(e.g. {MAX_IMAGE_PIXELS_ENV}=100000000 for 100 megapixels)")
    return value


def _over_budget(path: Path, pixels: str, budget: int, error: type[UserError]) -> UserError:
    return error(f"{path}: image is {pixels}, above the pixel budget of {budget / 1e6:g} "
                 f"megapixels; raise it with {MAX_IMAGE_PIXELS_ENV}=<pixels> if the file is "
                 f"trusted")


def _jpeg_scale(width: int, height: int, budget: int, size: int | None) -> int | None:
    """The reduction (JPEG_SCALES) a JPEG of width x height is decoded at: the smallest that
    brings it within the budget, or larger where `size` (the side it is brought to) leaves
    both sides at least DRAFT_FACTOR times that; None when even 1/8 is over the budget."""
    fits = [s for s in JPEG_SCALES
            if min(width // s, height // s) >= 1 and -(-width // s) * -(-height // s) <= budget]
    if not fits:
        return None
    scale = fits[0]
    if size:
        scale = max([scale] + [s for s in fits if min(width // s, height // s)
                               >= DRAFT_FACTOR * size])
    return scale


@contextlib.contextmanager
def _pillow_limit_at_least(pixels: int):
    """Pillow's own bomb limit (a process-wide setting) raised to `pixels` for the block, only
    where it is lower (a budget raised above it), and restored after; never lowered, so that
    other code's Pillow calls keep Pillow's own limit."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    if before is None or before >= pixels:
        yield
        return
    Image.MAX_IMAGE_PIXELS = pixels
    try:
        yield
    finally:
        if Image.MAX_IMAGE_PIXELS == pixels:  # unless someone else changed it meanwhile
            Image.MAX_IMAGE_PIXELS = before


def _describe(width: int, height: int) -> str:
    return f"{width}x{height} ({width * height / 1e6:.1f} megapixels)"


def _within_budget(image, path: Path, budget: int, size: int | None, draft: bool,
                   error: type[UserError]) -> None:
    """Refuse an image over the budget; a JPEG is judged at the scale it is decoded at (set
    on `image` with Pillow's draft where `draft`: the header's size then becomes that)."""
    from PIL import JpegImagePlugin

    width, height = image.size
    if width * height <= budget and not (size and draft):
        return
    scale = None
    if isinstance(image, JpegImagePlugin.JpegImageFile):
        scale = _jpeg_scale(width, height, budget, size)
    if scale is None:
        if width * height > budget:
            raise _over_budget(path, _describe(width, height), budget, error)
        return
    if draft and scale > 1:
        image.draft(image.mode, (width // scale, height // scale))
        if image.width * image.height > budget:  # the decoder declined to scale
            raise _over_budget(path, _describe(width, height), budget, error)


@contextlib.contextmanager
def _checked_image(path: Path, error: type[UserError], size: int | None = None,
                   draft: bool = False):
    """Pillow's lazily opened image of the file at `path`, within the pixel budget (checked
    from the header: nothing decoded yet; a JPEG at the scale it would be decoded at, drafted
    to it with `draft`); Pillow's errors in the block become one line."""
    from PIL import Image, UnidentifiedImageError

    budget = max_image_pixels()
    with fileio.open_regular_file(path, "an image file", error) as handle, \
            warnings.catch_warnings(), _pillow_limit_at_least(budget):
        # Pillow's warnings (its bomb warning, "Truncated File Read", "Corrupt EXIF data")
        # would print lines of their own: an image is used, or refused in one line
        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
        try:
            image = Image.open(handle)
            _within_budget(image, path, budget, size, draft, error)
            yield image
        except UserError:
            raise
        except Image.DecompressionBombError as exc:  # above twice Pillow's own limit
            count = re.search(r"\((\d+) pixels\)", str(exc))
            pixels = f"{int(count[1]) / 1e6:.1f} megapixels" if count else "too large"
            raise _over_budget(path, pixels, budget, error) from None
        except UnidentifiedImageError:
            raise error(f"{path}: not an image file Pillow can read (PNG, JPEG, WebP, ...)") \
                from None
        except Exception as exc:  # Pillow raises many kinds on truncated or corrupt data
            raise error(f"{path}: cannot decode the image ({first_line(exc)})") from None


def open_image(path: str | os.PathLike, *, upright: bool = False,
               error: type[UserError] = DataError, size: int | None = None):
    """The image file at `path`, decoded by Pillow (and turned upright by its EXIF orientation
    with `upright`). One line (`error`) names the file when it is missing, not a regular file
    (a FIFO is refused without blocking), not an image, over the pixel budget (checked from
    the header, before decoding) or cannot be decoded.

    A JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (Pillow's `Image.draft`) where that
    helps: at the smallest scale that brings it within the pixel budget, so a 48 MP photo is
    decoded at 12 MP instead of refused; and, given `size` (the side the image is brought to
    next), at the smallest scale that keeps both sides at least DRAFT_FACTOR x `size`. The
    budget applies to the size decoded, and the image returned has that size. Other formats
    are decoded at full size, within the budget.

    >>> open_image("shirt.jpg", upright=True).size                      # doctest: +SKIP
    (600, 800)
    >>> open_image("photo-8000x6000.jpg", size=28).size                 # doctest: +SKIP
    (1000, 750)
    """
    from PIL import ImageOps

    with _checked_image(Path(path), error, size, draft=True) as image:
        image.load()  # decode now, while the file is open: a truncated file fails here
        return ImageOps.exif_transpose(image) if upright else image


def image_header(path: str | os.PathLike, error: type[UserError] = DataError) -> tuple:
    """(width, height, mode) of the image file at `path`, from its header alone (a JPEG's full
    size, whatever scale open_image would decode it at); the same refusals as open_image
    except for damage past the header."""
    with _checked_image(Path(path), error) as image:
        return image.width, image.height, image.mode


def _image_bytes(count: int, size: int, channels: int) -> tuple[int, str]:
    """Bytes (uint8) of `count` images of size x size (x 3 for channels=3), and those words."""
    need = math.prod((count, size, size, 3 if channels == 3 else 1))  # exact: no wrap-around
    return need, f"{count:,} images of {size}x{size}{'x3' if channels == 3 else ''}"


def check_image_memory(count: int, size: int, channels: int) -> None:
    """Refuse, before anything is allocated, `count` images of size x size (x 3 for
    channels=3) that would not fit in this machine's memory (its container's limit where
    lower): one line naming data.image_size.

    >>> check_image_memory(70000, 4096, 1)                              # doctest: +SKIP
    DataError: data.image_size=4096: 70,000 images of 4096x4096 take 1,093.8 GiB, ...
    """
    need, what = _image_bytes(count, size, channels)
    memory = machine_memory_bytes()
    if memory and need > memory:
        raise DataError(f"data.image_size={size}: {what} take {need / 2**30:,.1f} GiB, more "
                        f"than this machine's memory ({memory / 2**30:,.1f} GiB); choose a "
                        f"smaller data.image_size", setting="data.image_size")


def image_array(count: int, size: int, channels: int) -> np.ndarray:
    """An uninitialised uint8 array (count, size, size[, 3]) for images brought to `size`,
    after check_image_memory; one line naming data.image_size where the allocation fails
    (under a process memory limit: ulimit -v, a container's)."""
    check_image_memory(count, size, channels)
    try:
        return np.empty((count, size, size) + ((3,) if channels == 3 else ()), np.uint8)
    except MemoryError:
        need, what = _image_bytes(count, size, channels)
        raise DataError(f"data.image_size={size}: {what} take {need / 2**30:,.1f} GiB, more "
                        f"memory than this process may take; choose a smaller "
                        f"data.image_size", setting="data.image_size") from None


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
    out = image_array(len(images), size, channels)
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
    from PIL import Image

    root = Path(root)
    base = root / split if split else root
    folders = [str(name).replace("/", "-") for name in class_names]
    for folder in folders:
        (base / folder).mkdir(parents=True, exist_ok=True)
    options = {"quality": quality} if fmt.lower() in ("jpg", "jpeg") else {}
    kind = Image.registered_extensions().get("." + fmt.lower())
    if kind is None:
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
