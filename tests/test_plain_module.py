"""Training any torch.nn.Module: fashion_cnn.train(..., model=net), checkpoints, exact resume
after SIGKILL, figures, evaluation, and the one-line refusals without the module.

The network is a plain nn.Sequential (with Dropout, so the global generator matters) defined
in a small file this test writes and puts on the path, so that a training subprocess can build
the same one. Runs are tiny (1,024 images, 2 epochs, one thread, fp32), so results are bit-exact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fashion_cnn as fc
from fashion_cnn import cli
from fashion_cnn.training import checkpoint, run

NET_SOURCE = '''
import torch
from torch import nn


def make_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
                         nn.Flatten(), nn.Linear(8 * 13 * 13, 10))
'''
SETTINGS = {"epochs": 2, "subset": 1024, "batch_size": 64, "threads": 1, "precision": "fp32"}
FIGURES = ("metrics.png", "confusion_matrix.png", "confusion_matrix_normalized.png",
           "predictions.png", "misclassified.png", "weights.png", "activations.png")


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def netfile(tmp_path, monkeypatch):
    """The directory holding plainnet.py (make_net), on this process's path."""
    directory = tmp_path / "nets"
    directory.mkdir()
    (directory / "plainnet.py").write_text(NET_SOURCE)
    monkeypatch.syspath_prepend(str(directory))
    sys.modules.pop("plainnet", None)
    yield directory
    sys.modules.pop("plainnet", None)


def make_net(seed: int = 0):
    import plainnet

    return plainnet.make_net(seed)


def test_plain_module_trains_checkpoints_draws_figures_and_evaluates(real_data, netfile, tmp_path,
                                                                    capsys):
    net = make_net()
    out = tmp_path / "run"
    result = fc.train(out=out, model=net, data=real_data, progress=False, **SETTINGS)
    assert result.model is net
    params = sum(p.numel() for p in net.parameters())
    config = (out / "config.toml").read_text()
    assert "[module]" in config and "[model]" not in config
    assert 'class = "torch.nn.modules.container.Sequential"' in config
    assert f"params = {params}" in config
    assert result.metrics["params"] == params and result.metrics["epochs"] == 2
    assert not result.metrics["fused_first_block"] and not result.metrics["fused_pool"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "epoch_1", "epoch_2"]
    for name in (*FIGURES, "per_class.csv", "confused_pairs.csv", "confusion_matrix.csv"):
        assert (out / "plots" / name).stat().st_size > 0, name
    assert result.per_class

    # evaluation and reloading take a new instance of the module
    again = fc.evaluate_run(out, data=real_data, model=make_net())
    assert again["test_correct"] == result.metrics["test_correct"]
    _, reloaded = fc.load_model(out, "1", model=make_net())
    assert torch.equal(load_file(out / "checkpoints" / "epoch_1" / "model.safetensors")["5.weight"],
                       reloaded[5].weight)

    # without it: one line naming the module and what to pass
    with pytest.raises(fc.UserError, match=r"plain PyTorch module \(torch\.nn\.modules\.container"
                                           r"\.Sequential, [\d,]+ parameters\).*"
                                           r"model=Sequential\(\) to fashion_cnn\.resume"):
        fc.resume(out, data=real_data, progress=False)
    with pytest.raises(fc.UserError, match=r"has [\d,]+ parameters, the given one"):
        fc.evaluate_run(out, data=real_data, model=torch.nn.Sequential(torch.nn.Flatten(),
                                                                       torch.nn.Linear(784, 10)))
    with pytest.raises(fc.UserError, match="only Python code can rebuild"):
        fc.train(out / "config.toml", tmp_path / "again", data=real_data)
    for command in (["resume", out], ["evaluate", out]):
        assert cli.main([str(a) for a in command]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("fashion-cnn: error:")]
        assert len(lines) == 1 and "plain PyTorch module" in lines[0], err


def test_trainer_takes_any_module_and_refuses_a_wrong_output_in_one_line(real_data, tmp_path):
    cfg = fc.resolve_config("dense", subset=256, epochs=1, threads=1)
    splits = run.splits_for(cfg, real_data)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    history = fc.Trainer(cfg, splits, model=net).fit()
    assert len(history) == 1 and history[0]["penalty"] == 0.0

    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 3))
    with pytest.raises(fc.UserError, match=r"returned shape \(2, 3\).*logits of shape \(N, 10\)"):
        fc.train(out=tmp_path / "run", model=wrong, data=real_data, progress=False, **SETTINGS)
    assert not (tmp_path / "run").exists()


def test_tied_and_shared_tensors_checkpoint_and_load(tmp_path):
    """safetensors refuses tensors that share memory; a module's state_dict may hold them."""
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight                        # one Parameter, two names
            self.register_buffer("head", self.a.bias.data[:2])   # a view of another tensor

    model = Tied()
    path = tmp_path / "w.safetensors"
    checkpoint.save_weights(model, path)
    fresh = Tied()
    checkpoint.load_weights(fresh, path)
    assert torch.equal(fresh.a.weight, model.a.weight) and fresh.b.weight is fresh.a.weight
    assert torch.equal(fresh.head, model.a.bias[:2])


def _start_paused(script: str, env: dict, marker: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training ended (rc {proc.returncode}) before pausing:\n"
                        f"{proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training never paused")
        time.sleep(0.05)
    return proc


def test_plain_module_resumes_bit_identically_after_sigkill(real_data, netfile, tmp_path):
    reference = fc.train(out=tmp_path / "reference", model=make_net(), data=real_data,
                         progress=False, plots=False, **SETTINGS).run_dir
    r = tmp_path / "r"
    marker = tmp_path / "paused"
    script = (f"import fashion_cnn, plainnet\n"
              f"fashion_cnn.train(out={str(r)!r}, model=plainnet.make_net(), progress=False, "
              f"plots=False, **{SETTINGS!r})\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHION_CNN_PAUSE")}
    env.update(PYTHONPATH=os.pathsep.join([str(netfile), env.get("PYTHONPATH", "")]),
               FASHION_CNN_PAUSE_AT="batch", FASHION_CNN_PAUSE_PATH="epoch=2,batch=5;",
               FASHION_CNN_PAUSE_MARKER=str(marker))
    proc = _start_paused(script, env, marker)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in checkpoint.list_checkpoints(r)] == ["best", "epoch_1"]

    done = fc.resume(r, model=make_net(seed=1), data=real_data, progress=False, plots=False)
    a, b = load_file(r / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["epoch"] for h in done.history] == [1, 2]
    assert ([{k: v for k, v in h.items() if k != "seconds"} for h in fc.RunDir(r).read_history()]
            == [{k: v for k, v in h.items() if k != "seconds"}
                for h in fc.RunDir(reference).read_history()])
    assert done.metrics["test_loss"] == fc.RunDir(reference).read_metrics()["test_loss"]
