import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import fashion_cnn as fc
from fashion_cnn.training import run
from fashion_cnn.models.build import build_model
from fashion_cnn.training.config import to_toml
from fashion_cnn.models.spec import parse_spec
from fashion_cnn.training.loop import Trainer
from fashion_cnn.training.recipes import load_config


@pytest.fixture(scope="module")
def real_data(real_data):
    """Fashion-MNIST with its first 2,000 test images: these tests train on subsets, and what
    they check holds on any test set (five evaluations of 10,000 images cost a minute here)."""
    import dataclasses

    return dataclasses.replace(real_data, test_images=real_data.test_images[:2000],
                               test_labels=real_data.test_labels[:2000])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "fashion_cnn", *args], capture_output=True, text=True)


def test_two_runs_give_identical_weights_and_history(real_data, tmp_path):
    kwargs = dict(data=real_data, progress=False, plots=False, subset=1500, epochs=1, threads=2)
    a = fc.train("model2", tmp_path / "a", **kwargs)
    b = fc.train("model2", tmp_path / "b", **kwargs)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]
    assert strip(a.history) == strip(b.history)
    c = fc.train("model2", tmp_path / "c", **{**kwargs, "seed": 1})
    wc = load_file(tmp_path / "c" / "model.safetensors")
    first_kernel = next(k for k in wa if k.endswith("weight"))
    assert not torch.equal(wa[first_kernel], wc[first_kernel])


