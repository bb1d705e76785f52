"""Checkpoints: weights and full training state in formats that cannot execute code.

A checkpoint is a directory `RUN_DIR/checkpoints/<name>/` holding
  model.safetensors   weights and buffers (BatchNorm statistics)
  state.safetensors   optimizer moments, RNG states, the current shuffle, partial-epoch sums
  state.json          kind, epoch, step, position in the epoch, history, config fingerprint,
                      optimizer hyper-parameters, the SHA-256 of both tensor files and a
                      checksum of state.json's own content
It is written into a hidden temporary directory, each file fsynced, then renamed into place in
one step, so a crash never leaves a partial checkpoint under a checkpoint's name. Nothing here
uses pickle: safetensors and JSON only, and every value read back is type-checked.

Kinds: "epoch" (end of an epoch, named by the {epoch} pattern), "best" (the epoch with the best
monitored value so far), "interrupt" (written mid-epoch on SIGINT/SIGTERM).
"""

from __future__ import annotations

import errno
import hashlib
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
from ..errors import CheckpointError, UserError
from . import distributed
from .rundir import STATE_FILE, STATE_TENSORS_FILE, WEIGHTS_FILE, RunDir

FORMAT = 1
TENSOR_FILES = (WEIGHTS_FILE, STATE_TENSORS_FILE)
KINDS = ("epoch", "best", "interrupt")
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


def save_weights(model: torch.nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Atomically write the model's weights and buffers as safetensors."""
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    fileio.write_with(path, lambda tmp: _save_tensors(model_tensors(model), tmp, meta))


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
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a valid safetensors file ({reason})") from None


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


def _meta_checksum(meta: dict) -> str:
    """SHA-256 of state.json's content without its own checksum (floats round-trip exactly)."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_checkpoint(trainer, directory: str | os.PathLike, kind: str = "epoch") -> Path:
    """Write the trainer's complete state to `directory` atomically (replacing an older one)."""
    directory = Path(directory)
    s = trainer.state
    opt_tensors, opt_meta = _optimizer_split(trainer.optimizer)
    state_tensors = {
        **opt_tensors,
        "rng.global": torch.get_rng_state(),
        "rng.shuffle": trainer.shuffle_gen.get_state(),
        "rng.augment": trainer.augment_gen.get_state(),
        "sums": s.sums.double(),
    }
    device_type = trainer.device.type
    device_state = devices.get_rng_state(trainer.device)
    if device_state is not None:  # a GPU's generator (dropout there), by device type
        state_tensors[f"rng.{device_type}"] = device_state
    processes = trainer.world
    if processes > 1:  # the other processes' generators (distributed.py)
        for rank, states in enumerate(trainer.process_rng_states[1:], start=1):
            state_tensors[f"rng.global.{rank}"] = states["global"]
            state_tensors[f"rng.augment.{rank}"] = states["augment"]
            if device_type in states:
                state_tensors[f"rng.{device_type}.{rank}"] = states[device_type]
    if s.perm is not None:
        state_tensors["perm"] = s.perm
    meta = {
        "format": FORMAT, "kind": kind, "epoch": s.epoch, "step": s.step,
        "batch_in_epoch": s.batch_in_epoch, "cursor": s.cursor, "epoch_seconds": s.epoch_seconds,
        "history": s.history, "config_fingerprint": trainer.config.fingerprint(),
        "optimizer": opt_meta, "processes": processes, "device_type": device_type,
    }
    if trainer.grad_scaler is not None:  # fp16: the loss scale and its growth counter
        meta["grad_scaler"] = {k: v for k, v in trainer.grad_scaler.state_dict().items()
                               if isinstance(v, (int, float))}
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=_TMP_SUFFIX,
                                    dir=directory.parent))
    except OSError as exc:
        raise UserError(fileio.describe_os_error(directory, exc)) from None
    try:
        _save_tensors(model_tensors(trainer.model), tmp / WEIGHTS_FILE)
        fileio.fault_hook("mid_checkpoint", directory)
        _save_tensors(_contiguous(state_tensors), tmp / STATE_TENSORS_FILE)
        meta["sha256"] = {name: fileio.sha256_file(tmp / name) for name in TENSOR_FILES}
        meta["checksum"] = _meta_checksum(meta)
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


