"""A checkpoint carries its run: resume, extend, test and predict from it alone; what is given beside it is
applied on purpose or refused; the lr schedule never silently re-warms; a new lr on a resume is applied."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import fails_with, fit_args, only_run, read_events, scalar
from mnist_lit.cli import main


class StopAfterFirstEpoch(L.Callback):
    """Ends a fit after its epoch 0, its schedule planned for all of max_epochs: a run cut short. Resumed (it
    is in the run's config, as every callback), it lets the later epochs run."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = trainer.should_stop or trainer.current_epoch == 0


STOP_AFTER_FIRST_EPOCH = ("--trainer.callbacks+=test_resume.StopAfterFirstEpoch",)


class ForgetsAfterFirstEpoch(L.Callback):
    """From epoch 1 on, the network is zeroed before each validation: every later epoch is far worse than epoch 0."""

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch >= 1 and not trainer.sanity_checking:
            for parameter in pl_module.net.parameters():
                torch.nn.init.zeros_(parameter)


def checkpoint(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)


def alone(subcommand: str, ckpt: Path, logs: Path, *extra: str) -> list[str]:
    """The shortest command: the checkpoint, where to log this run, and nothing else."""
    return [subcommand, "--ckpt_path", str(ckpt), "--trainer.logger.init_args.save_dir", str(logs), *extra]


def test_test_with_the_checkpoint_alone_uses_the_runs_normalization_and_network(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "fit", "--trainer.max_epochs", "2", "--data.standardize", "true",
                  "--model.net.init_args.hidden1", "32", "--model.net.init_args.hidden2", "16"))
    run = only_run(tmp_path / "fit")
    fitted = json.loads((run / "metrics.json").read_text())
    main(alone("test", Path(fitted["best_checkpoint"]), tmp_path / "test"))
    events = read_events(only_run(tmp_path / "test"))
    # the fit's own test pass, to the last bit: standardized inputs, the 32-16 network
    assert scalar(events, "test/loss") == pytest.approx([fitted["metrics"]["test/loss"]], rel=1e-7)
    assert scalar(events, "test/acc") == pytest.approx([fitted["metrics"]["test/acc"]])


def test_evaluating_a_runs_checkpoint_writes_beside_that_run_with_a_metrics_json(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "1"))
    run = only_run(tmp_path / "logs")
    fitted = json.loads((run / "metrics.json").read_text())
    for subcommand in ("test", "validate", "predict", "test"):  # the checkpoint alone: no folder given
        main([subcommand, "--ckpt_path", fitted["best_checkpoint"]])
    assert only_run(tmp_path / "logs") == run  # no evaluation among the training runs
    assert sorted(p.relative_to(run).as_posix() for p in run.glob("*/version_*")) == [
        "predict/version_0", "test/version_0", "test/version_1", "validate/version_0"]
    tested = json.loads((run / "test" / "version_1" / "metrics.json").read_text())
    assert tested["subcommand"] == "test" and tested["checkpoint"] == fitted["best_checkpoint"]
    assert tested["metrics"]["test/acc"] == fitted["metrics"]["test/acc"]  # the fit's own test pass, again
    validated = json.loads((run / "validate" / "version_0" / "metrics.json").read_text())
    assert validated["metrics"]["val/acc"] == pytest.approx(fitted["metrics"]["val/acc_best"])
    assert (run / "predict" / "version_0" / "predictions.csv").is_file()


def test_a_config_that_contradicts_the_checkpoint_is_refused_by_name(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "fit", "--trainer.max_epochs", "1", "--data.standardize", "true"))
    last = only_run(tmp_path / "fit") / "checkpoints" / "last.ckpt"
    args = fit_args(tiny_mnist, tmp_path / "test", "--ckpt_path", str(last))  # default.yaml: standardize false
    args[0] = "test"
    message = fails_with(args)
    assert "data.standardize (True there, False here)" in message and "--ckpt_path alone is enough" in message
    assert not list((tmp_path / "test").glob("*/version_*/events*"))  # refused before any work


def test_fit_with_the_checkpoint_alone_resumes_the_run(tiny_mnist: Path, tmp_path: Path):
    constant = ("--model.lr_scheduler", "null")
    main(fit_args(tiny_mnist, tmp_path / "once", "--trainer.max_epochs", "2", *constant))
    main(fit_args(tiny_mnist, tmp_path / "first", "--trainer.max_epochs", "1", *constant))
    last = only_run(tmp_path / "first") / "checkpoints" / "last.ckpt"
    main(alone("fit", last, tmp_path / "resumed", "--trainer.max_epochs", "2"))
    once, resumed = checkpoint(only_run(tmp_path / "once")), checkpoint(only_run(tmp_path / "resumed"))
    assert resumed["global_step"] == once["global_step"] == 32
    for name, tensor in once["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    record = json.loads((only_run(tmp_path / "resumed") / "metrics.json").read_text())
    assert record["resumed_from"] == str(last)  # the new run folder names the run it continues


def test_a_new_lr_on_a_resume_is_applied(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "first", "--trainer.max_epochs", "4", *STOP_AFTER_FIRST_EPOCH))
    last = only_run(tmp_path / "first") / "checkpoints" / "last.ckpt"  # step 16 of a 64-step cosine
    main(alone("fit", last, tmp_path / "resumed", "--model.optimizer.init_args.lr", "0.01"))
    lrs = scalar(read_events(only_run(tmp_path / "resumed")), "train/lr")
    cosine = lambda t: (1 + math.cos(math.pi * t / 64)) / 2  # noqa: E731
    assert lrs == pytest.approx([0.01 * cosine(t) for t in range(16, 64)], rel=1e-5)  # the same curve, a tenth


