"""Optimizer and schedule by config: other optimizers and schedules train, get the run's length from the
Trainer, draw the lr curve they promise, step identically on both loops, and bad ones get one paragraph.
(The default, SGD with a per-step cosine, equals a hand-built one bit for bit: tests/test_exactness.py.)"""

from pathlib import Path

import pytest
import torch

from conftest import REPO, fails_with, fit_args, only_run, read_events, scalar
from mnist_lit.cli import main
from mnist_lit.optimization import WarmupCosine

EXPERIMENTS = REPO / "configs" / "experiment"
EPOCH = 63  # tiny_mnist at batch 8: 63 SGD steps an epoch (the last batch of 4 rows)
STEPS = 4 * EPOCH  # 4 epochs


def fit(data: Path, logs: Path, *extra: str, steps_per_call: str = "16"):
    cli = main(fit_args(data, logs, "--trainer.max_epochs", "4", "--torch_threads", "1", "--test_after_fit", "false",
                        "--data.batch_size", "8", "--model.steps_per_training_step", steps_per_call, *extra))
    return cli, only_run(logs)


def lr_curve(run: Path) -> list[float]:
    return scalar(read_events(run), "train/lr")  # log_every_n_steps 1: the lr of every SGD step


def expected_lrs(make_optimizer, make_schedule, steps: int, per_epoch: int = 1) -> list[float]:
    """The lr of each SGD step of a schedule stepped every ``per_epoch`` steps, by torch alone."""
    optimizer = make_optimizer([torch.zeros(1, requires_grad=True)])
    schedule = make_schedule(optimizer)
    lrs = []
    for step in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if (step + 1) % per_epoch == 0:
            schedule.step()
    return lrs


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)


@pytest.mark.slow
@pytest.mark.parametrize("config, expected", [
    ("onecycle.yaml", lambda: expected_lrs(sgd, lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.2, pct_start=0.25, total_steps=STEPS), STEPS)),
    ("adamw.yaml", lambda: expected_lrs(lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
                                        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, STEPS), STEPS)),
])
def test_experiment_configs_train_and_follow_their_schedule(tiny_mnist: Path, tmp_path: Path, config: str, expected):
    cli, run = fit(tiny_mnist, tmp_path / "logs", "--config", str(EXPERIMENTS / config))
    assert type(cli.model.optimizers().optimizer).__name__ == ("AdamW" if config == "adamw.yaml" else "SGD")
    assert lr_curve(run) == pytest.approx(expected(), rel=1e-6)  # the length came from the Trainer: 252 steps
    assert scalar(read_events(run), "val/acc")[-1] > 0.9


def test_warmup_then_cosine_takes_the_runs_length_under_max_steps(tiny_mnist: Path, tmp_path: Path):
    _, run = fit(tiny_mnist, tmp_path / "logs", "--trainer.max_steps", "40", "--model.lr_scheduler",
                 "mnist_lit.optimization.WarmupCosine", "--model.lr_scheduler.warmup_steps", "8")
    expected = expected_lrs(sgd, lambda o: WarmupCosine(o, warmup_steps=8, total_steps=40), 40)
    assert lr_curve(run) == pytest.approx(expected, rel=1e-6)
    assert expected[7] == pytest.approx(0.1 * (0.01 + 0.99 * 7 / 8)) and expected[8] == pytest.approx(0.1)


@pytest.mark.slow
def test_a_per_epoch_schedule_counts_epochs(tiny_mnist: Path, tmp_path: Path):
    _, run = fit(tiny_mnist, tmp_path / "logs", "--model.lr_scheduler_interval", "epoch")
    expected = expected_lrs(sgd, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 4), STEPS, per_epoch=EPOCH)
    assert lr_curve(run) == pytest.approx(expected, rel=1e-6)  # T_max = 4 epochs, constant within each


@pytest.mark.slow
@pytest.mark.parametrize("flags, steps", [
    (["--trainer.accumulate_grad_batches", "2"], 4 * 32),  # 63 batches an epoch: 32 SGD steps (the last on one)
    (["--trainer.limit_train_batches", "10"], 4 * 10),
    (["--trainer.max_steps", "100"], 100),
], ids=["accumulation", "limit_train_batches", "max_steps"])
def test_the_schedule_length_counts_sgd_steps(tiny_mnist: Path, tmp_path: Path, flags: list[str], steps: int):
    cli, run = fit(tiny_mnist, tmp_path / "logs", "--config", str(EXPERIMENTS / "onecycle.yaml"), *flags)
    assert cli.trainer.global_step == steps and cli.model.lr_schedulers().total_steps == steps
    lrs = lr_curve(run)  # one-cycle ends exactly at the run's last step: its smallest lr there
    assert len(lrs) == steps and lrs[-1] == min(lrs) < 1e-5


