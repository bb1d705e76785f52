"""What this installation runs on: the report a user pastes into a bug report (`fashion-cnn env`).

>>> report = environment_report()
>>> report["torch_build"], report["auto_device"]                  # doctest: +SKIP
('CPU', 'cpu')
>>> print(format_environment(report))                               # doctest: +SKIP
fashion-cnn       0.1.0
python            3.11.7 (CPython) on Linux-6.8.0-x86_64-with-glibc2.36
...

Nothing here changes a setting: it asks torch, the C kernels and the data finder what they see.
Asking the kernels compiles them on the first call (as a training run would), so that the
report says whether they compile on this machine, not only whether a compiler is there.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from .. import devices
from ..data.fashion_mnist import cache_root, find_data_dir
from ..errors import DataError
from ..models import kernels

# The extras' packages (pyproject's export, tune and keras): their versions, read from the
# installed metadata without importing them (onnxruntime alone takes a second to import).
OPTIONAL_PACKAGES = ("onnx", "onnxscript", "onnxruntime", "optuna", "h5py")
NOT_INSTALLED = "not installed"
_LABEL_WIDTH = 18


def package_version() -> str:
    """The installed package's version ("0+unknown" for a source tree never installed);
    fashion_cnn.__version__."""
    try:
        return importlib.metadata.version("fashion-cnn")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def version_line() -> str:
    """`fashion-cnn --version`: "fashion-cnn 0.1.0 (torch 2.13.0+cpu, CPU)"."""
    return f"fashion-cnn {package_version()} (torch {torch.__version__}, {devices.torch_build()})"


def _device_name(seen: str) -> str:
    """"cuda:0 (NVIDIA H200, ...)" -> "cuda:0": devices_seen's entries start with the name."""
    return seen.split(" ", 1)[0]


def _optional_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def environment_report() -> dict:
    """The versions, devices, precisions, C kernels, data and cache directories, as a dict that
    json.dumps writes as it is. A precision's entry is None where the device has it, else why
    not; `data_dir` is None where Fashion-MNIST was not found, with the reason in
    `data_dir_error`."""
    seen = devices.devices_seen()
    try:
        data_dir, data_error = str(find_data_dir()), None
    except DataError as exc:
        data_dir, data_error = None, str(exc)
    capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return {
        "fashion_cnn": package_version(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_build": devices.torch_build(),
        "devices": seen,
        "auto_device": str(devices.auto_device()),
        "precisions": {_device_name(entry): devices.precision_support(
            torch.device(_device_name(entry))) for entry in seen},
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": capability() if capability else None,
        "kernels_compiled": kernels.available(),  # compiles them on the first call
        "kernels_status": kernels.status(),
        "fused_layers": kernels.fused_layers_pay_off(),  # the default of every CPU model
        "fused_layers_note": kernels.fused_layers_note(),
        "data_dir": data_dir,
        "data_dir_error": data_error,
        "cache_dir": str(cache_root()),
        "optional_packages": {name: _optional_version(name) for name in OPTIONAL_PACKAGES},
    }


def _line(label: str, value: object) -> str:
    return f"{label:<{_LABEL_WIDTH}}{value}"


def format_environment(report: dict) -> str:
    """environment_report()'s dict as aligned lines of text, one fact a line."""
    lines = [
        _line("fashion-cnn", report["fashion_cnn"]),
        _line("python", f"{report['python']} ({report['python_implementation']}) on "
                        f"{report['platform']}"),
        _line("torch", f"{report['torch']} ({report['torch_build']} build)"),
        _line("devices", ", ".join(report["devices"])),
        _line("auto device", report["auto_device"]),
    ]
    label = "precisions"
    for device, support in report["precisions"].items():
        for index, (precision, reason) in enumerate(support.items()):
            shown = device if index == 0 else ""  # the device once, above its precisions
            lines.append(_line(label, f"{shown:<8}{precision} "
                                      f"{'yes' if reason is None else 'no: ' + reason}"))
            label = ""
    lines += [
        _line("cpu threads", f"{report['cpu_threads']} (of {report['cpu_count']} logical "
                             f"cores; capability {report['cpu_capability']})"),
        _line("C kernels", report["kernels_status"].removeprefix("C kernels: ")),
        _line("fused layers", report["fused_layers_note"]),
        _line("data", report["data_dir"] or f"not found: {report['data_dir_error']}"),
        _line("cache", report["cache_dir"]),
    ]
    lines += [_line(name, version) for name, version in report["optional_packages"].items()]
    return "\n".join(lines)
