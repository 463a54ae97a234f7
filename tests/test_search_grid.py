"""python -m mnist_lit.search --grid ... --seeds ...: what scripts/sweep.py did (a grid x seeds, each run a
fit process, a CSV and mean ± std per configuration, resumable), now studies in the same engine as a search."""

import csv
import os
import signal
import sqlite3
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_search import FIT, SEARCH, search, search_main

from conftest import REPO, run_main


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def grid(root: Path, data: Path, *extra: str, name: str = "lr", popen: bool = False):
    return search(root, name, "--grid", "model.optimizer.init_args.lr=0.02,0.1", "--seeds", "0", "1",
                  "--workers", "2", *extra, data=data, popen=popen)


@pytest.mark.slow
def test_grid_times_seeds_gives_a_row_per_run_and_mean_std_per_configuration(tiny_mnist: Path, tmp_path: Path):
    done = grid(tmp_path, tiny_mnist)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = read_csv(tmp_path / "lr" / "results.csv")
    assert [(r["configuration"], r["model.optimizer.init_args.lr"], r["seed"], r["status"]) for r in rows] == [
        ("lr=0.02", "0.02", "0", "ok"), ("lr=0.02", "0.02", "1", "ok"), ("lr=0.1", "0.1", "0", "ok"),
        ("lr=0.1", "0.1", "1", "ok")]
    for row in rows:  # each run is a normal run folder, with its own seed recorded
        assert Path(row["run_folder"], "metrics.json").is_file()
        assert f"seed_everything: {row['seed']}" in Path(row["run_folder"], "config.yaml").read_text()
    losses = [float(r["test/loss"]) for r in rows if r["configuration"] == "lr=0.1"]
    assert losses[0] != losses[1]  # different seeds, different runs
    table = (tmp_path / "lr" / "results.md").read_text()
    assert table.splitlines()[0] == ("| configuration | model.optimizer.init_args.lr | seeds | test/acc | "
                                     "val/acc_best | test/loss | wall_s |")
    (line,) = [line for line in table.splitlines() if line.startswith("| lr=0.1 | 0.1 | 2/2 | ")]
    assert line.split(" | ")[5] == f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}", table
    study = sqlite3.connect(tmp_path / "lr" / "study.db")  # the books are Optuna's: four trials, complete
    assert study.execute("select state, count(*) from trials group by state").fetchall() == [("COMPLETE", 4)]


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_grid_exits_nonzero(tiny_mnist: Path, tmp_path: Path):
    done = search(tmp_path, "bad", "--grid", "data.val_size=100,100000", data=tiny_mnist, epochs=1,
                  fit=[*(a for a in FIT if a not in ("--data.val_size", "100")), "--torch_threads", "2"])
    assert done.returncode == 1
    # the arguments after -- may change what the grid only defaults to (one torch thread per run)
    assert "torch_threads: 2" in (tmp_path / "bad" / "val_size=100" / "seed0" / "config.yaml").read_text()
    assert "trial 1: FAILED, fit exited with code 1" in done.stdout
    assert "--data.val_size is 100000" in (tmp_path / "bad" / "val_size=100000" / "seed0.log").read_text()
    assert [r["status"] for r in read_csv(tmp_path / "bad" / "results.csv")] == ["ok", "failed"]


