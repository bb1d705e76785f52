"""The wheel: built from the source tree, installed into a fresh venv, run from elsewhere.

Nothing is downloaded. The wheel is built with the test interpreter's setuptools (`pip wheel
--no-build-isolation --no-index`, from a copy of the tree, so that no build/ or egg-info lands
in the checkout). The fresh venv sees the already-installed dependencies (torch, numpy, ...)
through a .pth line naming a folder of links to the test venv's site-packages, less this
package's editable install: `import fashion_cnn` there can only find the wheel's copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

import fashion_cnn
from fashion_cnn.devices import torch_build
from fashion_cnn.training.rundir import METRICS_FILE, WEIGHTS_FILE

from conftest import REAL_DIR

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "fashion_cnn"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# What the package reads at run time besides its modules: the zoo and the kernels' C sources.
PACKAGE_DATA_SUFFIXES = (".toml", ".c", ".h")
# The test venv's own install of this package: kept out of the fresh venv's view.
EDITABLE_NAMES = ("fashion_cnn", "fashion-cnn", "__editable__")

needs_real_data = pytest.mark.skipif(
    not any((REAL_DIR / name).exists() for name in
            ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")),
    reason="the real Fashion-MNIST files are not installed")


def run(command: list, cwd: Path, env: dict | None = None, timeout: int = 300):
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", work / "dist"], cwd=work)
    (built,) = (work / "dist").glob("fashion_cnn-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel, the test venv's dependencies visible beside it."""
    work = tmp_path_factory.mktemp("venv")
    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work)
    python = venv / "bin" / "python"
    site_packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                            "['purelib'])"], cwd=work).stdout.strip())
    # A path line in a .pth file only extends sys.path: the .pth files in that folder (the
    # editable install's among them) are not run, and the links leave out its metadata.
    deps = work / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(EDITABLE_NAMES) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    (site_packages / "test_venv_dependencies.pth").write_text(f"{deps}\n")
    # the pip of the test venv, through the .pth line; --no-index: nothing is downloaded
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=work)
    return venv


@pytest.fixture
def outside(tmp_path) -> tuple[Path, dict]:
    """A working directory outside the source tree and an environment whose cache is empty
    (so the C kernels compile from the installed sources) and names no source folder."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["FASHION_CNN_CACHE"] = str(tmp_path / "cache")
    env["FASHION_CNN_FUSED_KERNELS"] = "1"  # train through every kernel the wheel compiled
    return cwd, env


def test_wheel_carries_every_module_zoo_file_and_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    in_tree = {f"fashion_cnn/{path.relative_to(PACKAGE_DIR).as_posix()}"
               for path in PACKAGE_DIR.rglob("*")
               if path.suffix in (".py", *PACKAGE_DATA_SUFFIXES) and "__pycache__" not in path.parts}
    assert in_tree - names == set()
    for pattern in ("fashion_cnn/zoo/models/", "fashion_cnn/zoo/recipes/",
                    "fashion_cnn/zoo/studies/", "fashion_cnn/zoo/searches/"):
        assert any(name.startswith(pattern) and name.endswith(".toml") for name in names), pattern
    kernels = {name for name in names if name.startswith("fashion_cnn/models/kernels/")}
    assert {"fashion_cnn/models/kernels/simd.h", "fashion_cnn/models/kernels/conv1_pool.c"} <= kernels
    assert sum(name.endswith(".c") for name in kernels) >= 4
    assert f"fashion_cnn-{PROJECT['version']}.dist-info/entry_points.txt" in names
    assert wheel.name.startswith(f"fashion_cnn-{PROJECT['version']}-py3-none-any")


def test_installed_wheel_reports_its_version_from_outside_the_tree(venv, outside):
    cwd, env = outside
    done = run([venv / "bin" / "fashion-cnn", "--version"], cwd=cwd, env=env)
    assert PROJECT["version"] == fashion_cnn.__version__
    assert done.stdout.strip() == (f"fashion-cnn {PROJECT['version']} (torch {torch.__version__}, "
                                   f"{torch_build()})")
    # the import resolves to the wheel's copy, with the wheel's metadata and kernel sources
    code = ("import importlib.metadata, json, fashion_cnn; from fashion_cnn.models import kernels; "
            "print(json.dumps({'module': fashion_cnn.__file__, 'version': fashion_cnn.__version__, "
            "'dist': str(importlib.metadata.distribution('fashion-cnn').locate_file('')), "
            "'sources': [str(s) for s in kernels.SOURCES + kernels.HEADERS]}))")
    seen = json.loads(run([venv / "bin" / "python", "-c", code], cwd=cwd, env=env).stdout)
    assert Path(seen["module"]).is_relative_to(venv)
    assert Path(seen["dist"]).is_relative_to(venv)
    assert seen["version"] == PROJECT["version"]
    assert all(Path(path).is_relative_to(venv) and Path(path).is_file()
               for path in seen["sources"])


@pytest.mark.realdata
@needs_real_data
def test_installed_wheel_trains_one_epoch_with_its_own_kernels(venv, outside):
    cwd, env = outside
    report = json.loads(run([venv / "bin" / "fashion-cnn", "env", "--json"], cwd=cwd,
                            env=env).stdout)
    assert report["fashion_cnn"] == PROJECT["version"]
    assert report["data_dir"] is not None
    compiler = env.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler and not env.get("FASHION_CNN_NO_KERNELS"):
        # compiled now, into the empty cache: from the sources the wheel installed
        assert report["kernels_compiled"], report["kernels_status"]
        assert env["FASHION_CNN_CACHE"] in report["kernels_status"]
    out = cwd / "run"
    run([venv / "bin" / "fashion-cnn", "train", "seed-model1", "--epochs", "1", "--subset", "500",
         "--no-plots", "--quiet", "--out", out], cwd=cwd, env=env)
    assert (out / WEIGHTS_FILE).stat().st_size > 0
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["epochs"] == 1 and 0 <= metrics["test_accuracy"] <= 1
    assert metrics["fused_first_block"] == report["kernels_compiled"]
