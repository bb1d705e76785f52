"""Export a trained run to ONNX, for inference without this package or PyTorch.

The exported graph takes the images as the run's dataset stores them and does the rest itself:

    input  "pixels"         uint8 (N, H, W) for grayscale data (Fashion-MNIST: (N, 28, 28)),
                            (N, H, W, 3) for colour; 0 = dark, 255 = brightest (any batch size)
    output "logits"         float32 (N, classes), in the run's class order
    output "probabilities"  float32 (N, classes), their softmax (what Keras' model.predict returns)

inside: the run's scaling (the seed's pixels / 128 - 0.5, or its per-channel mean and std),
its padding, then the network in inference mode (Dropout off, BatchNorm with its running
statistics), in float32. The file's metadata names the classes (`class_names`, a JSON list)
and the input (`image_size`, `channels`, `dataset`). It is written
with torch.onnx's exporter (torch.export, ONNX opset 18) into one self-contained file, and then
checked: onnxruntime runs it on a batch of images and must give PyTorch's probabilities.
Photos need `fashion_cnn.predict.to_fashion_mnist` (or the same steps) first.

>>> from fashion_cnn.export import export_onnx
>>> result = export_onnx("runs/fast-20261130-101500")            # doctest: +SKIP
>>> result.path, result.max_difference                            # doctest: +SKIP
(PosixPath('runs/fast-20261130-101500/model.onnx'), 2.4e-07)
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import fileio
from ..errors import UserError, first_line, require_module
from ..training.rundir import RunDir

OPSET = 18
# The check passes when onnxruntime's probabilities are within this of PyTorch's (float32
# arithmetic in another order: differences of about 1e-7 are usual).
CHECK_TOLERANCE = 1e-4
CHECK_IMAGES = 64
INSTALL_HINT = "pip install 'fashion-cnn[export]' (onnx, onnxscript, onnxruntime)"


@dataclass
class ExportResult:
    path: Path
    size_bytes: int
    max_difference: float | None  # onnxruntime vs PyTorch, max |probability difference|
    checked_images: int
    onnxruntime_version: str | None
    pixels_shape: tuple = ("N", 28, 28)  # the "pixels" input, N = any batch size
    num_classes: int = 10


class PixelsToProbabilities(torch.nn.Module):
    """uint8 pixels (N, H, W) or (N, H, W, 3) -> (logits, probabilities), with the run's
    scaling (as data.to_tensor: x/128 - 0.5, or (x/255 - mean)/std) and padding."""

    def __init__(self, model: torch.nn.Module, pad: int, pad_value: float, mean=None, std=None):
        super().__init__()
        self.model, self.pad, self.pad_value = model, pad, pad_value
        self.by_stats = mean is not None
        self.register_buffer("mean", torch.tensor(mean or [0.0]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std or [1.0]).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor):
        x = pixels.float()
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
        x = x.div(255.0).sub(self.mean).div(self.std) if self.by_stats else x.div(128.0).sub(0.5)
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, value=self.pad_value)
        logits = self.model(x)
        return logits, torch.softmax(logits, dim=1)


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                checkpoint: str | None = None, check: bool = True) -> ExportResult:
    """Write the run's model (final weights, or a checkpoint's) as ONNX to `out` (default
    RUN_DIR/model.onnx), atomically; with `check`, compare onnxruntime's output with
    PyTorch's on CHECK_IMAGES images and raise if they differ by more than CHECK_TOLERANCE."""
    from ..training.reload import load_model

    require_module("onnxscript", "export", INSTALL_HINT)
    if check:
        require_module("onnxruntime", "export", INSTALL_HINT)
    path = Path(out) if out is not None else Path(run_dir) / "model.onnx"
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name such as {path / 'model.onnx'}")
    if any(path.resolve() == own.resolve() for own in RunDir(run_dir).own_files()):
        raise UserError(f"{path}: is one of the run's own files, which the export would "
                        f"replace; give another name, such as {Path(run_dir) / 'model.onnx'}",
                        setting="out")
    # the plain model on the CPU: the C kernels are opaque to the exporter
    config, model = load_model(run_dir, checkpoint, device="cpu", cpu_kernels=False)
    mean, std = config.stats
    wrapper = PixelsToProbabilities(model, config.pad, config.data.pad_value, mean, std).eval()
    example = torch.zeros(pixel_shape(config, 2), dtype=torch.uint8)

    checked: dict = {}

    def write(tmp: Path) -> None:
        # the exporter reports its progress on stdout, and warns and logs about its own
        # internals (deprecations, torchvision's ops it skips)
        logger = logging.getLogger("torch.onnx")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapper, (example,), str(tmp), input_names=["pixels"],
                                  output_names=["logits", "probabilities"], opset_version=OPSET,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},),
                                  external_data=False, verbose=False, dynamo=True)
        finally:
            logger.setLevel(level)
        _add_metadata(tmp, config)
        if check:  # before the rename: a file that fails it never takes `path`'s place
            checked["result"] = check_onnx(tmp, wrapper, name=path,
                                           shape=pixel_shape(config, CHECK_IMAGES))

    try:
        fileio.write_with(path, write)
    except UserError:
        raise
    except Exception as exc:  # the exporter's own failures: say what, in one line
        raise UserError(f"{path}: the ONNX export failed ({type(exc).__name__}: "
                        f"{first_line(exc)})") from None
    result = ExportResult(path, path.stat().st_size, None, 0, None,
                          ("N",) + pixel_shape(config, 1)[1:], len(config.class_names))
    if check:
        result.max_difference, result.checked_images, result.onnxruntime_version = \
            checked["result"]
    return result


def pixel_shape(config, n: int) -> tuple[int, ...]:
    """The "pixels" input's shape for n images of the run's data: (n, H, W) or (n, H, W, 3)."""
    size, channels = config.image_size, config.channels
    return (n, size, size) if channels == 1 else (n, size, size, channels)


def _add_metadata(path: Path, config) -> None:
    """The class names and the expected input, in the ONNX file's metadata_props."""
    import json

    import onnx

    graph = onnx.load(str(path))
    for key, value in {"class_names": json.dumps(config.class_names),
                       "dataset": config.data.dataset, "image_size": str(config.image_size),
                       "channels": str(config.channels),
                       "normalize": config.data.normalize}.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))


def check_onnx(path: str | os.PathLike, wrapper: torch.nn.Module, images: int = CHECK_IMAGES,
               name: str | os.PathLike | None = None,
               shape: tuple[int, ...] | None = None) -> tuple[float, int, str]:
    """Run the ONNX file in onnxruntime on `images` pixel images (random, and an all-black one)
    and compare its probabilities with `wrapper`'s; (max |difference|, images, ort version).
    `name`: the file's name in error messages (default `path`)."""
    name = path if name is None else name
    ort = require_module("onnxruntime", "export", INSTALL_HINT)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, shape or (images, 28, 28), dtype=torch.uint8,
                           generator=generator)
    pixels[0] = 0  # an empty image: the background alone
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(["logits", "probabilities"], {"pixels": pixels.numpy()})
    with torch.inference_mode():
        expected = wrapper(pixels)[1].numpy()
    if logits.shape != (images, expected.shape[1]):
        raise UserError(f"{name}: onnxruntime returned logits of shape {logits.shape}, "
                        f"expected {(images, expected.shape[1])}")
    difference = float(np.abs(probabilities - expected).max())
    if not difference <= CHECK_TOLERANCE:
        raise UserError(f"{name}: onnxruntime's probabilities differ from PyTorch's by "
                        f"{difference:.2e} (more than {CHECK_TOLERANCE:g}); nothing written")
    return difference, images, ort.__version__
