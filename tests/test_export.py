import subprocess
import sys

import numpy as np
import pytest

from fashion_cnn.apps import export
import fashion_cnn as fc
from fashion_cnn.data.fashion_mnist import load_data
from fashion_cnn.errors import UserError
from fashion_cnn.apps.predict import predict_arrays

ort = pytest.importorskip("onnxruntime")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "fashion_cnn", *args], capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from conftest import make_idx_dir

    return load_data(make_idx_dir(tmp_path_factory.mktemp("export") / "idx"), check_md5=False)


def _run(tmp_path, tiny_data, model):
    return fc.train(model, tmp_path / model, data=tiny_data, progress=False, plots=False,
                     epochs=1, threads=1).run_dir


# dense; model3: padded input (36x36) and Dropout; fastnet: 'same' padding and BatchNorm
@pytest.mark.parametrize("model", ["dense", "model3", "fastnet"])
def test_exported_model_gives_pytorchs_probabilities(tmp_path, tiny_data, model):
    run_dir = _run(tmp_path, tiny_data, model)
    result = export.export_onnx(run_dir)
    assert result.path == run_dir / "model.onnx" and result.size_bytes > 1000
    assert result.max_difference <= export.CHECK_TOLERANCE and result.checked_images == 64
    assert sorted(p.name for p in run_dir.iterdir() if "onnx" in p.name) == ["model.onnx"]
    # independently of the built-in check: the same probabilities as `predict` gives, for
    # real-format images and a batch size the export never saw
    config, torch_model = fc.load_model(run_dir)
    pixels = tiny_data.test_images[:13]
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert [i.name for i in session.get_inputs()] == ["pixels"]
    assert names == ["logits", "probabilities"]
    logits, probabilities = session.run(None, {"pixels": pixels})
    expected = predict_arrays(torch_model, config, pixels)
    assert logits.shape == (13, 10) and np.abs(probabilities - expected).max() < 1e-5
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)


def test_a_failed_check_writes_nothing_and_keeps_the_old_file(tmp_path, tiny_data, monkeypatch):
    run_dir = _run(tmp_path, tiny_data, "dense")
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the previous export")
    monkeypatch.setattr(export, "CHECK_TOLERANCE", -1.0)
    with pytest.raises(UserError, match="differ from PyTorch's by .*nothing written"):
        export.export_onnx(run_dir, target)
    assert target.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "model.onnx"]  # no temp file


def test_missing_exporter_packages_are_named(tmp_path, tiny_data, monkeypatch):
    run_dir = _run(tmp_path, tiny_data, "dense")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"export needs the onnxscript package: pip install"):
        export.export_onnx(run_dir)
    assert not (run_dir / "model.onnx").exists()


def test_cli_export(tmp_path, tiny_data):
    run_dir = _run(tmp_path, tiny_data, "dense")
    result = cli("export", str(run_dir), "--out", str(tmp_path / "out" / "dense.onnx"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the exporter's own progress and warnings are kept quiet
    assert "input 'pixels' uint8 (N, 28, 28)" in result.stdout
    assert "Checked with onnxruntime" in result.stdout and (tmp_path / "out" / "dense.onnx").is_file()
    result = cli("export", str(run_dir), "--out", str(tmp_path))
    assert result.returncode == 2 and "is a directory" in result.stderr
    assert result.stderr.count("\n") == 1