def _require(ok: bool, meta_path: Path, what: str) -> None:
    if not ok:
        raise CheckpointError(f"{meta_path}: invalid checkpoint ({what})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _validate_meta(meta, meta_path: Path) -> None:
    """Type-check everything load_checkpoint reads, so a crafted file gives one clear error."""
    _require(isinstance(meta, dict), meta_path, "not a JSON object")
    _require(meta.get("format") == FORMAT, meta_path, f"not a fashion-cnn checkpoint of format {FORMAT}")
    _require(meta.get("checksum") == _meta_checksum(meta), meta_path,
             "checksum mismatch: the file is corrupt")
    _require(meta.get("kind") in KINDS, meta_path, "unknown kind")
    for key in ("epoch", "step", "batch_in_epoch", "cursor"):
        _require(_is_int(meta.get(key)), meta_path, f"{key} is not a count")
    _require(isinstance(meta.get("epoch_seconds"), (int, float)), meta_path, "epoch_seconds")
    _require(isinstance(meta.get("history"), list)
             and all(isinstance(h, dict) for h in meta["history"]), meta_path, "history")
    _require(len(meta["history"]) == meta["epoch"], meta_path, "history length != epoch")
    _require(isinstance(meta.get("config_fingerprint"), str), meta_path, "config_fingerprint")
    _require(_is_int(meta.get("processes", 1)) and meta.get("processes", 1) >= 1, meta_path,
             "processes is not a count")
    opt = meta.get("optimizer")
    _require(isinstance(opt, dict) and isinstance(opt.get("param_groups"), list)
             and all(isinstance(g, dict) for g in opt["param_groups"])
             and isinstance(opt.get("scalars"), dict), meta_path, "optimizer")
    sha = meta.get("sha256")
    _require(isinstance(sha, dict) and sorted(sha) == sorted(TENSOR_FILES)
             and all(isinstance(v, str) for v in sha.values()), meta_path, "sha256")


def read_checkpoint_meta(directory: str | os.PathLike) -> dict:
    """Read and verify a checkpoint's state.json and the checksums of its tensor files;
    CheckpointError names the first bad file."""
    directory = Path(directory)
    meta_path = directory / STATE_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: file not found (incomplete checkpoint)") from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable or corrupt ({type(exc).__name__})") from None
    _validate_meta(meta, meta_path)
    for name, digest in meta["sha256"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found (incomplete checkpoint)")
        if fileio.sha256_file(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (the file is corrupt or truncated)")
    return meta


def checkpoint_weights(directory: str | os.PathLike) -> Path:
    """The verified model.safetensors of a checkpoint (for evaluate --checkpoint)."""
    read_checkpoint_meta(directory)
    return Path(directory) / WEIGHTS_FILE


def load_checkpoint(trainer, directory: str | os.PathLike) -> dict:
    """Restore weights, optimizer, RNGs and position from a verified checkpoint."""
    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    if meta["config_fingerprint"] != trainer.config.fingerprint():
        raise CheckpointError(f"{directory}: was written by a run with a different configuration "
                              f"(only the number of epochs may change on resume)")
    processes, rank = meta.get("processes", 1), trainer.rank
    if processes != trainer.world:
        how = ("without torchrun" if processes == 1 else
               f"with torchrun --nproc-per-node {processes} (in all, over its nodes)")
        raise CheckpointError(f"{directory}: was written by {processes} training process"
                              f"{'es' if processes > 1 else ''}; continue it {how}")
    load_weights(trainer.model, directory / WEIGHTS_FILE)
    state_path = directory / STATE_TENSORS_FILE
    tensors = _read_safetensors(state_path)
    n = len(trainer.splits.x_train)
    try:
        perm, sums = tensors.get("perm"), tensors["sums"]
        if perm is not None and (perm.dtype != torch.int64 or perm.shape != (n,)):
            raise ValueError(f"perm must be int64 of shape ({n},)")
        if sums.dtype != torch.float64 or sums.shape != (4,):
            raise ValueError("sums must be float64 of shape (4,)")
        if meta["cursor"] > n or meta["batch_in_epoch"] >= trainer.steps_per_epoch:
            raise ValueError("position beyond the end of an epoch")
        trainer.optimizer.load_state_dict(_optimizer_join(tensors, meta["optimizer"]))
        suffix = f".{rank}" if rank else ""  # this process's own generators
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
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                              ) from None
    s = trainer.state
    s.epoch, s.step = meta["epoch"], meta["step"]
    s.batch_in_epoch, s.cursor = meta["batch_in_epoch"], meta["cursor"]
    s.epoch_seconds = float(meta["epoch_seconds"])
    s.perm = perm
    # several processes: process 0 holds the sums of the unfinished epoch for all of them
    s.sums = (sums.to(trainer.device, trainer.zero_sums().dtype) if rank == 0
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
        info = CheckpointInfo(path)
        try:
            meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
            info.kind, info.epoch, info.step = str(meta["kind"]), int(meta["epoch"]), int(meta["step"])
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            info = CheckpointInfo(path)
        found.append(info)
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
