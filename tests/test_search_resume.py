"""A search killed mid-trial, by SIGKILL to its worker or to its whole process group: the same command resumes
each interrupted trial from its last.ckpt, and the study's books count what happened. Apart from
test_search.py so that the two files run on two test workers side by side (pytest-xdist's loadfile)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from optuna.trial import TrialState
from test_search import read_csv, search, space_file, trials_of


@pytest.mark.slow
def test_a_sigkilled_workers_trial_is_never_complete_and_the_same_command_finishes_the_study(tmp_path: Path,
                                                                                             tiny_mnist: Path):
    space = space_file(tmp_path)
    worker = search(tmp_path, "k", "--space", str(space), "--trials", "2", data=tiny_mnist, epochs=15, popen=True)
    last = tmp_path / "k" / "trials" / "trial0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.is_file(), worker.communicate(timeout=30)
    worker.kill()  # SIGKILL: no handler runs in the worker
    worker.communicate(timeout=60)
    (trial,) = trials_of(tmp_path, "k")
    assert trial.state == TrialState.RUNNING  # not complete; its fit got SIGTERM from the kernel and stopped
    deadline = time.monotonic() + 120
    while psutil.pid_exists(trial.user_attrs["fit_pid"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not psutil.pid_exists(trial.user_attrs["fit_pid"]), "the killed worker's fit did not end on its SIGTERM"
    done = search(tmp_path, "k", "--space", str(space), "--trials", "2", data=tiny_mnist, epochs=15)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = trials_of(tmp_path, "k")
    assert trials[0].state == TrialState.FAIL and "error" not in trials[0].user_attrs
    resumed = [t for t in trials if t.user_attrs.get("resumes") == 0]
    assert len(resumed) == 1 and resumed[0].state == TrialState.COMPLETE
    assert resumed[0].params == trials[0].params and resumed[0].user_attrs["run_folder"] == "trials/trial0"
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    assert "Restoring states from the checkpoint" in (tmp_path / "k" / "trials" / "trial0.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("commands", [1, 2], ids=["one-command-of-two-workers", "two-commands-started-together"])
def test_a_sigkilled_search_resumes_its_own_trials_first_and_its_books_count_what_happened(tmp_path: Path,
                                                                                          tiny_mnist: Path,
                                                                                          commands: int):
    space = space_file(tmp_path, pruner=None)
    args = ["--space", str(space), "--trials", "3"]
    first = search(tmp_path, "k", *args, "--workers", "2", data=tiny_mnist, epochs=15, popen=True)
    lasts = [tmp_path / "k" / "trials" / f"trial{n}" / "checkpoints" / "last.ckpt" for n in (0, 1)]
    deadline = time.monotonic() + 300
    while not all(last.is_file() for last in lasts) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(last.is_file() for last in lasts), first.communicate(timeout=30)
    os.killpg(first.pid, signal.SIGKILL)  # the search and both trials' fits, mid-run: no handler runs anywhere
    first.communicate(timeout=60)
    assert [t.state for t in trials_of(tmp_path, "k")] == [TrialState.RUNNING] * 2

    if commands == 1:  # the same command again, in this process
        again = [search(tmp_path, "k", *args, "--workers", "2", data=tiny_mnist, epochs=15)]
    else:  # two commands of one worker each, started together: two processes
        started = [search(tmp_path, "k", *args, "--workers", "1", data=tiny_mnist, epochs=15, popen=True)
                   for _ in range(commands)]
        outputs = [c.communicate(timeout=600) for c in started]
        again = [subprocess.CompletedProcess(c.args, c.returncode, *out)
                 for c, out in zip(started, outputs, strict=True)]
    for command in again:
        assert command.returncode == 0, command.stdout[-3000:] + command.stderr[-3000:]
    trials = trials_of(tmp_path, "k")
    states = [t.state for t in trials]
    # FAIL marks the two interruptions, once each; nothing is left waiting or running.
    assert states.count(TrialState.FAIL) == 2 and trials[0].state == trials[1].state == TrialState.FAIL
    assert TrialState.WAITING not in states and TrialState.RUNNING not in states
    resumed = {t.user_attrs["resumes"]: t for t in trials if "resumes" in t.user_attrs}
    assert sorted(resumed) == [0, 1]  # each interrupted run resumed, once, in its own folder, from its checkpoint
    for number, copy in resumed.items():
        assert copy.state == TrialState.COMPLETE and copy.params == trials[number].params
        assert copy.user_attrs["run_folder"] == f"trials/trial{number}"
        assert "Restoring states from the checkpoint" in (tmp_path / "k" / "trials" / f"trial{number}.log").read_text()
    fresh = [t for t in trials[2:] if "resumes" not in t.user_attrs]
    assert [t.state for t in fresh] == [TrialState.COMPLETE]  # the third place: sampled after both resumed
    assert fresh[0].number > max(t.number for t in resumed.values())
    top = (tmp_path / "k" / "top.md").read_text()
    assert "3 complete, 0 pruned, 2 failed (2 of them interrupted, 2 resumed" in top
    notes = {int(r["trial"]): r["note"] for r in read_csv(tmp_path / "k" / "trials.csv")}
    assert notes[0] == f"interrupted; resumed by trial {resumed[0].number}" and notes[fresh[0].number] == ""
