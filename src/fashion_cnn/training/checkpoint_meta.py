"""A checkpoint's state.json: its checksum, reading it, checking every value in it, and the
checksums it records of the checkpoint's tensor files (read_checkpoint_meta).

state.json is JSON a user can edit (or an attacker craft, recomputing its checksum): nothing in
it is trusted. `read_state_json` reads it (a regular file of at most STATE_FILE_LIMIT bytes) and
`validate_meta` type-checks everything load_checkpoint reads, so that a bad file gives one
CheckpointError naming it; `check_optimizer_state` checks the optimizer's saved state against
the optimizer it is loaded into.

>>> meta_checksum({"format": 1, "checksum": "ignored"}) == meta_checksum({"format": 1})
True
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .. import fileio
from ..errors import CheckpointError
from .rundir import (COUNT_LIMIT, STATE_FILE, STATE_FILE_LIMIT, STATE_TENSORS_FILE,
                     WEIGHTS_FILE, read_limited)

FORMAT = 1
TENSOR_FILES = (WEIGHTS_FILE, STATE_TENSORS_FILE)
KINDS = ("epoch", "best", "interrupt")


def meta_checksum(meta: dict) -> str:
    """SHA-256 of state.json's content without its own checksum, as sorted JSON (floats
    round-trip exactly); docs/checkpoints.md defines it."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_state_json(meta_path: Path):
    """state.json parsed (not yet validated); CheckpointError where it is missing, not a
    regular file (refused unopened, never blocking on a FIFO), over STATE_FILE_LIMIT or not
    JSON."""
    if not os.path.lexists(meta_path):
        raise CheckpointError(f"{meta_path}: file not found (incomplete checkpoint)")
    data = read_limited(meta_path, f"a checkpoint's {STATE_FILE}", STATE_FILE_LIMIT)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{meta_path}: unreadable or corrupt ({type(exc).__name__})") \
            from None


def read_checkpoint_meta(directory: str | os.PathLike) -> dict:
    """Read and verify a checkpoint's state.json and the checksums of its tensor files;
    CheckpointError names the first bad file.

    >>> read_checkpoint_meta("runs/demo/checkpoints/best")["epoch"]     # doctest: +SKIP
    3
    """
    directory = Path(directory)
    meta_path = directory / STATE_FILE
    meta = read_state_json(meta_path)
    validate_meta(meta, meta_path)
    for name, expected in meta["sha256"].items():
        path = directory / name
        if not os.path.lexists(path):
            raise CheckpointError(f"{path}: file not found (incomplete checkpoint)")
        digest = fileio.sha256_file(path, what="a checkpoint's tensor file",
                                    error=CheckpointError)
        if digest != expected:
            raise CheckpointError(f"{path}: checksum mismatch (the file is corrupt or truncated)")
    return meta


# ----------------------------------------------------------------------- value checks

def _require(ok: bool, meta_path: Path, what: str) -> None:
    if not ok:
        raise CheckpointError(f"{meta_path}: invalid checkpoint ({what})")


def _is_int(value) -> bool:
    return type(value) is int and 0 <= value < COUNT_LIMIT


