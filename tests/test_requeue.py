"""A job that its scheduler starts again resumes its own run, and nothing else: SLURM jobs and array tasks told
apart by their ids, a checkpoint of the same job with another config left alone, Lightning's hpc_ckpt_N.ckpt
never adopted, and a torchrun worker restarted by --max-restarts. (The preempted job's bit-exact resume is in
tests/test_faults.py, beside the other interrupted runs.)"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fails_with, fit_args, only_run, read_events
from mnist_lit.cli import main

HALF_RUN = ("--trainer.max_epochs", "2", "--trainer.callbacks+=test_resume.StopAfterFirstEpoch")  # 16 of 32 steps


def as_slurm_job(monkeypatch: pytest.MonkeyPatch, job: str, restarts: int = 0, **more: str) -> None:
    """This process as the one task of SLURM job ``job``, started ``restarts`` times again (requeued)."""
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "mnist", "SLURM_JOB_ID": job, "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1",
                        "SLURM_NODELIST": "127.0.0.1", "SLURM_RESTART_COUNT": str(restarts), **more}.items():
        monkeypatch.setenv(name, value)


def runs(logs: Path) -> list[Path]:
    return sorted(logs.glob("mnist/version_*"), key=lambda p: int(p.name[8:]))


def record(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def first_step(run: Path) -> int:
    return read_events(run).Scalars("train/loss")[0].step


def test_another_job_in_the_same_folder_adopts_neither_its_run_nor_lightnings_hpc_checkpoint(
        tiny_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    logs = tmp_path / "logs"
    as_slurm_job(monkeypatch, "777")
    main(fit_args(tiny_mnist, logs, *HALF_RUN))  # job 777, preempted after its first epoch
    (theirs,) = runs(logs)
    shutil.copy(theirs / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt")  # what Lightning's own left
    as_slurm_job(monkeypatch, "888", restarts=1)  # another job, itself requeued, in the same folder
    main(fit_args(tiny_mnist, logs, "--trainer.max_epochs", "1", "--model.optimizer.init_args.lr", "0.05"))
    mine = runs(logs)[-1]
    assert mine != theirs and record(mine)["resumed_from"] is None and first_step(mine) == 0  # from scratch
    assert torch.load(mine / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 16
    assert f"left {tmp_path / 'hpc_ckpt_1.ckpt'} alone: Lightning's SLURM checkpoint" in caplog.text
    assert f"slurm::888 started again, but none of its runs under {logs / 'mnist'} wrote a last.ckpt" in caplog.text


def test_each_task_of_an_array_job_resumes_its_own_run(tiny_mnist: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    logs, args = tmp_path / "logs", fit_args(tiny_mnist, tmp_path / "logs", *HALF_RUN)  # one config for both tasks
    for task in ("0", "1"):  # version_0 is task 0's, version_1 task 1's; each job id is the task's own
        as_slurm_job(monkeypatch, f"90{task}", SLURM_ARRAY_JOB_ID="900", SLURM_ARRAY_TASK_ID=task)
        main(args)
    task0, task1 = runs(logs)
    for task, own in (("0", task0), ("1", task1)):  # requeued: the same command, the same ids
        as_slurm_job(monkeypatch, f"90{task}", restarts=1, SLURM_ARRAY_JOB_ID="900", SLURM_ARRAY_TASK_ID=task)
        main(args)
        resumed = runs(logs)[-1]
        assert record(resumed)["resumed_from"] == str(own / "checkpoints" / "last.ckpt"), task
        assert first_step(resumed) == 16 and record(resumed)["global_step"] == 32


def test_the_same_job_with_another_config_leaves_its_checkpoint_alone(
        tiny_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    logs = tmp_path / "logs"
    as_slurm_job(monkeypatch, "777")
    main(fit_args(tiny_mnist, logs, *HALF_RUN))
    (theirs,) = runs(logs)
    as_slurm_job(monkeypatch, "777", restarts=1)  # requeued, but its script now asks for another network
    main(fit_args(tiny_mnist, logs, *HALF_RUN, "--model.net.init_args.hidden1", "128"))
    mine = runs(logs)[-1]
    assert record(mine)["resumed_from"] is None and first_step(mine) == 0
    assert (f"left {theirs / 'checkpoints' / 'last.ckpt'} alone, although this job (slurm::777) wrote it: "
            "model.net.init_args.hidden1 (512 there, 128 here). This job starts a run of its own.") in caplog.text


def test_ckpt_path_hpc_is_refused_by_name(tiny_mnist: Path, tmp_path: Path):
    message = fails_with(fit_args(tiny_mnist, tmp_path / "logs", "--ckpt_path", "hpc"))
    assert "--ckpt_path hpc restores whatever hpc_ckpt_N.ckpt Lightning finds" in message
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_a_torchrun_worker_restarted_by_max_restarts_resumes_to_the_uninterrupted_runs_weights(
        tiny_mnist: Path, tmp_path: Path):
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "3",
                    "--trainer.callbacks+=exit_hang.FailOnceAtEpoch", "--trainer.callbacks.epoch", "2")
    main(fit_args(tiny_mnist, tmp_path / "once", *args[args.index("--trainer.max_epochs"):]))  # never interrupted
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "--max-restarts", "1", "-m", "mnist_lit", *args]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)  # tests/ on PYTHONPATH
    assert done.returncode == 0, done.stderr[-4000:]
    first, restarted = runs(tmp_path / "logs")  # the first attempt died at the start of epoch 2
    assert record(restarted)["resumed_from"] == str(first / "checkpoints" / "last.ckpt")
    assert "started again (restart 1): it resumes its own run from" in done.stderr
    once = torch.load(only_run(tmp_path / "once") / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(restarted / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == once["global_step"] == 48
    for name, tensor in once["state_dict"].items():
        if name.startswith(("net.", "val_acc_best")):
            assert torch.equal(tensor, resumed["state_dict"][name]), name
