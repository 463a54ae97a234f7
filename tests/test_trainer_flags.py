"""Every Trainer flag that shapes training does what Lightning's docs say, on whichever loop the fit uses:
counted in batches and SGD steps, never in training_step calls; callbacks' gradient hooks run once per step."""

from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import fit_args, only_run, read_events
from mnist_lit.cli import main
from mnist_lit.data import MNISTDataModule
from mnist_lit.model import MNISTClassifier

# tiny_mnist at batch 32: 500 training rows = 16 batches an epoch (15 of 32 rows, the last of 20)


def fit(data: Path, logs: Path, *extra: str) -> tuple[Path, bool]:
    """A CLI fit; its run folder, and whether it trained with Lightning's own loop."""
    cli = main(fit_args(data, logs, "--test_after_fit", "false", "--torch_threads", "1", *extra))
    return only_run(logs), cli.model.automatic_optimization


def val_steps(run: Path) -> list[int]:
    return [e.step for e in read_events(run).Scalars("val/acc")]


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def net_weights(checkpoint: dict) -> list[torch.Tensor]:
    return [t for name, t in checkpoint["state_dict"].items() if name.startswith("net.")]


@pytest.mark.slow
def test_max_steps_is_exact_on_the_fast_path(tiny_mnist: Path, tmp_path: Path):
    run, automatic = fit(tiny_mnist, tmp_path / "fast", "--trainer.max_epochs", "5", "--trainer.max_steps", "37")
    reference, reference_automatic = fit(tiny_mnist, tmp_path / "lightning", "--trainer.max_epochs", "5",
                                         "--trainer.max_steps", "37", "--model.steps_per_training_step", "1")
    assert (automatic, reference_automatic) == (False, True)
    assert last(run)["global_step"] == last(reference)["global_step"] == 37  # not 48, the next multiple of 16
    assert all(torch.equal(a, b) for a, b in zip(net_weights(last(run)), net_weights(last(reference)), strict=True))
    assert val_steps(run) == val_steps(reference) == [15, 31]  # no validation at step 37, as in Lightning's loop


@pytest.mark.slow
@pytest.mark.parametrize("interval, expected", [("0.5", [7, 15, 23, 31]), ("4", [3, 7, 11, 15, 19, 23, 27, 31])])
def test_val_check_interval_counts_batches(tiny_mnist: Path, tmp_path: Path, interval: str, expected: list[int]):
    run, automatic = fit(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "2",
                         "--trainer.val_check_interval", interval)
    assert automatic and val_steps(run) == expected


def test_check_val_every_n_epoch_on_the_fast_path(tiny_mnist: Path, tmp_path: Path):
    run, automatic = fit(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "4",
                         "--trainer.check_val_every_n_epoch", "2")
    assert not automatic and val_steps(run) == [31, 63]


