"""The wiring: YAML and flags -> typed ``__init__`` arguments -> Trainer, TensorBoard and checkpoints.

    python -m mnist_lit fit --config configs/default.yaml
    python -m mnist_lit test --config configs/default.yaml --ckpt_path logs/mnist/version_0/checkpoints/last.ckpt
    python -m mnist_lit fit --config configs/default.yaml --print_config
    python -m mnist_lit fit --config configs/default.yaml --model.optimizer.help torch.optim.AdamW

Every option is an ``__init__`` argument of the LightningModule chosen by ``--model`` (default
``MNISTClassifier``; any LightningModule by ``class_path``, LightningCLI's subclass mode) (``--model.*``),
``MNISTDataModule`` (``--data.*``), Lightning's ``Trainer`` (``--trainer.*``),
``ModelCheckpoint`` (``--checkpoint.*``), ``TensorBoardReport`` (``--report.*``) or
``PredictionWriter`` (``--predictions.*``); ``--torch_threads`` sets torch's CPU threads.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

from mnist_lit.checkpoints import (
    DEFAULT_MODEL,
    SPECIAL_CKPT_PATHS,
    CheckpointError,
    LastCheckpoint,
    check_fits,
    load_checkpoint,
)
from mnist_lit.clock import RunClock
from mnist_lit.data import MNISTDataModule
from mnist_lit.denormals import set_flush_denormal
from mnist_lit.engine import TrainingDiverged
from mnist_lit.idx import MNISTDataError
from mnist_lit.optimization import OptimizationError
from mnist_lit.parsing import DroppedArguments, Parser
from mnist_lit.predict import PredictionWriter
from mnist_lit.report import TensorBoardReport
from mnist_lit.runs import (
    RUNS_NAME,
    RUNS_ROOT,
    LogFolderError,
    RunConfig,
    changed_beside_checkpoint,
    checkpoint_conflict_message,
    ckpt_path_in,
    claim_logger_folders,
    claim_run_folder,
    finish_loggers,
    launched_rank,
    run_folder,
    with_run_config,
    write_results,
)
from mnist_lit.trust import TRUST_OPTION, UntrustedImports, check_imports, named_by_user, without_trust

TRAINER_DEFAULTS = {
    # One TensorBoard run per invocation: logs/mnist/version_N/, config.yaml and checkpoints/ beside the events.
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "logs", "name": "mnist", "default_hp_metric": False}},
}


class MNISTCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        argv = kwargs.get("args")
        argv = sys.argv[1:] if argv is None else argv
        self.asked = argv[0] if isinstance(argv, list) and argv and argv[0] in LightningCLI.subcommands() else None
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        """Lightning's subcommands; a command line that starts with one builds that one's parser alone (each costs
        jsonargparse about a tenth of a second at every launch), any other (``--help``, a typo) all of them."""
        every = LightningCLI.subcommands()
        return {self.asked: every[self.asked]} if self.asked else every

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Two checkpoints in <run>/checkpoints/: the best by val/acc, and last.ckpt after every epoch
        # (Lightning 2.6 writes save_last only when the monitored metric improved, so it gets its own).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")  # also saved on SIGTERM / Ctrl-C
        parser.set_defaults({
            "checkpoint.monitor": "val/acc", "checkpoint.mode": "max",
            "checkpoint.filename": "best-epoch{epoch:02d}-val_acc{val/acc:.4f}",
            "checkpoint.auto_insert_metric_name": False,  # the '/' in 'val/acc' would make a sub-folder
            "last_checkpoint.filename": "last", "last_checkpoint.enable_version_counter": False,
        })
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}})
        parser.add_lightning_class_args(TensorBoardReport, "report")
        parser.add_lightning_class_args(PredictionWriter, "predictions")  # predict: CSV + table
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="fit: then test the best checkpoint on t10k in the same run, write metrics.json "
                                 "and the HPARAMS table.")
        parser.add_argument(TRUST_OPTION, type=str | None, default=None,
                            help="with --ckpt_path: the packages (comma-separated) that the checkpoint's stored config "
                                 "may import beyond mnist_lit, torch, torchvision, lightning, torchmetrics, optuna, "
                                 "your own modules and what your command line names (README, 'When things go "
                                 "wrong'). Importing a module runs its code: name only what you trust.")
        parser.add_argument("--flush_denormal", type=bool, default=True,
                            help="flush subnormal floats to zero on the CPU, in every torch thread (FTZ/DAZ): some "
                                 "CPUs compute on them many times slower, and training makes them (mnist_lit/"
                                 "denormals.py); false keeps IEEE 754's gradual underflow. Recorded in metrics.json.")
        parser.add_argument("--torch_threads", type=PositiveInt | None, default=None,
                            help="torch CPU threads; null keeps PyTorch's default (one per core), right for a machine "
                                 "of your own. On a machine shared with other busy processes, 1 does not collapse "
                                 "as more threads do (docs/benchmarks.md).")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """With --ckpt_path: the checkpoint is checked first (a clear refusal, nothing unpickled), and the run's
        own config it carries is parsed under the user's arguments, which may change only what
        ``runs.BESIDE_CHECKPOINT`` allows."""
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
        ckpt_path = ckpt_path_in(argv) if argv else None
        self.run_config = None
        if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS and argv[0] in self.subcommands():
            checkpoint = load_checkpoint(ckpt_path)
            check_imports(ckpt_path, checkpoint, named_by_user(argv))  # before anything it names is imported
            self.run_config = checkpoint.get("run_config") and without_trust(checkpoint["run_config"])
        super().parse_arguments(parser, with_run_config(argv, self.run_config) if self.run_config else args)
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        for handler in parser.logger.handlers:
            if isinstance(handler, DroppedArguments):
                handler.notice(config.model.class_path)
        if self.run_config:
            config = self.parser.dump(self.config, skip_none=False, skip_validation=True)  # validated just now
            changed = changed_beside_checkpoint(self.run_config, config, self.config.subcommand)
            if changed:
                raise CheckpointError(checkpoint_conflict_message(ckpt_path, changed))

    def _dump_config(self) -> None:
        # Lightning's dump of the config for the model's hyperparameters, without validating the config a second
        # time (parse_arguments did, and the checks are most of a dump's cost): the same text, ~0.05 s sooner at
        # every launch. (tests/test_lightning_private.py compares it with Lightning's own.)
        if not hasattr(self, "config_dump"):
            dump = self.parser.dump(self.config, skip_link_targets=False, skip_none=False, format="yaml",
                                    skip_validation=True)
            self.config_dump = yaml.safe_load(dump)
            if "subcommand" in self.config:
                self.config_dump = self.config_dump[self.config.subcommand]

    def _parse_ckpt_path(self) -> None:
        # Lightning's own merge puts the checkpoint's model hyperparameters over the user's flags; a checkpoint
        # that carries its run's config was merged under them instead (parse_arguments). Older checkpoints, and
        # ones saved from Python, keep Lightning's behaviour. (tests/test_lightning_private.py watches this hook.)
        if not self.run_config:
            super()._parse_ckpt_path()

    def before_run(self) -> None:
        """Before any subcommand: the checkpoint fits the configured network, and the run folder is claimed."""
        check_fits(self.model, self.config[self.subcommand].get("ckpt_path") or "best")
        claim_logger_folders(self.trainer)

    before_validate = before_test = before_run

    def before_predict(self) -> None:
        if not is_overridden("predict_step", self.model, L.LightningModule):  # Lightning's would call forward(batch)
            raise MisconfigurationException(f"{type(self.model).__name__} has no predict_step, so predict cannot say "
                                            "what its outputs are: write one that returns (images, classes) "
                                            "probabilities, as mnist_lit.model.MNISTClassifier.predict_step does.")
        self.before_run()

    def before_fit(self) -> None:
        self.before_run()
        # Ctrl-C raises KeyboardInterrupt wherever Python happens to be, e.g. between taking a batch and
        # stepping on it. Turned into SIGTERM, it stops at Lightning's next safe point instead, so the
        # last.ckpt written on the way out resumes exactly.
        signal.signal(signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGTERM))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        set_flush_denormal(config.flush_denormal)  # before the run's first computation, in each of its processes
        trainer = config.trainer
        if trainer.logger in (False, None) and trainer.default_root_dir is None and not trainer.fast_dev_run \
                and not launched_rank():
            # No logger: the run still gets its own folder (config, checkpoints, metrics.json), not the cwd.
            version = claim_run_folder(RUNS_ROOT, RUNS_NAME)
            trainer.default_root_dir = str(Path(RUNS_ROOT, RUNS_NAME, f"version_{version}"))

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if config.trainer.enable_checkpointing is False or config.trainer.barebones:
            # Lightning refuses checkpoint callbacks then; the two this CLI always adds make way (no-op callbacks).
            config.checkpoint, config.last_checkpoint = L.Callback(), L.Callback()
        trainer = super().instantiate_trainer(**kwargs)
        self.clock = RunClock()  # metrics.json's "seconds": where the run's time went (mnist_lit/clock.py)
        trainer.callbacks.append(self.clock)
        return trainer

    def after_fit(self) -> None:
        trainer = self.trainer
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if trainer.interrupted:  # Ctrl-C: last.ckpt was written; an unfinished run has no results
            return
        folder = run_folder(trainer)  # a collective under DDP: every rank asks
        results = {k: v.item() for k, v in trainer.callback_metrics.items() if k in ("val/acc_best", "val/loss")}
        best_score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        if "val/acc_best" not in results and best_score is not None:  # resumed after its last epoch: no validation ran
            results["val/acc_best"] = best_score.item()
        if self.config.fit.test_after_fit and not is_overridden("test_step", self.model, L.LightningModule):
            rank_zero_info(f"mnist_lit: fit's test pass steps aside: {type(self.model).__name__} has no test_step.")
        elif self.config.fit.test_after_fit:
            (test,) = trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False)
            results |= {k: test[k] for k in ("test/acc", "test/loss") if k in test}  # what the module logs of them
        write_results(trainer, folder, results, best, resumed_from=self.config.fit.ckpt_path,
                      seconds=self.clock.seconds(), curve=self.clock.curve)
        finish_loggers(trainer)
        if trainer.is_global_zero:
            print(f"\nResults: {json.dumps(results)}\nBest checkpoint: {best or None}\nRun folder: {folder}")

    def after_validate(self) -> None:
        finish_loggers(self.trainer)

    after_test = after_validate

    def after_predict(self) -> None:
        finish_loggers(self.trainer)
        skipped = self.datamodule.unreadable
        if skipped:  # the readable ones were predicted and written; the exit code still says not all were
            listing = "; ".join(f"{item} ({reason})" for item, reason in skipped)
            raise MNISTDataError(f"{len(skipped)} of --data.predict_images could not be predicted: {listing}. The "
                                 f"other {len(self.datamodule.predict_names)} were predicted and written above. "
                                 "Convert those files to PNG or JPEG, or leave them out.")


def main(args: list[str] | None = None) -> MNISTCLI:
    """Run the CLI; a problem the user can fix ends it with its one-paragraph message and exit code 1
    (JSONARGPARSE_DEBUG=1 shows the traceback)."""
    # training_step pulls several batches from Lightning's dataloader_iter on purpose (model.py).
    warnings.filterwarnings("ignore", message=".*`dataloader_iter`.*")
    sigint_handler = signal.getsignal(signal.SIGINT)  # before_fit replaces it for the run's duration
    parse_log = logging.getLogger("mnist_lit.parse")  # what jsonargparse says while it parses: heard, not shown
    parse_log.setLevel(logging.DEBUG)
    parse_log.propagate = False
    parse_log.handlers = [DroppedArguments()]  # this call's own
    try:
        return MNISTCLI(L.LightningModule, MNISTDataModule, subclass_mode_model=True, args=args, parser_class=Parser,
                        trainer_defaults=TRAINER_DEFAULTS,
                        auto_configure_optimizers=False,  # --model.optimizer / --model.lr_scheduler instead
                        save_config_callback=RunConfig,
                        parser_kwargs={"prog": "python -m mnist_lit", "logger": parse_log})
    except (MNISTDataError, CheckpointError, UntrustedImports, LogFolderError, TrainingDiverged, OptimizationError,
            MisconfigurationException) as err:
        # MisconfigurationException: Lightning refusing a combination of its own flags, in a sentence naming them
        if os.environ.get("JSONARGPARSE_DEBUG"):
            raise
        sys.exit("error: " + " ".join(str(err).split()))  # one paragraph
    finally:
        signal.signal(signal.SIGINT, sigint_handler)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning keeps the process group for a next fit; a finished run ends it, so that no rank's exit
            # waits on a peer that already left (a multi-node run that printed its results, then hung).
            torch.distributed.destroy_process_group()
            # Whatever else may wait at exit (a store, a thread): past this many seconds the process stops with
            # code 1 and the stack of every thread on stderr, the reason, instead of holding the job's nodes.
            # Only as the program (python -m mnist_lit): a caller of main(args) goes on in this process.
            if args is None:
                faulthandler.dump_traceback_later(float(os.environ.get("MNIST_LIT_EXIT_TIMEOUT", "120")), exit=True)
