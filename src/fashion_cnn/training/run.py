"""Runs: train a recipe into a run directory and resume it (reload.py reloads and evaluates
a finished one).

These are the functions behind every command that trains a model. They write the
run's config, history, checkpoints, weights and metrics (RunDir); figures come from callbacks
of the analysis layer (fashion_cnn.train adds them).

>>> result = train("seed-model1", epochs=1, out="runs/demo")     # doctest: +SKIP
>>> result.metrics["test_accuracy"]                              # doctest: +SKIP
0.86
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import devices, fileio
from ..data.arrays import ImageData, Splits, make_splits
from ..data.sources import open_dataset
from ..errors import Interrupted, TrainingStopped, UserError
from ..models.build import KerasSequential
from ..models.cpu_pass import is_accelerated
from ..perf import configure_runtime, return_freed_memory
from . import distributed
from .progress import ProgressBar
from .threads import FreeCoreThreads
from .callbacks import (EarlyStopping, HistoryWriter, ModelCheckpoint, best_epoch,
                        check_options)
from .checkpoint import load_checkpoint, newest_intact, recover_checkpoints, save_run_weights
from .config import ModuleInfo, RunConfig, bind_to_data, validate
from .loop import Trainer, check_module, evaluate, module_needed
from .recipes import resolve_config
from .rundir import RunDir


@dataclass
class RunResult:
    run_dir: Path
    config: RunConfig
    model: torch.nn.Module  # a KerasSequential, or the plain module given as model=
    history: list[dict]
    metrics: dict
    per_class: str = ""  # per-class precision/recall/F1 table (empty when plots were skipped)
    test_result: dict | None = None  # loop.evaluate() on the test set: logits, predictions...


def data_for(cfg: RunConfig, data: ImageData | None = None) -> ImageData:
    """`data` where given, else the dataset the config names ([data] dataset), loaded."""
    if data is not None:
        return data
    d = cfg.data
    return open_dataset(d.dataset, data_dir=d.data_dir, image_size=d.image_size,
                        channels=d.channels, fit=d.fit, order=d.order,
                        test_fraction=d.test_fraction, split_seed=d.split_seed, strict=d.strict,
                        class_names=d.class_names or None)


def splits_for(cfg: RunConfig, data: ImageData | None = None) -> Splits:
    """The config's training, validation and test splits (subset, padding, scaling). Binds
    `cfg` to the data first (config.bind_to_data: image size, channels, class names, the
    model adapted to them), or, for a bound config, checks that the data is the same."""
    data = data_for(cfg, data)
    bind_to_data(cfg, data)
    mean, std = cfg.stats
    return make_splits(data, subset=cfg.data.subset or None, val_fraction=cfg.data.validation_split,
                       pad=cfg.pad, pad_value=cfg.data.pad_value, mean=mean, std=std)


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer):
    """SIGINT/SIGTERM ask the trainer to stop at the next batch boundary (a second one kills)."""
    previous = {}

    def handler(signum, frame):
        if trainer.stop_request:  # second signal: give up at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        trainer.stop_request = signal.Signals(signum).name

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def settle_device(cfg: RunConfig, explicit_precision: bool) -> torch.device:
    """The device a run trains on (train.device, resolved here), and its precision settled in
    `cfg`: one the device lacks is a UserError if the user asked for it (`explicit_precision`),
    else fp32 with a one-line notice (devices.resolve_precision); config.toml records it."""
    device = devices.resolve_device(cfg.train.device)
    precision, notice = devices.resolve_precision(device, cfg.train.precision, explicit_precision)
    if notice and distributed.is_main():
        print(f"note: {notice}", file=sys.stderr)
    cfg.train.precision = precision
    return device


def standard_callbacks(cfg: RunConfig, run_dir: RunDir, progress: bool = True, extra=()) -> list:
    """A run's callbacks; none in processes other than process 0 under torchrun, which only
    train (distributed.py)."""
    if not distributed.is_main():
        return []
    c = cfg.checkpoint
    callbacks = [HistoryWriter(run_dir)]
    # Always present: it writes the checkpoint of a SIGINT/SIGTERM stop even with every = 0.
    callbacks.append(ModelCheckpoint(run_dir, c.every, c.filename, c.save_best_only,
                                     c.monitor, c.keep_last, c.min_delta,
                                     keep_best=bool(c.every or c.save_best_only or c.restore_best)))
    if c.early_stopping or c.restore_best:
        callbacks.append(EarlyStopping(c.early_stopping or 10 ** 9, c.monitor, c.min_delta,
                                       c.restore_best, run_dir))
    if progress:
        callbacks.append(ProgressBar())
    if not cfg.train.threads and not cfg.train.deterministic:
        callbacks.append(FreeCoreThreads())  # fewer threads while other processes are busy
    return callbacks + list(extra)


def peak_rss_mib() -> float:
    """The process's peak resident memory in MiB (VmHWM; getrusage's figure can include a
    forking parent's size, which overstates it for processes started from a large one)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start the peak-memory count afresh (Linux: VmHWM is reset to the current resident size,
    after freed heap memory is given back), so that each run of a study, all in one process,
    reports its own peak and not the largest of the runs before it, nor the buffers they left
    to the allocator. Elsewhere a no-op: the figure is then the process's peak."""
    return_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _runs_adam_kernel(optimizer) -> bool:
    """Whether the optimizer steps ran through kernels.adam_update (Adam, all float32)."""
    runs = getattr(optimizer, "runs_kernel", None)
    return bool(runs and all(runs(group["params"]) for group in optimizer.param_groups))


