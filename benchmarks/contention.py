"""A training epoch on an idle machine and beside one busy process, with the thread count fixed
(all cores, as before) and fitted to the free cores (training.threads.FreeCoreThreads, what
`train.threads = 0` does).

Each round trains, for each variant in alternating order, one epoch with the machine otherwise
idle and one epoch while a competitor process (a Python busy loop, started just before the
epoch and killed after it) holds a core. The table gives the median epoch seconds per variant
and condition, and the contended epoch's ratio to the idle one: 2.0 is what losing one of two
cores explains.

    .venv/bin/python benchmarks/contention.py --rounds 5
    .venv/bin/python benchmarks/contention.py --smoke        # seconds: checks the script
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import common
import torch

from fashion_cnn.data.fashion_mnist import load_data
from fashion_cnn.perf import configure_runtime
from fashion_cnn.training.loop import Trainer
from fashion_cnn.training.recipes import resolve_config
from fashion_cnn.training.run import settle_device, splits_for
from fashion_cnn.training.threads import FreeCoreThreads

VARIANTS = ("fixed", "adaptive")
BUSY_LOOP = "while True: pass"


def one_epoch(cfg, splits, variant: str, contended: bool) -> tuple[float, list]:
    """Seconds of one epoch (training and validation) and the thread switches it made."""
    governor = FreeCoreThreads(announce=False) if variant == "adaptive" else None
    trainer = Trainer(cfg, splits, [governor] if governor else [])
    competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if contended else None
    try:
        start = time.perf_counter()
        trainer.fit()
        return time.perf_counter() - start, governor.changes if governor else []
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="seed-model1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--subset", type=int, default=24_000, help="training images")
    parser.add_argument("--smoke", action="store_true", help="one round on 1,000 images")
    parser.add_argument("--out", default=str(common.OUT_DIR / "contention.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.subset = 1, 1000
    cfg = resolve_config(args.recipe, **{"train.epochs": 1, "data.subset": args.subset,
                                         "data.validation_split": 0.0})
    settle_device(cfg, False)
    configure_runtime(cfg.train.threads)
    threads = torch.get_num_threads()
    splits = splits_for(cfg, load_data())
    one_epoch(cfg, splits, "fixed", False)  # warm-up: kernels compiled, memory allocated
    seconds = {(v, c): [] for v in VARIANTS for c in ("idle", "contended")}
    switches = {v: [] for v in VARIANTS}
    for round_index in range(args.rounds):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            for condition in ("idle", "contended"):
                took, changes = one_epoch(cfg, splits, variant, condition == "contended")
                seconds[(variant, condition)].append(took)
                if changes:
                    switches[variant].append({"round": round_index, "condition": condition,
                                              "changes": changes})
        common.note(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{v} {c} {s[-1]:.2f} s" for (v, c), s in seconds.items()))
    med = {key: common.median(values) for key, values in seconds.items()}
    rows = [[v, common.fmt(med[(v, "idle")]), common.fmt(med[(v, "contended")]),
             f"{med[(v, 'contended')] / med[(v, 'idle')]:.2f}"] for v in VARIANTS]
    print(f"\n{args.recipe}: one epoch of {len(splits.x_train):,} images, {threads} threads at "
          f"most, median of {args.rounds} rounds")
    print(common.table(["variant", "idle s", "contended s", "contended / idle"], rows))
    print(f"adaptive idle / fixed idle: {med[('adaptive', 'idle')] / med[('fixed', 'idle')]:.3f}")
    common.write_result(args.out, {
        "machine": common.machine_info(), "recipe": args.recipe, "rounds": args.rounds,
        "images": len(splits.x_train), "threads": threads,
        "seconds": {f"{v}/{c}": s for (v, c), s in seconds.items()},
        "median": {f"{v}/{c}": m for (v, c), m in med.items()}, "switches": switches})
    return 0


if __name__ == "__main__":
    sys.exit(main())
