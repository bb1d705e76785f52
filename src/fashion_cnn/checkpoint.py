"""Checkpoints: weights and full training state in formats that cannot execute code.

A checkpoint is a directory `RUN_DIR/checkpoints/<name>/` holding
  model.safetensors   weights and buffers (BatchNorm statistics)
  state.safetensors   optimizer moments, RNG states, the current shuffle, partial-epoch sums
  state.json          epoch, step, position in the epoch, history, config fingerprint,
                      optimizer hyper-parameters and the SHA-256 of both tensor files
It is written into a hidden temporary directory, each file fsynced, then renamed into place in
one step, so a crash never leaves a partial checkpoint under a checkpoint's name. Nothing here
uses pickle: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import fileio
from .errors import CheckpointError, UserError

FORMAT = 1


def _contiguous(tensors: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return _contiguous(model.state_dict())


def save_weights(model: torch.nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Atomically write the model's weights and buffers as safetensors."""
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    fileio.write_with(path, lambda tmp: save_file(model_tensors(model), str(tmp), metadata=meta))


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors weights into `model`; CheckpointError names the file on any problem."""
    tensors = _read_safetensors(Path(path))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit this model ({first})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0]})"
                              ) from None


# ----------------------------------------------------------------------- training state

def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Optimizer state_dict -> (tensors, JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(trainer, directory: str | os.PathLike) -> Path:
    """Write the trainer's complete state to `directory` atomically (replacing an older one)."""
    directory = Path(directory)
    s = trainer.state
    opt_tensors, opt_meta = _optimizer_split(trainer.optimizer)
    state_tensors = {
        **opt_tensors,
        "rng.global": torch.get_rng_state(),
        "rng.shuffle": trainer.shuffle_gen.get_state(),
        "rng.augment": trainer.augment_gen.get_state(),
        "sums": s.sums,
    }
    if s.perm is not None:
        state_tensors["perm"] = s.perm
    meta = {
        "format": FORMAT, "epoch": s.epoch, "step": s.step, "batch_in_epoch": s.batch_in_epoch,
        "cursor": s.cursor, "epoch_seconds": s.epoch_seconds, "history": s.history,
        "config_fingerprint": trainer.config.fingerprint(), "optimizer": opt_meta,
    }
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    except OSError as exc:
        raise UserError(fileio._describe_os_error(directory, exc)) from None
    try:
        save_file(model_tensors(trainer.model), str(tmp / "model.safetensors"))
        fileio._fault_hook("mid_checkpoint", directory)
        save_file(_contiguous(state_tensors), str(tmp / "state.safetensors"))
        meta["sha256"] = {name: fileio.sha256_file(tmp / name)
                          for name in ("model.safetensors", "state.safetensors")}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        for name in ("model.safetensors", "state.safetensors", "state.json"):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        _replace_dir(tmp, directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(fileio._describe_os_error(directory, exc)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _replace_dir(tmp: Path, directory: Path) -> None:
    """Rename `tmp` to `directory`; an existing one is moved aside first, then deleted."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    fileio._fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_checkpoint_meta(directory: str | os.PathLike) -> dict:
    """Read and verify a checkpoint's state.json and the checksums of its tensor files."""
    directory = Path(directory)
    meta_path = directory / "state.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: file not found (incomplete checkpoint)") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable or corrupt ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "sha256" not in meta:
        raise CheckpointError(f"{meta_path}: not a fashion-cnn checkpoint (format {FORMAT})")
    for name, digest in meta["sha256"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found (incomplete checkpoint)")
        if fileio.sha256_file(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (the file is corrupt or truncated)")
    return meta


def load_checkpoint(trainer, directory: str | os.PathLike) -> dict:
    """Restore weights, optimizer, RNGs and position from a verified checkpoint."""
    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    if meta["config_fingerprint"] != trainer.config.fingerprint():
        raise CheckpointError(f"{directory}: was written by a run with a different configuration "
                              f"(only --epochs may change on resume)")
    load_weights(trainer.model, directory / "model.safetensors")
    tensors = _read_safetensors(directory / "state.safetensors")
    try:
        trainer.optimizer.load_state_dict(_optimizer_join(tensors, meta["optimizer"]))
        torch.set_rng_state(tensors["rng.global"])
        trainer.shuffle_gen.set_state(tensors["rng.shuffle"])
        trainer.augment_gen.set_state(tensors["rng.augment"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{directory / 'state.safetensors'}: incomplete training state "
                              f"({type(exc).__name__}: {exc})") from None
    s = trainer.state
    s.epoch, s.step = int(meta["epoch"]), int(meta["step"])
    s.batch_in_epoch, s.cursor = int(meta["batch_in_epoch"]), int(meta["cursor"])
    s.epoch_seconds = float(meta.get("epoch_seconds", 0.0))
    s.perm = tensors.get("perm")
    s.sums = tensors["sums"].clone()
    s.history = list(meta["history"])
    return meta


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run, oldest first by (epoch, step) as recorded in state.json;
    unreadable ones sort first so that the newest intact one is tried first by resume."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if not path.is_dir() or path.name.startswith(".") or path.name == "best":
            continue
        try:
            meta = json.loads((path / "state.json").read_text())
            key = (int(meta["epoch"]), int(meta["step"]))
        except (OSError, ValueError, KeyError, TypeError):
            key = (-1, -1)
        found.append((key, path.stat().st_mtime_ns, path))
    return [path for _, _, path in sorted(found)]


def newest_intact(run_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint whose files verify; warns about each corrupt one it skips."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, read_checkpoint_meta(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping corrupt checkpoint: {exc}", stacklevel=2)
    return None