def _finish(trainer: Trainer, run_dir: RunDir, train_seconds: float) -> RunResult:
    """Save the final weights, evaluate on the test set, write metrics.json; then the
    callbacks' on_run_end (figures)."""
    cfg, model, splits = trainer.config, trainer.model, trainer.splits
    save_run_weights(model, run_dir, {"model": run_name(cfg)})
    start = time.perf_counter()
    result = evaluate(model, splits.x_test, splits.y_test, cfg.train.eval_batch_size,
                      cfg.train.precision, cfg.train.tta)
    eval_seconds = time.perf_counter() - start
    history = trainer.state.history
    best_index, _ = best_epoch(history, "val_loss")
    images = sum(trainer.steps_per_epoch for _ in history) * cfg.train.batch_size
    metrics = {
        "test_loss": result["loss"], "test_accuracy": result["accuracy"],
        "test_correct": result["correct"], "test_size": len(splits.y_test),
        "params": cfg.model.total_params if cfg.model is not None else cfg.module.params,
        "epochs": len(history),
        "best_epoch": best_index + 1 if best_index is not None else None,
        "train_seconds": train_seconds,
        "samples_per_second": images / train_seconds if train_seconds > 0 else None,
        "compile_seconds": trainer.compile_seconds,
        "eval_seconds": eval_seconds,
        "peak_rss_mib": peak_rss_mib(),
        "precision": cfg.train.precision, "threads": torch.get_num_threads(),
        # (epoch, batch, threads) for each time FreeCoreThreads changed the count: other
        # processes were busy, so train_seconds is not this machine's idle speed
        "thread_changes": [list(c) for cb in trainer.callbacks
                           if isinstance(cb, FreeCoreThreads) for c in cb.changes],
        "device": str(trainer.device), "device_name": devices.device_name(trainer.device),
        "cpu_pass": is_accelerated(trainer.model),
        # whether the training steps ran the first block, the max pools and the dropout layers
        # through the C kernels (speed, not results); a compiled model runs PyTorch's layers
        "fused_first_block": (getattr(trainer.model, "runs_fused_block", False)
                              and not cfg.train.compile),
        "fused_pool": (getattr(trainer.model, "runs_fused_pool", False)
                       and not cfg.train.compile),
        "fused_dropout": (getattr(trainer.model, "runs_fused_dropout", False)
                          and not cfg.train.compile),
        "fused_adam": _runs_adam_kernel(trainer.optimizer),
    }
    if history:
        last = history[-1]
        metrics.update({k: last.get(k) for k in ("loss", "accuracy", "val_loss", "val_accuracy")})
        # None, not 0.0, for a run without a validation split: no value rather than a false one
        _, metrics["best_val_accuracy"] = best_epoch(history, "val_accuracy")
    if cfg.train.tta != "none":
        # the effect of test-time augmentation, on validation (to judge it) and test (to report)
        metrics["tta"] = cfg.train.tta
        if len(splits.x_val):
            metrics["val_accuracy_tta"] = evaluate(
                model, splits.x_val, splits.y_val, cfg.train.eval_batch_size,
                cfg.train.precision, cfg.train.tta)["accuracy"]
        metrics["test_accuracy_without_tta"] = result["accuracy_without_tta"]
    run_dir.write_metrics(metrics)
    run = RunResult(run_dir.path, cfg, model, history, metrics, test_result=result)
    trainer.call("on_run_end", run)
    return run