def test_run_directory_contents_and_evaluate_reproduces_metrics(real_data, tmp_path):
    result = fc.train("seed-model1", tmp_path / "r", data=real_data, progress=False, plots=False,
                       subset=1000, epochs=2)
    r = tmp_path / "r"
    for name in ("config.toml", "history.csv", "model.safetensors", "metrics.json"):
        assert (r / name).is_file(), name
    header, *rows = (r / "history.csv").read_text().strip().splitlines()
    assert header.split(",")[:6] == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "penalty"]
    assert len(rows) == 2
    metrics = json.loads((r / "metrics.json").read_text())
    for key in ("test_loss", "test_accuracy", "params", "epochs", "train_seconds", "samples_per_second"):
        assert key in metrics
    assert metrics["params"] == 93322 and metrics["epochs"] == 2
    from fashion_cnn.models import kernels
    fused_layers = kernels.available() and kernels.fused_layers_pay_off()  # AVX2, AVX-512
    assert metrics["fused_first_block"] is fused_layers  # model1 opens with the block
    assert metrics["fused_adam"] is kernels.available()  # Keras' Adam, float32 weights
    assert metrics["fused_pool"] is fused_layers         # its second max pool
    again = fc.evaluate_run(r, data=real_data)
    assert again["test_accuracy"] == metrics["test_accuracy"]
    assert again["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)
    # The saved config alone re-creates the run's configuration.
    cfg = load_config(str(r / "config.toml"))
    assert cfg.fingerprint() == result.config.fingerprint()
    assert to_toml(cfg) == (r / "config.toml").read_text()


def test_existing_run_dir_is_never_overwritten(real_data, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("mine")
    result = cli("train", "dense", "--out", str(tmp_path / "r"), "--subset", "200", "--epochs", "1")
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (tmp_path / "r" / "keep.txt").read_text() == "mine"


def test_regularization_penalty_equals_hand_computation():
    spec = parse_spec({"input_shape": [28, 28, 1], "layers": [
        {"type": "Flatten"},
        {"type": "Dense", "units": 3, "kernel_regularizer": "l2(0.01)", "bias_regularizer": "l1(0.5)"},
        {"type": "Dense", "units": 10, "kernel_regularizer": "l1_l2(l1=0.1, l2=0.2)"}]})
    model = build_model(spec, seed=0)
    d1, d2 = model.layers[1], model.layers[2]  # no activation: bare Linear modules
    with torch.no_grad():
        d1.bias.copy_(torch.tensor([1.0, -2.0, 3.0]))
    expected = (0.01 * (d1.weight ** 2).sum() + 0.5 * d1.bias.abs().sum()
                + 0.1 * d2.weight.abs().sum() + 0.2 * (d2.weight ** 2).sum())
    assert torch.allclose(model.regularization_penalty(), expected)
    assert model.regularization_penalty().item() > 3.0  # the l1 bias term alone is 3.0


def test_penalty_recorded_separately_and_in_loss(real_data):
    cfg = fc.resolve_config("seed-model1-l2", **{"data.subset": 600, "train.epochs": 1})
    splits = run.splits_for(cfg, real_data)
    trainer = Trainer(cfg, splits)
    logs = trainer.fit()[0]
    assert logs["penalty"] > 0
    plain = trainer.model.regularization_penalty().item()
    val_data_loss = run.evaluate(trainer.model, splits.x_val, splits.y_val)["loss"]
    assert logs["val_loss"] == pytest.approx(val_data_loss + plain, rel=1e-5)


def test_dropout_active_only_in_training():
    model = build_model(load_config("model2").model, seed=0)
    x = torch.randn(4, 1, 28, 28)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_recipe_settings_and_overrides(tmp_path):
    cfg = fc.resolve_config("seed-model4", **{"train.epochs": 3, "augment.enabled": False})
    assert cfg.train.batch_size == 128 and cfg.train.steps_fraction == 0.75
    assert cfg.train.epochs == 3 and cfg.augment.enabled is False
    assert cfg.augment.rotation_range == 2.0 and cfg.pad == 4
    assert fc.resolve_config("seed-model2").train.batch_size == 32


def test_steps_fraction_runs_fewer_steps(real_data):
    cfg = fc.resolve_config("seed-model4", **{"data.subset": 1280, "train.epochs": 1})
    trainer = Trainer(cfg, run.splits_for(cfg, real_data))
    trainer.fit()
    assert trainer.state.step == int(8 * 0.75)  # 1024 training images / 128 = 8 steps


def test_cli_train_and_evaluate_smoke(real_data, tmp_path):
    out = tmp_path / "run"
    result = cli("train", "dense", "--subset", "500", "--epochs", "1", "--out", str(out),
                 "--no-plots", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "Test accuracy:" in result.stdout and str(out) in result.stdout
    result = cli("evaluate", str(out), "--json")
    assert result.returncode == 0
    payload = json.loads(result.stdout)
    assert payload["test_accuracy"] == json.loads((out / "metrics.json").read_text())["test_accuracy"]
    assert set(payload["per_class_accuracy"]) >= {"T-shirt/top", "Ankle boot"}
    result = cli("evaluate", str(out), "--tta", "flip")  # trained without flips: say so
    assert result.returncode == 0, result.stderr
    plain_accuracy = payload["test_accuracy"]  # this run has no TTA of its own
    assert (f"(test-time augmentation: flip; without it: {plain_accuracy:.4f})"
            in result.stdout), result.stdout
    assert "trained without horizontal flips" in result.stderr


@pytest.mark.parametrize("args,fragment", [
    (["train", "model1", "--epochs", "0"], "[train] epochs must be at least 1"),
    (["train", "model1", "--set", "train.optimiser=sgd"], "unknown setting 'optimiser'"),
    (["train", "model1", "--set", "augment.fill_mode=wrap"], "must be one of nearest, constant, reflect"),
    (["train", "model1", "--set", "augment.interpolation_order=3"], "must be 0 (nearest) or 1"),
    (["summary", "nosuch.toml"], "nosuch.toml: file not found"),
    (["evaluate", "/nonexistent/run"], "not a run directory"),
])
def test_user_errors_are_one_line(args, fragment):
    result = cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and fragment in result.stderr


@pytest.mark.parametrize("cpu_pass", [False, True])
def test_dropout_keeps_one_minus_rate_and_rescales(cpu_pass):
    from fashion_cnn.models.cpu_pass import CpuDropout
    from fashion_cnn.models.modules import Dropout

    dropout = (CpuDropout if cpu_pass else Dropout)(0.3).train()
    for use_kernel in ((True, False) if cpu_pass else (None,)):
        if cpu_pass:
            dropout.use_kernel = use_kernel  # the C kernel's masks, then the 15-bit masks
        y = dropout(torch.ones(200_000))
        kept = (y != 0).float().mean().item()
        assert abs(kept - 0.7) < 0.005
        assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))
        x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
        assert dropout(x).is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(dropout.eval()(x), x)
        dropout.train()


def test_dropout_mask_is_uniform_and_follows_the_layout():
    from fashion_cnn.models.cpu_pass import uniform_15bit_like

    torch.manual_seed(0)
    x = torch.zeros(64, 8, 20, 20).contiguous(memory_format=torch.channels_last)
    lanes = uniform_15bit_like(x)
    assert lanes.shape == x.shape and lanes.is_contiguous(memory_format=torch.channels_last)
    assert int(lanes.min()) >= 0 and int(lanes.max()) < 32768
    values = lanes.flatten().float()
    # every one of the four lanes of a 64-bit word is uniform on [0, 32768): mean 16383.5
    for lane in range(4):
        assert abs(values[lane::4].mean().item() / 16383.5 - 1) < 0.01
    # and the values are not correlated with their neighbours
    a, b = values[:-1] - values.mean(), values[1:] - values.mean()
    assert abs((a * b).mean().item() / values.var().item()) < 0.01


def test_tta_views_are_the_image_and_its_one_pixel_shifts():
    from fashion_cnn.training.loop import tta_views

    x = torch.zeros(2, 1, 6, 6)
    x[:, :, 2, 3] = 1.0  # one bright pixel at row 2, column 3
    assert tta_views(x, "none") == [x]
    views = tta_views(x, "shift")
    assert len(views) == 5 and torch.equal(views[0], x)
    bright = [tuple(int(i) for i in (v[0, 0] == 1).nonzero()[0]) for v in views[1:]]
    assert bright == [(2, 4), (2, 2), (3, 3), (1, 3)]  # right, left, down, up
    assert all(v.shape == x.shape for v in views)
    plain, mirror = tta_views(x, "flip")
    assert torch.equal(plain, x) and (mirror[0, 0] == 1).nonzero().tolist() == [[2, 2]]


def test_tta_averages_the_logits_of_the_views():
    from fashion_cnn.training.loop import predict_logits, tta_views

    model = build_model(load_config("model1").model, seed=0).eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        for tta in ("shift", "flip"):
            expected = torch.stack([model(v) for v in tta_views(x, tta)]).mean(0)
            got = predict_logits(model, x, batch_size=3, tta=tta)
            assert torch.allclose(got, expected, atol=1e-5), tta
            assert not torch.allclose(got, predict_logits(model, x), atol=1e-4), tta


def test_run_with_tta_reports_both_accuracies_and_evaluate_can_switch_it(real_data, tmp_path):
    out = tmp_path / "r"
    # fp32: the subject is what is reported, and 4 evaluations of 5 views of the 10,000 test
    # images cost minutes in bf16 on a CPU that only emulates it
    result = fc.train("fast", out, data=real_data, progress=False, plots=False, subset=1000,
                       epochs=1, **{"train.tta": "shift", "data.validation_split": 0.1,
                                    "train.precision": "fp32"})
    metrics = result.metrics
    assert metrics["tta"] == "shift"
    assert {"val_accuracy_tta", "test_accuracy_without_tta"} <= set(metrics)
    assert fc.evaluate_run(out, data=real_data)["test_accuracy"] == metrics["test_accuracy"]
    plain = fc.evaluate_run(out, data=real_data, tta="none")
    assert plain["test_accuracy"] == metrics["test_accuracy_without_tta"] and plain["tta"] == "none"
    assert "test_accuracy_without_tta" not in plain
    assert plain["trained_with_flips"]  # `fast` mirrors half of each batch
    # the plain accuracy comes from the first view of the TTA pass: it must equal a plain pass
    assert fc.evaluate_run(out, data=real_data)["test_accuracy_without_tta"] == plain["test_accuracy"]


def test_run_without_validation_split_trains_on_everything_and_reports_no_val(real_data, tmp_path):
    result = fc.train("fast", tmp_path / "r", data=real_data, progress=False, plots=True,
                       subset=600, epochs=1, **{"data.validation_split": 0.0,
                                                "train.precision": "fp32"})
    metrics = result.metrics
    assert metrics["val_accuracy"] is None and metrics["best_val_accuracy"] is None
    assert "val_accuracy_tta" not in metrics and metrics["best_epoch"] is None
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_size"] == 2000
    header, row = (tmp_path / "r" / "history.csv").read_text().strip().splitlines()
    assert row.split(",")[3:5] == ["", ""]  # val_loss, val_accuracy left empty, not zero
    assert (tmp_path / "r" / "plots" / "metrics.png").stat().st_size > 0


def peak_before_and_after_reset(setup: str) -> tuple[float, float]:
    """Run `setup` in a fresh process (so that memory kept by earlier tests plays no part),
    then run.reset_peak_rss(): the peak in MiB before and after the reset."""
    import os
    import subprocess
    import sys
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs here: the peak is the process's")
    code = ("import torch\n"
            "from fashion_cnn import perf\nfrom fashion_cnn.training import run\n"
            f"{setup}\n"
            "before = run.peak_rss_mib()\n"
            "run.reset_peak_rss()\n"
            "print(before, run.peak_rss_mib())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "skip":
        pytest.skip("not glibc: the allocator setting does not apply")
    before, after = map(float, done.stdout.split())
    return before, after


def test_peak_memory_count_restarts_for_each_run():
    # a study trains its runs in one process: each run's metrics.json must hold its own peak
    high, after = peak_before_and_after_reset(
        "run.reset_peak_rss()\n"
        "block = torch.ones(256 * 1024 * 1024 // 4)  # 256 MiB, touched\n"
        "del block")
    assert after < high - 128


def test_memory_the_allocator_kept_from_a_run_is_not_the_next_runs():
    # configure_runtime() makes glibc keep freed buffers (fast steps); a run's start gives them
    # back before the count restarts, or a study's later runs would report the earlier ones'
    kept, after = peak_before_and_after_reset(
        "if not perf.keep_freed_memory(): print('skip'); raise SystemExit\n"
        "blocks = [torch.ones(16 * 1024 * 1024 // 4) for _ in range(16)]  # 256 MiB\n"
        "del blocks  # kept by the allocator: 16 MiB is below the mmap threshold now")
    assert after < kept - 128


def test_compiled_training_runs_a_model_with_dropout(real_data, tmp_path, monkeypatch,
                                                    precision="bf16"):
    # model2: dropout and a small-output convolution, whose eager paths (the C kernel, the
    # int16 mask lanes, the custom weight gradient) torch.compile must not see; in bf16, where
    # every one of them would run (fp32 compiles the same graph without the bf16-only paths)
    monkeypatch.setenv("FASHION_CNN_FUSED_KERNELS", "1")  # eager would take them on any CPU
    result = fc.train("model2", tmp_path / "r", data=real_data, progress=False, plots=False,
                       subset=256, epochs=1, batch_size=64, compile=True, precision=precision)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["compile_seconds"] > 0
    assert metrics["fused_dropout"] is False and metrics["fused_first_block"] is False
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert torch.isfinite(torch.tensor(result.history[-1]["loss"]))
