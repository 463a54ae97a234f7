"""Search hyperparameters with Optuna, or run a grid x seeds, each trial an ordinary ``fit`` run.

    python -m mnist_lit.search --name mlp --space configs/search/mlp.yaml --trials 30 --workers 2
    python -m mnist_lit.search --name lr --grid model.optimizer.init_args.lr=0.05,0.1,0.2 --seeds 0 1 2
    python -m mnist_lit.search --name mlp-best --config logs/search/mlp/best.yaml --seeds 0 1 2

Everything lands in logs/search/<name>/: the study (study.db, SQLite), one run folder per trial (TensorBoard
events, config.yaml, checkpoints, metrics.json) beside its console log, and the results: for a search
top.md, trials.csv, best.yaml (``fit --config best.yaml`` runs it), history.png and importances.png; for a
grid results.md (mean ± std per configuration over the seeds) and results.csv. ``tensorboard --logdir
logs/search/<name>`` compares every trial in the HPARAMS tab.

A search maximizes val/acc_best and never tests; trials report val/acc after every epoch and the study's
pruner stops losing ones. The third command above is how the test set is used, once: the best configuration
retrained over seeds. Running the same command again continues the study (a finished run is skipped, an
interrupted one resumes from its last.ckpt). Several machines: give every one the same command with
``--storage`` a database URL they all reach. Arguments after ``--`` go to every trial's fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import signal
import sys
import threading
import time
from pathlib import Path

if importlib.util.find_spec("optuna") is None:
    sys.exit("error: python -m mnist_lit.search needs Optuna: pip install -e '.[search]' (scripts/setup.sh installs "
             "it with the dev tools).")

from mnist_lit.search import fork  # noqa: E402
from mnist_lit.search.report import write_grid_results, write_search_results  # noqa: E402
from mnist_lit.search.space import SearchSpace, SearchSpaceError  # noqa: E402
from mnist_lit.search.storage import quiet_optuna  # noqa: E402
from mnist_lit.search.study import (  # noqa: E402
    AskLock,
    Plan,
    StudyMismatch,
    Worker,
    enqueue_grid,
    open_study,
    reap_dead_workers,
)

DEFAULT_CONFIG = "configs/default.yaml"


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SearchSpaceError(f"--grid {item!r} is not KEY=V1,V2,...; e.g. --grid "
                                   "model.optimizer.init_args.lr=0.05,0.1")
        grid[key.removeprefix("--")] = values.split(",")
    return grid


def check_fit_arguments(plan: Plan, sample: dict) -> None:
    """The fit command parses a trial's command line (the base configs, the arguments after --, one point of
    the space and the search's own flags) before any trial starts: a misspelt key, or a config whose logger
    takes no save_dir, is one message here, not a failed trial per worker."""
    done = fork.run([*plan.fit_arguments(sample, plan.folder / "trials" / "check", None), "--print_config"])
    if done.returncode != 0:
        error = done.stderr.strip().split("error: ", 1)[-1]
        keys = ", ".join(sample) or "(none)"
        raise SearchSpaceError(f"the fit command refuses this search's arguments (keys searched: {keys}; after "
                               f"--: {' '.join(plan.passthrough) or '(none)'}): {' '.join(error.split())}. "
                               "Keys are the fit command's dotted names: python -m mnist_lit fit --config "
                               f"{DEFAULT_CONFIG} --print_config lists them. Each trial logs under the search's "
                               "folder through its logger's save_dir, name and version, so the config's logger must "
                               "take them (TensorBoard, the default, or CSV).")


def arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m mnist_lit.search",
                                     description="\n\n".join(__doc__.split("\n\n")[:2]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Arguments after -- go to every trial's fit. See the README, 'Search'.")
    parser.add_argument("--name", required=True, help="the study, and its folder under --root")
    parser.add_argument("--config", action="append", help=f"fit config files, in order (default: {DEFAULT_CONFIG})")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--space", help="a search: the search space YAML (configs/search/mlp.yaml)")
    what.add_argument("--grid", action="append", help="a grid: KEY=V1,V2,... (repeat for a product)")
    parser.add_argument("--seeds", type=int, nargs="+", help="a grid: each configuration with these (default: 0)")
    parser.add_argument("--trials", type=int, help="a search: COMPLETE + PRUNED trials to reach (default: 30)")
    parser.add_argument("--workers", type=int, default=1, help="trials at a time on this machine (one thread each)")
    parser.add_argument("--no-pruning", action="store_true", help="a search: every trial runs all its epochs")
    parser.add_argument("--storage", help="an SQLAlchemy URL or a journal file (default: sqlite in the folder)")
    parser.add_argument("--heartbeat", type=int, help="a database storage: seconds; a trial is marked failed "
                        "after 3 heartbeats missed, a dead machine (default: 60)")
    parser.add_argument("--root", default="logs/search", help="where the study's folder goes (default: logs/search)")
    options = parser.parse_args(argv)
    for flag in ("trials", "workers", "heartbeat"):
        if getattr(options, flag) is not None and getattr(options, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    return options, passthrough


def refuse_what_does_not_apply(options: argparse.Namespace) -> None:
    """A flag that would change nothing here is refused, not ignored."""
    if options.space and options.seeds is not None:
        raise SearchSpaceError("--seeds is for a grid (--grid, or neither); a search's trials all use the config's "
                               "seed_everything. Drop --seeds, or retrain the best configuration over seeds "
                               "afterwards: --config logs/search/<name>/best.yaml --seeds 0 1 2.")
    if not options.space and (options.trials is not None or options.no_pruning):
        raise SearchSpaceError("--trials and --no-pruning are for a search (--space); a grid runs each "
                               "configuration x seed once, with no pruning. Drop them, or give --space.")
    if options.heartbeat is not None and options.storage and "://" not in options.storage:
        raise SearchSpaceError(f"--heartbeat is for a database storage; Optuna's journal file ({options.storage}) "
                               "has no heartbeat. Drop --heartbeat, or give a database URL as --storage.")


# Set by the search for every trial; after -- they would be overridden without a word, so they are refused there.
SET_BY_THE_SEARCH = ("trainer.logger.init_args.save_dir", "trainer.logger.init_args.name",
                     "trainer.logger.init_args.version", "ckpt_path")


def given_after_dashes(keys: list[str], passthrough: list[str]) -> list[str]:
    """Which dotted keys the arguments after -- set, ``init_args`` written out or left out."""
    def short(key: str) -> str:
        return key.removeprefix("--").split("=", 1)[0].replace(".init_args.", ".")
    flags = {short(a) for a in passthrough if a.startswith("--")}
    return [key for key in keys if short(key) in flags]


def plan_of(options: argparse.Namespace, passthrough: list[str]) -> Plan:
    folder = Path(options.root, options.name).resolve()
    configs = [str(Path(c).resolve()) for c in options.config or [DEFAULT_CONFIG]]
    missing = [c for c in configs if not Path(c).is_file()]
    if missing:
        raise SearchSpaceError(f"--config {missing[0]} does not exist. Give the fit config(s) to start from with "
                               f"--config (without one: {DEFAULT_CONFIG}, relative to the current folder).")
    storage = options.storage or f"sqlite:///{folder / 'study.db'}"
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    plan = Plan(options.name, folder, storage, configs, passthrough, heartbeat=options.heartbeat or 60)
    if options.space:
        space = SearchSpace.load(options.space)
        plan.space = dataclasses.replace(space, pruner=None) if options.no_pruning else space
        plan.trials = options.trials or 30
    else:
        plan.grid, plan.seeds = parse_grid(options.grid or []), options.seeds or [0]
    varied = [d.key for d in plan.space.dimensions] if plan.space else [*plan.grid, "seed_everything"]
    kind = "search" if plan.space else "grid"
    for keys, why in ((varied, f"is also what the {kind} varies"),
                      ((*SET_BY_THE_SEARCH, *(["test_after_fit"] if plan.space else [])),
                       f"is set by the {kind} itself for every trial (its run folder; a search never tests)")):
        given = given_after_dashes(list(keys), passthrough)
        if given:
            raise SearchSpaceError(f"--{given[0]} is given after -- and {why}; each trial would silently get the "
                                   f"{kind}'s value. Drop it from the arguments after --.")
    return plan


def main(argv: list[str] | None = None) -> int:
    options, passthrough = arguments(sys.argv[1:] if argv is None else argv)
    quiet_optuna()
    try:
        refuse_what_does_not_apply(options)
        plan = plan_of(options, passthrough)
        plan.folder.mkdir(parents=True, exist_ok=True)
        check_fit_arguments(plan, plan.space.first() if plan.space else plan.grid_runs()[0][1])
        study = open_study(plan)
    except (SearchSpaceError, StudyMismatch) as err:
        sys.exit("error: " + " ".join(str(err).split()))
    if plan.grid is not None:
        reap_dead_workers(study, study.get_trials(deepcopy=False))
        queued = enqueue_grid(study, plan)
        total = len(plan.grid_runs())
        print(f"{total} runs: {total - queued} already finished or running, {queued} to run", flush=True)
    stop, ask_lock = threading.Event(), AskLock(plan.folder)
    workers = [Worker(plan, i, ask_lock, stop) for i in range(options.workers)]
    interrupted = []

    def interrupt(signum, _frame):
        # Ctrl-C reaches every trial too (one process group): each writes its last.ckpt and ends. A SIGTERM sent
        # to this process alone is passed on. The workers start no new trial.
        interrupted.append(signum)
        stop.set()
        for worker in workers if signum == signal.SIGTERM else ():
            if worker.process is not None and worker.process.is_alive():
                worker.process.terminate()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)
    started = time.perf_counter()
    print(f"Study '{plan.name}' in {plan.storage}, {options.workers} worker(s); folder {plan.folder}", flush=True)
    for worker in workers:
        worker.start()
    for worker in workers:
        while worker.is_alive():
            worker.join(0.5)
    wall = time.perf_counter() - started
    try:
        study = open_study(plan)
    except StudyMismatch as err:  # a --config file edited while the trials ran: later trials read the new one
        sys.exit(f"error: a file this command was given changed while it ran ({' '.join(str(err).split())}) The "
                 "runs that started after the change read the new file, so this study may mix two configurations, "
                 "and its tables were not written. If the change cannot matter to a run (a comment), put the file "
                 "back as it was and run the same command again to write them (finished runs are kept); otherwise "
                 "start a new --name. Each run's config.yaml shows what it ran with.")
    ok = write_grid_results(study, plan) if plan.grid is not None else write_search_results(study, plan)
    print(f"This command's wall time: {wall:.0f} s")
    if interrupted:
        print("Interrupted: run the same command again to resume.", file=sys.stderr)
        return 1
    return 0 if ok else 1