def _run(trainer: Trainer, run_dir: RunDir) -> RunResult:
    already = sum(h.get("seconds", 0.0) for h in trainer.state.history)
    start = time.perf_counter()
    with stop_on_signals(trainer):
        try:
            trainer.fit()
        except Interrupted as stop:
            if trainer.interrupt_checkpoint is None:
                raise
            launch = ("fashion-cnn" if trainer.world == 1 else
                      f"torchrun --nproc-per-node {trainer.world} -m fashion_cnn")
            raise stop.extended(f"; checkpoint written to {trainer.interrupt_checkpoint}; "
                                f"continue with: {launch} resume "
                                f"{shlex.quote(str(run_dir))}") from None
    if not distributed.is_main():  # process 0 evaluates, writes and reports
        return RunResult(run_dir.path, trainer.config, trainer.model, trainer.state.history, {})
    return _finish(trainer, run_dir, already + time.perf_counter() - start)


def _on_main(action):
    """Run `action` on process 0 only (all of it, in a single process); its result on every
    process. A UserError it raises is raised on every process: where only process 0 can fail
    (its run directory, say), the others stop with it instead of waiting for it."""
    result, error = None, None
    if distributed.is_main():
        try:
            result = action()
        except UserError as exc:
            if distributed.world()[1] == 1:
                raise  # as it is, class and setting
            error = (str(exc), exc.setting)
    error, result = distributed.broadcast((error, result))
    if error is not None:
        raise UserError(*error)
    return result


def run_name(cfg: RunConfig) -> str:
    """What a run's directory and figures are called: a plain module's class name, else the
    recipe or model name."""
    if cfg.module is not None:
        return cfg.module.short_name
    return cfg.recipe or cfg.model.name


def module_info(model: torch.nn.Module) -> ModuleInfo:
    """What config.toml records of a plain module: its class and parameter count (-1 while a
    lazy module's parameters are not yet initialized)."""
    cls = type(model)
    params = sum(p.numel() for p in model.parameters()
                 if not isinstance(p, torch.nn.parameter.UninitializedParameter))
    lazy = any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in model.parameters())
    return ModuleInfo(f"{cls.__module__}.{cls.__qualname__}", -1 if lazy else params)


def _with_model(cfg: RunConfig, model) -> RunConfig:
    """The config of a run of `model`: a spec model brings its spec; any other module is
    recorded as [module] in place of the recipe's model (whose settings still apply)."""
    if isinstance(model, KerasSequential):
        return validate(dataclasses.replace(cfg, model=model.spec, module=None))
    info = module_info(model)
    if info.params < 0:
        raise UserError(f"model: {info.qualname} still has uninitialized (lazy) parameters",
                        setting="model")
    return dataclasses.replace(cfg, model=None, module=info)


