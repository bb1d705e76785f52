"""Shared pieces of the benchmark scripts: machine description, statistics, tables, JSON.

The scripts import this as a sibling module (`python benchmarks/NAME.py` puts this folder on
sys.path), so it is no part of the installed package.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fashion_cnn import fileio
from fashion_cnn.devices import cpu_has_native_bf16

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"  # git-ignored
TRAIN_SPLIT_IMAGES = 48_000  # 60,000 training images minus the last 20 % held out for validation


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What a reader needs to compare figures: CPU, cores, threads, versions, date."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "bf16_native": cpu_has_native_bf16(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values) -> dict:
    """Mean, sample standard deviation, min and max of the non-missing values."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width table (first column left-aligned, the others right-aligned)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)]
                     + [line(row) for row in cells[1:]])


def write_result(path: str | os.PathLike, result: dict) -> Path:
    path = Path(path)
    fileio.write_json(path, result)
    print(f"\nwrote {path}")
    return path


def parse_run_args(parser, argv, out_name: str, smoke_help: str):
    """`parser`'s arguments with --smoke and --out (default OUT_DIR/out_name) added, for a
    script measuring a trained run: its RUN_DIR positional is needed unless --smoke."""
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", type=Path, default=OUT_DIR / out_name)
    args = parser.parse_args(argv)
    if not args.smoke and not args.run_dir:
        parser.error("give a RUN_DIR (or --smoke)")
    return args


def smoke_run(prefix: str, data, subset: int, **options) -> Path:
    """A `dense` run trained for one epoch on `subset` images in a new temporary folder: the
    model a script's --smoke setting measures (only that the script works)."""
    import fashion_cnn as fc

    run_dir = Path(tempfile.mkdtemp(prefix=prefix)) / "run"
    fc.train("dense", run_dir, data=data, progress=False, plots=False, epochs=1,
             subset=subset, **options)
    return run_dir


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
