"""What the fork server imports after the CLI (mnist_lit/preload.py), before it forks the first trial
(mnist_lit/search/fork.py): the modules that every trial of a search would otherwise import again, each in its own
process, when its run first needs them. The TensorBoard writer (the default logger's, imported at its first
event), and Optuna's database layer with the pruning callback that reports each epoch to the study (SQLAlchemy
and Alembic, imported when the trial first opens the study's storage). A server started without Optuna
installed (the core install) imports the writer alone.
"""

from mnist_lit.preload import collector_paused

with collector_paused():
    import torch.utils.tensorboard  # noqa: F401

    try:
        import alembic.command  # noqa: F401  optuna.storages.RDBStorage imports these lazily, at its first use
        import alembic.config  # noqa: F401
        import alembic.migration  # noqa: F401
        import alembic.script  # noqa: F401
        import optuna.storages._rdb.models  # noqa: F401
        import sqlalchemy.orm  # noqa: F401

        import mnist_lit.search.pruning  # noqa: F401
    except ImportError:  # the search's extra is not installed: nothing here will need them
        pass