def model_for_run(cfg: RunConfig, model, run_dir: RunDir):
    """The model to reload a run into: None (built from the run's spec) or the given one,
    which a run of a plain module requires, with its parameter count."""
    if cfg.module is None:
        if model is not None and not isinstance(model, KerasSequential):
            raise UserError(f"{run_dir}: the run's model is the spec {cfg.model.name!r}, not a "
                            f"plain module; leave out model=", setting="model")
        return model
    if model is None:
        how = (f"model={cfg.module.short_name}() to fashion_cnn.resume, evaluate_run, "
               f"load_model or plots_from_run")
        raise UserError(f"{run_dir}: {module_needed(cfg.module, how)}", setting="model")
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}",
                        setting="model")
    given = module_info(model)
    if -1 not in (given.params, cfg.module.params) and given.params != cfg.module.params:
        raise UserError(f"{run_dir}: the run's model ({cfg.module.qualname}) has "
                        f"{cfg.module.params:,} parameters, the given one ({given.qualname}) "
                        f"{given.params:,}; pass the module the run was trained with",
                        setting="model")
    if given.qualname != cfg.module.qualname and distributed.is_main():
        print(f"warning: {run_dir} was trained with a {cfg.module.qualname}; using the given "
              f"{given.qualname}", file=sys.stderr)
    return model


def run_config(name_or_config: str | os.PathLike | RunConfig, *, data: ImageData | None = None,
               **overrides) -> RunConfig:
    """The configuration a run of `name_or_config` with these overrides would write as its
    config.toml, without training: resolved, checked, its precision settled for its device and
    bound to its data (image size, channels, class names, the model adapted to them).
    `fashion-cnn train ... --show-config` prints it (config.to_toml).

    >>> run_config("fast", epochs=3).train.epochs                 # doctest: +SKIP
    3
    """
    cfg = resolve_config(os.fspath(name_or_config) if isinstance(name_or_config, os.PathLike)
                         else name_or_config, **overrides)
    check_options(cfg)
    settle_device(cfg, bool({"precision", "train.precision"} & set(overrides)))
    if cfg.model is not None:
        bind_to_data(cfg, data_for(cfg, data))
    return cfg


def train(name_or_config: str | RunConfig | None = None, out: str | os.PathLike | None = None,
          *, model: torch.nn.Module | None = None, data: ImageData | None = None,
          progress: bool = True, callbacks=(), **overrides) -> RunResult:
    """Train a recipe or model into a new run directory (`out`, or runs/<name>-<time>);
    evaluate on the test set at the end. No figures: fashion_cnn.train adds them.

    Overrides use the config's names: train("model1", epochs=1) or **{"train.epochs": 1}.
    `model`: any torch.nn.Module (images (N, C, H, W) float32 in, logits (N, n_classes) out),
    trained with the recipe's settings (the defaults without a recipe) in place of its model;
    config.toml records its class and parameter count (docs/pytorch-modules.md).
    """
    if name_or_config is None:
        if model is None:
            raise UserError("train needs a recipe, a model or a config, or model= (a PyTorch "
                            "module)", setting="model")
        name_or_config = RunConfig(model=None)
    elif isinstance(name_or_config, os.PathLike):  # a recipe or config file
        name_or_config = os.fspath(name_or_config)
    cfg = resolve_config(name_or_config, **overrides)
    if model is None and cfg.model is None:
        how = f"model={cfg.module.short_name}() to fashion_cnn.train"
        raise UserError(module_needed(cfg.module, how), setting="model")
    check_options(cfg)
    explicit = bool({"precision", "train.precision"} & set(overrides))
    distributed.setup_from_env(settle_device(cfg, explicit))  # torchrun: one of several
    configure_runtime(cfg.train.threads)
    reset_peak_rss()
    splits = splits_for(cfg, data)
    if model is not None:
        if not isinstance(model, KerasSequential):
            check_module(model, splits, cfg.train.seed)  # before its parameters are counted
        cfg = _with_model(cfg, model)

    made: list[RunDir] = []  # the directory this process created (process 0's)

    def prepare() -> Path:
        run_dir = RunDir.create(out, run_name(cfg))
        made.append(run_dir)
        run_dir.write_config(cfg)
        return run_dir.path

    try:
        run_dir = RunDir(_on_main(prepare))
        trainer = Trainer(cfg, splits, standard_callbacks(cfg, run_dir, progress, callbacks),
                          model=model, run_dir=run_dir)
        return _run(trainer, run_dir)
    except BaseException as failure:
        # Failed before its first epoch (the model could not be built, the loss diverged at
        # once, Ctrl-C): a directory holding only config.toml would block the same --out.
        if made and made[0].discard_unstarted() and isinstance(failure, TrainingStopped):
            raise failure.extended(f"; removed {made[0]}, where nothing else had been "
                                   f"written") from None
        raise


