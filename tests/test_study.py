"""Studies: the study TOML, the seed study end to end on a tiny budget, reruns that skip,
resume or refuse, and the report's table checked against every run's metrics.json."""

from __future__ import annotations

import html
import json
import tomllib
from pathlib import Path

import pytest

from fashion_cnn import cli
from fashion_cnn.errors import SpecError, UserError
from fashion_cnn.analysis.findings import early_stopping_pick, overfitting_start
from fashion_cnn.analysis.report import write_report
from fashion_cnn.analysis.study import STUDY_FILE, load_study, read_study
from fashion_cnn.analysis.study_run import run_study
from fashion_cnn.catalog import ZOO

SEED_STUDY = ZOO / "studies" / "seed.toml"
QUICK = ["--subset", "1000", "--epochs-scale", "0.04"]


# ----------------------------------------------------------------------------- the study file

def test_seed_study_lists_the_seed_runs_with_reference_data_from_its_toml():
    study = load_study("seed")
    assert [r.name for r in study.runs] == ["seed-dense", "seed-model1", "seed-model1-l2",
                                            "seed-model2", "seed-model3", "seed-model4"]
    raw = tomllib.loads(SEED_STUDY.read_text())
    for entry in raw["runs"]:
        assert study.run(entry["recipe"]).reference == entry.get("reference", {})
    assert study.run("seed-model4").reference == {
        "seed_test_accuracy": 0.926, "keras_test_accuracy": 0.9254, "keras_train_seconds": 1450.7}
    assert "seed_test_accuracy" not in study.run("seed-dense").reference  # the seed prints none
    # Each run trains with its recipe's settings.
    assert [study.config_for(r).train.epochs for r in study.runs] == [25, 25, 25, 25, 50, 50]
    assert study.config_for(study.run("seed-model4")).augment.enabled


def test_epochs_scale_subset_and_repeats():
    study = load_study("seed", epochs_scale=0.04, subset=2000, repeats=3)
    model1, model3 = study.run("seed-model1"), study.run("seed-model3")
    assert study.config_for(model1).train.epochs == 1 and study.config_for(model3).train.epochs == 2
    assert load_study("seed", epochs_scale=0.001).config_for(model3).train.epochs == 1  # at least 1
    assert study.config_for(model1, 2).data.subset == 2000
    assert [study.config_for(model1, k).train.seed for k in range(3)] == [0, 1, 2]
    assert study.dir_names(model1) == [(0, "seed-model1-seed0"), (1, "seed-model1-seed1"),
                                       (2, "seed-model1-seed2")]
    assert load_study("seed").dir_names(model1) == [(0, "seed-model1")]


def test_resolved_study_toml_reads_back_the_same(tmp_path):
    study = load_study("seed", epochs_scale=0.5, repeats=2)
    study.overrides = {"train": {"precision": "bf16"}}
    path = tmp_path / STUDY_FILE
    path.write_text(study.to_toml())
    assert read_study(tmp_path) == study


