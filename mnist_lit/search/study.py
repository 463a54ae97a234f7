"""The engine under ``python -m mnist_lit.search``: an Optuna study whose trials are ordinary
``python -m mnist_lit fit`` runs, one process each (forked: ``fork.py``), kept in the study's storage.

The storage holds the books, so that one resume logic serves a search and a grid, one worker or many:
- a trial's ``run_folder`` (``trials/trial<number>`` or ``<configuration>/seed<S>``, under the search's folder)
  names the run; a run is done once a trial of it is COMPLETE or PRUNED;
- a run whose last trial was interrupted (Ctrl-C, a SIGKILLed worker, a machine that died) is enqueued again
  with the same parameters, before any new trial is sampled, and continues from its ``last.ckpt`` when that is
  on this machine (a search: while its ``--trials`` has room for it);
- a run that failed with an error is not retried within a command; a grid retries it on the next command;
- ``--trials N`` counts COMPLETE and PRUNED trials. The workers of the commands on one machine take turns
  through a lock (``AskLock``); a trial that a worker on another machine made surplus, or a duplicate, is
  marked FAIL with ``skipped``.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

from mnist_lit.search import fork
from mnist_lit.search.space import SearchSpace, as_argument, instantiate
from mnist_lit.search.storage import open_storage

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (TrialState.RUNNING, TrialState.WAITING)
ERRORS_IN_A_ROW = 3  # a search stops when this many trials in a row fail with an error (a broken base config)


class TrialFailed(Exception):
    """The trial's fit ended with an error (its console log says which), or was interrupted."""


class StudyMismatch(RuntimeError):
    """The study in the storage was started with other arguments than this command's."""


@dataclass
class Plan:
    """What one search or grid command asks for; ``record()`` is what the study keeps of it."""
    name: str
    folder: Path  # the search's folder on this machine: run folders, console logs, tables, plots
    storage: str
    configs: list[str]
    passthrough: list[str]  # arguments given to every trial's fit, after the search's own
    space: SearchSpace | None = None  # a search...
    grid: dict[str, list[str]] | None = None  # ...or a grid of overrides
    seeds: list[int] = field(default_factory=lambda: [0])  # for a grid: every configuration with each seed
    trials: int | None = None  # a search: this many COMPLETE or PRUNED trials
    heartbeat: int = 60

    def record(self) -> dict:
        configs = {Path(c).name: hashlib.sha256(Path(c).read_bytes()).hexdigest()[:16] for c in self.configs}
        if self.space is not None:
            record = {"space": self.space.record(), "sampler": self.space.sampler, "pruner": self.space.pruner,
                      "configs": configs, "passthrough": self.passthrough}
            if self.space.timed:  # a study of one objective keeps the record it always had
                record |= {"objectives": list(self.space.objectives), "target": self.space.target}
            return record
        return {"grid": self.grid, "seeds": self.seeds, "pruner": None, "configs": configs,
                "passthrough": self.passthrough}

    def grid_runs(self) -> list[tuple[str, dict]]:
        """(run folder, params) of every configuration x seed, in the grid's order."""
        runs = []
        for values in itertools.product(*self.grid.values()):
            overrides = dict(zip(self.grid, values, strict=True))
            for seed in self.seeds:
                runs.append((f"{configuration_name(overrides)}/seed{seed}", overrides | {"seed_everything": seed}))
        return runs

    def params(self, trial: optuna.Trial) -> dict:
        if self.space is not None:
            return self.space.suggest(trial)
        values = {key: trial.suggest_categorical(key, choices) for key, choices in self.grid.items()}
        return values | {"seed_everything": trial.suggest_categorical("seed_everything", self.seeds)}

    def fit_arguments(self, params: dict, run: Path, resume: Path | None) -> list[str]:
        """``python -m mnist_lit`` 's arguments: configs; what the arguments after -- may change (one torch thread,
        no progress bar); those arguments; then what the search sets for each trial (refused after --, see
        ``search.plan_of``) and its values."""
        command = ["fit", *self.config_arguments(),
                   "--torch_threads", "1", "--trainer.enable_progress_bar", "false", *self.passthrough,
                   "--trainer.logger.init_args.save_dir", str(run.parent.parent),
                   "--trainer.logger.init_args.name", run.parent.name, "--trainer.logger.init_args.version", run.name]
        if self.space is not None:  # a search never looks at the test set, and reports every epoch
            command += ["--test_after_fit", "false"]
            # A checkpoint's own config has the callback already; a study of two objectives takes no reports.
            if resume is None and not self.space.timed:
                command += ["--trainer.callbacks+=mnist_lit.search.pruning.TrialPruning", "--trainer.callbacks.storage",
                            self.storage, "--trainer.callbacks.study_name", self.name]
        return command + value_arguments(params) + (["--ckpt_path", str(resume)] if resume else [])

    def base_arguments(self, params: dict) -> list[str]:
        """A trial's configuration alone (best.yaml): the configs, the arguments after -- and its values."""
        return [*self.config_arguments(), *self.passthrough, *value_arguments(params)]

    def config_arguments(self) -> list[str]:
        return [argument for config in self.configs for argument in ("--config", config)]


