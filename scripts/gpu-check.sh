#!/bin/sh
# The GPU check: run once on a machine with a CUDA GPU, from the repository root.
#
#   sh scripts/gpu-check.sh            # writes gpu-check/ (logs, runs, summary.md)
#
# 1. a venv (.venv-gpu) with torch 2.13.0's CUDA build (PyPI's Linux wheel) and this package;
#    GPU_PYTHON=/path/to/python skips this and uses an interpreter that already has one
# 2. the tests marked `cuda` (training on the GPU, fp16 and bf16, bit-identical resume)
# 3. `fashion-cnn train fast --device cuda` for seeds 0, 1 and 2: test accuracy, seconds per epoch
# 4. a run trained on the CPU, evaluated on the CPU and on the GPU: the same accuracy
#
# The Fashion-MNIST files must be there (Debian's dataset-fashion-mnist, or FASHION_MNIST_DIR).
# Every figure it prints was measured by this script on this machine; copy summary.md into
# benchmarks/RESULTS.md with the date and the GPU's name.
set -eu

OUT=${GPU_CHECK_OUT:-gpu-check}
mkdir -p "$OUT"
if [ -n "${GPU_PYTHON:-}" ]; then
    PY=$GPU_PYTHON
else
    VENV=${GPU_VENV:-.venv-gpu}
    test -x "$VENV/bin/python" || python3 -m venv "$VENV"
    PY=$VENV/bin/python
    "$PY" -m pip install -q torch==2.13.0
    "$PY" -m pip install -q -e '.[test]'
fi
"$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: torch {torch.__version__} sees no CUDA GPU; nothing to check")
EOF
"$PY" -m fashion_cnn env | tee "$OUT/env.txt"

echo "== tests marked cuda"
"$PY" -m pytest -q -m cuda tests 2>&1 | tee "$OUT/pytest-cuda.log"

echo "== fast on the GPU, seeds 0 1 2"
for seed in 0 1 2; do
    "$PY" -m fashion_cnn train fast --device cuda --seed "$seed" --no-plots --quiet \
        --out "$OUT/fast-cuda-seed$seed" | tee "$OUT/fast-cuda-seed$seed.log"
done

echo "== a CPU-trained run evaluated on the CPU and on the GPU"
"$PY" -m fashion_cnn train seed-model1 --device cpu --epochs 2 --no-plots --quiet \
    --out "$OUT/model1-cpu" | tee "$OUT/model1-cpu.log"
"$PY" -m fashion_cnn evaluate "$OUT/model1-cpu" --device cpu --json > "$OUT/eval-cpu.json"
"$PY" -m fashion_cnn evaluate "$OUT/model1-cpu" --device cuda --json > "$OUT/eval-cuda.json"

"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import csv, json, statistics, sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
print("| run | device | precision | test acc. | s/epoch (median) |")
print("|---|---|---|---:|---:|")
accs = []
for seed in (0, 1, 2):
    run = out / f"fast-cuda-seed{seed}"
    m = json.loads((run / "metrics.json").read_text())
    with open(run / "history.csv") as handle:
        seconds = statistics.median(float(row["seconds"]) for row in csv.DictReader(handle))
    accs.append(m["test_accuracy"])
    print(f"| fast --seed {seed} | {m['device']} | {m['precision']} | {m['test_accuracy']:.4f} "
          f"| {seconds:.2f} |")
print(f"\nfast on the GPU: {statistics.mean(accs):.4f} +- {statistics.pstdev(accs):.4f}\n")
cpu = json.loads((out / "eval-cpu.json").read_text())
gpu = json.loads((out / "eval-cuda.json").read_text())
same = "same" if cpu["test_correct"] == gpu["test_correct"] else "DIFFERENT"
print(f"seed-model1 trained on the CPU: test accuracy {cpu['test_accuracy']:.4f} on the CPU, "
      f"{gpu['test_accuracy']:.4f} on {gpu['device']} ({same})")
EOF
