"""Data-parallel training over two processes (torch.distributed, gloo), as torchrun runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from fashion_cnn.training import distributed
from fashion_cnn.data.fashion_mnist import load_data
from fashion_cnn.training.run import resolve_config, splits_for
from fashion_cnn.training.loop import Trainer

TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(trainer: Trainer, steps: int) -> None:
    trainer.steps_per_epoch = steps
    trainer.train_one_epoch()


def _worker(rank: int, world: int, port: int, idx_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    succeeded = False
    try:
        cfg = resolve_config("model1", **{"train.threads": 1, "train.batch_size": 24})
        trainer = Trainer(cfg, splits_for(cfg, load_data(idx_dir, check_md5=False)))
        _steps(trainer, 3)
        if rank == 0:
            save_file({k: v.detach().contiguous() for k, v in
                       trainer.model.state_dict().items()}, out)
        succeeded = True
    finally:
        # as the command line ends: wait for process 0's file, then close the group in order;
        # a process that leaves first can make gloo abort its peer (SIGABRT)
        distributed.shutdown(succeeded)


def test_two_processes_take_the_whole_batch_gradient(tmp_path):
    """Three Adam steps of model1 (no dropout, no augmentation) over two processes, each with
    half of every batch of 24 (the last one uneven), end where one process ends."""
    from conftest import make_idx_dir

    idx_dir = make_idx_dir(tmp_path / "idx", n_train=90)
    out = tmp_path / "ddp.safetensors"
    mp.start_processes(_worker, args=(2, _free_port(), str(idx_dir), str(out)), nprocs=2,
                       start_method="spawn", join=True)
    cfg = resolve_config("model1", **{"train.threads": 1, "train.batch_size": 24})
    single = Trainer(cfg, splits_for(cfg, load_data(idx_dir, check_md5=False)))
    assert single.world == 1
    _steps(single, 3)
    ddp = load_file(out)
    for name, value in single.model.state_dict().items():
        assert torch.allclose(ddp[name], value, atol=2e-6, rtol=1e-5), name
    # and they did move: the test would pass trivially for frozen weights
    fresh = Trainer(cfg, single.splits).model.state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in single.model.state_dict().items())


def torchrun(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "fashion_cnn", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)


SETTINGS = ["--subset", "1200", "--no-plots", "--quiet"]  # seed-model4: augmentation, dropout


def test_torchrun_trains_and_resumes_exactly(real_data, tmp_path):
    straight = torchrun("train", "seed-model4", "--epochs", "3", "--out", str(tmp_path / "a"),
                        *SETTINGS)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert straight.stdout.count("Test accuracy:") == 1  # process 0 alone reports
    first = torchrun("train", "seed-model4", "--epochs", "2", "--out", str(tmp_path / "b"),
                     *SETTINGS)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun("resume", str(tmp_path / "b"), "--epochs", "3", "--no-plots", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (tmp_path / name / "model.safetensors" for name in "ab")
    assert a.read_bytes() == b.read_bytes()  # every process's generators were restored
    history = [(tmp_path / name / "history.csv").read_text().splitlines() for name in "ab"]
    assert [row.split(",")[:6] for row in history[0]] == [row.split(",")[:6] for row in history[1]]
    alone = subprocess.run([sys.executable, "-m", "fashion_cnn", "resume", str(tmp_path / "b"),
                            "--epochs", "4"], capture_output=True, text=True, timeout=TIMEOUT)
    assert alone.returncode == 2
    assert "was written by 2 training processes; continue it with torchrun" in alone.stderr


def test_a_signal_stops_both_processes_at_one_batch_and_resume_continues(real_data, tmp_path):
    args = ["seed-model2", "--epochs", "2", "--subset", "2400", "--no-plots", "--quiet"]
    straight = torchrun("train", *args, "--out", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    marker = tmp_path / "paused"
    env = {**os.environ, "FASHION_CNN_PAUSE_AT": "batch",
           "FASHION_CNN_PAUSE_PATH": "epoch=2,batch=7;", "FASHION_CNN_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", "-m", "fashion_cnn", "train", *args,
                             "--out", str(tmp_path / "b")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()
    proc.send_signal(signal.SIGINT)  # torchrun passes it on to both processes
    out, err = proc.communicate(timeout=TIMEOUT)
    assert "stopped by SIGINT at epoch 2, batch 7" in err
    assert "continue with: torchrun --nproc-per-node 2 -m fashion_cnn resume" in err
    assert (tmp_path / "b" / "checkpoints" / "interrupted_e2_b7").is_dir()
    resumed = torchrun("resume", str(tmp_path / "b"), "--no-plots", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (tmp_path / name / "model.safetensors" for name in "ab")
    assert a.read_bytes() == b.read_bytes()


def test_single_process_defaults():
    assert distributed.world() == (0, 1) and distributed.is_main()
    assert distributed.broadcast({"x": 1}) == {"x": 1} and distributed.gather(3) == [3]
    t = torch.ones(2)
    assert distributed.all_reduce(t) is t and torch.equal(t, torch.ones(2))
