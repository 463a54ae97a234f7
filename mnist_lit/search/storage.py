"""Where an Optuna study lives: any SQLAlchemy URL, or an Optuna journal file.

    sqlite:///logs/search/mlp/study.db         (the default: one file in the search's folder)
    postgresql://me@db-host/studies            (several machines; the password in ~/.pgpass, not the URL)
    logs/search/mlp/study.journal              (a journal file: one shared file system, no database server)

A database gets Optuna's heartbeat: a trial whose worker stopped beating (a machine that died) is marked
failed after ``3 x heartbeat`` seconds by whichever worker looks next. Optuna's journal has no heartbeat;
on the worker's own machine a dead worker is still found by its process id (``study.reap_dead_workers``).
"""

from __future__ import annotations

import time
import warnings

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend


def open_storage(where: str, heartbeat: int = 60) -> BaseStorage:
    if "://" not in where:
        return JournalStorage(JournalFileBackend(where))
    # SQLite lets one writer in at a time; others wait this long instead of failing at once.
    engine = {"connect_args": {"timeout": 60}} if where.startswith("sqlite") else None
    for attempt in range(4):
        try:
            return RDBStorage(where, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=3 * heartbeat)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            # Workers started together on a new database race to create Optuna's tables ("table ... already
            # exists") and to write its schema version ("UNIQUE constraint failed: alembic_version"); once one
            # has, the others find them.
            time.sleep(1 + attempt)
    return RDBStorage(where, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=3 * heartbeat)


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO and its own warning for each failed one; the search prints its own
    lines, naming the trial's console log."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # The heartbeat has been 'experimental' since Optuna 2.9; said once here, not at every trial.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