def value_arguments(params: dict) -> list[str]:
    return [argument for key, value in params.items() for argument in as_argument(key, value)]


def configuration_name(overrides: dict[str, str]) -> str:
    """A folder name that says what differs, e.g. 'lr=0.1,hidden1=512' ('default' for no overrides)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in overrides.items()]
    return re.sub(r"[^\w.=,+-]", "_", ",".join(parts)) or "default"


def open_study(plan: Plan) -> optuna.Study:
    """Create the study, or load it and refuse to continue it with other arguments."""
    storage = open_storage(plan.storage, plan.heartbeat)
    directions = plan.space.directions if plan.space is not None else ["maximize"]
    try:
        study = optuna.create_study(study_name=plan.name, storage=storage, directions=directions, load_if_exists=True)
    except ValueError as err:  # Optuna: the stored study has other directions
        raise StudyMismatch(f"The study '{plan.name}' in {plan.storage} was started with other objectives ({err}). "
                            "Give the same search space to continue it, or another --name.") from None
    ours = json.loads(json.dumps(plan.record()))  # as the storage gives it back
    theirs = study.user_attrs.get("search")
    if theirs is None:
        study.set_user_attr("search", ours)
    elif theirs != ours:
        differ = [f"{key} ({theirs.get(key)!r} there, {ours.get(key)!r} here)" for key in sorted(ours | theirs)
                  if theirs.get(key) != ours.get(key)]
        raise StudyMismatch(f"The study '{plan.name}' in {plan.storage} was started with other arguments: "
                            f"{'; '.join(differ)}. Give the same --config files (unchanged), search space or "
                            "grid and arguments after -- to continue it, or another --name to start a new study.")
    return study


def runs_of(trials: list[FrozenTrial]) -> dict[str, list[FrozenTrial]]:
    runs: dict[str, list[FrozenTrial]] = {}
    for trial in trials:
        if "run_folder" in trial.user_attrs and "skipped" not in trial.user_attrs:
            runs.setdefault(trial.user_attrs["run_folder"], []).append(trial)
    return runs


def enqueue(study: optuna.Study, run: str, params: dict, before: list[FrozenTrial]) -> None:
    last = max(before, key=lambda t: t.number) if before else None
    attrs = {"run_folder": run, "wall_s_before": last.user_attrs.get("wall_s", 0.0) if last else 0.0}
    study.enqueue_trial(params, user_attrs=attrs | ({"resumes": last.number} if last else {}))


def enqueue_grid(study: optuna.Study, plan: Plan) -> int:
    """Every configuration x seed not done and not queued or running: enqueued (failed ones retried)."""
    runs, queued = runs_of(study.get_trials(deepcopy=False)), 0
    for run, params in plan.grid_runs():
        before = runs.get(run, [])
        if not any(t.state in (*DONE, *LIVE) for t in before):
            enqueue(study, run, params, before)
            queued += 1
    return queued


def enqueue_interrupted(study: optuna.Study, trials: list[FrozenTrial], quota: int | None = None) -> None:
    """Runs whose last trial failed without an error of its own (interrupted, or its worker died): again,
    with the same parameters, in the same run folder, oldest first, before any new trial is sampled (the
    workers pop enqueued trials first). A search enqueues only as many as its ``--trials`` still has room for:
    an interrupted run whose place was taken by trials that finished meanwhile stays failed."""
    room = None if quota is None else quota - sum(t.state in (*DONE, *LIVE) for t in trials)
    for run, before in sorted(runs_of(trials).items(), key=lambda item: min(t.number for t in item[1])):
        last = max(before, key=lambda t: t.number)
        if last.state == TrialState.FAIL and not {"error", "skipped"} & last.user_attrs.keys() \
                and not any(t.state in (*DONE, *LIVE) for t in before):
            if room is not None and room <= 0:
                return
            enqueue(study, run, last.params, before)
            room = None if room is None else room - 1


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def alive(worker: dict) -> bool:
    try:
        return psutil.Process(worker["pid"]).create_time() == worker["started"]
    except psutil.Error:
        return False


def reap_dead_workers(study: optuna.Study, trials: list[FrozenTrial]) -> None:
    """RUNNING trials of a worker on this machine that no longer exists (SIGKILL, OOM killer): FAIL.
    Workers on other machines are left to Optuna's heartbeat (a database storage)."""
    here = socket.gethostname()
    for trial in trials:
        worker = trial.user_attrs.get("worker")
        if trial.state == TrialState.RUNNING and worker and worker["host"] == here and not alive(worker):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    optuna.storages.fail_stale_trials(study)


