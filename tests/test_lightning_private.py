"""The private Lightning attributes mnist_lit relies on, each checked where it is used, so that a Lightning
upgrade that moves one fails here with the name of the fix instead of giving silently wrong numbers."""

from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from mnist_lit.engine import checkpoint_intervals


def test_the_fast_path_can_count_logging_steps_in_sgd_steps():
    # model.py adds the SGD steps of a call to this counter, which Lightning's logger connector uses as the x-axis.
    # Public replacement, if Lightning ever offers one: a way to advance the logging step by n.
    loop = L.Trainer(logger=False).fit_loop.epoch_loop
    assert isinstance(getattr(loop, "_batches_that_stepped", None), int), (
        "Lightning no longer has fit_loop.epoch_loop._batches_that_stepped: update mnist_lit.engine.Engine.fast_steps, "
        "or train/* curves will be plotted against training_step calls instead of SGD steps.")


def test_loggers_take_a_claimed_version(tmp_path: Path):
    # runs.claim_logger_folders sets the version Lightning would otherwise pick by listing folders, racing other
    # runs. Public replacement: a version setter on the loggers (or passing version=, which the saved config keeps).
    for cls in (TensorBoardLogger, CSVLogger):
        logger = cls(save_dir=str(tmp_path), name="x")
        assert logger._version is None, f"{cls.__name__}._version moved: update runs.claim_logger_folders"
        logger._version = 7
        assert logger.version == 7 and logger.log_dir.endswith("version_7"), (
            f"{cls.__name__}.version no longer reads _version: update runs.claim_logger_folders")


def test_checkpoint_intervals_are_read_from_model_checkpoint():
    # model.checkpoint_intervals ends fast-path calls at every_n_train_steps. Public replacement: a property.
    trainer = L.Trainer(logger=False, callbacks=[ModelCheckpoint(every_n_train_steps=40), ModelCheckpoint()])
    assert checkpoint_intervals(trainer) == [40], (
        "ModelCheckpoint._every_n_train_steps moved: update mnist_lit.engine.checkpoint_intervals")


def test_the_cli_merges_checkpoint_hyperparameters_in_a_hook_mnist_lit_overrides():
    # MNISTCLI._parse_ckpt_path skips Lightning's merge of a checkpoint's model hyperparameters over the flags when
    # the checkpoint carries its run's config. Public replacement: Lightning#21455 (flags over checkpoint hparams).
    import inspect

    from lightning.pytorch.cli import LightningCLI

    source = inspect.getsource(LightningCLI.__init__)
    assert "self._parse_ckpt_path()" in source and source.index("self.parse_arguments(") < source.index(
        "self._parse_ckpt_path()"), "LightningCLI no longer calls _parse_ckpt_path after parse_arguments: update " \
        "MNISTCLI._parse_ckpt_path, or flags beside --ckpt_path may again be overridden by the checkpoint"


def test_the_fast_path_steps_the_optimizer_as_lightnings_wrapper_does(tiny_mnist: Path, tmp_path: Path):
    # engine.Engine.step_optimizer counts each SGD step on the manual loop's progress (what global_step reads) and
    # calls the on_before_optimizer_step hooks itself. A profiler sends the fit through Lightning's own wrapper
    # instead: both must give the same weights, steps and hook calls. Public replacement: a cheaper wrapper.
    import torch

    from conftest import fit_args, only_run, read_events
    from mnist_lit.cli import main

    loop = L.Trainer(logger=False).fit_loop.epoch_loop
    assert hasattr(loop.manual_optimization.optim_step_progress, "increment_completed"), (
        "Lightning moved fit_loop.epoch_loop.manual_optimization.optim_step_progress: update "
        "mnist_lit.engine.Engine.step_optimizer, or global_step stops counting the fast path's SGD steps")
    runs = {}
    for profiler in ("null", "simple"):
        cli = main(fit_args(tiny_mnist, tmp_path / profiler, "--trainer.max_epochs", "2", "--test_after_fit", "false",
                            "--trainer.profiler", profiler, "--report.histograms", "true"))
        assert cli.model.loop == "fast" and cli.model.step_directly == (profiler == "null")
        run = only_run(tmp_path / profiler)
        assert "gradients/net.layers.1.weight" in read_events(run).Tags()["histograms"]  # the hook ran
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        runs[profiler] = (state["global_step"], state["state_dict"])
    (steps, direct), (wrapped_steps, wrapped) = runs["null"], runs["simple"]
    assert steps == wrapped_steps == 32
    assert all(torch.equal(t, wrapped[k]) for k, t in direct.items() if k.startswith("net."))


