"""What watching training costs: one `fast` epoch with no display, with the progress bar
(terminal mode: redrawn every 0.5 s from the running sums), and with TensorBoard logging
(per-epoch scalars, per-step loss every 100 steps, weight and gradient histograms, flushes).

Each round trains one epoch of each variant, in a rotating order, so that drift in the
machine's speed hits all alike; the table gives the median wall time of `fit()` (training,
validation and the callbacks' epoch-end work), its ratio to the bare epoch, and the time spent
inside the callback's own hooks with its share of the epoch: exact where the ratio of whole
epochs is only as good as their noise (several per cent here).

    .venv/bin/python benchmarks/watch_cost.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import common
import torch

from fashion_cnn.analysis.tensorboard import TensorBoardLogger
from fashion_cnn.data.fashion_mnist import load_data
from fashion_cnn.perf import configure_runtime
from fashion_cnn.training.loop import Trainer
from fashion_cnn.training.progress import ProgressBar
from fashion_cnn.training.recipes import resolve_config
from fashion_cnn.training.run import settle_device, splits_for

VARIANTS = ("none", "bar", "tensorboard")


class Timed:
    """A callback with the time spent in its hooks counted (`seconds`): the part of an epoch
    that is the callback's own, measured exactly, where the wall times of whole epochs
    differ by their noise."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name):
        hook = getattr(self.inner, name)  # AttributeError for hooks it lacks, as Trainer expects
        if not name.startswith("on_"):
            return hook

        def timed(*args):
            start = time.perf_counter()
            try:
                return hook(*args)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def callbacks_for(variant: str, log_dir: str, sink) -> list:
    if variant == "bar":
        return [Timed(ProgressBar(stream=sink, mode="terminal"))]
    if variant == "tensorboard":
        return [Timed(TensorBoardLogger(log_dir, enabled=True))]
    return []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--subset", type=int, default=0, help="training images (0: all)")
    parser.add_argument("--smoke", action="store_true", help="one round on 1,000 images")
    parser.add_argument("--out", default=str(common.OUT_DIR / "watch_cost.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.subset = 1, 1000
    overrides = {"train.epochs": 1}
    if args.subset:
        overrides["data.subset"] = args.subset
    cfg = resolve_config(args.recipe, **overrides)
    settle_device(cfg, False)
    configure_runtime(cfg.train.threads)
    splits = splits_for(cfg, load_data())
    seconds = {v: [] for v in VARIANTS}
    in_callback = {v: [] for v in VARIANTS}  # seconds inside the callback's hooks
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as sink:
        for round_index in range(args.rounds):
            order = VARIANTS[round_index % 3:] + VARIANTS[:round_index % 3]
            for variant in order:
                trainer = Trainer(cfg, splits, callbacks_for(
                    variant, os.path.join(tmp, f"{variant}-{round_index}"), sink))
                start = time.perf_counter()
                trainer.fit()
                seconds[variant].append(time.perf_counter() - start)
                in_callback[variant].append(sum(c.seconds for c in trainer.callbacks))
                for callback in trainer.callbacks:  # close the event files
                    getattr(callback.inner, "_close", lambda: None)()
            common.note(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
                f"{v} {seconds[v][-1]:.2f} s" for v in VARIANTS))
    base = common.median(seconds["none"])
    share = {v: common.median([c / s for c, s in zip(in_callback[v], seconds[v])])
             for v in VARIANTS}
    rows = [[v, common.fmt(common.median(seconds[v])),
             f"{common.median(seconds[v]) / base:.3f}",
             common.fmt(common.median(in_callback[v]), 3), f"{share[v] * 100:.2f} %"]
            for v in VARIANTS]
    print(f"\n{args.recipe}: one epoch ({len(splits.x_train):,} images, "
          f"{torch.get_num_threads()} threads), median of {args.rounds} rounds")
    print(common.table(["variant", "epoch s", "ratio to none", "in callback s",
                        "callback share"], rows))
    common.write_result(args.out, {"machine": common.machine_info(), "recipe": args.recipe,
                                   "rounds": args.rounds, "images": len(splits.x_train),
                                   "seconds": seconds, "callback_seconds": in_callback,
                                   "callback_share": share,
                                   "median_ratio": {v: common.median(seconds[v]) / base
                                                    for v in VARIANTS}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
