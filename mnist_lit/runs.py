"""Runs: where a run's files go, whatever the logger, what it leaves there, and how a checkpoint carries it.

    python -m mnist_lit fit --config configs/default.yaml                         # logs/mnist/version_N/
    python -m mnist_lit fit --config configs/default.yaml --trainer.logger false  # the same folder, no events
    python -m mnist_lit fit --ckpt_path logs/mnist/version_0/checkpoints/last.ckpt  # resumes with its own config

Each run claims a fresh ``version_N`` atomically, so that runs started together never share one.
The folder is the first logger's (TensorBoard or CSV: ``save_dir/name/version_N``; any other logger:
where Lightning puts its checkpoints, ``save_dir/name/version/``), or, with no logger, a claimed
``logs/mnist/version_N`` used as the Trainer's ``default_root_dir``. Into it go ``config.yaml``
(``RunConfig``), ``checkpoints/`` (Lightning) and, after ``fit``, ``metrics.json`` (``write_results``).

Every checkpoint also holds the run's resolved config and the scheduler's job that ran it (``scheduler_job``):
how it is resumed, by ``--ckpt_path`` or by a requeued job itself, is mnist_lit/resume.py's. A resumed fit is a
new run folder: nothing the interrupted run wrote is touched, and its config.yaml names the checkpoint it
continues (``ckpt_path``), as does its metrics.json (``resumed_from``).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from mnist_lit.denormals import flushed

RUNS_ROOT, RUNS_NAME = "logs", "mnist"  # runs without a logger: logs/mnist/version_N


class LogFolderError(RuntimeError):
    """The run folder cannot be written; the message names it and the fix."""


def launched_rank() -> bool:
    """True in a process that a launcher started as rank > 0 (torchrun, Lightning's DDP, SLURM's srun):
    rank 0 alone claims the run folder, the others take it from Lightning."""
    return any(os.environ.get(name, "0") != "0" for name in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))


def slurm_job_id() -> str:
    """This SLURM job's id as ``scontrol`` takes it (an array task's is ``<array job>_<task>``); "" outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID", "")


def scheduler_job() -> str | None:
    """The job a scheduler runs this process in, the same after a requeue or a restart: ``slurm:<cluster>:<job>``
    (an array task's job is ``<array job>_<task>``, as scontrol names it), else ``torchrun:<run id>`` (torchrun's
    ``--rdzv-id``, or a fresh one per launch with ``--standalone``; its default ``none`` is any launch's, so on one
    machine the agent's process, which stays through its restarts, tells launches apart). None outside both, and for
    a multi-node torchrun with the default id, whose launches cannot be told apart."""
    env = os.environ
    if slurm_job_id():
        return f"slurm:{env.get('SLURM_CLUSTER_NAME', '')}:{slurm_job_id()}"
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun:{run_id}"
    if run_id and env.get("WORLD_SIZE") == env.get("LOCAL_WORLD_SIZE"):
        return f"torchrun:{platform.node()}:{os.getppid()}"
    return None


def check_log_folder(save_dir: str) -> None:
    """Fail before training, not after the first epoch, when runs cannot be written under ``save_dir``."""
    folder = Path(save_dir).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    writable = existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)
    if not writable:
        what = "is a file, not a folder" if not existing.is_dir() else "is not writable"
        raise LogFolderError(f"Runs cannot be written under {folder}: {existing} {what}. Choose another folder with "
                             "--trainer.logger.init_args.save_dir DIR (default: logs).")


def claim_run_folder(save_dir: str, name: str) -> int:
    """The next free version_N under save_dir/name, created atomically (mkdir), so that two runs started
    at the same moment in the same folder never share a run folder (Lightning only lists and counts)."""
    check_log_folder(save_dir)
    root = Path(save_dir, name)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def claim_logger_folders(trainer: L.Trainer) -> list[Path]:
    """Give every TensorBoard and CSV logger without a fixed version a freshly claimed ``version_N``; returns them.

    Set on the logger, not in the config, so that the saved config.yaml stays reusable for a new run.
    Neither logger has a public setter for its version (tests/test_lightning_private.py watches ``_version``).
    """
    if launched_rank():
        return []
    claimed = []
    for logger in trainer.loggers:
        if isinstance(logger, (TensorBoardLogger, CSVLogger)) and logger._version is None:
            logger._version = claim_run_folder(logger.save_dir, logger.name)
            claimed.append(Path(logger.save_dir, logger.name, f"version_{logger._version}"))
    return claimed


def release_unused(folders: list[Path], kept: bool) -> None:
    """Remove the run folders this process claimed for a run that failed or stopped before anything worth keeping
    (``kept`` False: no training step, no checkpoint, no results): a failed start leaves no empty version_N."""
    for folder in folders:
        if not kept and not any(folder.rglob("*.ckpt")) and not (folder / "metrics.json").exists():
            shutil.rmtree(folder, ignore_errors=True)


def runs_root(config) -> Path:
    """Where the runs of a parsed config get their ``version_N``: the first TensorBoard or CSV logger's
    ``save_dir/name``, else ``logs/mnist`` (no logger; for another logger, the folder a restart looks in)."""
    logger = config.trainer.logger
    logger = (logger or [None])[0] if isinstance(logger, list) else logger
    init_args = getattr(logger, "init_args", None)
    if init_args is not None and init_args.get("save_dir"):
        return Path(init_args.save_dir, init_args.get("name") or "lightning_logs")
    return Path(RUNS_ROOT, RUNS_NAME)


