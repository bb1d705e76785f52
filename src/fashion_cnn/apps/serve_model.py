"""The model behind `fashion-cnn serve`: a run loaded once, uploaded image files predicted
(and explained with Grad-CAM) one batch at a time behind a lock, answers as JSON-ready dicts.

Each file is read by predict's own path (apps.predict.image_input: special files refused, the
pixel budget checked from the header before decoding); a server's lower pixel limit is checked
from the header too. Messages name the upload by its client's name, never by the temporary
path it was written to.
"""

import base64
import io
import os
import threading
import time

import numpy as np

from ..errors import UserError
from .predict import ImageError, Prediction, image_input, predict_arrays
from .uploads import STATUS_UNPROCESSABLE, Upload

# A run's figure is a PNG of a few hundred KiB; a larger file is not one this package wrote.
FIGURE_LIMIT = 32 << 20  # bytes


def default_threads() -> int:
    """Torch threads for serving: half the usable cores, 1 to 4. The model runs one batch at a
    time (a lock); the other cores decode uploads and run the event loop, and a batch of at
    most a few dozen 28x28 images gains little from more threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, (cores or 1) // 2))


def png_data_url(image: np.ndarray) -> str:
    """A uint8 (H, W) or (H, W, 3) array as a data:image/png;base64 URL."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Busy(Exception):
    """The request's time ran out before the model was free (or while it was being served)."""


