"""Threads fitted to the free cores (training/threads.py): the decision, the CPU accounting,
the callback's switching, and a real busy competitor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fashion_cnn as fc
from fashion_cnn.training.run import standard_callbacks
from fashion_cnn.training.recipes import resolve_config
from fashion_cnn.training.rundir import RunDir
from fashion_cnn.training.threads import CpuClock, FreeCoreThreads, others_cores, threads_for


@pytest.mark.parametrize("current, others, wanted", [
    (2, 0.0, 2),    # idle: every core
    (2, 0.45, 2),   # background noise below half a core: keep both
    (2, 0.67, 1),   # one busy process beside our two threads gets about 2/3 of a core
    (2, 1.4, 1),    # two busy processes: still one thread, never none
    (1, 1.0, 1),    # the competitor still holds its core
    (1, 0.4, 1),    # between the two thresholds: no flip-flop
    (1, 0.1, 2),    # it left: take the core back
])
def test_threads_for_two_cores(current, others, wanted):
    assert threads_for(current, 2, others) == wanted


def test_threads_for_more_cores_gives_up_what_others_use():
    assert threads_for(8, 8, 2.9) == 5
    assert threads_for(5, 8, 2.9) == 5
    assert threads_for(5, 8, 0.0) == 8


def _stat(path: Path, cpu0: list[int], cpu1: list[int]) -> None:
    total = [a + b for a, b in zip(cpu0, cpu1)]
    lines = [f"cpu {' '.join(map(str, total))} 0 0", f"cpu0 {' '.join(map(str, cpu0))} 0 0",
             f"cpu1 {' '.join(map(str, cpu1))} 0 0", "intr 1 2 3", "ctxt 99"]
    path.write_text("\n".join(lines) + "\n")


def test_cpu_clock_counts_busy_ticks_of_the_allowed_cpus_only(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal
    _stat(stat, [100, 0, 50, 1000, 30, 5, 5, 10], [7, 0, 0, 2000, 0, 0, 0, 0])
    clock = CpuClock(cpus=[0], stat_path=str(stat))
    clock.ticks_per_second = 100
    busy, own, now = clock.read()
    assert busy == pytest.approx(1.70)  # 100+50+5+5+10 ticks: idle and iowait are free time
    both = CpuClock(cpus=[0, 1], stat_path=str(stat))
    both.ticks_per_second = 100
    assert both.read()[0] == pytest.approx(1.77)
    assert CpuClock(stat_path=str(tmp_path / "missing")).read() is None


def test_others_cores_subtracts_this_process():
    # 3 busy seconds on the cores in 2 wall seconds, 1.6 of them this process's: 0.7 cores
    assert others_cores((10.0, 5.0, 100.0), (13.0, 6.6, 102.0)) == pytest.approx(0.7)
    assert others_cores((10.0, 5.0, 100.0), (10.5, 6.0, 101.0)) == 0.0  # never negative


class FakeClock:
    """Readings in which other processes use `self.others` cores from now on."""

    def __init__(self):
        self.busy = self.own = self.wall = 0.0
        self.others = 0.0

    def advance(self, seconds: float, own_cores: float):
        self.wall += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + self.others) * seconds

    def read(self):
        return self.busy, self.own, self.wall


def test_callback_gives_up_a_thread_and_takes_it_back(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("fashion_cnn.training.threads.time.monotonic", lambda: clock.wall)
    trainer = SimpleNamespace(device=torch.device("cpu"), world=1,
                              state=SimpleNamespace(epoch=0))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        governor = FreeCoreThreads(window=1.0, clock=clock, announce=False)
        governor.on_train_begin(trainer)
        assert governor.active and governor.most == 2
        clock.advance(0.5, 2.0)
        governor.on_batch_end(trainer, 1, 100)   # inside the window: no reading acted on
        clock.others = 0.7
        clock.advance(2.0, 1.3)                  # 1.4 of 2.5 s: 0.56 cores on average
        governor.on_batch_end(trainer, 2, 100)
        assert torch.get_num_threads() == 1
        clock.advance(1.5, 1.0)
        governor.on_batch_end(trainer, 3, 100)   # still busy: stays at one
        assert torch.get_num_threads() == 1
        clock.others = 0.0
        trainer.state.epoch = 1
        clock.advance(1.5, 1.0)
        governor.on_batch_end(trainer, 4, 100)
        assert torch.get_num_threads() == 2
        assert governor.changes == [(1, 2, 1), (2, 4, 2)]
        clock.others = 0.9
        clock.advance(1.5, 1.4)
        governor.on_batch_end(trainer, 5, 100)
        assert torch.get_num_threads() == 1
        governor.on_train_end(trainer)
        assert torch.get_num_threads() == 2  # the starting count is put back
    finally:
        torch.set_num_threads(before)


def test_callback_is_off_with_one_thread_or_several_processes():
    trainer = SimpleNamespace(device=torch.device("cpu"), world=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        governor = FreeCoreThreads()
        governor.on_train_begin(trainer)
        assert not governor.active
        torch.set_num_threads(2)
        governor.on_train_begin(SimpleNamespace(device=torch.device("cpu"), world=2))
        assert not governor.active
    finally:
        torch.set_num_threads(before)


def test_standard_callbacks_adapt_only_when_threads_are_not_fixed(tmp_path):
    run_dir = RunDir(tmp_path)

    def has_governor(**overrides):
        cfg = resolve_config("seed-model1", **overrides)
        return any(isinstance(c, FreeCoreThreads)
                   for c in standard_callbacks(cfg, run_dir, progress=False))

    assert has_governor()
    assert not has_governor(**{"train.threads": 2})
    assert not has_governor(**{"train.deterministic": True})


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux's /proc/stat")
@pytest.mark.skipif(len(CpuClock().names) < 2, reason="needs two usable cores")
def test_a_busy_competitor_takes_a_thread(real_data, tmp_path, monkeypatch):
    """A real busy process on the same cores: the run (threads = 0, so the standard
    callbacks adapt) drops to one thread, says so, records it in metrics.json, and ends with
    its starting count."""
    monkeypatch.setattr("fashion_cnn.training.threads.WINDOW_SECONDS", 0.3)
    torch.set_num_threads(2)  # (the autouse fixture puts the test's count back)
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        result = fc.train("seed-model1", tmp_path / "run", data=real_data, progress=False,
                          plots=False, epochs=2, subset=3000, **{"train.threads": 0})
        assert torch.get_num_threads() == 2
    finally:
        competitor.kill()
        competitor.wait()
    changes = result.metrics["thread_changes"]
    assert changes and changes[0][2] == 1, changes
    assert all(1 <= threads <= 2 for _, _, threads in changes)
