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
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden

from mnist_lit.checkpoints import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    SPECIAL_CKPT_PATHS,
    BestCheckpoint,
    CheckpointError,
    LastCheckpoint,
    check_fits,
)
from mnist_lit.clock import RunClock
from mnist_lit.data import MNISTDataModule
from mnist_lit.denormals import set_flush_denormal
from mnist_lit.engine import TrainingDiverged
from mnist_lit.idx import MNISTDataError
from mnist_lit.optimization import OptimizationError
from mnist_lit.parsing import DroppedArguments, Parser
from mnist_lit.per_example import PerExample
from mnist_lit.predict import PredictionWriter
from mnist_lit.preflight import Preflight, sized_to_data
from mnist_lit.report import TensorBoardReport
from mnist_lit.resume import (
    RunStopped,
    changed_beside_checkpoint,
    checkpoint_conflict_message,
    ckpt_path_in,
    gate,
    leave_hpc_checkpoints_alone,
    own_checkpoint,
    requeue,
    restarts,
    stopped,
    with_run_config,
)
from mnist_lit.runs import (
    RUNS_NAME,
    RUNS_ROOT,
    LogFolderError,
    RunConfig,
    claim_logger_folders,
    claim_run_folder,
    evaluation_folder,
    finish_loggers,
    launched_rank,
    release_unused,
    run_folder,
    runs_root,
    scheduler_job,
    write_evaluation,
    write_results,
)
from mnist_lit.trust import TRUST_OPTION, UntrustedImports

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
        self.stop_signal = signal.SIGTERM  # what stops a run at Lightning's next safe point (before_fit)
        self.claimed: list[Path] = []  # the run folders this process claimed
        try:
            super().__init__(*args, **kwargs)
        except BaseException as failure:
            trainer, clock = getattr(self, "trainer", None), getattr(self, "clock", None)
            release_unused(self.claimed, kept=bool(trainer and clock and clock.stepped(trainer)))
            if not isinstance(failure, SIGTERMException):
                raise
            # Lightning's SIGTERMException is a SystemExit with code 0, as if the run had finished.
            asked_requeue = self.stop_signal == signal.SIGUSR1 and (trainer is None or trainer.is_global_zero)
            raise stopped(self.subcommand, trainer, self.stop_signal, requeue() if asked_requeue else None) from None

    def subcommands(self) -> dict[str, set[str]]:
        """Lightning's subcommands; a command line that starts with one builds that one's parser alone (each costs
        jsonargparse about a tenth of a second at every launch), any other (``--help``, a typo) all of them."""
        every = LightningCLI.subcommands()
        return {self.asked: every[self.asked]} if self.asked else every

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Two checkpoints in <run>/checkpoints/: the best by val/acc, and last.ckpt after every epoch
        # (Lightning 2.6 writes save_last only when the monitored metric improved, so it gets its own).
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")  # also saved on SIGTERM / Ctrl-C
        parser.set_defaults({
            "checkpoint.monitor": "val/acc", "checkpoint.mode": "max",
            "checkpoint.filename": "best-epoch{epoch:02d}-val_acc{val/acc:.4f}",
            "checkpoint.auto_insert_metric_name": False,  # the '/' in 'val/acc' would make a sub-folder
            "last_checkpoint.filename": "last", "last_checkpoint.enable_version_counter": False,
        })
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}, "data": {"class_path": DEFAULT_DATA}})
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
        """With --ckpt_path: the checkpoint passes the gate first (``resume.gate``: a clear refusal, nothing
        unpickled, nothing unvouched imported), and the run's own config it carries is parsed under the user's
        arguments, which may change only what ``resume.BESIDE_CHECKPOINT`` allows. A fit that its scheduler started
        again, given no checkpoint, does the same with its own run's last.ckpt (``resume.own_checkpoint``)."""
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
        self.run_config = None
        if not argv or argv[0] not in self.subcommands():
            return self.parse_plain(parser, args)
        ckpt_path = ckpt_path_in(argv)
        if ckpt_path == "hpc":
            raise CheckpointError("--ckpt_path hpc restores whatever hpc_ckpt_N.ckpt Lightning finds in the working "
                                  "directory, whichever job wrote it, and mnist_lit writes none: a requeued job "
                                  "resumes its own run by itself. Pass the path of the checkpoint to continue.")
        if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS:
            return self.parse_beside(parser, argv, ckpt_path)
        self.parse_plain(parser, args)
        job = scheduler_job()
        if argv[0] != "fit" or ckpt_path or not restarts() or not job:
            return
        own = own_checkpoint(runs_root(self.config.fit), job)
        if own is None:
            rank_zero_info(f"mnist_lit: {job} started again, but none of its runs under "
                           f"{runs_root(self.config.fit)} wrote a last.ckpt: it starts from the beginning.")
            return
        try:
            self.parse_beside(parser, [*argv, "--ckpt_path", str(own)], str(own))
        except (CheckpointError, UntrustedImports) as err:
            self.run_config = None
            self.parse_plain(parser, args)
            rank_zero_info(f"mnist_lit: left {own} alone, although this job ({job}) wrote it: "
                           f"{getattr(err, 'changed', None) or err}. This job starts a run of its own.")
            return
        rank_zero_info(f"mnist_lit: {job} started again (restart {restarts()}): it resumes its own run from {own}.")

    def parse_plain(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        for handler in parser.logger.handlers:
            if isinstance(handler, DroppedArguments):
                handler.notice(config.model.class_path)
                handler.notice(config.data.class_path, "--data")

    def parse_beside(self, parser: LightningArgumentParser, argv: list[str], ckpt_path: str) -> None:
        self.run_config = gate(ckpt_path, argv)
        self.parse_plain(parser, with_run_config(argv, self.run_config) if self.run_config else argv)
        if self.run_config:
            config = self.parser.dump(self.config, skip_none=False, skip_validation=True)  # validated just now
            changed = changed_beside_checkpoint(self.run_config, config, self.config.subcommand)
            if changed:
                error = CheckpointError(checkpoint_conflict_message(ckpt_path, changed))
                error.changed = "; ".join(changed)
                raise error

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
        """Before any subcommand: the checkpoint fits the configured network, no checkpoint of another job is
        adopted, and the run folder is claimed."""
        check_fits(self.model, self.config[self.subcommand].get("ckpt_path") or "best")
        notice = leave_hpc_checkpoints_alone(self.trainer)
        if notice:
            rank_zero_info(notice)
        self.claimed += claim_logger_folders(self.trainer)

    before_validate = before_test = before_run

    def before_predict(self) -> None:
        if not is_overridden("predict_step", self.model, L.LightningModule):  # Lightning's would call forward(batch)
            raise MisconfigurationException(f"{type(self.model).__name__} has no predict_step, so predict cannot say "
                                            "what its outputs are: write one that returns (images, classes) "
                                            "probabilities, as mnist_lit.model.MNISTClassifier.predict_step does.")
        self.before_run()

    def before_fit(self) -> None:
        self.before_run()
        if isinstance(self.datamodule, MNISTDataModule):
            # It restores its loader's place in the epoch (batches.py): a mid-epoch resume is exact (test_faults.py),
            # whatever Lightning, which looks only for a state_dict on the loader, says.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        # Ctrl-C raises KeyboardInterrupt wherever Python happens to be, e.g. between taking a batch and
        # stepping on it. Turned into SIGTERM, it stops at Lightning's next safe point instead, so the
        # last.ckpt written on the way out resumes exactly. So does SLURM's warning before a preemption or the
        # time limit (sbatch --signal=SIGUSR1@90), after which the job is requeued (mnist_lit/resume.py).
        signal.signal(signal.SIGINT, lambda *_: self.stop_at_next_step(signal.SIGINT))
        if isinstance(self.trainer._accelerator_connector.cluster_environment, SLURMEnvironment):
            signal.signal(signal.SIGUSR1, lambda *_: self.stop_at_next_step(signal.SIGUSR1))

    def stop_at_next_step(self, signum: int) -> None:
        self.stop_signal = signum
        os.kill(os.getpid(), signal.SIGTERM)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        set_flush_denormal(config.flush_denormal)  # before the run's first computation, in each of its processes
        filled = sized_to_data(config)  # a data module of your own: the model's sizes from it, before it is built
        if filled:
            rank_zero_info(f"mnist_lit: sized to --data {config.data.class_path}: {', '.join(filled)}.")
        trainer = config.trainer
        if trainer.logger in (False, None) and trainer.default_root_dir is None and not trainer.fast_dev_run \
                and not launched_rank():
            # No logger: the run still gets its own folder (config, checkpoints, metrics.json), not the cwd.
            version = claim_run_folder(RUNS_ROOT, RUNS_NAME)
            trainer.default_root_dir = str(Path(RUNS_ROOT, RUNS_NAME, f"version_{version}"))
            self.claimed.append(Path(trainer.default_root_dir))
        logger = trainer.logger
        init_args = getattr(logger, "init_args", None) if not isinstance(logger, (bool, list)) else None
        if init_args is not None and str(logger.class_path).endswith(("TensorBoardLogger", "CSVLogger")):
            # validate, test or predict of a run's checkpoint: beside that run, not among the training runs
            where = evaluation_folder(self.subcommand, config.get("ckpt_path"),
                                      str(Path(init_args.save_dir or "", init_args.get("name") or "")), self.run_config)
            if where:
                init_args.save_dir, init_args.name = where

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if config.trainer.enable_checkpointing is False or config.trainer.barebones:
            # Lightning refuses checkpoint callbacks then; the two this CLI always adds make way (no-op callbacks).
            config.checkpoint, config.last_checkpoint = L.Callback(), L.Callback()
        trainer = super().instantiate_trainer(**kwargs)
        self.clock = RunClock()  # metrics.json's "seconds": where the run's time went (mnist_lit/clock.py)
        trainer.callbacks.append(self.clock)
        trainer.callbacks.append(PerExample())  # per_example/{val,test}.csv: each example's prediction, to pair runs
        if self.subcommand == "fit":
            trainer.callbacks.append(Preflight())  # a data module of your own: one batch checked before training
        return trainer

    def after_fit(self) -> None:
        trainer = self.trainer
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
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
        """metrics.json beside the events: the checkpoint evaluated and what it scored."""
        trainer, ckpt_path = self.trainer, self.config[self.subcommand].get("ckpt_path")
        folder = run_folder(trainer)
        stage = "val/" if self.subcommand == "validate" else "test/"
        results = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith(stage)}
        if trainer.is_global_zero:
            write_evaluation(folder, self.subcommand, ckpt_path, {"metrics": results})
            print(f"Checkpoint: {ckpt_path}\nRun folder: {folder} (metrics.json)")  # the results: Lightning's table
        finish_loggers(trainer)

    after_test = after_validate

    def after_predict(self) -> None:
        if self.trainer.is_global_zero:
            write_evaluation(run_folder(self.trainer), "predict", self.config.predict.get("ckpt_path"),
                             {"predicted": len(getattr(self.datamodule, "predict_names", None) or [])})
        finish_loggers(self.trainer)
        skipped = getattr(self.datamodule, "unreadable", None)
        if skipped:  # the readable ones were predicted and written; the exit code still says not all were
            listing = "; ".join(f"{item} ({reason})" for item, reason in skipped)
            raise MNISTDataError(f"{len(skipped)} of --data.predict_images could not be predicted: {listing}. The "
                                 f"other {len(self.datamodule.predict_names)} were predicted and written above. "
                                 "Convert those files to PNG or JPEG, or leave them out.")