def net_weights(run: Path) -> list[torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return [t for name, t in state.items() if name.startswith("net.")]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    ["--config", str(EXPERIMENTS / "adamw.yaml")],
    ["--config", str(EXPERIMENTS / "onecycle.yaml")],
    ["--model.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau", "--model.lr_scheduler.factor", "0.5",
     "--model.lr_scheduler.patience", "0", "--model.lr_scheduler_monitor", "val/loss"],
], ids=["adamw", "onecycle", "plateau"])
def test_both_loops_give_the_same_weights_for_any_optimizer_and_schedule(tiny_mnist: Path, tmp_path: Path, flags):
    fast, fast_run = fit(tiny_mnist, tmp_path / "fast", *flags)
    lightning, lightning_run = fit(tiny_mnist, tmp_path / "lightning", *flags, steps_per_call="1")
    assert (fast.model.automatic_optimization, lightning.model.automatic_optimization) == (False, True)
    assert all(torch.equal(a, b) for a, b in zip(net_weights(fast_run), net_weights(lightning_run), strict=True))
    assert lr_curve(fast_run) == lr_curve(lightning_run)


@pytest.mark.slow
def test_plateau_lowers_the_lr_when_val_acc_stops_improving(tiny_mnist: Path, tmp_path: Path):
    _, run = fit(tiny_mnist, tmp_path / "logs", "--model.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau",
                 "--model.lr_scheduler.mode", "max", "--model.lr_scheduler.factor", "0.5",
                 "--model.lr_scheduler.patience", "0", "--model.lr_scheduler_monitor", "val/acc")
    events = read_events(run)
    val_acc, lrs = scalar(events, "val/acc"), lr_curve(run)
    per_epoch = [lrs[EPOCH * e] for e in range(4)]  # the lr of each epoch's first step
    expected, best = [0.1], -1.0
    for acc in val_acc[:-1]:  # torch's rule with patience 0: halve after any epoch that did not improve
        expected.append(expected[-1] * (0.5 if acc <= best * (1 + 1e-4) else 1))
        best = max(best, acc)
    assert per_epoch == pytest.approx(expected) and per_epoch[-1] < 0.1  # tiny_mnist's val/acc reaches 1.0 and stays


def test_an_optimizer_that_cannot_be_built_is_named(tiny_mnist: Path, tmp_path: Path):
    message = fails_with(fit_args(tiny_mnist, tmp_path / "logs", "--model.optimizer.init_args.lr", "-1"))
    assert "--model.optimizer (SGD) cannot be built" in message and "Invalid learning rate" in message


def test_a_schedule_without_a_run_length_is_refused(tiny_mnist: Path, tmp_path: Path):
    message = fails_with(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "-1"))
    assert "--model.lr_scheduler (CosineAnnealingLR) needs the run's length" in message
    assert "--trainer.max_epochs" in message


def test_a_plateau_stepped_per_step_is_refused(tiny_mnist: Path, tmp_path: Path):
    message = fails_with(fit_args(tiny_mnist, tmp_path / "logs", "--model.lr_scheduler_interval", "step",
                                  "--model.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"))
    assert "set --model.lr_scheduler_interval epoch" in message


def test_a_plateau_watching_accuracy_in_min_mode_is_refused(tiny_mnist: Path, tmp_path: Path):
    message = fails_with(fit_args(tiny_mnist, tmp_path / "logs", "--model.lr_scheduler_monitor", "val/acc",
                                  "--model.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"))
    assert "set --model.lr_scheduler.mode max" in message


@pytest.mark.parametrize("args, key", [
    (["--model.optimizer", "torch.optim.SGDD"], "model.optimizer"),
    (["--model.lr_scheduler", "torch.optim.lr_scheduler.StepLR"], "step_size"),  # its required argument
    (["--model.lr_scheduler", "torch.optim.lr_scheduler.CosineAnnealingLR", "--model.lr_scheduler.T_max", "5"],
     "T_max"),  # the run's length comes from the Trainer
])
def test_a_misspelt_class_or_a_missing_argument_names_the_key(args: list[str], key: str, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs" / "default.yaml"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and key in err and "Traceback" not in err