@pytest.mark.slow
def test_limit_train_batches_counts_batches(tiny_mnist: Path, tmp_path: Path):
    run, _ = fit(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6")
    assert last(run)["global_step"] == 12 and val_steps(run) == [5, 11]  # 6 SGD steps an epoch, not 6 calls


def test_fast_dev_run_trains_one_batch_and_writes_nothing(tiny_mnist: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture):
    main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.fast_dev_run", "true", "--torch_threads", "1"))
    assert "Run folder: None" in capsys.readouterr().out
    assert not list((tmp_path / "logs").glob("*/version_*/*"))  # Lightning's promise: no logs, no checkpoints


class BatchRecorder(L.Callback):
    """The labels of every training batch, per epoch (Lightning's loop passes each batch to the hook)."""

    def __init__(self):
        self.labels: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.labels.setdefault(trainer.current_epoch, []).append(batch[1].clone())


def python_fit(data: Path, callbacks: list[L.Callback], **trainer: object) -> tuple[L.Trainer, MNISTClassifier]:
    """The module and data module from Python, with Lightning's Trainer: no CLI involved."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = MNISTClassifier()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, **trainer)
    trainer.fit(model, MNISTDataModule(data_dir=str(data), verify_checksums=False, val_size=100, batch_size=32))
    return trainer, model


def test_overfit_batches_repeats_the_same_batches(tiny_mnist: Path):
    recorder = BatchRecorder()
    trainer, _ = python_fit(tiny_mnist, [recorder], max_epochs=3, overfit_batches=2)
    assert trainer.global_step == 6 and [len(recorder.labels[e]) for e in range(3)] == [2, 2, 2]
    for epoch in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(recorder.labels[0], recorder.labels[epoch], strict=True))


class GradientHooks(L.Callback):
    """Counts the gradient hooks and, from on_after_backward, scales every gradient (here: by zero)."""

    def __init__(self, scale: float):
        self.scale, self.calls = scale, {"before_backward": 0, "after_backward": 0, "before_optimizer_step": 0}

    def on_before_backward(self, trainer, pl_module, loss):
        self.calls["before_backward"] += 1

    def on_after_backward(self, trainer, pl_module):
        self.calls["after_backward"] += 1
        for p in pl_module.parameters():
            p.grad.mul_(self.scale)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls["before_optimizer_step"] += 1


def test_gradient_hooks_run_once_per_sgd_step_on_the_fast_path(tiny_mnist: Path):
    hooks = GradientHooks(scale=0.0)
    torch.manual_seed(0)
    initial = [p.clone() for p in MNISTClassifier().net.parameters()]  # what seed 0 draws, as in python_fit
    trainer, model = python_fit(tiny_mnist, [hooks], max_epochs=2, limit_val_batches=0)
    assert not model.automatic_optimization  # a gradient hook needs no other loop: manual_backward runs it
    assert trainer.global_step == 32 and hooks.calls == dict.fromkeys(hooks.calls, 32)
    # The hook zeroed every gradient before the step: SGD moved nothing, so the hook really ran in the step.
    assert all(torch.equal(a, b) for a, b in zip(initial, model.net.parameters(), strict=True))


def test_a_callback_with_per_batch_hooks_switches_to_lightnings_loop(tiny_mnist: Path, capsys):
    recorder = BatchRecorder()
    trainer, model = python_fit(tiny_mnist, [recorder], max_epochs=1, limit_val_batches=0)
    assert model.automatic_optimization and len(recorder.labels[0]) == 16  # the hook saw every batch
    reasons = model.one_step_reasons()
    assert reasons == ["the callback BatchRecorder acts on every batch"]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    ["--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"],
    ["--trainer.callbacks+=lightning.pytorch.callbacks.StochasticWeightAveraging",
     "--trainer.callbacks.swa_lrs", "0.01"],
    ["--trainer.callbacks+=lightning.pytorch.callbacks.GradientAccumulationScheduler",
     "--trainer.callbacks.scheduling", "{0: 2}"],
    ["--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping", "--trainer.callbacks.monitor", "val/loss"],
    ["--trainer.callbacks+=lightning.pytorch.callbacks.DeviceStatsMonitor"],
    ["--trainer.precision", "bf16-mixed"],
    ["--trainer.detect_anomaly", "true"],
    ["--trainer.deterministic", "true"],
    ["--trainer.max_time", "00:00:10:00"],
    ["--trainer.reload_dataloaders_every_n_epochs", "1"],
    ["--trainer.enable_progress_bar", "true"],
    ["--trainer.barebones", "true", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
     "--trainer.log_every_n_steps", "0", "--trainer.enable_model_summary", "false", "--test_after_fit", "false"],
    ["--trainer.enable_checkpointing", "false"],
], ids=lambda flags: flags[0].rsplit(".", 1)[-1] if "callbacks" in flags[0] else flags[0].split(".")[-1])
def test_lightning_flags_and_callbacks_train_without_a_traceback(tiny_mnist: Path, tmp_path: Path, flags: list[str]):
    cli = main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "2", "--torch_threads", "1", *flags))
    assert cli.trainer.global_step > 0 and torch.isfinite(next(cli.model.parameters())).all()