def skip_reason(trials: list[FrozenTrial], number: int, run: str, quota: int | None) -> str | None:
    """Why this trial must not run: another trial already runs or ran its run folder, or a search's quota
    is full with trials that came before it (workers of separate commands can race for the last places)."""
    for other in trials:
        if other.number != number and other.user_attrs.get("run_folder") == run and (
                other.state in DONE or (other.state in LIVE and other.number < number)):
            return f"a duplicate of trial {other.number}"
    if quota is not None and sum(t.number < number and t.state in (*DONE, TrialState.RUNNING) for t in trials) \
            >= quota:
        return f"the study already had its {quota} trials"
    return None


def say(line: str) -> None:
    print(line, flush=True)  # the workers' lines, in order, also when piped


class AskLock:
    """One asker at a time: the workers of a command (a thread lock) and the commands on this machine that share
    the study's folder (an ``flock`` on ``<folder>/.ask.lock``), so that two of them never enqueue the same
    interrupted run twice, nor ask for the last place of a search together. Workers on other machines, sharing
    a database, are not covered: there a duplicate or surplus trial is marked FAIL with ``skipped``."""

    def __init__(self, folder: Path):
        self.thread, self.path, self.file = threading.Lock(), folder / ".ask.lock", None

    def acquire(self) -> None:
        self.thread.acquire()
        self.file = self.path.open("a")
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.thread.release()