@pytest.mark.slow
def test_a_config_edited_while_the_runs_go_is_named_and_no_mixed_table_is_written(tiny_mnist: Path,
                                                                                   tmp_path: Path):
    config = tmp_path / "extra.yaml"
    config.write_text("trainer:\n  max_epochs: 1\n")
    original = config.read_text()
    command = search(tmp_path, "edited", "--config", str(config), "--seeds", "0", "1", "--workers", "1",
                     data=tiny_mnist, epochs=1, popen=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "edited" / "default" / "seed0.log").exists():  # the first run has started
        assert command.poll() is None and time.monotonic() < deadline, "the first run never started"
        time.sleep(0.2)
    config.write_text(original + "# edited\n")  # the second run will read this one
    out, err = command.communicate(timeout=300)
    assert command.returncode == 1 and "Traceback" not in err, err[-2000:]
    for said in ("changed while it ran", "extra.yaml", "put the file back", "start a new --name"):
        assert said in err, err[-2000:]
    assert not (tmp_path / "edited" / "results.md").exists()
    config.write_text(original)  # as the message says: the same command then writes the tables, training nothing
    again = search(tmp_path, "edited", "--config", str(config), "--seeds", "0", "1", "--workers", "1",
                   data=tiny_mnist, epochs=1)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 already finished or running, 0 to run" in again.stdout
    assert [r["status"] for r in read_csv(tmp_path / "edited" / "results.csv")] == ["ok", "ok"]


@pytest.mark.parametrize("args, message", [
    (["--grid", "model.optimizer.init_args.lr"], "is not KEY=V1,V2"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--seeds", "1", "--", "--seed_everything", "3"], "--seed_everything is given after -- and is also what"),
    (["--", "--trainer.logger.save_dir", "elsewhere"],  # init_args left out, as the CLI allows
     "--trainer.logger.init_args.save_dir is given after -- and is set by the grid itself"),
    (["--space", "configs/search/mlp.yaml", "--", "--test_after_fit", "true"],
     "--test_after_fit is given after -- and is set by the search itself"),
    (["--space", "configs/search/mlp.yaml", "--seeds", "1"], "--seeds is for a grid"),
    (["--trials", "3"], "--trials and --no-pruning are for a search"),
    (["--no-pruning"], "--trials and --no-pruning are for a search"),
    (["--storage", "study.journal", "--heartbeat", "5"], "--heartbeat is for a database storage"),
])
def test_bad_search_arguments_are_named(args: list[str], message: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)
    done = run_main(search_main, ["--name", "x", "--root", str(tmp_path), *args], timeout=120)
    assert done.returncode in (1, 2) and message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_ctrl_c_stops_every_run_with_a_checkpoint_and_the_same_command_resumes_them(tiny_mnist: Path,
                                                                                    tmp_path: Path):
    search_ = search(tmp_path, "long", "--seeds", "0", "1", "--workers", "2", data=tiny_mnist, epochs=20, popen=True)
    lasts = [tmp_path / "long" / "default" / f"seed{s}" / "checkpoints" / "last.ckpt" for s in (0, 1)]
    deadline = time.monotonic() + 300
    while not all(p.is_file() for p in lasts) and search_.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(search_.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    out, err = search_.communicate(timeout=120)
    assert search_.returncode == 1 and "Interrupted: run the same command again to resume." in err, out + err
    stopped_at = [torch.load(p, weights_only=True)["epoch"] for p in lasts]
    assert all(epoch < 19 for epoch in stopped_at) and not list(tmp_path.glob("long/default/*/metrics.json"))
    done = search(tmp_path, "long", "--seeds", "0", "1", "--workers", "2", data=tiny_mnist, epochs=20)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 runs: 0 already finished or running, 2 to run" in done.stdout
    for seed in (0, 1):
        log = (tmp_path / "long" / "default" / f"seed{seed}.log").read_text()
        assert "Restoring states from the checkpoint" in log
    assert [r["status"] for r in read_csv(tmp_path / "long" / "results.csv")] == ["ok", "ok"]
    again = search(tmp_path, "long", "--seeds", "0", "1", "--workers", "2", data=tiny_mnist, epochs=20)
    assert again.returncode == 0 and "2 runs: 2 already finished or running, 0 to run" in again.stdout


def test_help_shows_the_three_commands_and_every_option():
    done = subprocess.run([*SEARCH, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0
    for shown in ("--space configs/search/mlp.yaml --trials 30", "--grid model.optimizer.init_args.lr=",
                  "--config logs/search/mlp/best.yaml --seeds 0 1 2", "--no-pruning", "--storage", "--workers",
                  "Arguments after -- go to every trial's fit"):
        assert shown in done.stdout, shown
