"""Resuming a run: what ``--ckpt_path``, a requeued SLURM job and a restarted torchrun worker do, through one gate.

    python -m mnist_lit fit --ckpt_path logs/mnist/version_0/checkpoints/last.ckpt   # by hand
    sbatch scripts/slurm.sbatch          # preempted, timed out or its node failed: requeued, it resumes by itself
    torchrun --standalone --max-restarts 3 --nproc-per-node 4 -m mnist_lit fit ...   # restarted workers resume

The gate (``gate``): the checkpoint is loaded as tensors and plain values only, its stored config bounded
(mnist_lit/checkpoints.py), what that config names is imported only when vouched for (mnist_lit/trust.py), and it
is parsed first with the user's arguments over it, which may change only what ``BESIDE_CHECKPOINT`` allows.

A job that a scheduler starts again (``restarts()``: SLURM's requeue, after SIGUSR1 or a node failure; torchrun's
``--max-restarts``) resumes its own run by itself (``own_checkpoint``): the newest run folder whose last.ckpt
records this very job (``runs.scheduler_job``: the SLURM job and array task, or torchrun's run), given to the gate
as if the user had passed it. A checkpoint of another job is never looked at twice; one of this job with another
config is left alone, saying why. Lightning's own SLURM resumption, which adopts any ``hpc_ckpt_N.ckpt`` in the
working directory whoever wrote it, is off: the preemption signal stops the run at its next step boundary,
``last.ckpt`` is written there (an exact resume, mid-epoch included), and then the job is requeued
(``requeue``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

from mnist_lit.checkpoints import DEFAULT_DATA, DEFAULT_MODEL, LastCheckpoint, load_checkpoint
from mnist_lit.runs import slurm_job_id
from mnist_lit.trust import check_imports, named_by_user, without_trust

# What a user may change beside --ckpt_path, on purpose (dotted config keys; a trailing '.' covers a group):
# how long and on what hardware to go on, where to log, how to evaluate. Anything else that differs from the
# run's own config is refused: a checkpoint is only right with the data and network it was trained with.
BESIDE_CHECKPOINT = {
    "all": ("ckpt_path", "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.accelerator",
            "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.precision", "trainer.logger",
            "trainer.default_root_dir", "trainer.enable_progress_bar", "trainer.enable_model_summary",
            "trainer.log_every_n_steps", "trainer.limit_val_batches", "trainer.limit_test_batches",
            "trainer.limit_predict_batches", "trainer.num_sanity_val_steps", "trainer.callbacks", "torch_threads",
            "flush_denormal", "trust_imports", "test_after_fit", "report.", "predictions.", "checkpoint.",
            "last_checkpoint.", "data.data_dir", "data.download", "data.verify_checksums", "data.eval_batch_size",
            "data.predict_images", "model.steps_per_training_step", "model.compile", "model.finished_schedule"),
    "fit": ("model.optimizer.init_args.lr",),  # a new lr on a resume: applied, the schedule scaled to it
    "validate": ("data.dataset",), "test": ("data.dataset",), "predict": ("data.dataset",),  # evaluate elsewhere
}


def ckpt_path_in(argv: list[str]) -> str | None:
    """The value of --ckpt_path in a command line, if any."""
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
    return None


def gate(ckpt_path: str, argv: Iterable[str]) -> str | None:
    """The checks every resumed or evaluated checkpoint passes before anything in it is used; returns the run config
    it carries (None for one saved from Python), without any ``trust_imports`` of its own."""
    checkpoint = load_checkpoint(ckpt_path)  # weights only, its stored config bounded
    check_imports(ckpt_path, checkpoint, named_by_user(argv))  # before anything it names is imported
    return checkpoint.get("run_config") and without_trust(checkpoint["run_config"])


def with_run_config(argv: list[str], run_config: str) -> list[str]:
    """The command line with the run's own config parsed first, right after the subcommand, so that every
    argument the user gave (flags and --config files alike) comes over it."""
    return [argv[0], "--config", run_config, *argv[1:]]


def flatten(tree, prefix: str = "") -> dict:
    """Dotted keys of a parsed config, in the short form of the model's and the data module's:
    ``model.init_args.net...`` is ``model.net...`` (the command line takes both)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    key = prefix[:-1]
    for group in ("model.", "data."):
        if key.startswith(group + "init_args."):
            return {group + key[len(group + "init_args."):]: tree}
    return {key: tree}


def changed_beside_checkpoint(run_config: str, config: str, subcommand: str) -> list[str]:
    """'key (value there, value here)' for every setting the user changed from the run's own config that
    is not allowed beside a checkpoint. ``config``: the whole parsed command line, dumped."""
    theirs, ours = flatten(yaml.safe_load(run_config)), flatten(yaml.safe_load(config)[subcommand])
    theirs.setdefault("model.class_path", DEFAULT_MODEL)  # written before --model took a class: the classifier
    theirs.setdefault("data.class_path", DEFAULT_DATA)  # and before --data did: MNIST's
    allowed = (*BESIDE_CHECKPOINT["all"], *BESIDE_CHECKPOINT.get(subcommand, ()))
    # Keys on one side only are another subcommand's own (test's verbose) or another class's init_args, whose
    # class_path differs too.
    changed = sorted(k for k in theirs.keys() & ours.keys() if theirs[k] != ours[k])
    return [f"{key} ({theirs.get(key)!r} there, {ours.get(key)!r} here)" for key in changed
            if not any(key == a or (a.endswith(".") and key.startswith(a)) or key.startswith(a + ".") for a in allowed)]


