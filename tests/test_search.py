"""python -m mnist_lit.search: Optuna studies whose trials are ordinary fit runs; grids x seeds in the same
engine. Real fits on tiny IDX data, a few epochs each, each trial a forked process as a user's are; the search
command itself runs in this process (``search``), or as its own process where it is signalled or killed."""

import csv
import importlib
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import REPO, free_port, launch, read_events, run_main, write_mnist
from mnist_lit.search.command import main as search_main

SEARCH = [sys.executable, "-m", "mnist_lit.search"]
FIT = ["--data.verify_checksums", "false", "--data.val_size", "100",
       "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1"]
SPACE = {"space": {"model.optimizer.init_args.lr": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
                   "model.net.init_args.hidden1": {"type": "int", "low": 16, "high": 64},
                   "data.batch_size": {"type": "categorical", "choices": [32, 64]}},
         "pruner": None}


def search(root: Path, name: str, *args: str, data: Path, epochs: int = 2, timeout: int = 600,
           popen: bool = False, fit: list[str] = FIT):
    """``python -m mnist_lit.search`` with these arguments: its own process when ``popen`` (a command that is
    signalled or killed, or two of them at once), otherwise its ``main`` in this process, its trials forked as
    always (the search's imports and its fork server's are paid once per test file, not once per command)."""
    argv = ["--name", name, "--root", str(root), "--config", str(REPO / "configs" / "default.yaml"), *args, "--",
            "--data.data_dir", str(data), *fit, "--trainer.max_epochs", str(epochs)]
    if popen:  # its own process group: a signal to the group reaches the search and its trials, as Ctrl-C does
        return subprocess.Popen([*SEARCH, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return run_main(search_main, argv, timeout)


def space_file(folder: Path, **changes) -> Path:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump({**SPACE, **changes}))
    return path


def trials_of(root: Path, name: str, storage=None) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{root / name / 'study.db'}").get_trials()


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One search of 4 trials, two commands of one worker each on one SQLite study, started together: as two
    machines would share a database."""
    root = tmp_path_factory.mktemp("search")
    data = write_mnist(root / "data")
    space = space_file(root)
    first, second = (search(root, "s", "--space", str(space), "--trials", "4", data=data, popen=True)
                     for _ in range(2))
    outputs = [process.communicate(timeout=600) for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    return root


@pytest.mark.slow
def test_two_workers_on_one_study_complete_exactly_the_trials_asked_once_each(finished_search: Path):
    trials = trials_of(finished_search, "s")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4, [(t.number, t.state, t.user_attrs) for t in trials]
    folders = [t.user_attrs["run_folder"] for t in complete]
    assert len(set(folders)) == 4 and len({json.dumps(t.params, sort_keys=True) for t in complete}) == 4
    assert {t.user_attrs["worker"]["pid"] for t in complete}.__len__() == 2  # both commands ran trials
    for trial in complete:  # each an ordinary fit run: its folder, its events, its results
        run = finished_search / "s" / trial.user_attrs["run_folder"]
        metrics = json.loads((run / "metrics.json").read_text())["metrics"]
        assert trial.value == metrics["val/acc_best"] and "test/acc" not in metrics  # the test set is not looked at
        assert sorted(trial.intermediate_values) == [0, 1]  # val/acc reported after each epoch
        assert max(trial.intermediate_values.values()) == pytest.approx(trial.value)
        assert (run / "checkpoints" / "last.ckpt").is_file()
        events = read_events(run)  # the HPARAMS tab, every trial under the search's one log dir
        session = plugin_data_pb2.HParamsPluginData.FromString(
            events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
        assert session.hparams["net/init_args/hidden1"].number_value == trial.params["model.net.init_args.hidden1"]
        assert events.Scalars("hp/val_acc_best")[0].value == pytest.approx(trial.value)


@pytest.mark.slow
def test_a_search_leaves_its_tables_plots_and_a_best_config_that_fits_as_is(finished_search: Path,
                                                                         tmp_path: Path):
    folder = finished_search / "s"
    trials = trials_of(finished_search, "s")
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    top = (folder / "top.md").read_text()
    assert f"| {best.number} | {best.value:.4f} |" in top.splitlines()[4]  # the first row is the best trial
    assert "4 complete, 0 pruned" in top
    assert len(read_csv(folder / "trials.csv")) == len(trials)
    for plot in ("history.png", "importances.png"):
        assert (folder / plot).read_bytes()[:4] == b"\x89PNG"
    config = yaml.safe_load((folder / "best.yaml").read_text())
    assert config["model"]["class_path"] == "mnist_lit.model.MNISTClassifier"
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == best.params["model.optimizer.init_args.lr"]
    assert config["data"]["init_args"]["batch_size"] == best.params["data.batch_size"]
    assert config["trainer"]["callbacks"] is None and config["test_after_fit"] is True
    done = launch(["fit", "--config", str(folder / "best.yaml"), "--torch_threads", "1",
                   "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics,) = [json.loads(p.read_text())["metrics"] for p in (tmp_path / "logs").glob("*/*/metrics.json")]
    assert metrics["val/acc_best"] == pytest.approx(best.value)  # the same run again, and now its test result
    assert "test/acc" in metrics


@pytest.mark.slow
def test_rerunning_a_finished_search_runs_nothing_and_another_space_is_refused(finished_search: Path):
    space = finished_search / "space.yaml"
    before = len(trials_of(finished_search, "s"))
    done = search(finished_search, "s", "--space", str(space), "--trials", "4", data=finished_search / "data")
    assert done.returncode == 0 and not [line for line in done.stdout.splitlines() if line.startswith("[worker")]
    assert len(trials_of(finished_search, "s")) == before
    other = space_file(finished_search / "data", space={**SPACE["space"], "data.batch_size": {
        "type": "categorical", "choices": [32, 128]}})
    done = search(finished_search, "s", "--space", str(other), "--trials", "4", data=finished_search / "data")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    message = done.stderr.strip()
    assert message.startswith("error: The study 's'") and "data.batch_size" in message and "--name" in message


@pytest.mark.slow
def test_optuna_dashboard_serves_the_finished_study_on_loopback(finished_search: Path):
    pytest.importorskip("optuna_dashboard")
    port = free_port()
    program = Path(sys.executable).parent / "optuna-dashboard"  # the extra's console script, beside python
    dashboard = subprocess.Popen([str(program), f"sqlite:///{finished_search / 's' / 'study.db'}", "--host",
                                  "127.0.0.1", "--port", str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, studies = time.monotonic() + 60, None
        while studies is None and dashboard.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.load(response)["study_summaries"]
            except OSError:
                time.sleep(0.5)
        if studies is None:
            dashboard.kill()
            pytest.fail(f"optuna-dashboard did not answer within 60 s: {dashboard.communicate(timeout=30)[0][-2000:]}")
        (study,) = [s for s in studies if s["study_name"] == "s"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}", timeout=10) as r:
            served = {t["number"]: t for t in json.load(r)["trials"]}
        for trial in trials_of(finished_search, "s"):
            if trial.state == TrialState.COMPLETE:
                assert served[trial.number]["values"] == [trial.value]
    finally:
        dashboard.kill()
        dashboard.wait(timeout=30)


@pytest.mark.slow
def test_a_space_over_a_modules_own_init_args_searches_them(tmp_path: Path, tiny_mnist: Path):
    focal = ["--config", str(REPO / "configs" / "examples" / "focal.yaml")]
    space = space_file(tmp_path, space={"model.gamma": {"type": "float", "low": 0.5, "high": 3.0}})
    done = search(tmp_path, "focal", *focal, "--space", str(space), "--trials", "2", data=tiny_mnist, epochs=1)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = [t for t in trials_of(tmp_path, "focal") if t.state == TrialState.COMPLETE]
    assert len(trials) == 2
    for trial in trials:  # each trial's fit ran the subclass with the gamma the study chose
        config = yaml.safe_load((tmp_path / "focal" / "trials" / f"trial{trial.number}" / "config.yaml").read_text())
        assert config["model"]["class_path"] == "mnist_lit.examples.focal.FocalClassifier"
        assert config["model"]["init_args"]["gamma"] == trial.params["model.gamma"]
    done = search(tmp_path, "ce", "--space", str(space), "--trials", "1", data=tiny_mnist, epochs=1)
    assert done.returncode != 0 and "model.gamma" in done.stderr  # the default classifier has no gamma: refused


@pytest.mark.slow
def test_the_993_space_searches_the_distortions_widths_and_schedule_of_each_trials_fit(tmp_path: Path,
                                                                                         tiny_mnist: Path):
    """configs/search/mlp_993.yaml with the base configs and arguments scripts/figures/search_993.py gives it."""
    base = ["--config", str(REPO / "configs" / "experiment" / "mlp_99.yaml")]
    space = yaml.safe_load((REPO / "configs" / "search" / "mlp_993.yaml").read_text())
    space["pruner"] = None  # one epoch of tiny data: nothing to prune
    path = tmp_path / "mlp_993.yaml"
    path.write_text(yaml.safe_dump(space))
    done = search(tmp_path, "s993", *base, "--space", str(path), "--trials", "2", data=tiny_mnist, epochs=1,
                  fit=[*FIT, "--data.augment", "mnist_lit.augment.ElasticAffine"])
    assert done.returncode == 0, done.stderr[-3000:]
    trials = [t for t in trials_of(tmp_path, "s993") if t.state == TrialState.COMPLETE]
    assert len(trials) == 2 and trials[0].params != trials[1].params
    for trial in trials:
        config = yaml.safe_load((tmp_path / "s993" / "trials" / f"trial{trial.number}" / "config.yaml").read_text())
        augment, model = config["data"]["init_args"]["augment"], config["model"]["init_args"]
        assert augment["class_path"] == "mnist_lit.augment.ElasticAffine"
        for key, value in trial.params.items():  # every searched value reached the fit, under its own name
            node = config
            for part in key.split("."):  # short keys skip init_args, as jsonargparse lets them
                node = node[part] if part in node else node["init_args"][part]
            assert (node["class_path"] if isinstance(node, dict) else node) == value, key
        assert model["net"]["class_path"] == "mnist_lit.model.MLP"  # still two hidden layers


@pytest.mark.slow
def test_a_search_for_time_keeps_the_pareto_front_of_accuracy_against_seconds(tmp_path: Path, tiny_mnist: Path):
    # Two objectives: each trial's val/acc_best and its fit's own launch-to-result seconds (metrics.json); no pruner,
    # no per-epoch reports; top.md lists exactly the trials that no other beats on both, fastest first; best.yaml
    # is the fastest of them that reaches the target; front.png draws them.
    space = tmp_path / "time.yaml"
    space.write_text(yaml.safe_dump({
        "sampler": {"class_path": "optuna.samplers.RandomSampler", "init_args": {"seed": 0}},
        "objectives": ["val/acc_best", "seconds"], "target": 0.3,
        "space": {"trainer.max_epochs": {"type": "int", "low": 1, "high": 3},
                  "model.net.init_args.hidden1": {"type": "int", "low": 8, "high": 96, "log": True}}}))
    done = run_main(search_main, ["--name", "fast", "--root", str(tmp_path / "s"), "--space", str(space), "--trials",
                                  "4", "--config", str(REPO / "configs" / "default.yaml"), "--", "--data.data_dir",
                                  str(tiny_mnist), *FIT])  # the trials' own epochs: not search()'s --trainer.max_epochs
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="fast", storage=f"sqlite:///{tmp_path / 's' / 'fast' / 'study.db'}")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    trials = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(trials) == 4
    for t in trials:
        record = json.loads((tmp_path / "s" / "fast" / t.user_attrs["run_folder"] / "metrics.json").read_text())
        assert t.values == [record["metrics"]["val/acc_best"], record["seconds"]["total"]]
        assert record["epochs"] == t.params["trainer.max_epochs"] and not t.intermediate_values
        assert set(record["seconds"]) == {"start_up", "train", "validation", "test", "other", "total"}
    front = {t.number for t in trials if not any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1]
                                                 and o.values != t.values for o in trials)}
    top = (tmp_path / "s" / "fast" / "top.md").read_text()
    listed = [int(line.split("|")[1]) for line in top.splitlines() if line.startswith("| ") and "trial" not in line]
    assert sorted(listed) == sorted(front)  # the front, each trial once
    seconds = {t.number: t.values[1] for t in trials}
    assert listed == sorted(listed, key=seconds.get)
    reaching = [n for n in listed if study.trials[n].values[0] >= 0.3]
    best = reaching[0] if reaching else max(listed, key=lambda n: study.trials[n].values[0])
    assert (tmp_path / "s" / "fast" / "best.yaml").read_text().startswith(f"# Trial {best} of study 'fast'")
    assert (tmp_path / "s" / "fast" / "front.png").stat().st_size > 10_000


@pytest.mark.parametrize("changes, named", [
    ({"objectives": ["val/acc_best", "seconds"], "pruner": {"class_path": "optuna.pruners.MedianPruner"}},
     "Optuna's pruners judge one value per epoch"),
    ({"objectives": ["seconds"]}, "'objectives' is ['seconds']"),
    ({"target": 0.99}, "'target' is 0.99"),
])
def test_a_search_for_time_that_cannot_be_searched_is_refused(tmp_path: Path, changes: dict, named: str):
    from mnist_lit.search.space import SearchSpace, SearchSpaceError
    with pytest.raises(SearchSpaceError, match=named.replace("[", r"\[").replace("]", r"\]")):
        SearchSpace.load(space_file(tmp_path, **changes))


def test_commands_started_together_on_a_new_database_all_open_it(tmp_path: Path):
    """Optuna's schema is created by whichever command comes first; the others race it (its tables, then its
    version row) and must find it instead of failing. Two at a time failed about every other time before."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    opener = f"from mnist_lit.search.storage import open_storage; open_storage({url!r}); print('opened')"
    openers = [subprocess.Popen([sys.executable, "-W", "ignore", "-c", opener], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [process.communicate(timeout=300) for process in openers]
    assert [out.strip() for out, _ in outputs] == ["opened"] * 4, [err[-1500:] for _, err in outputs]


@pytest.mark.slow
def test_a_pruner_that_must_prune_stops_every_trial_after_its_first_epoch(tmp_path: Path, tiny_mnist: Path):
    space = space_file(tmp_path, pruner={"class_path": "optuna.pruners.ThresholdPruner",
                                         "init_args": {"lower": 1.01}})  # val/acc <= 1 < 1.01: always prune
    journal = tmp_path / "shared" / "p.journal"  # an Optuna journal file instead of a database, as on a shared disk
    journal.parent.mkdir()
    done = search(tmp_path, "p", "--space", str(space), "--trials", "2", "--workers", "2", "--storage", str(journal),
                  data=tiny_mnist, epochs=4)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path / "p" / "study.db").exists()
    trials = trials_of(tmp_path, "p", JournalStorage(JournalFileBackend(str(journal))))
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    for trial in trials:
        run = tmp_path / "p" / trial.user_attrs["run_folder"]
        assert trial.user_attrs["pruned_at_epoch"] == 0 and list(trial.intermediate_values) == [0]
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0  # stopped, saved
        assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    assert "0 complete, 2 pruned" in (tmp_path / "p" / "top.md").read_text()
    assert not (tmp_path / "p" / "best.yaml").exists()  # no complete trial: no best configuration


@pytest.mark.slow
def test_pruning_stops_every_rank_of_a_ddp_trial(tmp_path: Path, tiny_mnist: Path):
    space = space_file(tmp_path, pruner={"class_path": "optuna.pruners.ThresholdPruner",
                                         "init_args": {"lower": 1.01}})
    done = search(tmp_path, "d", "--space", str(space), "--trials", "1", data=tiny_mnist, epochs=4,
                  fit=[*FIT, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (trial,) = trials_of(tmp_path, "d")
    assert trial.state == TrialState.PRUNED and trial.user_attrs["pruned_at_epoch"] == 0
    run = tmp_path / "d" / trial.user_attrs["run_folder"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert "Trial 0 pruned after epoch 0" in run.with_suffix(".log").read_text()


@pytest.mark.parametrize("dimension, named", [
    pytest.param({"model.net.init_args.hidden3": {"type": "int", "low": 8, "high": 16}}, "hidden3",
                 marks=pytest.mark.slow),  # found by a trial's fit failing
    ({"model.optimizer.init_args.lr": {"type": "float", "low": 0.5, "high": 0.1}}, "range [0.5, 0.1] is empty"),
    ({"model.optimizer.init_args.weight_decay": {"type": "float", "low": 0.0, "high": 0.01, "log": True}},
     "a log range must be above 0"),
    ({"data.batch_size": {"type": "categorical", "choices": []}}, "'choices' must be a non-empty list"),
    ({"data.batch_size": {"type": "integer", "low": 1, "high": 3}}, "'type' float, int or categorical"),
    ({"model.net.init_args.hidden1": {"type": "int", "low": 16, "high": 64, "step": 0}}, "`step > 0` must hold"),
])
def test_a_bad_search_space_is_one_paragraph_naming_the_key(tmp_path: Path, dimension: dict, named: str):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"space": dimension}))
    done = search(tmp_path, "bad", "--space", str(space), data=tmp_path, timeout=120)
    message = done.stderr.strip()
    assert done.returncode == 1 and message.startswith("error: ") and "\n" not in message, done.stderr
    assert next(iter(dimension)).rsplit(".", 1)[-1] in message and named in message
    assert not (tmp_path / "bad" / "study.db").exists()  # refused before any study or trial


@pytest.mark.parametrize(("old", "new"), [
    ("mnist_lit.pruning.TrialPruning", "mnist_lit.search.pruning.TrialPruning"),
    ("mnist_lit.study.Plan", "mnist_lit.search.study.Plan"),
    ("mnist_lit.search_space.SearchSpace", "mnist_lit.search.space.SearchSpace"),
    ("mnist_lit.storage.open_storage", "mnist_lit.search.storage.open_storage"),
    ("mnist_lit.search_report.write_search_results", "mnist_lit.search.report.write_search_results"),
    ("mnist_lit.focal.FocalClassifier", "mnist_lit.examples.focal.FocalClassifier"),
    ("mnist_lit.distillation.Distillation", "mnist_lit.examples.distillation.Distillation"),
])
def test_a_stored_class_path_from_before_the_move_still_names_the_same_class(old, new):
    """Studies and checkpoints written before the search and the examples became wings store the old names
    (every trial's config holds mnist_lit.pruning.TrialPruning): they resolve, as jsonargparse resolves them, to
    the very same objects."""
    def resolve(path: str):  # what jsonargparse does with a class_path: import the module, take the attribute
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    assert resolve(old) is resolve(new)
    module = importlib.import_module(old.rpartition(".")[0])
    assert module.__spec__.name == new.rpartition(".")[0]  # one module, under its own name
