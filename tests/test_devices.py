"""The device seam: --device, precisions per device, the CPU pass against the plain model,
and checkpoints that do not depend on the device. Tests marked `cuda` run where torch sees a
CUDA GPU and are skipped elsewhere (conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch

import fashion_cnn as fc
from fashion_cnn import devices
from fashion_cnn.cli import main
from fashion_cnn.errors import UserError
from fashion_cnn.models import kernels
from fashion_cnn.models.build import build_model
from fashion_cnn.models.cpu_pass import accelerate, is_accelerated, plain
from fashion_cnn.models.zoo import get_model_spec, list_models

SMALL = {"subset": 600, "epochs": 1, "threads": 1, "batch_size": 64}


# ---- devices ---------------------------------------------------------------------------------

def test_device_names_resolve_or_are_refused_in_library_terms():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("gpu", "cpu:0", "mps:1", "cuda:x", "", "CUDA"):
        with pytest.raises(UserError) as info:
            devices.resolve_device(bad)
        assert info.value.setting == "train.device" and "not a device" in str(info.value)
    expected = ("cuda" if torch.cuda.is_available()
                else "mps" if devices.mps_available() else "cpu")
    assert devices.resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line_and_exit_2(capsys):
    with pytest.raises(UserError) as info:
        devices.resolve_device("cuda:1")
    assert "not available" in str(info.value)
    code = main(["train", "seed-model1", "--device", "cuda", "--epochs", "1", "--no-plots"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("fashion-cnn: error: --device: device 'cuda' is not available")


def test_bad_device_in_a_recipe_names_the_setting(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "model1"\n[train]\ndevice = "tpu"\n')
    with pytest.raises(UserError) as info:
        fc.resolve_config(str(recipe))
    assert "[train] device 'tpu' is not a device" in str(info.value)


# ---- precisions ------------------------------------------------------------------------------

@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    monkeypatch.delenv(devices.EMULATED_BF16_ENV, raising=False)


def test_a_precision_the_device_lacks_is_refused_when_asked_for(cpu_without_bf16):
    cpu = torch.device("cpu")
    assert devices.resolve_precision(cpu, "fp32", True) == ("fp32", None)
    for precision in ("bf16", "fp16"):
        with pytest.raises(UserError) as info:
            devices.resolve_precision(cpu, precision, explicit=True)
        assert info.value.setting == "train.precision"
        assert f"{precision} is not available on cpu" in str(info.value)


def test_a_recipes_default_falls_back_to_fp32_with_a_notice(cpu_without_bf16, monkeypatch):
    cpu = torch.device("cpu")
    precision, notice = devices.resolve_precision(cpu, "bf16", explicit=False)
    assert precision == "fp32" and "not the recipe's bf16" in notice and "fast bf16" in notice
    monkeypatch.setenv(devices.EMULATED_BF16_ENV, "1")  # asked for anyway: bf16, emulated
    assert devices.resolve_precision(cpu, "bf16", explicit=True) == ("bf16", None)


def test_native_bf16_is_used_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.resolve_precision(torch.device("cpu"), "bf16", True) == ("bf16", None)


def test_precision_refusal_on_the_command_line_is_one_line(capsys):
    code = main(["train", "seed-model1", "--device", "cpu", "--precision", "fp16",
                 "--epochs", "1", "--no-plots"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--precision: fp16 is not available on cpu: fp16 training needs a GPU" in err


def test_a_run_records_the_fallback_and_its_device(real_data, cpu_without_bf16, tmp_path,
                                                   capsys):
    cfg = fc.load_config("seed-model1")
    cfg.train.precision = "bf16"  # as a recipe's default: not asked for on the command line
    result = fc.train(cfg, tmp_path / "run", data=real_data, progress=False, plots=False,
                      **SMALL)
    assert "note: training in fp32, not the recipe's bf16" in capsys.readouterr().err
    assert result.config.train.precision == "fp32"
    assert 'precision = "fp32"' in (tmp_path / "run" / "config.toml").read_text()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["device"] == "cpu" and metrics["precision"] == "fp32"
    assert metrics["cpu_pass"] is True and metrics["device_name"].startswith("CPU")


# ---- the CPU pass ------------------------------------------------------------------------

def _images(spec, n=6, seed=0):
    height, width, channels = spec.input_shape
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, height, width, generator=g).contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_cpu_pass_computes_the_plain_models_function(name, precision):
    """Values and gradients of the plain model and the accelerated one, from the same weights
    (eval mode: dropout is the identity, BatchNorm uses its statistics; gradients still flow).
    fp32 agrees to float rounding; bf16 to bf16 rounding (the CPU pass keeps small Dense calls
    in float32 and takes the small-output convolution's weight gradient as one product)."""
    spec = get_model_spec(name)
    reference, fast = build_model(spec, seed=0), accelerate(build_model(spec, seed=0))
    assert is_accelerated(fast) and not is_accelerated(reference)
    assert list(reference.state_dict()) == list(fast.state_dict())
    x = _images(spec)
    results = []
    for model in (reference, fast):
        model.eval()
        with devices.autocast("cpu", precision):
            out = model(x)
        out.float().square().sum().backward()
        with torch.no_grad(), devices.autocast("cpu", precision):
            inference = model(x).float()  # the fused first block runs without gradients
        results.append((out.detach().float(), inference,
                        [p.grad.float() for p in model.parameters()]))
    (out_a, inf_a, grads_a), (out_b, inf_b, grads_b) = results
    if precision == "fp32":
        torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(inf_b, inf_a, rtol=1e-4, atol=1e-5)
        for a, b in zip(grads_a, grads_b):
            scale = a.abs().max().item() or 1.0
            torch.testing.assert_close(b / scale, a / scale, rtol=1e-4, atol=1e-5)
        return
    # bf16 keeps 8 bits of mantissa, and the pass computes some layers in float32 where the
    # plain model computes them in bf16 (the fused first block, small Dense calls): the
    # tensors are compared as wholes, by the relative error of the norm (a wrong layer or
    # order gives errors near 100 %)
    for a, b in [(out_a, out_b), (inf_a, inf_b), *zip(grads_a, grads_b)]:
        assert (b - a).norm() <= 0.1 * a.norm() + 1e-6


def test_plain_undoes_the_pass_and_keeps_the_parameters():
    model = build_model(get_model_spec("model2"), seed=0)
    params = [p for p in model.parameters()]
    types = [type(m) for m in model.modules()]
    assert accelerate(model) is model and [p for p in model.parameters()] == params
    assert plain(model) is model and [type(m) for m in model.modules()] == types
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    assert accelerate(net) is net and not is_accelerated(net)  # other modules: as they are


def test_training_with_and_without_the_cpu_pass_reaches_the_same_weights(real_data, tmp_path,
                                                                          monkeypatch):
    """seed-model1 has no dropout: with the pass on (C kernels, Keras' Adam in C) and off (the
    plain model, torch's fused Adam) the same steps give the same weights up to rounding."""
    monkeypatch.setenv("FASHION_CNN_FUSED_KERNELS", "1")  # the fused layers on any CPU
    runs = {}
    for kernels_on in (True, False):
        out = tmp_path / f"kernels-{kernels_on}"
        runs[kernels_on] = fc.train("seed-model1", out, data=real_data, progress=False,
                                    plots=False, cpu_kernels=kernels_on, **SMALL)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["cpu_pass"] is kernels_on
        assert metrics["fused_first_block"] is (kernels_on and kernels.available())
    fast, reference = (runs[k].model.state_dict() for k in (True, False))
    for key in reference:
        torch.testing.assert_close(fast[key], reference[key], rtol=1e-3, atol=1e-5)
    accuracy = [runs[k].metrics["test_accuracy"] for k in (True, False)]
    assert abs(accuracy[0] - accuracy[1]) <= 0.002


# ---- checkpoints across devices ----------------------------------------------------------

def test_a_run_from_a_device_this_machine_lacks_evaluates_on_the_cpu(real_data, tmp_path,
                                                                     capsys):
    """config.toml says the run trained on "cuda" (as a GPU run's does): weights are saved
    device-independent, so it reloads here, on the CPU, with a notice."""
    out = tmp_path / "run"
    result = fc.train("seed-model1", out, data=real_data, progress=False, plots=False, **SMALL)
    config = out / "config.toml"
    config.write_text(config.read_text().replace('device = "auto"', 'device = "cuda:3"'))
    capsys.readouterr()
    evaluated = fc.evaluate_run(out, data=real_data)
    if not torch.cuda.is_available():
        assert "note: computing on the CPU" in capsys.readouterr().err
        assert evaluated["device"] == "cpu"
    assert evaluated["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"], abs=1e-4)
    _, model = fc.load_model(out, device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    with pytest.raises(UserError) as info:
        fc.load_model(out, device="tpu")
    assert info.value.setting == "device"


# ---- CUDA (skipped without it) -------------------------------------------------------------

@pytest.mark.cuda
def test_training_on_cuda_then_evaluating_on_the_cpu(real_data, tmp_path):
    out = tmp_path / "gpu"
    result = fc.train("seed-model2", out, data=real_data, progress=False, plots=True,
                      device="cuda", **SMALL)
    assert result.metrics["device"].startswith("cuda") and not result.metrics["cpu_pass"]
    on_cpu = fc.evaluate_run(out, data=real_data, device="cpu")
    assert on_cpu["device"] == "cpu"
    assert on_cpu["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"], abs=2e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_precisions_train(real_data, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    result = fc.train("seed-model1", tmp_path / precision, data=real_data, progress=False,
                      plots=False, device="cuda", precision=precision, **SMALL)
    assert result.metrics["precision"] == precision and result.metrics["test_accuracy"] > 0.5


@pytest.mark.cuda
def test_cuda_resume_is_bit_identical(real_data, tmp_path):
    settings = {**SMALL, "epochs": 2, "deterministic": True, "device": "cuda"}
    whole = fc.train("seed-model2", tmp_path / "whole", data=real_data, progress=False,
                     plots=False, **settings)
    first = fc.train("seed-model2", tmp_path / "split", data=real_data, progress=False,
                     plots=False, **{**settings, "epochs": 1})
    done = fc.resume(first.run_dir, epochs=2, data=real_data, progress=False, plots=False)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, done.model.state_dict()[key]), key