def _is_number(value) -> bool:
    """A JSON number as this package writes one (bool is no number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return _is_number(value) and abs(value) < float("inf") and value == value


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (bool, str)) or _is_number(value)


def _is_setting(value) -> bool:
    """An optimizer hyper-parameter as JSON holds it: a scalar, or a list of scalars (Adam's
    betas, torch's param_names)."""
    return _is_scalar(value) or (isinstance(value, list) and all(map(_is_scalar, value)))


def validate_meta(meta, meta_path: Path) -> None:
    """Type-check everything load_checkpoint reads, so a crafted file gives one clear error."""
    _require(isinstance(meta, dict), meta_path, "not a JSON object")
    _require(meta.get("format") == FORMAT, meta_path,
             f"not a fashion-cnn checkpoint of format {FORMAT}")
    try:
        matches = meta.get("checksum") == meta_checksum(meta)
    except (ValueError, TypeError, RecursionError):
        matches = False
    _require(matches, meta_path, "checksum mismatch: the file is corrupt")
    _require(meta.get("kind") in KINDS, meta_path, "unknown kind")
    _validate_position(meta, meta_path)
    _require(isinstance(meta.get("config_fingerprint"), str), meta_path, "config_fingerprint")
    _require(_is_int(meta.get("processes", 1)) and meta.get("processes", 1) >= 1, meta_path,
             "processes is not a count")
    _require(isinstance(meta.get("device_type", "cpu"), str), meta_path, "device_type")
    _validate_optimizer(meta.get("optimizer"), meta_path)
    scaler = meta.get("grad_scaler", {})
    _require(isinstance(scaler, dict) and all(_is_finite_number(v) for v in scaler.values()),
             meta_path, "grad_scaler")
    sha = meta.get("sha256")
    _require(isinstance(sha, dict) and sorted(sha) == sorted(TENSOR_FILES)
             and all(isinstance(v, str) for v in sha.values()), meta_path, "sha256")


def _validate_position(meta: dict, meta_path: Path) -> None:
    """The counts, the epoch's seconds and the history (one dict of numbers per epoch)."""
    for key in ("epoch", "step", "batch_in_epoch", "cursor"):
        _require(_is_int(meta.get(key)), meta_path, f"{key} is not a count")
    _require(_is_finite_number(meta.get("epoch_seconds")) and meta["epoch_seconds"] >= 0,
             meta_path, "epoch_seconds is not a number of seconds")
    _require(isinstance(meta.get("history"), list)
             and all(isinstance(h, dict) for h in meta["history"]), meta_path, "history")
    _require(len(meta["history"]) == meta["epoch"], meta_path, "history length != epoch")
    for number, logs in enumerate(meta["history"], start=1):
        _require(all(isinstance(k, str) and (v is None or _is_number(v)) for k, v in logs.items()),
                 meta_path, f"history: epoch {number}'s logs are not numbers")


def _validate_optimizer(opt, meta_path: Path) -> None:
    """The optimizer's parameter groups (distinct indices, scalar hyper-parameters) and its
    non-tensor state entries ("<index>.<key>": a number, a flag or null)."""
    _require(isinstance(opt, dict) and isinstance(opt.get("param_groups"), list)
             and all(isinstance(g, dict) for g in opt["param_groups"])
             and isinstance(opt.get("scalars"), dict), meta_path, "optimizer")
    for group in opt["param_groups"]:
        params = group.get("params")
        _require(isinstance(params, list) and all(_is_int(i) for i in params)
                 and len(set(params)) == len(params), meta_path,
                 "optimizer: a parameter group's params are not distinct indices")
        _require(all(_is_setting(v) for k, v in group.items() if k != "params"), meta_path,
                 "optimizer: a hyper-parameter is not a number, flag or name")
    for name, value in opt["scalars"].items():
        index, dot, key = name.partition(".")
        _require(dot == "." and index.isascii() and index.isdigit() and key
                 and (value is None or isinstance(value, (bool, int, float))), meta_path,
                 f"optimizer: state entry {name[:40]!r}")


# ----------------------------------------------------------------------- against the optimizer

def _kind(value) -> str:
    """A hyper-parameter's kind, as the optimizer's own and a saved one are compared."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return type(value).__name__
    return "number" if _is_number(value) else "sequence"


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, state_path: Path,
                          meta_path: Path) -> None:
    """A checkpoint's optimizer state against the optimizer it is loaded into, beyond what
    torch's load_state_dict checks: each saved hyper-parameter of the kind the optimizer uses
    (a number for a number...), and each state tensor of its parameter's shape or a scalar;
    otherwise the first training step would fail inside torch."""
    fresh = optimizer.state_dict()["param_groups"]
    _require(len(fresh) == len(saved["param_groups"]), meta_path,
             "optimizer: another number of parameter groups")
    by_index = {}
    for group, loaded, live in zip(fresh, saved["param_groups"], optimizer.param_groups):
        for key in group.keys() & loaded.keys() - {"params"}:
            if _kind(group[key]) != _kind(loaded[key]) and None not in (group[key], loaded[key]):
                raise CheckpointError(f"{meta_path}: invalid checkpoint (optimizer: {key} is a "
                                      f"{_kind(loaded[key])}, the optimizer's is a "
                                      f"{_kind(group[key])})")
        by_index.update(zip(loaded["params"], live["params"]))
    for name, value in saved["state"].items():
        if name not in by_index:
            raise CheckpointError(f"{state_path}: training state does not fit this run "
                                  f"(optimizer state for parameter {name}, which no group has)")
        param = by_index[name]
        for key, tensor in value.items():
            if isinstance(tensor, torch.Tensor) and tensor.numel() != 1 \
                    and tensor.shape != param.shape:
                raise CheckpointError(f"{state_path}: training state does not fit this run "
                                      f"(optimizer {key} of shape {tuple(tensor.shape)} for a "
                                      f"parameter of shape {tuple(param.shape)})")