def run_folder(trainer: L.Trainer) -> Path | None:
    """The run's folder (see the module docstring); None under ``fast_dev_run``, which writes nothing.
    Under DDP every rank must call it (``Trainer.log_dir`` is a collective)."""
    if trainer.fast_dev_run:
        return None
    log_dir = trainer.log_dir
    if not trainer.loggers or isinstance(trainer.loggers[0], (TensorBoardLogger, CSVLogger)):
        return Path(log_dir)
    logger = trainer.loggers[0]  # e.g. MLflow: the folder that Lightning's ModelCheckpoint uses
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


class RunConfig(SaveConfigCallback):
    """``config.yaml``, the resolved config of the run, in its run folder whatever the logger; the same config
    in every checkpoint (``run_config``), so that the checkpoint alone is enough to resume, test or predict."""

    @functools.cached_property
    def dumped(self) -> str:
        """The config as YAML text, made once per run: config.yaml's text, what ``parser.save`` would write, and
        what every checkpoint carries. The CLI validated the config when it parsed it; a dump that validated it again
        would give the same text in twice the time (tests/test_lightning_private.py)."""
        return self.parser.dump(self.config, skip_none=False, skip_validation=True)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["run_config"] = self.dumped  # YAML text: weights-only safe
        checkpoint["job"] = scheduler_job()  # whose run it is, for a requeued or restarted job (mnist_lit/resume.py)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, save_to_log_dir=False)  # Lightning's choice of folder: the logger's root

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.folder = run_folder(trainer)  # a collective under DDP: every rank asks, rank 0 alone saves
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        folder = self.folder
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.config_filename
        if path.exists() and path.read_text() == self.dumped:
            return  # this run's own, written before: fit's test pass under ddp_spawn sets the callback up again
        if path.exists() and not self.overwrite:
            raise LogFolderError(f"{folder} already holds the {self.config_filename} of another run, and a run never "
                                 "overwrites another's files: leave the logger's version unset (each run then gets a "
                                 "new version_N) or choose another --trainer.default_root_dir.")
        if self.multifile:  # the config's own files kept apart (jsonargparse's __path__ metas)
            self.parser.save(self.config, path, skip_none=False, overwrite=self.overwrite, multifile=True)
        else:
            path.write_text(self.dumped)


def environment() -> dict:
    """What reproducing a run needs beyond its config: code version, packages, device."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            return ""

    import lightning
    import torchmetrics
    import torchvision

    return {"git_commit": git("rev-parse", "HEAD") or None, "git_dirty": bool(git("status", "--porcelain")),
            "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "torchvision": torchvision.__version__, "torchmetrics": torchmetrics.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}


def evaluation_folder(subcommand: str, ckpt_path: str | None, logger_dir: str | None, run_config: str | None):
    """Where validate, test or predict of a run's checkpoint writes: ``<run>/<subcommand>/version_K`` beside the
    run it evaluates (``(save_dir, name)``), when the checkpoint sits in a run folder and the logger's folder is the
    run's own (``logger_dir``: ``save_dir/name`` as configured, the same as the run config's); None otherwise."""
    if subcommand == "fit" or not ckpt_path or not run_config or not logger_dir:
        return None
    checkpoints = Path(ckpt_path).parent
    if checkpoints.name != "checkpoints" or not (checkpoints.parent / "config.yaml").is_file():
        return None
    logger = (yaml.safe_load(run_config).get("trainer") or {}).get("logger")
    init_args = logger.get("init_args") if isinstance(logger, dict) else None
    if not init_args or logger_dir != str(Path(init_args.get("save_dir", ""), init_args.get("name") or "")):
        return None  # the user chose where this evaluation goes
    return str(checkpoints.parent), subcommand


def write_evaluation(folder: Path | None, subcommand: str, ckpt_path: str | None, results: dict) -> None:
    """Rank 0: ``metrics.json`` of validate, test or predict: what was evaluated, and its results."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    record = {"subcommand": subcommand, "checkpoint": ckpt_path, **results, "seed": torch.initial_seed(),
              "environment": environment()}
    (folder / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")


def write_results(trainer: L.Trainer, folder: Path | None, results: dict[str, float], best_checkpoint: str,
                  resumed_from: str | None = None, seconds: dict[str, float] | None = None,
                  curve: list | None = None) -> None:
    """Rank 0: the results to every logger (TensorBoard: the HPARAMS table, model and data hyperparameters
    against them under ``hp/`` tags, so the metric curves stay untouched) and ``metrics.json`` with the
    provenance record in the run folder."""
    if not trainer.is_global_zero:
        return
    hp_metrics = {f"hp/{k.replace('/', '_')}": v for k, v in results.items()}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            params = {**trainer.lightning_module.hparams, **(trainer.datamodule.hparams if trainer.datamodule else {})}
            params = {k: v for k, v in params.items() if not k.startswith("_")} | {"seed": torch.initial_seed()}
            logger.log_hyperparams(params, hp_metrics)
        else:  # Lightning logged the hyperparameters at fit start; the results go in as metrics
            logger.log_metrics(hp_metrics, step=trainer.global_step)
        logger.save()
    if folder is None:
        return
    record = {"metrics": results, "epochs": trainer.current_epoch, "global_step": trainer.global_step,
              "best_checkpoint": best_checkpoint, "resumed_from": resumed_from, "seed": torch.initial_seed(),
              "subnormals_flushed": flushed(),  # measured over torch's threads, not read back from the option
              "seconds": seconds, "val_acc_by_seconds": curve, "environment": environment()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")


def finish_loggers(trainer: L.Trainer) -> None:
    """End the loggers' runs that need ending: a W&B run left to W&B's own exit hook is cut off (its service goes
    first), with no exit record, so that ``wandb sync`` finds it unfinished."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()