class Worker(threading.Thread):
    """Runs trials one at a time until the study is done, or ``stop`` is set."""

    def __init__(self, plan: Plan, index: int, ask_lock: AskLock, stop: threading.Event):
        super().__init__(name=f"worker-{index}", daemon=True)
        self.plan, self.ask_lock, self.stop = plan, ask_lock, stop
        self.index, self.errors_in_a_row, self.holding = index, 0, False
        self.process: multiprocessing.Process | None = None  # the trial's fit, while it runs

    def run(self) -> None:
        study = open_study(self.plan)
        spec = self.plan.space.sampler if self.plan.space else {"class_path": "optuna.samplers.RandomSampler"}
        if "seed" in spec.get("init_args", {}):  # each worker its own stream, or they propose the same points
            spec = {**spec, "init_args": {**spec["init_args"], "seed": spec["init_args"]["seed"] + self.index}}
        study.sampler = instantiate(spec)
        waiting_said = False
        while not self.stop.is_set():
            self.ask_lock.acquire()
            self.holding = True
            try:
                reap_dead_workers(study, study.get_trials(deepcopy=False))
                # Read again: the trials of dead workers are FAIL now, and so theirs runs to resume.
                enqueue_interrupted(study, study.get_trials(deepcopy=False), self.plan.trials)
                step = self.next_step(study.get_trials(deepcopy=False))
                if step == "done":
                    return
                if step == "run":  # the objective lets go of the lock once its trial is asked
                    waiting_said = False
                    study.optimize(self.objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=False)
                    continue
            finally:
                if self.holding:
                    self.holding = False
                    self.ask_lock.release()
            if not waiting_said:
                say(f"[{self.name}] no trial left to start: waiting for the running ones to end (one whose "
                    f"worker died fails within {3 * self.plan.heartbeat} s, and runs again)")
                waiting_said = True
            self.stop.wait(min(5, self.plan.heartbeat))

    def next_step(self, trials: list[FrozenTrial]) -> str:
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if self.plan.space is None:
            return "run" if waiting else "done"
        if self.errors_in_a_row >= ERRORS_IN_A_ROW:
            return "done"
        done = sum(t.state in DONE for t in trials)
        running = sum(t.state in LIVE for t in trials)
        if done >= self.plan.trials:
            return "done"
        return "run" if waiting or done + running < self.plan.trials else "wait"

    def objective(self, trial: optuna.Trial) -> float | tuple[float, float]:
        study = trial.study
        trial.set_user_attr("worker", this_process())
        params = self.plan.params(trial)
        enqueued = "run_folder" in trial.user_attrs  # a grid's run, or an interrupted one again
        run = trial.user_attrs["run_folder"] if enqueued else f"trials/trial{trial.number}"
        trial.set_user_attr("run_folder", run)
        if self.plan.space is None and not enqueued:
            reason = "the grid had no configuration left to run"  # another command took the last one
        else:
            reason = skip_reason(study.get_trials(deepcopy=False), trial.number, run, self.plan.trials)
        self.holding = False
        self.ask_lock.release()  # the next worker may ask now
        if reason:
            trial.set_user_attr("skipped", reason)
            raise TrialFailed(reason)
        if self.stop.is_set():
            raise TrialFailed("interrupted before it started")
        return self.fit(trial, params, self.plan.folder / run)

    def fit(self, trial: optuna.Trial, params: dict, run: Path) -> float | tuple[float, float]:
        last = run / "checkpoints" / "last.ckpt"
        arguments = self.plan.fit_arguments(params, run, last if last.is_file() else None)
        trial.set_user_attr("run_path", str(run))  # how the trial's fit finds its trial (mnist_lit.search.pruning)
        if last.is_file():  # interrupted: continue where it stopped, in the same folder
            config = run / "config.yaml"  # Lightning refuses to overwrite it; keep the first one
            if config.is_file():
                config.rename(run / f"config.before-resume-{int(time.time())}.yaml")
            (run / "metrics.json").unlink(missing_ok=True)
        elif run.exists():  # stopped before its first checkpoint: keep it aside, start again
            run.rename(run.with_name(f"{run.name}.incomplete-{int(time.time())}"))
        console = run.with_suffix(".log")
        console.parent.mkdir(parents=True, exist_ok=True)
        say(f"[{self.name}] trial {trial.number}: {run.relative_to(self.plan.folder)} "
            f"{' '.join(f'{k}={v}' for k, v in params.items())}" + (" (resumed)" if last.is_file() else ""))
        started = time.perf_counter()
        self.process = fork.start(arguments, console)
        trial.set_user_attr("fit_pid", self.process.pid)
        self.process.join()
        returncode = self.process.exitcode
        wall = trial.user_attrs.get("wall_s_before", 0.0) + time.perf_counter() - started
        trial.set_user_attr("wall_s", round(wall, 1))
        metrics_file = run / "metrics.json"
        if self.stop.is_set() and (returncode != 0 or not metrics_file.is_file()):
            say(f"[{self.name}] trial {trial.number}: interrupted; run the same command again to resume it")
            raise TrialFailed("interrupted")
        if returncode != 0 or not metrics_file.is_file():
            self.errors_in_a_row += 1
            error = f"fit exited with code {returncode}: see {console}"
            trial.set_user_attr("error", error)
            say(f"[{self.name}] trial {trial.number}: FAILED, {error}")
            raise TrialFailed(error)
        self.errors_in_a_row = 0
        record = json.loads(metrics_file.read_text())
        trial.set_user_attr("metrics", record["metrics"])
        trial.set_user_attr("epochs", record["epochs"])
        (current,) = [t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number]
        value = record["metrics"]["val/acc_best"]
        if self.plan.space is not None and self.plan.space.timed:
            seconds = record["seconds"]["total"]  # the fit's own launch to result (mnist_lit.clock)
            trial.set_user_attr("seconds", record["seconds"])
            say(f"[{self.name}] trial {trial.number}: val/acc_best {value:.4f} in {seconds:.1f} s")
            return value, seconds
        if "pruned_at_epoch" in current.user_attrs:
            say(f"[{self.name}] trial {trial.number}: pruned after epoch {current.user_attrs['pruned_at_epoch']}"
                f", val/acc_best {value:.4f} ({wall:.0f} s)")
            raise optuna.TrialPruned()
        say(f"[{self.name}] trial {trial.number}: val/acc_best {value:.4f} ({wall:.0f} s)")
        return value
