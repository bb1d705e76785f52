"""Import a model trained with Keras as a run directory that evaluate, predict, plots, export
and resume take. Reading the files (as data: nothing in them is executed or unpickled) and
converting the weights is models/keras_format.py's; this module writes the run.

>>> run_dir = import_keras("model1_01.keras", "runs/model1-keras")       # doctest: +SKIP
>>> fc.evaluate_run(run_dir)["test_accuracy"]                           # doctest: +SKIP
0.8479
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError
from ..models.keras_format import load_keras
from ..models.spec import ModelSpec
from ..training.checkpoint import save_checkpoint, save_run_weights
from ..training.config import RunConfig
from ..training.loop import Trainer
from ..training.recipes import resolve_config
from ..training.rundir import RunDir, check_checkpoint_pattern, checkpoint_name
from ..training.run import splits_for

IMPORTED_CHECKPOINT_EPOCH = 0  # the imported weights' checkpoint: before this run's first epoch


def import_keras(path: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 weights_only: bool = False, model: ModelSpec | str | None = None,
                 name: str | None = None, recipe: str | None = None, data=None,
                 **overrides) -> Path:
    """Import a Keras model file into a new run directory (`out`, or
    runs/<name>-keras-<time>); returns its path.

    The run holds config.toml (the imported spec, with `recipe`'s training settings or the
    defaults, Keras' own: Adam 1e-3, batch 32; train.epochs 1), model.safetensors (the
    converted weights) and a checkpoint of them before any epoch (checkpoints/epoch_0), from
    which `resume` fine-tunes: `fashion-cnn resume RUN_DIR --epochs 3` trains three epochs
    starting from the Keras weights. `overrides` set config values as for train ("epochs",
    "data.dataset", ...). The config is bound to its dataset (`data`, or the one it names),
    which must have the model's input size and number of classes.

    >>> run_dir = import_keras("model1_01.keras", "runs/model1-keras")  # doctest: +SKIP
    """
    path = Path(path)
    net = load_keras(path, weights_only=weights_only, model=model, name=name)
    spec = net.spec
    base = resolve_config(recipe) if recipe else RunConfig(model=spec)
    settings = {"train.epochs": 1, **overrides}
    cfg = resolve_config(RunConfig(model=spec, recipe=f"keras:{path.name}",
                                   description=f"imported from the Keras file {path.name}",
                                   data=base.data, augment=base.augment, train=base.train,
                                   checkpoint=base.checkpoint), **settings)
    splits = splits_for(cfg, data)
    if cfg.model.to_data() != spec.to_data():  # bind_to_data adapted it: it does not fit
        h, w, c = spec.input_shape
        raise UserError(f"{path}: the model takes {h}x{w}x{c} images and gives "
                        f"{spec.num_classes} classes; the data ({cfg.data.dataset}) has "
                        f"{cfg.data.image_size}x{cfg.data.image_size}x{cfg.data.channels} "
                        f"images (+ padding {cfg.pad}) and {len(cfg.class_names)} classes",
                        setting="data.dataset")
    run_dir = RunDir.create(out, f"{spec.name}-keras")
    run_dir.write_config(cfg)
    save_run_weights(net, run_dir, {"model": spec.name, "keras_file": path.name})
    # A Trainer at its start, around the imported weights: its checkpoint is what `resume`
    # continues from (optimizer moments zero, generators seeded as a new run's). The caller's
    # global random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        trainer = Trainer(cfg, splits, model=net, run_dir=run_dir)
        pattern = cfg.checkpoint.filename
        name_0 = (checkpoint_name(pattern, IMPORTED_CHECKPOINT_EPOCH)
                  if "epoch" in check_checkpoint_pattern(pattern) else "imported")
        save_checkpoint(trainer, run_dir.checkpoint(name_0), kind="epoch")
    net.eval()
    return run_dir.path