def test_a_resumed_fit_keeps_the_best_checkpoint_so_far_and_tests_it(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "3", *STOP_AFTER_FIRST_EPOCH,
                  "--trainer.callbacks+=test_resume.ForgetsAfterFirstEpoch"))
    first = only_run(tmp_path / "logs")
    (best,) = (first / "checkpoints").glob("best-*.ckpt")  # epoch 0's: the run's best, whatever comes after
    main(alone("fit", first / "checkpoints" / "last.ckpt", tmp_path / "logs"))  # epochs 1 and 2: chance level
    resumed = max((tmp_path / "logs" / "mnist").iterdir())
    record = json.loads((resumed / "metrics.json").read_text())
    assert record["best_checkpoint"] == str(best) and best.is_file()  # kept in its run's folder, not replaced
    assert not list((resumed / "checkpoints").glob("best-*.ckpt"))  # no worse epoch was saved as the best
    assert record["metrics"]["test/acc"] > 0.8 > max(scalar(read_events(resumed), "val/acc"))  # best tested


@pytest.mark.slow
def test_the_divergence_advice_works(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "good", "--trainer.max_epochs", "2", *STOP_AFTER_FIRST_EPOCH))
    last = only_run(tmp_path / "good") / "checkpoints" / "last.ckpt"  # a good checkpoint, mid-run
    message = fails_with(alone("fit", last, tmp_path / "diverged", "--model.optimizer.init_args.lr", "1e9"))
    advice = "--model.optimizer.init_args.lr 0.01"
    assert f"python -m mnist_lit fit --ckpt_path <this run>/checkpoints/last.ckpt {advice}" in message
    cli = main(alone("fit", last, tmp_path / "advised", *advice.split()))  # the advice, as printed
    assert cli.trainer.global_step == 32 and all(torch.isfinite(p).all() for p in cli.model.parameters())


@pytest.mark.slow
def test_resume_continues_epoch_step_optimizer_and_schedule(tiny_mnist: Path, tmp_path: Path):
    constant = ("--model.lr_scheduler", "null")
    main(fit_args(tiny_mnist, tmp_path / "once", "--trainer.max_epochs", "2", *constant))
    main(fit_args(tiny_mnist, tmp_path / "first", "--trainer.max_epochs", "1", *constant))
    last = only_run(tmp_path / "first") / "checkpoints" / "last.ckpt"
    main(fit_args(tiny_mnist, tmp_path / "resumed", "--trainer.max_epochs", "2", "--ckpt_path", str(last), *constant))

    once, resumed = checkpoint(only_run(tmp_path / "once")), checkpoint(only_run(tmp_path / "resumed"))
    assert resumed["global_step"] == once["global_step"] == 32 and resumed["epoch"] == 1
    for name, tensor in once["state_dict"].items():  # same data order, same momentum buffers: same weights
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    events = read_events(only_run(tmp_path / "resumed"))
    assert [e.step for e in events.Scalars("val/acc")] == [31]  # only the second epoch ran


@pytest.mark.slow
def test_a_longer_resume_replans_the_cosine_continuously(tiny_mnist: Path, tmp_path: Path):
    # Stopped after epoch 0 of a 4-epoch plan (64 steps); resumed for 6 epochs (96 steps).
    main(fit_args(tiny_mnist, tmp_path / "first", "--trainer.max_epochs", "4", *STOP_AFTER_FIRST_EPOCH))
    last = only_run(tmp_path / "first") / "checkpoints" / "last.ckpt"
    assert checkpoint(only_run(tmp_path / "first"))["lr_schedulers"][0]["T_max"] == 64
    main(fit_args(tiny_mnist, tmp_path / "resumed", "--trainer.max_epochs", "6", "--ckpt_path", str(last)))
    lrs = [(e.step, e.value) for e in read_events(only_run(tmp_path / "resumed")).Scalars("train/lr")]
    assert [step for step, _ in lrs] == list(range(16, 96))  # log_every_n_steps 1: every step after the join
    cosine = lambda t, total: (1 + math.cos(math.pi * t / total)) / 2  # noqa: E731
    at_join = 0.1 * cosine(16, 64)  # where the first run's 4-epoch plan had brought the lr: no jump back up
    for step, lr in lrs:  # the 96-step cosine, scaled to meet the lr at the join, down to 0 at the new end
        assert lr == pytest.approx(at_join * cosine(step, 96) / cosine(16, 96), rel=1e-5, abs=1e-7), step
    assert lrs[-1][1] < 1e-4 and all(a[1] > b[1] for a, b in zip(lrs[:-1], lrs[1:], strict=True))  # never climbs


@pytest.mark.slow
def test_extending_a_finished_schedule_is_refused_or_restarted_on_request(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "first", "--trainer.max_epochs", "2"))
    last = only_run(tmp_path / "first") / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(tiny_mnist, tmp_path / "refused", "--trainer.max_epochs", "4", "--ckpt_path", str(last)))
    message = str(exit_.value.code)
    assert "schedule has ended (step 32 of 32" in message and "--model.finished_schedule restart" in message
    main(fit_args(tiny_mnist, tmp_path / "restarted", "--trainer.max_epochs", "4", "--ckpt_path", str(last),
                  "--model.finished_schedule", "restart"))
    lrs = scalar(read_events(only_run(tmp_path / "restarted")), "train/lr")
    assert lrs[0] == pytest.approx(0.1) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-3  # a new 32-step cosine
