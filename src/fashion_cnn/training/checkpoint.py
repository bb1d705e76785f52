"""Checkpoints: weights and full training state in formats that cannot execute code.

A checkpoint is a directory `RUN_DIR/checkpoints/<name>/` holding
  model.safetensors   weights and buffers (BatchNorm statistics)
  state.safetensors   optimizer moments, RNG states, the current shuffle, partial-epoch sums
  state.json          kind, epoch, step, position in the epoch, history, config fingerprint,
                      optimizer hyper-parameters, the SHA-256 of both tensor files and a
                      checksum of state.json's own content
It is written into a hidden temporary directory, each file fsynced, then renamed into place in
one step, so a crash never leaves a partial checkpoint under a checkpoint's name. Nothing here
uses pickle: safetensors and JSON only, and every value read back is type-checked (state.json
by checkpoint_meta.py).

Kinds: "epoch" (end of an epoch, named by the {epoch} pattern), "best" (the epoch with the best
monitored value so far), "interrupt" (written mid-epoch on SIGINT/SIGTERM).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import devices, fileio
from ..errors import CheckpointError, UserError, first_line
from . import distributed
from .checkpoint_meta import (FORMAT, TENSOR_FILES, check_optimizer_state, meta_checksum,
                              read_checkpoint_meta)
from .rundir import STATE_FILE, STATE_TENSORS_FILE, WEIGHTS_FILE, RunDir

# Hidden leftovers of an interrupted write or removal inside checkpoints/ (see _replace_dir).
_OLD_SUFFIX, _TMP_SUFFIX, _DELETED_SUFFIX = ".old", ".tmp", ".deleted"


def _contiguous(tensors: dict) -> dict:
    """On the CPU and contiguous: a checkpoint does not depend on the device it came from."""
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict as safetensors takes it: contiguous, and each tensor with a memory of its
    own. A module may tie weights (one Parameter under two names) or keep a view of another
    tensor; safetensors refuses tensors that share memory, so each later one is copied (the
    file then holds both names, and load_state_dict fills both)."""
    out, seen = {}, set()
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"model: its state_dict entry {name!r} is a "
                            f"{type(value).__name__}, not a tensor; checkpoints hold tensors "
                            f"only", setting="model")
        tensor = value.detach().cpu().contiguous()  # saved device-independent
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen or not tensor.numel():
            tensor = tensor.clone()
        seen.add(storage)
        out[name] = tensor
    return out


def _save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its I/O failures (disk full...) raised as OSError.

    safetensors reports them as SafetensorError("... I/O error: No space left on device
    (os error 28)"); as an OSError they get the same one-line message as any other write.
    """
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, os.strerror(code)) from None


def save_weights(model: torch.nn.Module, path: str | os.PathLike,
                 metadata: dict | None = None) -> str:
    """Atomically write the model's weights and buffers as safetensors; the SHA-256 of the
    file written."""
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    digest = []

    def write(tmp: Path) -> None:
        _save_tensors(model_tensors(model), tmp, meta)
        digest.append(fileio.sha256_file(tmp))  # of the very bytes renamed into place

    fileio.write_with(path, write)
    return digest[0]


def save_run_weights(model: torch.nn.Module, run_dir: str | os.PathLike | RunDir,
                     metadata: dict | None = None) -> None:
    """A run's final weights (RUN/model.safetensors) and, beside them, their SHA-256
    (model.safetensors.sha256), which load_model checks as checkpoints' are checked.

    The old checksum goes first: a crash before the new one is written leaves weights without
    one (loaded unverified, as a run from before checksums), never a checksum that does not
    match its weights."""
    run_dir = RunDir(run_dir)
    run_dir.remove_weights_checksum()
    run_dir.write_weights_checksum(save_weights(model, run_dir.weights_file, metadata))


def verify_run_weights(run_dir: str | os.PathLike | RunDir) -> Path:
    """The run's final weights file, its checksum verified where the run has one (a run
    written before final weights had a checksum loads unverified); CheckpointError naming the
    file where it does not match."""
    run_dir = RunDir(run_dir)
    path = run_dir.weights_file
    expected = run_dir.read_weights_checksum()
    if expected is not None:
        if fileio.sha256_file(path, what="a safetensors file", error=CheckpointError) \
                != expected:
            raise CheckpointError(f"{path}: checksum mismatch with "
                                  f"{run_dir.weights_checksum_file.name} (the file is corrupt "
                                  f"or truncated)")
    return path


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors weights into `model`; CheckpointError names the file on any problem,
    non-finite weights included (a diverged or damaged model gives no usable prediction)."""
    tensors = _read_safetensors(Path(path))
    _check_finite(model, tensors, path)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit this model ({first_line(exc)})") \
            from None


