"""Numbers from predictions: probabilities, the confusion matrix, per-class precision, recall
and F1, the most confused pairs. Pure functions of arrays; no files, no figures.

>>> confusion_matrix([0, 1, 1], [0, 1, 0], n_classes=2).tolist()
[[1, 0], [1, 1]]
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.fashion_mnist import CLASS_NAMES, NUM_CLASSES


def softmax(logits: torch.Tensor) -> np.ndarray:
    """Probabilities (N, classes) as float64 numpy, from logits (N, classes)."""
    return torch.softmax(torch.as_tensor(logits).double(), dim=1).numpy()


def confusion_matrix(y_true, y_pred, n_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts (n_classes, n_classes) int64: row = true class, column = predicted class."""
    t = np.asarray(torch.as_tensor(y_true).cpu(), dtype=np.int64)
    p = np.asarray(torch.as_tensor(y_pred).cpu(), dtype=np.int64)
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_table(matrix: np.ndarray, class_names=CLASS_NAMES) -> list[dict]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows = true)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    out = []
    for i, name in enumerate(class_names):
        tp, predicted, support = matrix[i, i], matrix[:, i].sum(), matrix[i].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append({"class": name, "precision": precision, "recall": recall, "f1": f1,
                    "support": int(support)})
    return out


def most_confused(matrix: np.ndarray, k: int = 5, class_names=CLASS_NAMES) -> list[dict]:
    """The k largest off-diagonal cells: true class, predicted class, count."""
    m = np.array(matrix, dtype=np.int64)
    np.fill_diagonal(m, 0)
    order = np.argsort(-m, axis=None, kind="stable")[:k]
    pairs = []
    for flat in order:
        i, j = divmod(int(flat), m.shape[1])
        if m[i, j] > 0:
            pairs.append({"true": class_names[i], "predicted": class_names[j], "count": int(m[i, j])})
    return pairs


def format_per_class(table: list[dict], pairs: list[dict]) -> str:
    """The per-class table and the most confused pairs as aligned text."""
    lines = [f"{'class':<14}{'precision':>10}{'recall':>9}{'F1':>9}{'support':>9}"]
    for row in table:
        lines.append(f"{row['class']:<14}{row['precision']:>10.3f}{row['recall']:>9.3f}"
                     f"{row['f1']:>9.3f}{row['support']:>9}")
    if table:
        mean = {k: sum(r[k] for r in table) / len(table) for k in ("precision", "recall", "f1")}
        lines.append(f"{'macro average':<14}{mean['precision']:>10.3f}{mean['recall']:>9.3f}"
                     f"{mean['f1']:>9.3f}{sum(r['support'] for r in table):>9}")
    if pairs:
        lines.append("Most confused (true -> predicted: images):")
        lines += [f"  {p['true']} -> {p['predicted']}: {p['count']}" for p in pairs]
    return "\n".join(lines)


def one_per_class(labels, n_classes: int = NUM_CLASSES) -> list[int]:
    """Index of the first example of each class present in `labels`, in class order."""
    y = np.asarray(labels)
    return [int(np.flatnonzero(y == c)[0]) for c in range(n_classes) if (y == c).any()]