def resume(run_dir: str | os.PathLike, *, epochs: int | None = None,
           data: ImageData | None = None, progress: bool = True,
           expect: RunConfig | None = None, callbacks=(),
           model: torch.nn.Module | None = None, device: str | None = None) -> RunResult:
    """Continue a run from its newest intact checkpoint with its own saved configuration.

    `expect`, when given, must match the run's configuration (train ... --resume checks this).
    A run of a plain PyTorch module needs `model`: a new instance of it (its weights, like
    everything else, come from the checkpoint). `device` continues it on another device than
    its train.device (bit-identical continuation needs the same device type and threads).
    """
    run_dir = RunDir(run_dir)
    cfg = run_dir.read_config()
    if device is not None:
        cfg.train.device = devices.check_device_name(device)
    # the run's own precision: one this device lacks is an error, never a silent change
    device = settle_device(cfg, explicit_precision=True)
    distributed.setup_from_env(device)
    model = model_for_run(cfg, model, run_dir)
    if expect is not None:
        data = data_for(cfg, data)
        bind_to_data(expect, data)  # the given options, as the run resolved its own
        expect.train.precision = devices.resolve_precision(
            device, expect.train.precision, False)[0]
    if expect is not None and expect.fingerprint() != cfg.fingerprint():
        raise UserError(f"{run_dir}: the given options contradict the run's configuration "
                        f"({config_differences(cfg, expect)}); continue it as it was with "
                        f"`fashion-cnn resume {shlex.quote(str(run_dir))}`")
    if epochs is not None:
        if epochs < cfg.train.epochs:
            raise UserError(f"epochs {epochs} is fewer than the run's {cfg.train.epochs}",
                            setting="train.epochs")
        cfg.train.epochs = epochs
        validate(cfg)  # the one validator's bounds hold for the extended run too
    configure_runtime(cfg.train.threads)
    reset_peak_rss()
    splits = splits_for(cfg, data)
    trainer = Trainer(cfg, splits, standard_callbacks(cfg, run_dir, progress, callbacks),
                      model=model, run_dir=run_dir)

    def recover() -> list[str]:
        try:
            return recover_checkpoints(run_dir)
        except OSError as exc:
            raise UserError(fileio.describe_os_error(run_dir.checkpoints, exc)) from None

    for name in _on_main(recover):
        print(f"warning: put back checkpoint {name}, whose rewrite was interrupted",
              file=sys.stderr)
    found = _on_main(lambda: newest_intact(run_dir))  # one choice for every process
    if found is None:
        if distributed.is_main():
            print(f"warning: {run_dir} has no checkpoint yet; starting from epoch 1",
                  file=sys.stderr)
    else:
        load_checkpoint(trainer, found[0])
        trainer.last_checkpoint = found[0]
    if epochs is not None:  # only once the checkpoint has loaded
        _on_main(lambda: run_dir.write_config(cfg))
    return _run(trainer, run_dir)


def config_differences(run_cfg: RunConfig, given: RunConfig, limit: int = 3) -> str:
    """'train.lr: run 0.001, given 0.01; ...' for the settings that differ (epochs excepted)."""
    def flat(data, prefix=""):
        items = {}
        for key, value in data.items():
            if isinstance(value, dict):
                items.update(flat(value, f"{prefix}{key}."))
            else:
                items[f"{prefix}{key}"] = value
        return items

    a, b = flat(run_cfg.to_data()), flat(given.to_data())
    skip = {"description", "train.epochs", "train.threads", "data.data_dir"}
    diffs = [f"{key}: run {a.get(key)!r}, given {b.get(key)!r}" for key in sorted(set(a) | set(b))
             if key not in skip and a.get(key) != b.get(key)]
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more if diffs else "the model differs"
