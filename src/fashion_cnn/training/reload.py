"""Finished runs reloaded: the model with its final weights or a checkpoint's (load_model),
with its data (open_run), evaluated on the test set (evaluate_run), on the run's own device or
any other here.

>>> config, model = load_model("runs/demo")                       # doctest: +SKIP
>>> evaluate_run("runs/demo")["test_accuracy"]                    # doctest: +SKIP
0.86
"""

from __future__ import annotations

import os
import sys
import time

import torch

from .. import devices
from ..data.arrays import ImageData, Splits
from ..errors import UserError
from ..models.build import build_model
from ..models.spec import check_memory
from ..perf import configure_runtime
from .checkpoint import checkpoint_weights, load_weights, verify_run_weights
from .config import RunConfig
from .loop import evaluate, module_device, prepare_model
from .rundir import RunDir
from .run import model_for_run, splits_for


def reload_device(cfg: RunConfig, device: str | torch.device | None = None) -> torch.device:
    """Where a reloaded run computes (evaluate, predict, plots): `device` if given (it must be
    here), else the run's train.device; a run trained on a device this machine lacks is
    computed on the CPU (weights are saved device-independent), with a notice."""
    if device is not None:
        return devices.resolve_device(device, setting="device")
    try:
        return devices.resolve_device(cfg.train.device)
    except UserError as exc:
        print(f"note: computing on the CPU: {exc}", file=sys.stderr)
        return torch.device("cpu")


def load_model(run_dir: str | os.PathLike, checkpoint: str | None = None, *,
               model: torch.nn.Module | None = None, device: str | torch.device | None = None,
               cpu_kernels: bool | None = None) -> tuple[RunConfig, torch.nn.Module]:
    """The run's config and model with its final weights (or a named checkpoint's), in eval
    mode on `device` (default: the run's own, or the CPU where that is not here: see
    reload_device). Weights load as with torch.load's map_location: saved from any device,
    onto this one. On the CPU the model gets the CPU pass unless `cpu_kernels` is False (the
    run's train.cpu_kernels by default).

    A run of a plain PyTorch module needs `model`, a new instance of it: the weights are
    loaded into it (in place) and it is returned in eval mode.
    """
    run_dir = RunDir(run_dir)
    cfg = run_dir.read_config()
    model = model_for_run(cfg, model, run_dir)
    if model is None:
        check_memory(cfg.model, eval_batch_size=cfg.train.eval_batch_size, training=False)
        model = build_model(cfg.model)
    if checkpoint:
        directory = run_dir.find_checkpoint(str(checkpoint), cfg.checkpoint.filename)
        path = checkpoint_weights(directory)  # checksums verified first
    else:
        path = verify_run_weights(run_dir)
    load_weights(model, path)  # refuses non-finite weights
    kernels_on = cfg.train.cpu_kernels if cpu_kernels is None else cpu_kernels
    prepare_model(model, reload_device(cfg, device), kernels_on)
    model.eval()
    return cfg, model


def open_run(run_dir: str | os.PathLike, checkpoint: str | None = None,
             data: ImageData | None = None, *, with_splits: bool = True,
             model: torch.nn.Module | None = None, device: str | torch.device | None = None
             ) -> tuple[RunConfig, torch.nn.Module, Splits | None]:
    """A run reloaded to be used: its config, its model (load_model; `model` and `device` as
    there), this process set to the run's thread count, and its splits (None with
    with_splits=False; on the CPU: evaluation moves each batch to the model)."""
    cfg, model = load_model(run_dir, checkpoint, model=model, device=device)
    configure_runtime(cfg.train.threads)
    return cfg, model, splits_for(cfg, data) if with_splits else None


def evaluate_run(run_dir: str | os.PathLike, data: ImageData | None = None,
                 checkpoint: str | None = None, tta: str | None = None, *,
                 model: torch.nn.Module | None = None,
                 device: str | torch.device | None = None) -> dict:
    """Reload a run and evaluate it on the test set: loss, accuracy and per-class accuracy.
    `tta` (none | shift | flip) overrides the run's own test-time augmentation setting;
    `model`: a new instance of a plain module's run's module; `device` where to compute
    (load_model)."""
    cfg, model, splits = open_run(run_dir, checkpoint, data, model=model, device=device)
    tta = cfg.train.tta if tta is None else tta
    start = time.perf_counter()
    result = evaluate(model, splits.x_test, splits.y_test, cfg.train.eval_batch_size,
                      cfg.train.precision, tta)
    seconds = time.perf_counter() - start
    y, pred = splits.y_test, result["predictions"]
    per_class = {}
    for index, name in enumerate(cfg.class_names):
        mask = y == index
        per_class[name] = float((pred[mask] == index).float().mean()) if mask.any() else None
    out = {"test_loss": result["loss"], "test_accuracy": result["accuracy"],
           "test_correct": result["correct"], "test_size": len(y),
           "per_class_accuracy": per_class, "eval_seconds": seconds, "tta": tta,
           "device": str(module_device(model))}
    if "accuracy_without_tta" in result:
        out["test_accuracy_without_tta"] = result["accuracy_without_tta"]
    # a mirrored shoe is new to a model trained without flips: the CLI warns about the flip TTA
    out["trained_with_flips"] = bool(cfg.augment.enabled and cfg.augment.horizontal_flip)
    return out

