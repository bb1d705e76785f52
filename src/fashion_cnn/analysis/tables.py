"""The per-class tables of a run as CSV files (per_class.csv, confused_pairs.csv,
confusion_matrix.csv in its plots folder), written and read back."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from .. import fileio
from ..data.fashion_mnist import CLASS_NAMES
from .metrics import format_per_class, most_confused, per_class_table


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def write_per_class(out_dir: str | os.PathLike, matrix: np.ndarray, class_names=CLASS_NAMES) -> str:
    """Write per_class.csv, confused_pairs.csv and confusion_matrix.csv (counts, rows = true
    class); return the per-class table and the confused pairs as text."""
    out_dir = Path(out_dir)
    table, pairs = per_class_table(matrix, class_names), most_confused(matrix, class_names=class_names)
    counts = [{"true": name, **{col: int(v) for col, v in zip(class_names, row)}}
              for name, row in zip(class_names, np.asarray(matrix))]
    fileio.write_text(out_dir / "confusion_matrix.csv", _csv_text(counts, ["true", *class_names]))
    fileio.write_text(out_dir / "per_class.csv",
                      _csv_text(table, ["class", "precision", "recall", "f1", "support"]))
    fileio.write_text(out_dir / "confused_pairs.csv",
                      _csv_text(pairs, ["true", "predicted", "count"]))
    return format_per_class(table, pairs)


def read_per_class(out_dir: str | os.PathLike) -> str | None:
    """The text table from a plots folder's CSV files (None if they are not there)."""
    out_dir = Path(out_dir)
    try:
        with open(out_dir / "per_class.csv", newline="") as f:
            table = [{"class": r["class"], "precision": float(r["precision"]),
                      "recall": float(r["recall"]), "f1": float(r["f1"]),
                      "support": int(r["support"])} for r in csv.DictReader(f)]
        pairs = []
        if (out_dir / "confused_pairs.csv").is_file():
            with open(out_dir / "confused_pairs.csv", newline="") as f:
                pairs = [{"true": r["true"], "predicted": r["predicted"], "count": int(r["count"])}
                         for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return None
    return format_per_class(table, pairs)