def checkpoint_conflict_message(path: str, changed: list[str]) -> str:
    return (f"{path} was trained with another config than the one given beside it: {'; '.join(changed)}. The "
            "checkpoint carries its run's own config, so --ckpt_path alone is enough: drop those arguments (and "
            "any --config that sets them). To train something else from scratch, leave out --ckpt_path. What may be "
            "given beside a checkpoint: README, 'Resume and evaluate'.")


# -- a job that its scheduler starts again -------------------------------------------------------------------------


def restarts() -> int:
    """How many times the scheduler has started this job again: SLURM's requeues (``SLURM_RESTART_COUNT``), or
    torchrun's restarts of its workers (``TORCHELASTIC_RESTART_COUNT``). A first start resumes nothing by itself,
    so that a job script that runs one config twice gets two runs."""
    counts = (os.environ.get(name, "0") for name in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"))
    return max(int(count) if count.isdigit() else 0 for count in counts)


def own_checkpoint(root: Path, job: str) -> Path | None:
    """The last.ckpt of this job's newest run under ``root`` (``runs.runs_root``) that wrote one: the job's run
    as it stopped, whichever attempt wrote it. Only the checkpoints' metadata is read (mmap), not their tensors."""
    folders = [p for p in root.glob("version_*") if p.name[8:].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name[8:]), reverse=True):
        last = folder / "checkpoints" / "last.ckpt"
        try:
            recorded = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("job")
        except Exception:  # absent, being written, or not ours to judge: the gate names a bad file when given one
            continue
        if recorded == job:
            return last
    return None


class _NoHPCAdoption(_CheckpointConnector):
    """Lightning's checkpoint connector without its SLURM resumption: under SLURM, a fit given no checkpoint would
    restore the highest ``hpc_ckpt_N.ckpt`` in ``default_root_dir``, whichever job wrote it, unchecked."""

    _hpc_resume_path = None


def leave_hpc_checkpoints_alone(trainer: L.Trainer) -> str | None:
    """Turn off Lightning's SLURM requeue and resumption for this fit (``resume`` does both, for this job only);
    returns the one-line notice for an ``hpc_ckpt_N.ckpt`` that Lightning would have adopted, if any.
    (tests/test_lightning_private.py watches the private names.)"""
    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment):
        environment.auto_requeue = False  # no save in the middle of a step, no hpc_ckpt_N.ckpt
    connector = trainer._checkpoint_connector
    stranger = connector._hpc_resume_path if SLURMEnvironment.detect() else None
    connector.__class__ = _NoHPCAdoption
    if stranger:
        return (f"mnist_lit: left {stranger} alone: Lightning's SLURM checkpoint does not say which job or config "
                "wrote it. This job starts its own run; to continue that one, pass --ckpt_path with its path.")
    return None


def requeue() -> str:
    """``scontrol requeue`` this SLURM job (an array task by its ``<array job>_<task>`` name): it starts again with
    the same job id, and ``own_checkpoint`` finds its run. Returns what happened, for the closing paragraph."""
    job = slurm_job_id()
    scontrol = shutil.which("scontrol")
    if not job or not scontrol:
        return f"it could not be requeued ({'no SLURM job id' if not job else 'scontrol is not on PATH'})"
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return f"`scontrol requeue {job}` did not answer within 60 s, so the job may not have been requeued"
    if done.returncode:
        return f"`scontrol requeue {job}` failed ({' '.join((done.stderr or done.stdout).split())[:200]})"
    return f"SLURM job {job} was requeued and resumes this run by itself when it starts again"


class RunStopped(Exception):
    """A run stopped by a signal: ``message`` (None on ranks > 0) goes to stderr, and the process exits with
    ``code``, the shell's 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), never 0."""

    def __init__(self, message: str | None, code: int):
        super().__init__(message)
        self.message, self.code = message, code


def stopped(subcommand: str, trainer: L.Trainer | None, signum: int, requeued: str | None = None) -> RunStopped:
    """What a run that a signal stopped says: where it stopped, the checkpoint written there, and the command that
    goes on from it, or what the requeue did."""
    name, code = signal.Signals(signum).name, 128 + signum
    if trainer is not None and not trainer.is_global_zero:
        return RunStopped(None, code)
    if subcommand != "fit" or trainer is None:
        return RunStopped(f"mnist_lit: {subcommand} stopped by {name} before it finished; it wrote no results. Run "
                          "the same command again.", code)
    last = next((Path(cb.dirpath) / f"{cb.filename}{cb.FILE_EXTENSION}" for cb in trainer.checkpoint_callbacks
                 if isinstance(cb, LastCheckpoint) and cb.dirpath), None)
    try:
        step = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    except Exception:  # none written: stopped before its first step, or checkpointing is off
        step = None
    where = (f"mnist_lit: {name} stopped the fit at step {trainer.global_step} (epoch {trainer.current_epoch}), "
             "before its test pass and its metrics.json.")
    if step is None:
        return RunStopped(f"{where} No checkpoint was written: run the same command again.", code)
    then = requeued + "." if requeued else f"Resume it with: python -m mnist_lit fit --ckpt_path {last}"
    return RunStopped(f"{where} Its last checkpoint, {last}, holds step {step}. {then}", code)
