import csv
import io
import subprocess
import sys

import pytest

from fashion_cnn.apps import tune as search
from fashion_cnn.data.fashion_mnist import load_data
from fashion_cnn.errors import SpecError, UserError
from fashion_cnn.training.loop import Trainer
from fashion_cnn.apps.tune import list_searches
from fashion_cnn.training.recipes import load_config

pytest.importorskip("optuna")

SPACE = """
recipe = "dense"
[set]
"train.epochs" = 2
"train.threads" = 1
[params."train.lr"]
type = "float"
low = 0.0003
high = 0.01
log = true
[params."train.batch_size"]
type = "categorical"
choices = [16, 32]
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from conftest import make_idx_dir

    return load_data(make_idx_dir(tmp_path_factory.mktemp("search") / "idx", n_train=200),
                     check_md5=False)


def write(tmp_path, text, name="space.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def rows(out_dir):
    return list(csv.DictReader(io.StringIO((out_dir / "trials.csv").read_text())))


def test_tune_records_every_trial_and_writes_a_runnable_best_config(tmp_path, tiny_data,
                                                                   monkeypatch):
    judged_on = set()
    original = Trainer.evaluate_split

    def spy(self, split, *args, **kwargs):
        judged_on.add(split)
        return original(self, split, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate_split", spy)
    result = search.tune(write(tmp_path, SPACE), trials=4, out=tmp_path / "out",
                         data=tiny_data, progress=False)
    assert judged_on == {"val"}  # never the test set
    assert result.trials == 4 and sorted(p.name for p in result.out_dir.iterdir()) == [
        "best.toml", "space.toml", "trials.csv"]
    table = rows(result.out_dir)
    assert [r["trial"] for r in table] == ["0", "1", "2", "3"]
    assert all(r["state"] in ("complete", "pruned") for r in table)
    complete = [r for r in table if r["state"] == "complete"]
    best = max(complete, key=lambda r: float(r["val_accuracy"]))
    assert result.best_value == pytest.approx(float(best["val_accuracy"]))
    assert int(best["trial"]) == result.best_trial
    config = load_config(str(result.out_dir / "best.toml"))  # `fashion-cnn train best.toml`
    assert config.train.lr == pytest.approx(result.best_params["train.lr"])
    assert config.train.batch_size == result.best_params["train.batch_size"]
    assert config.train.epochs == 2 and config.model.name == "dense"
    for r in table:
        assert 0.0003 <= float(r["train.lr"]) <= 0.01 and r["train.batch_size"] in ("16", "32")
    again = search.tune(write(tmp_path, SPACE), trials=4, out=tmp_path / "again",
                        data=tiny_data, progress=False)
    assert rows(again.out_dir) == [dict(r, seconds=a["seconds"]) for r, a in
                                   zip(table, rows(again.out_dir))]  # same seed: same study


def test_diverging_trials_fail_and_the_search_goes_on(tmp_path, tiny_data, capsys):
    space = SPACE.replace('"train.epochs" = 2', '"train.epochs" = 2\n"train.optimizer" = "sgd"')
    space = space.replace("low = 0.0003\nhigh = 0.01", "low = 1e29\nhigh = 1e30")
    result = search.tune(write(tmp_path, space), trials=2, out=tmp_path / "out",
                         data=tiny_data)
    assert result.best_trial is None and result.trials == 2
    assert [r["state"] for r in rows(result.out_dir)] == ["fail", "fail"]
    assert "failed (non-finite loss)" in capsys.readouterr().out
    assert not (result.out_dir / "best.toml").exists()


def test_processes_sharing_a_journal_work_on_one_study(tmp_path, tiny_data):
    journal = tmp_path / "study.journal"
    space = write(tmp_path, SPACE)
    first = search.tune(space, trials=2, out=tmp_path / "a", storage=journal, data=tiny_data,
                        progress=False)
    second = search.tune(space, trials=2, out=tmp_path / "b", storage=journal, data=tiny_data,
                         progress=False)
    assert first.trials == 2 and second.trials == 4
    table = rows(second.out_dir)
    assert [r["trial"] for r in table] == ["0", "1", "2", "3"]
    assert len({r["train.lr"] for r in table}) == 4  # each process samples its own


class FakeTrial:
    def __init__(self, prune):
        self.prune, self.reported = prune, []

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return self.prune


class FakeTrainer:
    class config:
        class train:
            epochs = 3

    stop_training = False
    stop_reason = None


def test_the_pruner_stops_training_but_never_at_the_last_epoch():
    trainer, trial = FakeTrainer(), FakeTrial(prune=True)
    report = search.ReportToTrial(trial, "val_accuracy")
    report.on_epoch_end(trainer, 0, {"val_accuracy": 0.5})
    assert trial.reported == [(1, 0.5)] and trainer.stop_training and report.pruned_at == 1
    trainer, trial = FakeTrainer(), FakeTrial(prune=True)
    report = search.ReportToTrial(trial, "val_loss")
    report.on_epoch_end(trainer, 2, {"val_loss": 0.3})
    assert trial.reported == [(3, 0.3)] and not trainer.stop_training
    report.on_epoch_end(trainer, 1, {"val_loss": float("nan")})  # not reported
    assert trial.reported == [(3, 0.3)]


@pytest.mark.parametrize("text,fragment", [
    ("recipe = 1\n[params.\"train.lr\"]\ntype = \"float\"\nlow = 1\nhigh = 2",
     "recipe = \"...\" is required"),
    (SPACE + "colour = 1", "unknown key 'colour'"),
    (SPACE.replace('recipe = "dense"', 'recipe = "dense"\nobjective = "test_accuracy"'),
     "objective must be one of val_accuracy, val_loss"),
    (SPACE.replace('type = "float"', 'type = "normal"'), "type must be one of float, int"),
    (SPACE.replace("low = 0.0003", "low = 0.3"), "low (0.3) must not exceed high (0.01)"),
    (SPACE.replace("low = 0.0003", "low = 0"), "log = true needs low > 0"),
    (SPACE.replace('"train.lr"]', '"train.lrate"]'), "unknown setting 'lrate'"),
    (SPACE.replace('"train.lr"]', '"lr"]'), "name settings as \"section.key\""),
    (SPACE.replace("choices = [16, 32]", "choices = []"), "choices must be a non-empty list"),
    (SPACE.replace("choices = [16, 32]", "choices = [16, 0]"), "train.batch_size = 0"),
    (SPACE.replace('"train.threads" = 1', '"train.threads" = 1\n"train.lr" = 0.1'),
     "both fixed in [set] and searched"),
    (SPACE.replace('recipe = "dense"', 'recipe = "fast"'), "has no validation split"),
])
def test_search_space_mistakes_are_one_clear_line(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as caught:
        search.load_space(path)
    message = str(caught.value)
    assert message.startswith(path) and fragment in message and "\n" not in message


def test_the_built_in_spaces_are_valid():
    assert "fast" in list_searches()
    for name in list_searches():
        space = search.load_space(name)
        assert space.params and space.recipe


def test_missing_optuna_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(UserError, match="tune needs the optuna package"):
        search.tune(write(tmp_path, SPACE), trials=1, out=tmp_path / "out")


def test_cli_tune(real_data, tmp_path):
    space = write(tmp_path, SPACE)
    done = subprocess.run([sys.executable, "-m", "fashion_cnn", "tune", space, "--trials", "2",
                           "--subset", "600", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("trial 0: val_accuracy ") and lines[1].startswith("trial 1: ")
    assert lines[2].startswith("Best of 2 trials (study 'space'): trial ")
    assert lines[3].startswith(f"Retrain it: fashion-cnn train {tmp_path / 'out' / 'best.toml'}")
    done = subprocess.run([sys.executable, "-m", "fashion_cnn", "tune", "nosuch", "--trials", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "unknown search space 'nosuch'" in done.stderr
    assert done.stderr.count("\n") == 1
