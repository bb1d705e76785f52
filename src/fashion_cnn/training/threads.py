"""Torch threads fitted to the cores other processes leave free, re-checked while training.

Why: the CPU kernels and oneDNN split every layer over torch's OpenMP threads, which meet at a
barrier when the layer ends. With as many threads as cores and one other busy process, the
scheduler keeps one of our threads off its core for a time slice at a time, and the others
wait for it at every barrier: the epoch slows far more than the lost core explains (the
contention table in benchmarks/RESULTS.md). One thread fewer than the cores loses only the
busy core's share. So while training, `FreeCoreThreads` looks every few seconds at how much
of this process's cores other processes used, and trains on the cores left free: fewer
threads while they are busy, all of them again once they are not.

Thread counts change the order of floating-point sums, so a run whose threads changed does
not repeat bit for bit; a run with `train.threads` set (or `train.deterministic`) keeps its
count and does not adapt.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

WINDOW_SECONDS = 2.0  # how long a share of the cores is measured before it is acted on
# Others' use, in cores, at which a thread is given up (DROP_AT) or taken back (TAKE_AT): the
# gap keeps background noise near one threshold from switching the count back and forth.
DROP_AT = 0.5
TAKE_AT = 0.3


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity), or all of them."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


class CpuClock:
    """Busy seconds of the allowed CPUs (all processes) and of this process, from /proc/stat
    (Linux). `read()` returns (all processes' busy seconds, this process's CPU seconds,
    monotonic seconds), or None where /proc/stat cannot be read."""

    def __init__(self, cpus: list[int] | None = None, stat_path: str = "/proc/stat"):
        self.names = {f"cpu{c}" for c in (cpus if cpus is not None else allowed_cpus())}
        self.stat_path = stat_path
        try:
            self.ticks_per_second = os.sysconf("SC_CLK_TCK")
        except (AttributeError, ValueError, OSError):
            self.ticks_per_second = 100

    def read(self) -> tuple[float, float, float] | None:
        try:
            with open(self.stat_path) as handle:
                lines = handle.read().splitlines()
        except OSError:
            return None
        busy_ticks = 0
        for line in lines:
            fields = line.split()
            if fields and fields[0] in self.names:
                # user nice system idle iowait irq softirq steal ...: everything but idle
                # and iowait is a core not free for us (steal: taken by the hypervisor)
                ticks = [int(v) for v in fields[1:9]]
                busy_ticks += sum(ticks) - ticks[3] - ticks[4]
        return busy_ticks / self.ticks_per_second, time.process_time(), time.monotonic()


def others_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Cores' worth of CPU time other processes used between two CpuClock readings."""
    wall = after[2] - before[2]
    if wall <= 0:
        return 0.0
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / wall)


def threads_for(current: int, most: int, others: float) -> int:
    """Threads to train on: the cores left free by `others` (cores other processes used),
    at least 1 and at most `most`; a thread is taken back only once others' use falls clearly
    below the level that made us give it up (DROP_AT, TAKE_AT)."""
    wanted = max(1, min(most, math.floor(most - others + DROP_AT)))
    if wanted > current:
        wanted = max(current, min(most, math.floor(most - others + TAKE_AT)))
    return wanted


class FreeCoreThreads:
    """Callback: trains on as many torch threads as there are cores free of other processes'
    work, re-checked every `window` seconds at batch ends; puts the starting count back when
    training ends. Does nothing on a GPU, under torchrun, with one thread, or where /proc/stat
    is missing. `changes` lists (epoch, batch, threads) for each switch; `announce` prints a
    note on stderr at the end of an epoch in which the count changed."""

    def __init__(self, window: float | None = None, clock: CpuClock | None = None,
                 announce: bool = True):
        self.window = WINDOW_SECONDS if window is None else window
        self.clock = clock
        self.announce = announce
        self.changes: list[tuple[int, int, int]] = []
        self.most = 1
        self.active = False
        self.last = None
        self.epoch_changes = 0

    def on_train_begin(self, trainer):
        self.most = torch.get_num_threads()
        self.active = trainer.device.type == "cpu" and trainer.world == 1 and self.most > 1
        if self.active:
            self.clock = self.clock or CpuClock()
            self.last = self.clock.read()
            self.active = self.last is not None

    def on_batch_end(self, trainer, batch, steps):
        if not self.active or time.monotonic() - self.last[2] < self.window:
            return
        now = self.clock.read()
        if now is None:
            self.active = False
            return
        current = torch.get_num_threads()
        others = others_cores(self.last, now)
        self.last = now
        wanted = threads_for(current, self.most, others)
        if wanted != current:
            torch.set_num_threads(wanted)
            self.changes.append((trainer.state.epoch + 1, batch, wanted))
            self.epoch_changes += 1
            self.last_others = others

    def on_epoch_end(self, trainer, epoch, logs):
        if self.epoch_changes and self.announce:
            threads = torch.get_num_threads()
            print(f"note: other processes were using about {self.last_others:.1f} of the "
                  f"{self.most} cores; training continues on {threads} thread"
                  f"{'s' if threads > 1 else ''} (train.threads fixes the count)",
                  file=sys.stderr)
        self.epoch_changes = 0

    def on_train_end(self, trainer):
        if self.active and torch.get_num_threads() != self.most:
            torch.set_num_threads(self.most)
