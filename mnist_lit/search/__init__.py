"""The search wing: Optuna studies and grids x seeds whose every trial is an ordinary ``fit`` run.

    python -m mnist_lit.search --name mlp --space configs/search/mlp.yaml --trials 30 --workers 2

command.py  the command: its arguments, the workers, Ctrl-C (``python -m mnist_lit.search``)
study.py    the engine: trials as fit processes, their run folders, resume and retry in the storage
fork.py     a trial's process, forked from a server that imported the CLI once
trial_imports.py  what that server imports besides, so that no trial imports it again
space.py    the space YAML, checked; sampler and pruner by class_path
pruning.py  the callback in each trial's fit: report val/acc, stop when pruned
storage.py  SQLAlchemy URL or journal file -> Optuna storage, with the heartbeat
report.py   top.md, trials.csv, best.yaml, plots; a grid's results.md
"""
