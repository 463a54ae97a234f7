"""scripts/sweep.py: a grid x seeds in separate processes, a CSV and mean ± std per configuration, resumable."""

import csv
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO

SWEEP = [sys.executable, str(REPO / "scripts" / "sweep.py")]


def sweep(root: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [*SWEEP, "--name", "lr", "--root", str(root), "--grid", "model.optimizer.init_args.lr=0.02,0.1",
               "--seeds", "0", "1",
               "--parallel", "2", *extra, "--", "--data.data_dir", str(data), "--data.verify_checksums", "false",
               "--data.batch_size", "32", "--data.val_size", "100", "--trainer.max_epochs", "2",
               "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1"]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_grid_times_seeds_gives_a_row_per_run_and_mean_std_per_configuration(tiny_mnist: Path, tmp_path: Path):
    done = sweep(tmp_path, tiny_mnist)
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
    (line,) = [line for line in table.splitlines() if line.startswith("| lr=0.1 | 0.1 | 2/2 | ")]
    assert line.split(" | ")[5] == f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}", table


@pytest.mark.slow
def test_a_rerun_skips_finished_runs_resumes_an_interrupted_one_and_starts_a_missing_one(tiny_mnist: Path,
                                                                                          tmp_path: Path):
    assert sweep(tmp_path, tiny_mnist).returncode == 0
    before = {r["run_folder"]: r for r in read_csv(tmp_path / "lr" / "results.csv")}
    interrupted = tmp_path / "lr" / "lr=0.1" / "seed1"
    (interrupted / "metrics.json").unlink()  # as if stopped after its last checkpoint, before the test pass
    never_started = tmp_path / "lr" / "lr=0.02" / "seed0"
    finished_mtime = (tmp_path / "lr" / "lr=0.1" / "seed0" / "metrics.json").stat().st_mtime_ns
    subprocess.run(["mv", str(never_started), str(tmp_path / "moved")], check=True)
    done = sweep(tmp_path, tiny_mnist)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "4 runs: 2 already finished, 2 to run" in done.stdout
    assert (tmp_path / "lr" / "lr=0.1" / "seed0" / "metrics.json").stat().st_mtime_ns == finished_mtime
    assert "Restoring states from the checkpoint" in (interrupted.with_suffix(".log")).read_text()
    assert list(interrupted.glob("config.before-resume-*.yaml"))  # the first config.yaml is kept
    after = {r["run_folder"]: r for r in read_csv(tmp_path / "lr" / "results.csv")}
    for folder in (str(interrupted), str(never_started)):  # same config and seed: the same result
        assert after[folder]["test/acc"] == before[folder]["test/acc"]
        assert after[folder]["val/acc_best"] == before[folder]["val/acc_best"]  # also when resumed after its end


def test_a_failing_run_is_reported_and_the_sweep_exits_nonzero(tiny_mnist: Path, tmp_path: Path):
    command = [*SWEEP, "--name", "bad", "--root", str(tmp_path), "--grid", "data.val_size=100,100000", "--",
               "--data.data_dir", str(tiny_mnist), "--data.verify_checksums", "false", "--trainer.max_epochs", "1"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 1
    assert "FAILED  val_size=100000 seed 0 (exit 1)" in done.stdout
    assert "--data.val_size is 100000" in (tmp_path / "bad" / "val_size=100000" / "seed0.log").read_text()
    statuses = [r["status"] for r in read_csv(tmp_path / "bad" / "results.csv")]
    assert statuses == ["ok", "failed"]


@pytest.mark.parametrize("args", [["--grid", "model.optimizer.init_args.lr"], ["--parallel", "0"]])
def test_bad_sweep_arguments_are_named(args: list[str], tmp_path: Path):
    done = subprocess.run([*SWEEP, "--name", "x", "--root", str(tmp_path), *args], capture_output=True, text=True)
    assert done.returncode == 2 if "--parallel" in args else done.returncode == 1
    assert ("--grid 'model.optimizer.init_args.lr' is not KEY=V1,V2" in done.stderr
            or "--parallel must be at least 1" in done.stderr)


@pytest.mark.slow
def test_ctrl_c_stops_every_run_with_a_checkpoint_and_the_same_command_finishes_them(tiny_mnist: Path,
                                                                                     tmp_path: Path):
    command = [*SWEEP, "--name", "long", "--root", str(tmp_path), "--seeds", "0", "1", "--parallel", "2", "--",
               "--data.data_dir", str(tiny_mnist), "--data.verify_checksums", "false", "--data.batch_size", "32",
               "--data.val_size", "100", "--trainer.max_epochs", "40", "--trainer.enable_model_summary", "false"]
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             start_new_session=True)  # its own process group: Ctrl-C reaches it and its runs
    lasts = [tmp_path / "long" / "default" / f"seed{s}" / "checkpoints" / "last.ckpt" for s in (0, 1)]
    deadline = time.monotonic() + 300
    while not all(p.is_file() for p in lasts) and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(sweep.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 1 and "Interrupted: run the same command again to resume." in err, out + err
    stopped_at = [torch.load(p, weights_only=True)["epoch"] for p in lasts]
    assert all(epoch < 39 for epoch in stopped_at) and not list(tmp_path.glob("long/default/*/metrics.json"))
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 runs: 0 already finished, 2 to run" in done.stdout
    for seed in (0, 1):
        assert "Restoring states from the checkpoint" in (tmp_path / "long" / "default" / f"seed{seed}.log").read_text()
    assert [r["status"] for r in read_csv(tmp_path / "long" / "results.csv")] == ["ok", "ok"]