def _check_finite(model: torch.nn.Module, tensors: dict, path) -> None:
    """CheckpointError unless every parameter is finite and no buffer holds NaN (a buffer may
    hold an infinity on purpose: a plain module's attention mask, say)."""
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        bad = ~torch.isfinite(tensor) if name in parameters else torch.isnan(tensor)
        count = int(bad.sum())
        if count:
            raise CheckpointError(f"{path}: {name} holds {count:,} non-finite value"
                                  f"{'s' if count > 1 else ''} (NaN or infinity): the run "
                                  f"diverged or the file is damaged; refusing to use it")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    fileio.require_regular_file(path, "a safetensors file", CheckpointError)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({first_line(exc)})") \
            from None


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


def _state_tensors(trainer, opt_tensors: dict) -> dict[str, torch.Tensor]:
    """The state tensors (STATE_TENSORS_FILE): optimizer moments, every random generator (the other
    processes' too), the partial-epoch sums and the current shuffle."""
    tensors = {
        **opt_tensors,
        "rng.global": torch.get_rng_state(),
        "rng.shuffle": trainer.shuffle_gen.get_state(),
        "rng.augment": trainer.augment_gen.get_state(),
        "sums": trainer.state.sums.double(),
    }
    device_type = trainer.device.type
    device_state = devices.get_rng_state(trainer.device)
    if device_state is not None:  # a GPU's generator (dropout there), by device type
        tensors[f"rng.{device_type}"] = device_state
    if trainer.world > 1:  # the other processes' generators (distributed.py)
        for rank, states in enumerate(trainer.process_rng_states[1:], start=1):
            tensors[f"rng.global.{rank}"] = states["global"]
            tensors[f"rng.augment.{rank}"] = states["augment"]
            if device_type in states:
                tensors[f"rng.{device_type}.{rank}"] = states[device_type]
    if trainer.state.perm is not None:
        tensors["perm"] = trainer.state.perm
    return _contiguous(tensors)


def _state_meta(trainer, kind: str, opt_meta: dict) -> dict:
    """The metadata (STATE_FILE) before the checksums: kind, position, history, configuration."""
    s = trainer.state
    meta = {
        "format": FORMAT, "kind": kind, "epoch": s.epoch, "step": s.step,
        "batch_in_epoch": s.batch_in_epoch, "cursor": s.cursor, "epoch_seconds": s.epoch_seconds,
        "history": s.history, "config_fingerprint": trainer.config.fingerprint(),
        "optimizer": opt_meta, "processes": trainer.world, "device_type": trainer.device.type,
    }
    if trainer.grad_scaler is not None:  # fp16: the loss scale and its growth counter
        meta["grad_scaler"] = {k: v for k, v in trainer.grad_scaler.state_dict().items()
                               if isinstance(v, (int, float))}
    return meta


