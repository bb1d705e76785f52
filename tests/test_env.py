"""`fashion-cnn --version` and `fashion-cnn env`: what a user pastes into a bug report."""

from __future__ import annotations

import json
import platform
import tomllib
from pathlib import Path

import pytest
import torch

import fashion_cnn as fc
from fashion_cnn import devices
from fashion_cnn.apps import environment
from fashion_cnn.cli import main
from fashion_cnn.data import fashion_mnist as fdata
from fashion_cnn.errors import DataError
from fashion_cnn.models import kernels

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture(scope="module")
def report() -> dict:
    return fc.environment_report()


def test_version_flag_prints_the_package_torch_and_its_build(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == (f"fashion-cnn {fc.__version__} (torch {torch.__version__}, "
                                       f"{devices.torch_build()})\n")
    assert fc.__version__ == tomllib.loads(PYPROJECT.read_text())["project"]["version"]


def test_report_holds_each_item(report):
    assert report["fashion_cnn"] == fc.__version__
    assert report["python"] == platform.python_version()
    assert report["platform"] == platform.platform()
    assert (report["torch"], report["torch_build"]) == (torch.__version__, devices.torch_build())
    assert report["devices"] == devices.devices_seen() and report["devices"][0] == "cpu"
    assert report["auto_device"] == str(devices.auto_device())
    # every device seen, each with every precision: None where it has it, else why not
    assert list(report["precisions"]) == [seen.split(" ")[0] for seen in report["devices"]]
    assert report["precisions"]["cpu"] == devices.precision_support(torch.device("cpu"))
    assert set(report["precisions"]["cpu"]) == set(devices.PRECISIONS)
    assert report["precisions"]["cpu"]["fp32"] is None
    assert report["cpu_threads"] == torch.get_num_threads()
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["kernels_compiled"] == kernels.available()
    assert report["kernels_status"] == kernels.status() != ""
    assert report["fused_layers"] is kernels.fused_layers_pay_off()
    assert report["fused_layers_note"].startswith("on" if report["fused_layers"] else "off")
    try:
        assert report["data_dir"] == str(fdata.find_data_dir())
        assert report["data_dir_error"] is None
    except DataError as exc:
        assert (report["data_dir"], report["data_dir_error"]) == (None, str(exc))
    assert report["cache_dir"] == str(fdata.cache_root())
    assert set(report["optional_packages"]) >= {"onnx", "onnxruntime", "optuna", "h5py"}
    assert all(version for version in report["optional_packages"].values())
    assert json.loads(json.dumps(report)) == report  # plain JSON types only


def test_env_command_prints_each_item_as_text_and_json(capsys):
    report = fc.environment_report()  # as the command sees it now (threads may have changed)
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert text.strip() == fc.format_environment(report)
    for value in (report["fashion_cnn"], report["python"], report["platform"], report["torch"],
                  f"{report['torch_build']} build", report["auto_device"], report["cache_dir"],
                  report["data_dir"] or report["data_dir_error"],
                  report["kernels_status"].removeprefix("C kernels: "),
                  f"{report['cpu_threads']} (of", str(report["cpu_capability"])):
        assert value in text
    fused = report["fused_layers"]
    assert "fused layers" in text
    assert ("on (first" in text) is fused and ("off: " in text) is not fused
    for seen in report["devices"]:
        assert seen in text
    for reason in report["precisions"]["cpu"].values():
        assert (reason or "fp32 yes") in text
    for name, version in report["optional_packages"].items():
        assert any(line.split() == [name, *version.split()] for line in text.splitlines())
    assert main(["env", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == report


def test_report_says_why_data_or_a_package_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(fdata, "SYSTEM_DIR", tmp_path / "no-system-data")
    monkeypatch.setenv("FASHION_CNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(environment, "OPTIONAL_PACKAGES", ("onnx", "no-such-package-here"))
    report = fc.environment_report()
    assert report["data_dir"] is None
    assert "Fashion-MNIST not found" in report["data_dir_error"]
    assert str(tmp_path / "no-system-data") in report["data_dir_error"]
    assert report["cache_dir"] == str(tmp_path / "cache")
    assert report["optional_packages"]["no-such-package-here"] == "not installed"
    text = fc.format_environment(report)
    assert f"not found: {report['data_dir_error']}" in text
    assert "no-such-package-here" in text and "not installed" in text