def test_custom_study_with_relative_recipe_and_overrides(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.toml").write_text('model = "model1"\n[train]\nepochs = 4\n')
    (tmp_path / "mine.toml").write_text("""
        [overrides.train]
        batch_size = 64
        [[runs]]
        recipe = "recipes/mine.toml"
        [[runs]]
        recipe = "seed-model2"
        name = "faster"
        baseline = "mine"
        overrides = { train = { lr = 0.002 } }
    """)
    study = load_study(str(tmp_path / "mine.toml"))
    assert study.name == "mine" and [r.name for r in study.runs] == ["mine", "faster"]
    assert Path(study.runs[0].recipe) == (tmp_path / "recipes" / "mine.toml").resolve()
    first, second = (study.config_for(r) for r in study.runs)
    assert (first.train.epochs, first.train.batch_size) == (4, 64)
    assert (second.train.batch_size, second.train.lr) == (64, 0.002)


@pytest.mark.parametrize("text, fragment", [
    ("[[runs]]\nrecipe = 'seed-model1'\ncolour = 1\n", "unknown key 'colour'"),
    ("epochs = 3\n[[runs]]\nrecipe = 'seed-model1'\n", "unknown key 'epochs'"),
    ("name = 'x'\n", "no runs"),
    ("[[runs]]\nrecipe = 'seed-model1'\n[[runs]]\nrecipe = 'seed-model1'\n", "two runs are named"),
    ("[[runs]]\nrecipe = 'seed-model1'\nbaseline = 'nope'\n", "baseline 'nope'"),
    ("[[runs]]\nrecipe = 'seed-model1'\nreference = { seed_acc = 0.9 }\n", "unknown key 'seed_acc'"),
    ("[[runs]]\nrecipe = 'seed-model1'\noverrides = { trian = { lr = 1 } }\n", "unknown section"),
    ("[[runs]]\nrecipe = 'seed-model1'\nname = '../up'\n", "plain directory name"),
    ("repeats = 0\n[[runs]]\nrecipe = 'seed-model1'\n", "repeats must be at least 1"),
])
def test_study_file_errors_are_user_errors(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        load_study(str(path))


def test_unknown_study_and_bad_overrides_name_what_exists(tmp_path):
    with pytest.raises(SpecError, match="built-in studies: seed"):
        load_study("sead")
    path = tmp_path / "s.toml"
    path.write_text("[[runs]]\nrecipe = 'seed-model1'\noverrides = { train = { lrr = 1 } }\n")
    with pytest.raises(SpecError, match="unknown setting 'lrr'"):
        load_study(str(path)).config_for(load_study(str(path)).runs[0])


# ----------------------------------------------------------------------------- findings

def _history(val_losses, losses=None):
    losses = losses or [1.0 - 0.1 * i for i in range(len(val_losses))]
    return [{"epoch": i + 1, "loss": l, "val_loss": v, "val_accuracy": 0.8 + i / 100}
            for i, (v, l) in enumerate(zip(val_losses, losses))]


def test_overfitting_starts_after_the_lowest_val_loss_while_loss_falls():
    start = overfitting_start(_history([0.6, 0.5, 0.45, 0.47, 0.52, 0.55]))
    assert (start["epoch"], start["last_epoch"]) == (3, 6)
    assert start["val_loss"] == 0.45 and start["last_val_loss"] == 0.55
    assert overfitting_start(_history([0.6, 0.5, 0.4])) is None           # still improving
    rising_loss = [0.5, 0.4, 0.6, 0.7]
    assert overfitting_start(_history([0.6, 0.5, 0.55, 0.58], rising_loss)) is None
    assert overfitting_start([{"epoch": 1, "loss": 0.5}]) is None        # no validation


def test_early_stopping_pick_follows_keras_patience():
    # Lowest at epoch 2; epochs 3, 4, 5 do not improve: stops after 5, keeps 2.
    assert early_stopping_pick(_history([0.5, 0.4, 0.45, 0.41, 0.42, 0.3])) == (5, 2)
    assert early_stopping_pick(_history([0.5, 0.4, 0.45, 0.39, 0.42, 0.41])) is None
    assert early_stopping_pick(_history([0.5, 0.4, 0.45, 0.41]), patience=2) == (4, 2)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def quick_study(tmp_path_factory, real_data):
    """The seed study with --subset 1000 --epochs-scale 0.04, through the command line."""
    out = tmp_path_factory.mktemp("study") / "seed"
    assert cli.main(["study", "seed", "--out", str(out), *QUICK, "--quiet"]) == 0
    return out


def _markdown_table(text: str) -> dict[str, dict[str, str]]:
    """The first table after '## Results' as {first cell: {column: cell}}."""
    lines = text.split("## Results", 1)[1].strip().splitlines()
    rows = [[c.strip() for c in line.strip().strip("|").split(" | ")]
            for line in lines[:next(i for i, l in enumerate(lines) if not l.startswith("|"))]]
    header, body = rows[0], rows[2:]
    return {row[0]: dict(zip(header, row)) for row in body}


def test_report_table_matches_every_run_metrics(quick_study):
    study = tomllib.loads(SEED_STUDY.read_text())
    table = _markdown_table((quick_study / "report.md").read_text())
    page = (quick_study / "report.html").read_text()
    assert list(table) == [entry["recipe"] for entry in study["runs"]]
    for entry in study["runs"]:
        name = entry["recipe"]
        metrics = json.loads((quick_study / name / "metrics.json").read_text())
        reference = entry.get("reference", {})
        expected = {
            "Parameters": f"{metrics['params']:,}",
            "Epochs run": str(metrics["epochs"]),
            "Best epoch (val_loss)": str(metrics["best_epoch"]),
            "Final train acc.": f"{metrics['accuracy']:.4f}",
            "Best val. acc.": f"{metrics['best_val_accuracy']:.4f}",
            "Test loss": f"{metrics['test_loss']:.4f}",
            "Test accuracy": f"{metrics['test_accuracy']:.4f}",
            "Train–val. gap": f"{metrics['accuracy'] - metrics['val_accuracy']:+.4f}",
            "Training time": f"{metrics['train_seconds']:.1f} s",
            "Seed's test acc. (reported)": (f"{reference['seed_test_accuracy']:.3f}"
                                            if "seed_test_accuracy" in reference else "–"),
            "Keras test acc. (here)": (f"{reference['keras_test_accuracy']:.4f}"
                                       if "keras_test_accuracy" in reference else "–"),
            "Keras training time (here)": (f"{reference['keras_train_seconds']:.1f} s"
                                           if "keras_train_seconds" in reference else "–"),
        }
        assert {k: table[name][k] for k in expected} == expected, name
        assert metrics["epochs"] == max(1, round(25 * 0.04 if "model3" not in name
                                                 and "model4" not in name else 50 * 0.04))
        row = "".join(f"<td>{html.escape(cell)}</td>" for cell in table[name].values())
        assert row in page  # the HTML shows the same row
    # Findings are computed: the best run named is the one with the highest accuracy.
    best = max(table, key=lambda n: float(table[n]["Test accuracy"]))
    assert f"Highest test accuracy: {best}, {table[best]['Test accuracy']}" in page
    assert "quick version of the study" in page
    for figure in ("references", "learning_curves", "weights", "confusion_seed-model4",
                   "augmentation_seed-model4", "gradcam_seed-model4", "gradcam_seed-dense"):
        assert (quick_study / "report_files" / f"{figure}.png").is_file(), figure
        assert f"(report_files/{figure}.png)" in (quick_study / "report.md").read_text()


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(quick_study, capsys,
                                                                monkeypatch):
    from fashion_cnn.analysis import study_run

    spawned = []  # the runs given a process of their own: only those with work to do
    spawn = study_run.run_in_process

    def counting(function, args, log, what):
        spawned.append(what)
        return spawn(function, args, log, what)

    monkeypatch.setattr(study_run, "run_in_process", counting)
    stamps = {p: p.stat().st_mtime_ns for p in quick_study.glob("*/metrics.json")}
    before = json.loads((quick_study / "seed-dense" / "metrics.json").read_text())
    capsys.readouterr()
    assert cli.main(["study", "seed", "--out", str(quick_study), *QUICK, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "6 skipped" in out and out.count("finished already, skipped") == 6
    assert {p: p.stat().st_mtime_ns for p in quick_study.glob("*/metrics.json")} == stamps
    assert spawned == []
    # An interrupted run: config.toml and checkpoints but no metrics.json -> resumed.
    (quick_study / "seed-dense" / "metrics.json").unlink()
    assert cli.main(["study", "seed", "--out", str(quick_study), *QUICK, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "seed-dense: resuming" in out and "1 resumed, 5 skipped" in out
    assert spawned == ["run seed-dense"]
    after = json.loads((quick_study / "seed-dense" / "metrics.json").read_text())
    assert after["test_accuracy"] == before["test_accuracy"]  # the same final weights


def test_rerun_with_other_options_is_refused(quick_study, capsys):
    capsys.readouterr()
    assert cli.main(["study", "seed", "--out", str(quick_study), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings" in err
    assert "--epochs-scale 0.04 --subset 1000" in err and "choose another output directory" in err
    assert err.startswith("fashion-cnn: error: --out: ")  # the CLI names the flag
    assert read_study(quick_study).subset == 1000  # study.toml untouched


def test_report_command_rewrites_the_report(quick_study, capsys):
    (quick_study / "report.html").unlink()
    (quick_study / "report_files" / "references.png").unlink()
    assert cli.main(["report", str(quick_study)]) == 0
    assert (quick_study / "report.html").is_file()
    assert (quick_study / "report_files" / "references.png").is_file()
    assert cli.main(["report", str(quick_study / "seed-dense")]) == 2  # not a study directory


def test_repeats_give_mean_and_std_over_seeds(tmp_path, real_data):
    (tmp_path / "r.toml").write_text("[[runs]]\nrecipe = 'seed-dense'\n")
    result = run_study(str(tmp_path / "r.toml"), tmp_path / "out", epochs_scale=0.04, subset=500,
                       repeats=2, progress=False, data=real_data, log=lambda line: None,
                       tensorboard=tmp_path / "tb")
    assert sorted(result.done) == ["seed-dense-seed0", "seed-dense-seed1"]
    # one TensorBoard sub-run per run, under the one folder given
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == sorted(result.done)
    assert all(list((tmp_path / "tb" / name / "validation").glob("events.out.tfevents.*"))
               for name in result.done)
    accuracies = [json.loads((tmp_path / "out" / name / "metrics.json").read_text())
                  ["test_accuracy"] for name in sorted(result.done)]
    row = _markdown_table((tmp_path / "out" / "report.md").read_text())["seed-dense (×2)"]
    mean = sum(accuracies) / 2
    std = abs(accuracies[0] - accuracies[1]) / 2 ** 0.5  # sample std of two values
    assert row["Test accuracy"] == f"{mean:.4f} ± {std:.4f}"
    assert write_report(tmp_path / "out")[0].is_file()


def test_quick_study_leaves_the_full_size_references_out_of_its_panels():
    from fashion_cnn.analysis.findings import RunSummary
    from fashion_cnn.analysis.report import figure_references

    reference = {"seed_test_accuracy": 0.91, "keras_test_accuracy": 0.905,
                 "keras_train_seconds": 600.0}
    runs = [RunSummary(name, "", "", reference, [name],
                       metrics=[{"test_accuracy": acc, "train_seconds": 12.0}])
            for name, acc in (("model1", 0.80), ("model2", 0.82))]

    def bars(fig):  # (accuracy bars, time bars) drawn
        left, right = fig.axes[:2]
        return len(left.patches), len(right.patches)

    full, quick = figure_references(runs), figure_references(runs, quick=True)
    assert bars(full) == (6, 4)   # ours, seed, Keras per run; ours and Keras' time
    assert bars(quick) == (2, 2)  # ours alone
    assert "not comparable" in quick.axes[0].get_title()
    assert "with Keras" in full.axes[1].get_title() and "Keras" not in quick.axes[1].get_title()
    # the accuracy axis is zoomed on our bars alone, not on references far above them
    assert quick.axes[0].get_ylim()[1] < 0.9