def save_checkpoint(trainer, directory: str | os.PathLike, kind: str = "epoch") -> Path:
    """Write the trainer's complete state to `directory` atomically (replacing an older one)."""
    directory = Path(directory)
    opt_tensors, opt_meta = _optimizer_split(trainer.optimizer)
    state_tensors = _state_tensors(trainer, opt_tensors)
    meta = _state_meta(trainer, kind, opt_meta)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=_TMP_SUFFIX,
                                    dir=directory.parent))
    except OSError as exc:
        raise UserError(fileio.describe_os_error(directory, exc)) from None
    try:
        _save_tensors(model_tensors(trainer.model), tmp / WEIGHTS_FILE)
        fileio.fault_hook("mid_checkpoint", directory)
        _save_tensors(state_tensors, tmp / STATE_TENSORS_FILE)
        meta["sha256"] = {name: fileio.sha256_file(tmp / name) for name in TENSOR_FILES}
        meta["checksum"] = meta_checksum(meta)
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))
        for name in (*TENSOR_FILES, STATE_FILE):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        fileio.fsync_dir(tmp)
        fileio.fault_hook("before_rename", directory)
        _replace_dir(tmp, directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(fileio.describe_os_error(directory, exc)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _replace_dir(tmp: Path, directory: Path) -> None:
    """Rename `tmp` to `directory`. An existing one is first renamed to `.<name>.old` and
    deleted after; a crash in between leaves that complete old copy, which
    `recover_checkpoints` puts back."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}{_OLD_SUFFIX}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        fileio.fault_hook("checkpoint_swap", directory)
    os.replace(tmp, directory)
    fileio.fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_checkpoint(directory: Path) -> None:
    """Delete a checkpoint: first renamed out of sight in one step, so a crash during the
    deletion never leaves a half-deleted checkpoint under its name."""
    hidden = directory.with_name(f".{directory.name}{_DELETED_SUFFIX}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(directory, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def recover_checkpoints(run_dir: str | os.PathLike) -> list[str]:
    """Clean up after a process killed while writing: put back `.<name>.old` copies whose
    replacement never arrived, delete unfinished temporaries. Returns what was restored."""
    root = RunDir(run_dir).checkpoints
    restored = []
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if not path.name.startswith(".") or not path.is_dir():
                continue
            if path.name.endswith(_OLD_SUFFIX):
                name = path.name[1:-len(_OLD_SUFFIX)]
                if not (root / name).exists():
                    os.replace(path, root / name)
                    restored.append(name)
                    continue
            if path.name.endswith((_OLD_SUFFIX, _TMP_SUFFIX, _DELETED_SUFFIX)):
                shutil.rmtree(path, ignore_errors=True)
    # fileio's temporaries (`.history.csv.xyz.tmp`, plots/...) of writes that never finished
    for path in Path(run_dir).rglob(".*.tmp"):
        if path.is_file() and root not in path.parents:
            path.unlink(missing_ok=True)
    return restored


def checkpoint_weights(directory: str | os.PathLike) -> Path:
    """The verified model.safetensors of a checkpoint (for evaluate --checkpoint)."""
    read_checkpoint_meta(directory)
    return Path(directory) / WEIGHTS_FILE


def _check_same_run(trainer, directory: Path, meta: dict) -> None:
    """CheckpointError unless the checkpoint was written by a run of this configuration
    with as many training processes."""
    if meta["config_fingerprint"] != trainer.config.fingerprint():
        raise CheckpointError(f"{directory}: was written by a run with a different configuration "
                              f"(only the number of epochs may change on resume)")
    processes = meta.get("processes", 1)
    if processes != trainer.world:
        how = ("without torchrun" if processes == 1 else
               f"with torchrun --nproc-per-node {processes} (in all, over its nodes)")
        raise CheckpointError(f"{directory}: was written by {processes} training process"
                              f"{'es' if processes > 1 else ''}; continue it {how}")


def _restore_state(trainer, tensors: dict, meta: dict, state_path: Path,
                   meta_path: Path) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Load the optimizer, the generators and the loss scale from a checkpoint's tensors and
    state.json; (perm, sums), checked. Any mismatch is a CheckpointError naming the file."""
    n = len(trainer.splits.x_train)
    try:
        perm, sums = tensors.get("perm"), tensors["sums"]
        if perm is not None and (perm.dtype != torch.int64 or perm.shape != (n,)):
            raise ValueError(f"perm must be int64 of shape ({n},)")
        if sums.dtype != torch.float64 or sums.shape != (4,):
            raise ValueError("sums must be float64 of shape (4,)")
        if meta["cursor"] > n or meta["batch_in_epoch"] >= trainer.steps_per_epoch:
            raise ValueError("position beyond the end of an epoch")
        saved = _optimizer_join(tensors, meta["optimizer"])
        check_optimizer_state(trainer.optimizer, saved, state_path, meta_path)
        trainer.optimizer.load_state_dict(saved)
        suffix = f".{trainer.rank}" if trainer.rank else ""  # this process's own generators
        torch.set_rng_state(tensors["rng.global" + suffix])
        trainer.shuffle_gen.set_state(tensors["rng.shuffle"])
        trainer.augment_gen.set_state(tensors["rng.augment" + suffix])
        device_state = tensors.get(f"rng.{trainer.device.type}{suffix}")
        if device_state is not None:
            devices.set_rng_state(trainer.device, device_state)
        if trainer.grad_scaler is not None and meta.get("grad_scaler"):
            trainer.grad_scaler.load_state_dict(meta["grad_scaler"])
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{state_path}: training state does not fit this run "
                              f"({type(exc).__name__}: {first_line(exc)})") from None
    return perm, sums


def load_checkpoint(trainer, directory: str | os.PathLike) -> dict:
    """Restore weights, optimizer, RNGs and position from a verified checkpoint."""
    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    _check_same_run(trainer, directory, meta)
    load_weights(trainer.model, directory / WEIGHTS_FILE)
    state_path = directory / STATE_TENSORS_FILE
    perm, sums = _restore_state(trainer, _read_safetensors(state_path), meta, state_path,
                                directory / STATE_FILE)
    s = trainer.state
    s.epoch, s.step = meta["epoch"], meta["step"]
    s.batch_in_epoch, s.cursor = meta["batch_in_epoch"], meta["cursor"]
    s.epoch_seconds = float(meta["epoch_seconds"])
    s.perm = perm
    # several processes: process 0 holds the sums of the unfinished epoch for all of them
    s.sums = (sums.to(trainer.device, trainer.zero_sums().dtype) if trainer.rank == 0
              else trainer.zero_sums())
    written_on = meta.get("device_type", "cpu")
    if written_on != trainer.device.type and distributed.is_main():
        print(f"warning: {directory} was written training on {written_on}, this run trains "
              f"on {trainer.device.type}: it continues from the same weights and state, but "
              f"dropout's random draws, and the arithmetic, differ from an uninterrupted run",
              file=sys.stderr)
    s.history = list(meta["history"])
    return meta


# ----------------------------------------------------------------------- finding checkpoints

@dataclass
class CheckpointInfo:
    """A checkpoint directory and where it stands, as read (unverified) from its state.json."""

    path: Path
    kind: str | None = None   # None: state.json unreadable
    epoch: int = -1
    step: int = -1

    @property
    def position(self) -> tuple[int, int, int]:
        # On equal positions prefer an epoch checkpoint to `best` or an interrupt one.
        return (self.epoch, self.step, {"epoch": 2, "interrupt": 1}.get(self.kind, 0))


def scan_checkpoints(run_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """All checkpoints of a run (hidden temporaries excluded), oldest first by (epoch, step);
    those whose state.json cannot be read come last."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(".") or not path.is_dir():
            continue
        position = RunDir.checkpoint_position(path)
        found.append(CheckpointInfo(path, *position) if position else CheckpointInfo(path))
    return sorted(found, key=lambda i: (i.kind is None, i.position, i.path.name))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run, oldest first (see scan_checkpoints)."""
    return [info.path for info in scan_checkpoints(run_dir)]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def newest_intact(run_dir: str | os.PathLike,
                  warn: Callable[[str], None] = _warn) -> tuple[Path, dict] | None:
    """The newest checkpoint whose files verify, warning (naming the file) about each corrupt
    one; None when the run has no checkpoint at all. CheckpointError when it has some but
    none is intact: a silent restart from epoch 1 would throw their training away."""
    intact, errors = [], []
    for info in scan_checkpoints(run_dir):
        try:
            meta = read_checkpoint_meta(info.path)
        except CheckpointError as exc:
            errors.append(exc)
            warn(f"skipping corrupt checkpoint: {exc}")
            continue
        intact.append((info.position, info.path, meta))
    if intact:
        _, path, meta = max(intact, key=lambda item: item[0])
        return path, meta
    if errors:
        raise CheckpointError(f"no intact checkpoint in {RunDir(run_dir).checkpoints} "
                              f"(first problem: {errors[0]})")
    return None
