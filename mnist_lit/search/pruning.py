"""The trial's side of a search: report ``val/acc`` to its Optuna trial after every epoch, and stop the fit
at the end of that epoch when the study's pruner says the trial is losing.

``python -m mnist_lit.search`` adds it to every trial's ``fit`` (``--trainer.callbacks+=``); nothing else
needs it. Why not optuna-integration's ``PyTorchLightningPruningCallback``: it raises ``TrialPruned`` inside
``fit`` (the process would end with a traceback, no results and no last checkpoint) and supports only a
database under DDP. Here a pruned trial ends like any finished fit: its checkpoints, TensorBoard events and
``metrics.json`` (val/acc_best so far) are written, and ``trainer.should_stop`` reaches every DDP rank.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import optuna
from optuna.trial import TrialState

from mnist_lit.search.space import instantiate
from mnist_lit.search.storage import open_storage, quiet_optuna


class TrialPruning(L.Callback):
    """The trial is the study's RUNNING trial whose run folder is this run's log dir: a resumed trial (a new
    Optuna trial, the same run folder and config) reports to its own trial, and a trial's config.yaml run again
    by hand, outside any search, reports nothing."""

    def __init__(self, storage: str, study_name: str, monitor: str = "val/acc"):
        self.storage, self.study_name, self.monitor = storage, study_name, monitor
        self.trial: optuna.trial.Trial | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        here = str(Path(trainer.log_dir).resolve())  # a collective (a broadcast): every rank asks
        if not trainer.is_global_zero:  # one rank talks to the study
            return
        quiet_optuna()
        storage = open_storage(self.storage)
        study_id = storage.get_study_id_from_name(self.study_name)
        spec = storage.get_study_user_attrs(study_id)["search"]["pruner"]  # the study's own: every trial alike
        study = optuna.load_study(study_name=self.study_name, storage=storage,
                                  pruner=instantiate(spec) if spec else optuna.pruners.NopPruner())
        mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get("run_path") == here]
        if not mine:
            print(f"This run ({here}) is no running trial of study '{self.study_name}': it reports nothing and is "
                  "never pruned.", flush=True)
            return
        self.trial = optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id,
                                                                                                mine[0].number))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if self.trial is not None:
            value = trainer.callback_metrics[self.monitor].item()
            self.trial.report(value, step=trainer.current_epoch)
            prune = self.trial.should_prune()
            if prune:
                self.trial.set_user_attr("pruned_at_epoch", trainer.current_epoch)
                print(f"Trial {self.trial.number} pruned after epoch {trainer.current_epoch} "
                      f"({self.monitor} {value:.4f}): the study's pruner judged it losing.", flush=True)
        if trainer.strategy.broadcast(prune):  # every rank stops at the same epoch
            trainer.should_stop = True