class ServedModel:
    """A run loaded once to be served: its description, its figures, and predictions with
    Grad-CAM overlays of uploaded files, one batch at a time behind a lock.

    >>> served = ServedModel("runs/fast", max_pixels=None)                  # doctest: +SKIP
    >>> served.predict([Upload(0, "shirt.jpg", Path("/tmp/x/upload-000"))], top_k=3,
    ...                explain=True, invert="auto", deadline=time.monotonic() + 30)  # doctest: +SKIP
    """

    def __init__(self, run_dir, checkpoint: str | None = None, device: str | None = None, *,
                 max_pixels: int | None = None, threads: int | None = None):
        import torch

        from ..data.images import max_image_pixels
        from ..training.loop import module_device
        from ..training.rundir import RunDir
        from ..training.reload import open_run
        from ..training.run import run_name

        self.run = RunDir(run_dir)
        budget = max_image_pixels()
        if max_pixels is not None and max_pixels > budget:
            raise UserError(f"max_pixels={max_pixels}: above the image pixel budget of "
                            f"{budget} (raise that with FASHION_CNN_MAX_IMAGE_PIXELS)",
                            setting="max_pixels")
        self.max_pixels = max_pixels or budget
        self.config, self.model, _ = open_run(run_dir, checkpoint, with_splits=False,
                                              device=device)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise UserError(f"threads={threads!r}: must be a whole number of at least 1",
                            setting="threads")
        self.threads = threads or default_threads()
        torch.set_num_threads(self.threads)
        self.lock = threading.Lock()
        self._explained = None  # the model Grad-CAM differentiates, made on first use
        try:
            metrics = self.run.read_metrics()
        except UserError:  # an unfinished run, or metrics.json unreadable: no accuracy shown
            metrics = {}
        accuracy = metrics.get("test_accuracy")
        cfg = self.config
        self.info = {
            "run": self.run.path.resolve().name, "name": run_name(cfg),
            "classes": list(cfg.class_names),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "test_accuracy": accuracy if isinstance(accuracy, (int, float)) else None,
            "input_shape": [cfg.image_size, cfg.image_size, cfg.channels],
            "model_input_shape": [cfg.channels, cfg.image_size + 2 * cfg.pad,
                                  cfg.image_size + 2 * cfg.pad],
            "dataset": cfg.data.dataset, "checkpoint": checkpoint,
            "device": str(module_device(self.model)),
            "explain": self._has_conv(),
        }

    def _has_conv(self) -> bool:
        from ..analysis.explain import conv_layers

        return bool(conv_layers(self.model))

    def figures(self) -> list[str]:
        """The run's figures that exist, in analysis.plots' order."""
        from ..analysis.plots import RUN_FIGURES

        return [name for name in RUN_FIGURES if self.run.plot(name).is_file()]

    def figure(self, name: str) -> bytes | None:
        """The PNG bytes of the run's figure `name` (one of RUN_FIGURES), None where the name is
        not one of them or the run has no such file."""
        from ..analysis.plots import RUN_FIGURES
        from ..training.rundir import read_limited

        if name not in RUN_FIGURES or not name.endswith(".png"):
            return None
        path = self.run.plot(name)
        if not path.is_file():
            return None
        return read_limited(path, "a run's figure", FIGURE_LIMIT)

    # ------------------------------------------------------------------ prediction
    def _read(self, upload: Upload, invert: str) -> tuple[np.ndarray, bool]:
        """The upload as the model's input; ImageError naming the upload (never the temporary
        path it was written to)."""
        from ..data.images import image_header

        path = upload.path
        try:
            width, height, _ = image_header(path, error=ImageError)
            if width * height > self.max_pixels:
                raise ImageError(f"{path}: image is {width}x{height} "
                                 f"({width * height / 1e6:.1f} megapixels), above this "
                                 f"server's limit of {self.max_pixels / 1e6:g} megapixels")
            return image_input(path, self.config, invert)
        except ImageError as exc:
            raise ImageError(str(exc).replace(str(path), upload.name)) from None

    def _hold_model(self, deadline: float) -> None:
        if not self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Busy

    def predict(self, uploads: list[Upload], top_k: int, explain: bool, invert: str,
                deadline: float) -> list[dict]:
        """One dict per upload, in order: the prediction (Prediction.to_dict with its `name`,
        the model input as a PNG data URL and, with `explain`, the Grad-CAM overlay), or
        `error` and `status`. Busy where the deadline passes first."""
        results: list[dict] = []
        usable: list[tuple[int, Prediction]] = []
        for upload in uploads:
            if upload.error is None:
                if time.monotonic() > deadline:
                    raise Busy
                try:
                    array, inverted = self._read(upload, invert)
                    usable.append((len(results), Prediction(upload.name, inverted=inverted,
                                                             image=array,
                                                             class_names=self.config.class_names)))
                    results.append({})
                    continue
                except ImageError as exc:
                    upload.error, upload.status = str(exc), STATUS_UNPROCESSABLE
            results.append({"name": upload.name, "error": upload.error,
                            "status": upload.status})
        if not usable:
            return results
        images = np.stack([p.image for _, p in usable])
        self._hold_model(deadline)
        try:
            probabilities = predict_arrays(self.model, self.config, images)
            overlays = self._explain(images, probabilities.argmax(1)) if explain else None
        finally:
            self.lock.release()
        for n, (slot, prediction) in enumerate(usable):
            prediction.probabilities = [float(p) for p in probabilities[n]]
            details = prediction.to_dict(top_k)
            out = {"name": details.pop("path"), **details}
            out["input"] = png_data_url(prediction.image)
            if overlays is not None:
                out["heatmap"] = png_data_url(overlays[n])
            results[slot] = out
        return results

    def _explain(self, images: np.ndarray, classes: np.ndarray) -> list[np.ndarray]:
        """Grad-CAM overlays (H, W, 3) uint8 of `classes` (N,) (the top class shown) on each
        image (N, H, W[, C]) as the run stores it; the model's padding is cut off the heatmap."""
        from ..analysis.explain import explained_copy, gradcam, overlay_heatmap
        from .predict import input_tensor

        if self._explained is None:
            # gradients go through the plain model; Grad-CAM would copy an accelerated one on
            # every call, so the copy is made once, here
            self._explained = explained_copy(self.model)
        pad = self.config.pad
        x = input_tensor(self.config, images)
        maps = gradcam(self._explained, x, target=classes)  # (N, H+2p, W+2p) in [0, 1]
        size = images.shape[1]
        maps = maps[:, pad:pad + size, pad:pad + size].detach().float().cpu().numpy()
        return [overlay_heatmap(image, heatmap) for image, heatmap in zip(images, maps)]
