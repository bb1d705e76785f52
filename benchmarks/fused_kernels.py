"""Does a training step run faster with the fused C kernels (first block, max pool, dropout)
than through PyTorch's own layers on this CPU?

For each recipe, one trainer with the model's fused kernels on and one with them off (the rest
of the CPU pass, Adam's C pass included, in both), alternating in rounds; ms per step, medians.
The default (kernels.fused_layers_pay_off: AVX2 and AVX-512 CPUs) should pick the faster one.

    .venv/bin/python benchmarks/fused_kernels.py                 # a few minutes
    .venv/bin/python benchmarks/fused_kernels.py --smoke         # seconds: checks the script
"""

from __future__ import annotations

import argparse
import sys

import common
import torch

from fashion_cnn.data.fashion_mnist import load_data
from fashion_cnn.models import kernels
from fashion_cnn.perf import configure_runtime
from fashion_cnn.training.loop import Trainer
from fashion_cnn.training.recipes import resolve_config
from fashion_cnn.training.run import settle_device, splits_for
from step_profile import run_steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["seed-model1", "seed-model2", "seed-model3"])
    parser.add_argument("--images", type=int, default=9600,
                        help="images trained per sample (steps = images / batch size)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script")
    parser.add_argument("--out", default=str(common.OUT_DIR / "fused_kernels.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.recipes, args.images, args.rounds = ["seed-model2"], 160, 1
    data = load_data()
    trainers = {}
    for recipe in args.recipes:
        for fused in (True, False):
            cfg = resolve_config(recipe, **{"train.precision": "fp32"})
            settle_device(cfg, False)
            configure_runtime(cfg.train.threads)
            trainer = Trainer(cfg, splits_for(cfg, data))
            trainer.model.use_fused_kernels = fused
            trainers[(recipe, fused)] = trainer
    ms = {key: [] for key in trainers}
    for round_index in range(args.rounds):
        for key, trainer in trainers.items():
            steps = max(1, args.images // trainer.config.train.batch_size)
            run_steps(trainer, max(2, steps // 10))  # warm-up
            ms[key].append(1000 * run_steps(trainer, steps) / steps)
        common.note(f"round {round_index + 1}/{args.rounds} done")
    rows, result = [], {"machine": common.machine_info(), "kernels": kernels.status(),
                        "default_fused": kernels.fused_layers_pay_off(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "images": args.images, "rounds": args.rounds, "recipes": {}}
    for recipe in args.recipes:
        on, off = (common.median(ms[(recipe, f)]) for f in (True, False))
        rows.append([recipe, common.fmt(on), common.fmt(off), f"{off / on:.2f}"])
        result["recipes"][recipe] = {"fused_ms_per_step": ms[(recipe, True)],
                                     "pytorch_ms_per_step": ms[(recipe, False)],
                                     "pytorch_over_fused": off / on}
    print(f"{result['cpu_capability']}, fp32, {torch.get_num_threads()} threads; ms per step, "
          f"median of {args.rounds}; the default here: fused kernels "
          f"{'on' if result['default_fused'] else 'off'}")
    print(common.table(["recipe", "fused kernels", "PyTorch layers", "PyTorch / fused"], rows))
    common.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
