"""Which device a run computes on, and in which precision (the device seam).

    >>> resolve_device("cpu")
    device(type='cpu')

`train.device` (`--device`) is "auto", "cpu", "cuda", "cuda:N" or "mps", as timm's `--device`
and Lightning's `accelerator=`: "auto" takes CUDA when torch sees a CUDA (or ROCm) GPU, else
Apple's MPS, else the CPU. A device that is not there is a UserError naming the setting; the
run never falls back to the CPU silently.

`train.precision` is "fp32", "bf16" or "fp16", applied with torch.autocast for the device's
type (the loss, the optimizer and BatchNorm statistics stay in float32). fp16 on CUDA and MPS
trains with a gradient scaler. A precision the device lacks is refused when the user asked for
it, and a recipe's default falls back to fp32 with a notice (resolve_precision).
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

from .errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Set to 1 to train in bf16 on a CPU that only emulates it (no AVX512-BF16 or AMX): correct,
# but several times slower than fp32 there; for comparing results across machines.
EMULATED_BF16_ENV = "FASHION_CNN_ALLOW_EMULATED_BF16"

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def auto_device() -> torch.device:
    """CUDA (or ROCm) when torch sees a GPU, else Apple's MPS, else the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    if mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def torch_build() -> str:
    """What this torch was built for: "CPU", "CUDA 12.8" or "ROCm 6.3"."""
    hip = getattr(torch.version, "hip", None)
    if hip:
        return f"ROCm {hip}"
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}"
    return "CPU"


def is_device_name(name) -> bool:
    """Whether `name` has one of DEVICE_CHOICES' forms (whether or not that device is here)."""
    match = _DEVICE_PATTERN.match(name) if isinstance(name, str) else None
    return bool(match) and (match.group(2) is None or match.group(1) == "cuda")


def check_device_name(name: str, setting: str = "train.device") -> str:
    """`name` if it is one of DEVICE_CHOICES' forms; UserError naming `setting` otherwise."""
    if not is_device_name(name):
        raise UserError(f"{name!r} is not a device; use one of {', '.join(DEVICE_CHOICES)}",
                        setting=setting)
    return name


def resolve_device(name: str | torch.device = "auto", setting: str = "train.device") -> torch.device:
    """The torch.device `name` stands for, on this machine; UserError (naming `setting`) for a
    device that is not here, with what this torch build can use instead."""
    if isinstance(name, torch.device):
        name = str(name)
    name = check_device_name(name, setting)
    if name == "auto":
        return auto_device()
    device = torch.device(name)
    if device.type == "cuda":
        if not cuda_available():
            why = ("this torch is a CPU build" if torch_build() == "CPU"
                   else f"torch ({torch_build()}) sees no GPU")
            raise UserError(f"device {name!r} is not available: {why}; use cpu or auto",
                            setting=setting)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"device {name!r} is not available: torch sees {count} CUDA "
                            f"device(s), cuda:0 to cuda:{count - 1}", setting=setting)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "mps" and not mps_available():
        raise UserError("device 'mps' is not available: no Apple GPU here (or this torch "
                        "was built without MPS); use cpu or auto", setting=setting)
    return device


def cpu_has_native_bf16() -> bool:
    """True when oneDNN has fast bf16 kernels on this CPU: AVX-512 cores (AVX512-BF16 and AMX
    natively, plain AVX-512 by oneDNN's own conversion, which still beats float32 there: the
    bf16 figures of benchmarks/RESULTS.md). On AVX2-only CPUs PyTorch's bf16 is several times
    slower than float32."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_support(device: torch.device) -> dict[str, str | None]:
    """For each precision, None where `device` has it, else the reason it does not."""
    support: dict[str, str | None] = {"fp32": None, "bf16": None, "fp16": None}
    if device.type == "cpu":
        if not cpu_has_native_bf16() and os.environ.get(EMULATED_BF16_ENV) != "1":
            support["bf16"] = ("this CPU has no fast bf16 (no AVX-512): PyTorch emulates it, "
                               f"several times slower than fp32 (set {EMULATED_BF16_ENV}=1 to "
                               "use it anyway)")
        support["fp16"] = "fp16 training needs a GPU (use bf16 or fp32 on the CPU)"
    elif device.type == "cuda":
        # is_bf16_supported() asks about the current device, and counts emulation as support
        if torch.version.cuda and torch.cuda.get_device_capability(device) < (8, 0):
            support["bf16"] = (f"{torch.cuda.get_device_name(device)} has no bf16 "
                               f"(compute capability 8.0 or later); use fp16")
    elif device.type == "mps":
        if not _mps_bf16():
            support["bf16"] = "this Apple GPU (or macOS) has no bf16; use fp16"
    return support


def _mps_bf16() -> bool:
    try:
        torch.zeros(1, dtype=torch.bfloat16, device="mps")
        return True
    except (RuntimeError, TypeError):
        return False


def resolve_precision(device: torch.device, precision: str, explicit: bool,
                      setting: str = "train.precision") -> tuple[str, str | None]:
    """(the precision to train in, a one-line notice or None).

    A precision the device lacks is a UserError when the user asked for it (`explicit`: a
    command-line flag, an API argument); a recipe's default falls back to fp32 with a notice.
    """
    if precision not in PRECISIONS:
        raise UserError(f"{precision!r} is not a precision; use one of {', '.join(PRECISIONS)}",
                        setting=setting)
    reason = precision_support(device).get(precision)
    if reason is None:
        return precision, None
    if explicit:
        raise UserError(f"{precision} is not available on {device}: {reason}", setting=setting)
    return "fp32", f"training in fp32, not the recipe's {precision}: {reason}"


def autocast(device: torch.device | str, precision: str):
    """torch.autocast for `device`'s type in `precision`; a no-op context for fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(device_type, dtype=dtype)


def needs_grad_scaler(device: torch.device, precision: str) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has float32's range."""
    return precision == "fp16" and device.type in ("cuda", "mps")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for honest timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device: torch.device) -> str:
    """What the device is, for records: the GPU's name, or the CPU's instruction set."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({torch.backends.cpu.get_cpu_capability()})"


def devices_seen() -> list[str]:
    """Every device this torch can use here, as "cpu", "cuda:0 (NVIDIA H200, 139.8 GiB)"..."""
    seen = ["cpu"]
    if cuda_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            seen.append(f"cuda:{index} ({props.name}, {props.total_memory / 2**30:.1f} GiB, "
                        f"compute capability {props.major}.{props.minor})")
    if mps_available():
        seen.append("mps")
    return seen


def get_rng_state(device: torch.device) -> torch.Tensor | None:
    """The global generator's state of a GPU device (dropout draws from it there); None on the
    CPU, whose global generator checkpoints save anyway."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)
