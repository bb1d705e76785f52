"""Each benchmark script runs on its tiny --smoke setting and writes the JSON it promises.

Only that the scripts work is tested here, never how fast anything is. The Keras side of
vs_keras needs its own TensorFlow environment (benchmarks/.venv-keras) and some 20 s; it is
checked only when FASHION_CNN_TEST_KERAS=1 is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REAL_DIR

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not any((REAL_DIR / name).exists() for name in
                               ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")),
                       reason="the real Fashion-MNIST files are not installed"),
]


def run_smoke(script: str, tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / f"{script}.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke",
                           "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}" in done.stdout
    return json.loads(out.read_text()), done.stdout


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_train_speed_smoke(tmp_path):
    # dense (no conv) and model4 (padded input, augmentation) cover the code paths; --memory
    # runs a short `fashion-cnn train` in a child process
    result, stdout = run_smoke("train_speed", tmp_path, "--recipes", "seed-dense", "seed-model4",
                               "--memory", "--memory-recipes", "seed-dense")
    assert result["benchmark"] == "train_speed"
    assert result["machine"]["cpu"] and positive(result["machine"]["torch_threads"])
    precisions = set(result["matmul_peak_gflops"])
    assert "fp32" in precisions and precisions <= {"fp32", "bf16"}
    assert all(positive(v) for v in result["matmul_peak_gflops"].values())
    rows = result["results"]
    assert {(r["recipe"], r["precision"]) for r in rows} == {
        (recipe, p) for recipe in ("seed-dense", "seed-model4") for p in precisions}
    for row in rows:
        for key in ("seconds_per_epoch", "images_per_second", "gflops_per_second",
                    "fraction_of_peak", "floor_seconds_per_epoch", "ratio_to_floor",
                    "test_eval_seconds", "train_flops_per_image"):
            assert positive(row[key]), (row["recipe"], key, row[key])
        assert len(row["seconds_per_epoch_runs"]) == 1  # --smoke: one round
    model4 = next(r for r in rows if r["recipe"] == "seed-model4")
    assert model4["augment"] and model4["input"] == [36, 36, 1]
    assert [m["recipe"] for m in result["memory"]] == ["seed-dense"]
    assert all(positive(m["peak_rss_mib"]) and positive(m["wall_seconds"])
               for m in result["memory"])
    assert "seed-model4" in stdout and "peak RSS MiB" in stdout


def test_time_to_accuracy_smoke(tmp_path):
    result, stdout = run_smoke("time_to_accuracy", tmp_path)
    assert result["benchmark"] == "time_to_accuracy"
    (run,) = result["runs"]
    assert run["recipe"] == "seed-model1" and run["epochs"] == 1
    assert positive(run["train_seconds"]) and positive(run["probe_seconds"])
    assert set(run["reached"]) == {"0.9", "0.926", "0.94", "0.95"}
    (epoch,) = run["per_epoch"]
    assert positive(epoch["train_seconds"]) and 0.0 <= epoch["test_accuracy"] <= 1.0
    assert 0.0 <= run["final_test_accuracy"] <= 1.0
    (summary,) = result["summaries"]
    assert summary["recipe"] == "seed-model1" and summary["train_seconds"]["n"] == 1
    assert summary["thresholds"]["0.926"]["of"] == 1
    assert ">= 0.926" in stdout
    # its frontier: its one run, and the seed's Keras points beside it
    ours = [p for p in result["frontier"] if p["side"] == "ours"]
    assert [(p["label"], p["seeds"], p["frontier"]) for p in ours] == [("seed-model1", 1, True)]
    assert {p["label"] for p in result["frontier"] if p["side"] == "keras"} == {
        "seed-model1", "seed-model2", "seed-model3", "seed-model4"}
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 10_000


def test_frontier_of_finished_runs(tmp_path, real_data):
    """--frontier reads runs and a study's runs, groups seeds, marks the frontier, draws it."""
    import fashion_cnn as fc

    study = tmp_path / "study"
    for seed in (0, 1):
        fc.train("seed-dense", study / f"dense-seed{seed}", data=real_data, progress=False,
                 plots=False, epochs=1, subset=500, seed=seed)
    fc.train("seed-model1", tmp_path / "m1", data=real_data, progress=False, plots=False,
             epochs=1, subset=500)
    (study / "not-a-run").mkdir()
    # a point recorded on another machine, faster and more accurate than any run here: it is
    # drawn, but compared only with points of its own machine
    recorded = tmp_path / "recorded.toml"
    recorded.write_text('machine = "elsewhere"\n[[point]]\nlabel = "fast"\nprecision = "bf16"\n'
                        'seeds = 3\naccuracy = 0.99\naccuracy_sd = 0.001\ntrain_seconds = 1\n'
                        'measured = "2026-11-29"\nsource = "RESULTS.md"\n')
    out = tmp_path / "frontier.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "time_to_accuracy.py"),
                           "--frontier", str(study), str(tmp_path / "m1"), "--out", str(out),
                           "--recorded", str(recorded), "--machine", "here"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    points = {(p["label"], p["side"]): p for p in json.loads(out.read_text())["points"]}
    elsewhere = points[("fast", "ours")]
    assert elsewhere["machine"] == "elsewhere" and elsewhere["frontier"]
    assert elsewhere["minutes"] == pytest.approx(1 / 60) and elsewhere["seeds"] == 3
    assert points[("seed-dense", "ours")]["machine"] == "here"
    dense, model1 = points[("seed-dense", "ours")], points[("seed-model1", "ours")]
    accuracies = [json.loads((study / f"dense-seed{s}" / "metrics.json").read_text())
                  ["test_accuracy"] for s in (0, 1)]
    assert dense["seeds"] == 2 and dense["accuracy"] == pytest.approx(sum(accuracies) / 2)
    # a point is on the frontier unless another of ours is faster and more accurate
    faster = min((dense, model1), key=lambda p: p["minutes"])
    assert faster["frontier"]
    other = model1 if faster is dense else dense
    assert other["frontier"] == (other["accuracy"] > faster["accuracy"])
    assert not points[("seed-model1", "keras")]["frontier"]
    assert "frontier" in done.stdout and (tmp_path / "frontier.png").stat().st_size > 10_000
    missing = subprocess.run([sys.executable, str(BENCHMARKS / "time_to_accuracy.py"),
                              "--frontier", str(tmp_path / "nowhere")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "not a directory" in missing.stderr
    recorded.write_text('machine = "elsewhere"\n[[point]]\nlabel = "fast"\naccuracy = "high"\n')
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "time_to_accuracy.py"),
                          "--frontier", str(study), "--recorded", str(recorded)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "recorded.toml: point 1: `precision`" in bad.stderr


def test_the_reference_machines_recorded_points_read():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from time_to_accuracy import recorded_points
    finally:
        sys.path.remove(str(BENCHMARKS))
    points = recorded_points(BENCHMARKS / "frontier_reference.toml")
    assert {p["label"] for p in points} >= {"seed-model1", "seed-model4", "fast", "best"}
    assert all(p["machine"] == "AVX-512 machine" and 0.85 < p["accuracy"] < 1 for p in points)


def check_vs_keras(result: dict, with_keras: bool) -> None:
    assert result["benchmark"] == "vs_keras"
    (model1,) = result["results"]
    assert model1["recipe"] == "seed-model1" and model1["batch_size"] == 128
    sides = model1["sides"]
    assert {f"ours-{p}" for p in result["precisions"]} <= set(sides)
    assert ("keras" in sides) == with_keras
    for name, side in sides.items():
        assert positive(side["median_epoch_seconds"]), name
        assert len(side["epoch_seconds"]) == 1
        assert 0.0 <= side["test_accuracy"] <= 1.0
        assert side["train_images"] == 409  # subset 512 minus the last 20 % for validation
    (pooled,) = result["pooled_over_seeds"]  # one seed: the pooled row is that run's
    assert pooled["seeds"] == [0] and set(pooled["sides"]) == set(sides)
    for name, side in pooled["sides"].items():
        assert side["test_accuracies"] == [sides[name]["test_accuracy"]]
        assert side["median_epoch_seconds"] == sides[name]["median_epoch_seconds"]
    if with_keras:
        assert all(positive(v) for v in model1["speedup_vs_keras"].values())
        assert positive(sides["keras"]["peak_rss_mib"])
    else:
        assert result["keras_skipped"] and model1["speedup_vs_keras"] == {}


def test_vs_keras_smoke_without_keras(tmp_path):
    result, stdout = run_smoke("vs_keras", tmp_path, "--no-keras")
    check_vs_keras(result, with_keras=False)
    assert "NOTE: Keras side skipped" in stdout


@pytest.mark.skipif(os.environ.get("FASHION_CNN_TEST_KERAS") != "1",
                    reason="set FASHION_CNN_TEST_KERAS=1 to run TensorFlow/Keras (its own venv)")
def test_vs_keras_smoke_with_keras(tmp_path):
    venv = BENCHMARKS / ".venv-keras"
    if not (venv / "bin" / "python").exists():
        pytest.skip(f"{venv} is not set up: python benchmarks/vs_keras.py --setup-only")
    result, _ = run_smoke("vs_keras", tmp_path)
    check_vs_keras(result, with_keras=True)


def test_photo_like_smoke(tmp_path):
    result, stdout = run_smoke("photo_like", tmp_path)
    assert result["benchmark"] == "photo_like" and result["images"] == 50
    assert [v["variant"] for v in result["variants"]] == [
        "navy on light grey", "red on white, wide", "white on dark grey"]
    for variant in result["variants"]:
        assert 0 <= variant["accuracy"] <= 1 and 0 <= variant["agreement"] <= 1
    # a light background is detected and negated; a dark one is not
    assert [v["inverted_fraction"] for v in result["variants"]] == [1.0, 1.0, 0.0]
    assert "agrees with original" in stdout


def test_watch_cost_smoke(tmp_path):
    pytest.importorskip("tensorboard")
    result, stdout = run_smoke("watch_cost", tmp_path)
    assert set(result["seconds"]) == {"none", "bar", "tensorboard"}
    assert all(len(v) == 1 and positive(v[0]) for v in result["seconds"].values())
    assert result["median_ratio"]["none"] == 1.0 and "tensorboard" in stdout
    assert result["callback_share"]["none"] == 0 and result["callback_share"]["bar"] > 0


def test_serve_load_smoke(tmp_path):
    pytest.importorskip("uvicorn")
    result, stdout = run_smoke("serve_load", tmp_path)
    rows = result["results"]
    assert [(r["clients"], r["batch"]) for r in rows] == [(1, 1), (2, 1), (1, 4), (2, 4)]
    assert all(r["errors"] == 0 and r["requests"] == 20 and positive(r["p50_ms"]) for r in rows)
    assert result["soak"]["requests"] == 50 and result["soak"]["errors"] == 0


def test_contention_smoke(tmp_path):
    result, stdout = run_smoke("contention", tmp_path)
    assert set(result["seconds"]) == {"fixed/idle", "fixed/contended", "adaptive/idle",
                                      "adaptive/contended"}
    assert all(len(v) == 1 and positive(v[0]) for v in result["seconds"].values())
    assert "contended / idle" in stdout


def test_step_profile_smoke(tmp_path):
    result, stdout = run_smoke("step_profile", tmp_path)
    recipe = result["recipes"]["seed-model2"]
    assert set(recipe["ms_per_step"]) == {"16", "32"} and recipe["own_batch_size"] == 32
    for ms in recipe["ms_per_step"].values():
        # every phase the model computes in took time, and the phases fit inside the step
        assert all(positive(ms[phase]) for phase in ("total", "batch", "forward", "backward",
                                                     "optimizer"))
        timed = sum(ms[p] for p in ("batch", "augment", "forward", "backward", "optimizer",
                                    "clear_grads"))
        assert timed <= ms["total"] and abs(ms["rest"] - (ms["total"] - timed)) < 1e-9
    assert recipe["ms_per_image"] != 0 and 0 < recipe["profile"]["operator_calls_per_step"]
    assert recipe["profile"]["top"] and "fixed part" in stdout


def test_fused_kernels_smoke(tmp_path):
    result, stdout = run_smoke("fused_kernels", tmp_path)
    recipe = result["recipes"]["seed-model2"]
    assert len(recipe["fused_ms_per_step"]) == len(recipe["pytorch_ms_per_step"]) == 1
    assert all(positive(v) for v in recipe["fused_ms_per_step"] + recipe["pytorch_ms_per_step"])
    assert result["default_fused"] is result["cpu_capability"].startswith(("AVX2", "AVX512"))
    assert "PyTorch / fused" in stdout
