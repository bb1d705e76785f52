"""Where a training step's time goes, and how much of it is a fixed cost per step.

The seed's batch-32 recipes (seed-model2, seed-model3: 1,500 steps an epoch) spend a larger
share of their time on work done once per step, whatever the batch holds. For each recipe this
script trains steps at several batch sizes (the configurations alternating in rounds; medians
reported) and

- splits each step's wall time into phases, timed around the loop's own calls: the batch
  (gathering the images), augmentation, forward, backward, the optimizer step, clearing the
  gradients, and the rest (learning rate, loss, the epoch's sums, the loop itself);
- fits ms per step = fixed + per_image * batch over the batch sizes: `fixed` is the per-step
  overhead, and its share of a step at the recipe's own batch size is what fewer, larger
  kernels per step could win back at most (it holds the loop's own cost and the operators'
  dispatch, but also the kernels' lower efficiency on a small batch);
- counts, with torch.profiler over a few steps at the recipe's own batch size, the operator
  calls a step makes and the time spent inside them.

    .venv/bin/python benchmarks/step_profile.py                  # a few minutes
    .venv/bin/python benchmarks/step_profile.py --smoke          # seconds: checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict

import common
import torch
from torch.profiler import ProfilerActivity, profile

from fashion_cnn.data.fashion_mnist import load_data
from fashion_cnn.perf import configure_runtime
from fashion_cnn.training import loop
from fashion_cnn.training.loop import Trainer
from fashion_cnn.training.recipes import resolve_config
from fashion_cnn.training.run import settle_device, splits_for

SMALL_CALL_US = 20.0  # µs of an operator's own time per call, below which a call counts as small
PHASES = ("batch", "augment", "forward", "backward", "optimizer", "clear_grads")


class PhaseClock:
    """Seconds spent in each phase of a trainer's steps, by wrapping the calls `Trainer._step`
    makes (instance attributes, the module's augment_batch and Tensor.backward, all restored on
    exit). On a CPU every call returns when its work is done, so wall time around it is its
    cost."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.seconds: dict[str, float] = defaultdict(float)

    def _timed(self, phase: str, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
        return timed

    @contextlib.contextmanager
    def timing(self):
        t = self.trainer
        saved = {"_batch": t._batch, "forward": t.forward, "_clear_grads": t._clear_grads}
        step, augment, backward = t.optimizer.step, loop.augment_batch, torch.Tensor.backward
        own_step = "step" in vars(t.optimizer)  # an instance attribute already (torch's hooks)
        t._batch = self._timed("batch", t._batch)
        t.forward = self._timed("forward", t.forward)
        t._clear_grads = self._timed("clear_grads", t._clear_grads)
        t.optimizer.step = self._timed("optimizer", step)
        loop.augment_batch = self._timed("augment", augment)
        torch.Tensor.backward = self._timed("backward", backward)
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(t, name, value)
            if own_step:
                t.optimizer.step = step
            else:
                del t.optimizer.step  # back to the class's method
            loop.augment_batch, torch.Tensor.backward = augment, backward
        # _batch's time includes the augmentation it calls
        self.seconds["batch"] -= self.seconds["augment"]


def run_steps(trainer: Trainer, steps: int) -> float:
    """Seconds of `steps` training steps from a fresh shuffle (every batch a full one)."""
    trainer.steps_per_epoch = steps
    trainer.state.perm, trainer.state.cursor = None, 0
    start = time.perf_counter()
    trainer.train_one_epoch()
    return time.perf_counter() - start


def phase_sample(trainer: Trainer, steps: int, warmup: int) -> dict:
    """ms per step in total and per phase, over `steps` steps after `warmup` untimed ones."""
    run_steps(trainer, warmup)
    clock = PhaseClock(trainer)
    with clock.timing():
        total = run_steps(trainer, steps)
    ms = {phase: 1000 * clock.seconds[phase] / steps for phase in PHASES}
    ms["total"] = 1000 * total / steps
    ms["rest"] = ms["total"] - sum(ms[phase] for phase in PHASES)
    return ms


def operator_counts(trainer: Trainer, steps: int) -> dict:
    """Operator calls per step and ms per step inside them (self time, all operators), from
    torch.profiler over `steps` steps; the profiler's own cost inflates the wall time."""
    run_steps(trainer, 5)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = run_steps(trainer, steps)
    events = prof.key_averages()
    calls = sum(e.count for e in events)
    self_ms = sum(e.self_cpu_time_total for e in events) / 1000  # µs -> ms
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    # small calls: operators averaging under SMALL_CALL_US of their own time per call, the
    # dispatch-bound ones that fusing into fewer, larger kernels would remove
    small = [e for e in events if e.count and e.self_cpu_time_total / e.count < SMALL_CALL_US]
    return {"operator_calls_per_step": calls / steps,
            "operator_self_ms_per_step": self_ms / steps,
            "small_calls_per_step": sum(e.count for e in small) / steps,
            "small_calls_self_ms_per_step": sum(e.self_cpu_time_total for e in small) / 1000 / steps,
            "profiled_ms_per_step": 1000 * wall / steps,
            "top": [{"name": e.key, "calls_per_step": e.count / steps,
                     "self_ms_per_step": e.self_cpu_time_total / 1000 / steps} for e in top]}


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys = intercept + slope * xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["seed-model2", "seed-model3", "seed-model1"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32, 64, 128])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--images", type=int, default=9600,
                        help="images trained per sample (steps = images / batch size)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script")
    parser.add_argument("--out", default=str(common.OUT_DIR / "step_profile.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.recipes, args.batch_sizes = ["seed-model2"], [16, 32]
        args.images, args.rounds, args.profile_steps = 160, 1, 3
    if len(set(args.batch_sizes)) < 2:
        parser.error("--batch-sizes needs two sizes at least (the fit)")
    data = load_data()
    trainers, own_batch = {}, {}
    for recipe in args.recipes:
        for batch in [None] + args.batch_sizes:  # None: the recipe's own, for the profile
            overrides = {"train.precision": args.precision}
            if batch:
                overrides["train.batch_size"] = batch
            cfg = resolve_config(recipe, **overrides)
            settle_device(cfg, False)
            configure_runtime(cfg.train.threads)
            if batch is None:
                own_batch[recipe] = cfg.train.batch_size
                continue
            trainers[(recipe, batch)] = Trainer(cfg, splits_for(cfg, data))
    samples = defaultdict(list)
    for round_index in range(args.rounds):
        for key, trainer in trainers.items():
            steps = max(1, args.images // key[1])
            samples[key].append(phase_sample(trainer, steps, warmup=max(2, steps // 10)))
        common.note(f"round {round_index + 1}/{args.rounds} done")
    result = {"machine": common.machine_info(), "precision": args.precision,
              "threads": torch.get_num_threads(), "images": args.images, "rounds": args.rounds,
              "recipes": {}}
    columns = ["total"] + list(PHASES) + ["rest"]
    for recipe in args.recipes:
        medians = {batch: {c: common.median([s[c] for s in samples[(recipe, batch)]])
                           for c in columns} for batch in args.batch_sizes}
        fixed, per_image = linear_fit([float(b) for b in args.batch_sizes],
                                      [medians[b]["total"] for b in args.batch_sizes])
        own = own_batch[recipe]
        trainer = trainers.get((recipe, own)) or next(
            t for (r, _), t in trainers.items() if r == recipe)
        ops = operator_counts(trainer, args.profile_steps)
        print(f"\n{recipe} ({args.precision}, {result['threads']} threads), ms per step, "
              f"median of {args.rounds}:")
        print(common.table(["batch"] + columns + ["images/s"], [
            [str(b)] + [common.fmt(medians[b][c]) for c in columns]
            + [f"{1000 * b / medians[b]['total']:,.0f}"] for b in args.batch_sizes]))
        share = fixed / (fixed + per_image * own)
        print(f"fit: {fixed:.2f} ms per step + {per_image * 1000:.1f} µs per image; "
              f"at its own batch {own} the fixed part is {share:.0%} of a step")
        print(f"profile at batch {trainer.config.train.batch_size}: "
              f"{ops['operator_calls_per_step']:.0f} operator calls per step, "
              f"{ops['operator_self_ms_per_step']:.2f} ms inside them of "
              f"{ops['profiled_ms_per_step']:.2f} ms (profiled); "
              f"{ops['small_calls_per_step']:.0f} of the calls average under "
              f"{SMALL_CALL_US:.0f} µs each, {ops['small_calls_self_ms_per_step']:.2f} ms in all")
        for op in ops["top"]:
            print(f"  {op['name']:<40} {op['calls_per_step']:6.1f} calls "
                  f"{op['self_ms_per_step']:7.3f} ms")
        result["recipes"][recipe] = {
            "own_batch_size": own, "ms_per_step": {str(b): medians[b] for b in args.batch_sizes},
            "samples": {str(b): samples[(recipe, b)] for b in args.batch_sizes},
            "fixed_ms_per_step": fixed, "ms_per_image": per_image,
            "fixed_share_at_own_batch": share, "profile": ops}
    common.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