class NoAdvertisements(logging.Filter):
    """Lightning's tips for its cloud services ("💡 Tip: For seamless cloud logging..."), printed at every fit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def main(args: list[str] | None = None) -> MNISTCLI:
    """Run the CLI; a problem the user can fix ends it with its one-paragraph message and exit code 1
    (JSONARGPARSE_DEBUG=true shows the traceback)."""
    # training_step pulls several batches from Lightning's dataloader_iter on purpose (model.py).
    warnings.filterwarnings("ignore", message=".*`dataloader_iter`.*")
    # main(args) takes the place of sys.argv on purpose (a checkpoint's config before the user's arguments, a search's
    # trials): Lightning's warning against giving both, with the whole config in it, is not for this CLI.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    # torch's deprecation of a name that Lightning's own code still uses: nothing a user can change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, NoAdvertisements) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(NoAdvertisements())
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGUSR1)}  # before_fit's own
    parse_log = logging.getLogger("mnist_lit.parse")  # what jsonargparse says while it parses: heard, not shown
    parse_log.setLevel(logging.DEBUG)
    parse_log.propagate = False
    parse_log.handlers = [DroppedArguments()]  # this call's own
    try:
        with warnings.catch_warnings():  # what a run silences (before_fit) stays its own
            return MNISTCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                            args=args,
                            parser_class=Parser, trainer_defaults=TRAINER_DEFAULTS,
                            auto_configure_optimizers=False,  # --model.optimizer / --model.lr_scheduler instead
                            save_config_callback=RunConfig,
                            parser_kwargs={"prog": "python -m mnist_lit", "logger": parse_log, "allow_abbrev": False})
    except (MNISTDataError, CheckpointError, UntrustedImports, LogFolderError, TrainingDiverged, OptimizationError,
            MisconfigurationException) as err:
        # MisconfigurationException: Lightning refusing a combination of its own flags, in a sentence naming them
        if os.environ.get("JSONARGPARSE_DEBUG"):
            raise
        sys.exit("error: " + " ".join(str(err).split()))  # one paragraph
    except RunStopped as stop:
        if stop.message:
            print(stop.message, file=sys.stderr)
        sys.exit(stop.code)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning keeps the process group for a next fit; a finished run ends it, so that no rank's exit
            # waits on a peer that already left (a multi-node run that printed its results, then hung).
            torch.distributed.destroy_process_group()
            # Whatever else may wait at exit (a store, a thread): past this many seconds the process stops with
            # code 1 and the stack of every thread on stderr, the reason, instead of holding the job's nodes.
            # Only as the program (python -m mnist_lit): a caller of main(args) goes on in this process.
            if args is None:
                faulthandler.dump_traceback_later(float(os.environ.get("MNIST_LIT_EXIT_TIMEOUT", "120")), exit=True)