def test_the_cli_dumps_its_config_once_validated_as_lightning_would(tiny_mnist: Path, tmp_path: Path):
    # MNISTCLI._dump_config (the model's hyperparameters) and RunConfig.dumped (config.yaml, every checkpoint's
    # run_config) dump the parsed config without validating it again. They must give what Lightning's own
    # _dump_config and a validating dump give, for configs whose class paths name a subclass with a loss of its own
    # and a LightningModule of one's own, a network, a schedule, an augmentation, a callback and a logger.
    # Public replacement: a LightningCLI option to skip the second validation.
    import inspect

    from lightning.pytorch.cli import LightningCLI, _InstantiatorFn

    from conftest import REPO, fit_args
    from mnist_lit.cli import main
    from mnist_lit.runs import RunConfig

    assert "self.cli._dump_config()" in inspect.getsource(_InstantiatorFn.__call__), (
        "Lightning's model instantiator no longer calls LightningCLI._dump_config: update MNISTCLI._dump_config")
    for i, model in enumerate((["--config", str(REPO / "configs" / "examples" / "focal.yaml")],
                               ["--model", "research_modules.Plain", "--model.hidden", "24"])):
        cli = main(fit_args(tiny_mnist, tmp_path / str(i), *model, "--trainer.max_epochs", "1",
                            "--test_after_fit", "false", "--data.augment", "mnist_lit.augment.RandomAffine",
                            "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"))
        ours = cli.config_dump
        del cli.config_dump
        LightningCLI._dump_config(cli)
        assert ours == cli.config_dump and ours["model"]["class_path"]
        (run_config,) = [c for c in cli.trainer.callbacks if isinstance(c, RunConfig)]
        assert run_config.dumped == run_config.parser.dump(run_config.config, skip_none=False)


def test_lightnings_slurm_requeue_and_hpc_adoption_are_turned_off_where_resume_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # resume.leave_hpc_checkpoints_alone turns off SLURMEnvironment.auto_requeue (read by the signal connector) and
    # Lightning's adoption of any hpc_ckpt_N.ckpt in default_root_dir under SLURM (_CheckpointConnector's
    # _hpc_resume_path, through trainer._accelerator_connector and trainer._checkpoint_connector). Public
    # replacement: a Trainer flag that turns the adoption off.
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.trainer.states import TrainerFn

    from mnist_lit.resume import leave_hpc_checkpoints_alone

    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "mnist", "SLURM_JOB_ID": "777", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"")

    def trainer() -> L.Trainer:
        return L.Trainer(logger=False, default_root_dir=str(tmp_path), enable_checkpointing=False)

    stranger = str(tmp_path / "hpc_ckpt_3.ckpt")
    as_lightning = trainer()
    environment = as_lightning._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is True, (
        "Lightning's SLURM environment is no longer at trainer._accelerator_connector.cluster_environment with "
        "auto_requeue: update resume.leave_hpc_checkpoints_alone, or Lightning's mid-step requeue comes back")
    assert as_lightning._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, None, True, True) == stranger, (
        "Lightning no longer adopts hpc_ckpt_N.ckpt by itself: resume.leave_hpc_checkpoints_alone may go")
    ours = trainer()
    assert leave_hpc_checkpoints_alone(ours).startswith(f"mnist_lit: left {stranger} alone")
    assert ours._accelerator_connector.cluster_environment.auto_requeue is False
    assert ours._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, None, True, True) is None, (
        "_CheckpointConnector._hpc_resume_path moved: update resume._NoHPCAdoption, or a job adopts a stranger's "
        "checkpoint")
