"""The CLI as a user drives it: runs in-process through LightningCLI's ``args``, one in a new process."""

import gc
import json
import math
import multiprocessing
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import TQDMProgressBar
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import REPO, fails_with, fit_args, launch, only_run, read_events, scalar
from mnist_lit import engine
from mnist_lit.cli import main
from mnist_lit.search import fork


def checkpoint(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)


def best_checkpoint(run: Path) -> Path:
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    return best


def test_fit_writes_one_run_with_metrics_config_and_checkpoints(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "3"))
    run = only_run(tmp_path / "logs")
    events = read_events(run)
    val_acc = scalar(events, "val/acc")
    assert len(val_acc) == 3 and all(0 <= a <= 1 for a in val_acc) and val_acc[-1] > 0.9
    assert scalar(events, "val/acc_best")[-1] == max(val_acc)
    train_loss = scalar(events, "train/loss_epoch")
    assert len(train_loss) == 3 and train_loss[-1] < train_loss[0]
    assert {"train/acc", "train/loss", "val/loss"} <= set(events.Tags()["scalars"])

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["seed_everything"] == 0 and config["data"]["init_args"]["data_dir"] == str(tiny_mnist)
    assert config["model"]["class_path"] == "mnist_lit.model.MNISTClassifier"
    assert config["model"]["init_args"]["net"]["class_path"] == "mnist_lit.model.MLP"
    assert best_checkpoint(run).name.startswith("best-epoch") and (run / "checkpoints" / "last.ckpt").is_file()
    assert checkpoint(run)["global_step"] == 3 * 16  # 500 rows / batch 32 = 16 SGD steps per epoch


def test_hparams_tab_and_metrics_json_hold_the_runs_real_results(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "2", "--model.optimizer.init_args.lr", "0.05"))
    run = only_run(tmp_path / "logs")
    events = read_events(run)
    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = dict(session.session_start_info.hparams)
    assert hparams["optimizer/init_args/lr"].number_value == 0.05 and hparams["batch_size"].number_value == 32
    assert hparams["net/init_args/hidden1"].number_value == 512 and "seed" in hparams
    assert not any(key.startswith("_") for key in hparams)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    columns = {m.name.tag for m in experiment.metric_infos}
    assert columns == {"hp/val_acc_best", "hp/val_loss", "hp/test_acc", "hp/test_loss"}
    assert "hp_metric" not in events.Tags()["scalars"]

    # The columns hold the run's real results: the best validation accuracy and the test of the best checkpoint.
    assert scalar(events, "hp/val_acc_best") == [max(scalar(events, "val/acc"))]
    assert scalar(events, "hp/test_acc") == scalar(events, "test/acc") and 0.5 < scalar(events, "test/acc")[0] <= 1
    record = json.loads((run / "metrics.json").read_text())
    assert record["metrics"]["test/acc"] == pytest.approx(scalar(events, "test/acc")[0])
    assert record["best_checkpoint"].endswith(".ckpt") and record["seed"] == 0 and record["global_step"] == 32
    assert {"git_commit", "git_dirty", "torch", "lightning", "device"} <= set(record["environment"])


class CallCounter(TQDMProgressBar):
    """Lightning's progress bar, counting the training_step calls it is told of (a bar keeps the fast path)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def on_train_batch_end(self, *args, **kwargs):
        self.calls += 1
        super().on_train_batch_end(*args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("seconds, calls", [(math.inf, 2), (0.0, 32)])
def test_a_call_ends_after_its_seconds_and_the_optimization_stays(tiny_mnist: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  seconds: float, calls: int):
    # 16 batches an epoch in calls of up to 1024 steps: one call an epoch, or one step a call when a call may
    # last no time at all (the bar then moves every batch). The weights are those of Lightning's loop either way.
    monkeypatch.setattr(engine, "CALL_SECONDS", seconds)
    cli = main(fit_args(tiny_mnist, tmp_path / "fast", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar",
                        "true", "--trainer.callbacks+=test_cli.CallCounter"))
    bar = next(c for c in cli.trainer.callbacks if isinstance(c, CallCounter))
    assert not cli.model.automatic_optimization and (bar.calls, cli.trainer.global_step) == (calls, 32)
    main(fit_args(tiny_mnist, tmp_path / "lightning", "--trainer.max_epochs", "2",
                  "--model.steps_per_training_step", "1"))
    ours, theirs = (checkpoint(only_run(tmp_path / name))["state_dict"] for name in ("fast", "lightning"))
    assert all(torch.equal(ours[name], theirs[name]) for name in ours if name.startswith("net."))


@pytest.mark.slow
def test_steps_per_training_step_does_not_change_the_optimization(tiny_mnist: Path, tmp_path: Path):
    # 16 batches per epoch: with 5 steps per call the last call of each epoch holds one batch.
    weights = []
    for steps in ("1", "5"):
        main(fit_args(tiny_mnist, tmp_path / steps, "--trainer.max_epochs", "2",
                      "--model.steps_per_training_step", steps))
        ckpt = checkpoint(only_run(tmp_path / steps))
        assert ckpt["global_step"] == 32
        weights.append(ckpt["state_dict"])
    for name, tensor in weights[0].items():
        if name.startswith("net."):  # the network (metric states depend on when Lightning resets them)
            assert torch.equal(tensor, weights[1][name]), name


@pytest.mark.slow
def test_test_subcommand_evaluates_a_checkpoint_in_a_new_process(tiny_mnist: Path, tmp_path: Path):
    # A non-default network: the architecture must come back from the checkpoint, not from default.yaml.
    main(fit_args(tiny_mnist, tmp_path / "fit", "--trainer.max_epochs", "2",
                  "--model.net.init_args.hidden1", "32", "--model.net.init_args.hidden2", "16"))
    best = best_checkpoint(only_run(tmp_path / "fit"))
    args = ["test", "--ckpt_path", str(best), "--trainer.logger.init_args.save_dir", str(tmp_path / "test")]
    done = launch(args)
    assert done.returncode == 0, done.stderr[-3000:]
    test_acc = scalar(read_events(only_run(tmp_path / "test")), "test/acc")
    assert len(test_acc) == 1 and test_acc[0] > 0.8  # chance is 0.1
    assert "test/acc" in done.stdout


def test_help_and_print_config_name_the_real_command(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "usage: python -m mnist_lit" in out
    assert "{fit,validate,test,predict}" in out  # without a subcommand first, every one is offered
    with pytest.raises(SystemExit) as exit_:
        main(["tset", "--ckpt_path", "x.ckpt"])  # a typo: named among the real ones
    assert exit_.value.code == 2 and "{fit,validate,test,predict}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "default.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.1
    assert printed["data"]["init_args"]["batch_size"] == 128


@pytest.mark.parametrize("args, message", [
    (["--model.hiden", "3"], "error: --model.hiden is not an argument of mnist_lit.model.MNISTClassifier"),
    (["--model.net.init_args.hiden", "3"],
     "error: --model.net.init_args.hiden is not an argument of mnist_lit.model.MLP"),
    (["--model.optimizer.init_args.lr", "abc"], "error: --model.optimizer.init_args.lr cannot be 'abc'"),
    (["--data.batch_size", "0"], "error: --data.batch_size cannot be '0' (in mnist_lit.data.MNISTDataModule)"),
    (["--torch_threads", "0"], 'Parser key "torch_threads"'),
])
def test_bad_option_gets_jsonargparse_message(args: list[str], message: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs" / "default.yaml"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err
    if message.startswith(("error: --model", "error: --data")):  # nested screens deep in subclass mode: one paragraph
        assert "usage:" not in err and [line for line in err.splitlines() if line.startswith("error:")] == [
            err.strip().splitlines()[-1]], err


HINTS = {  # a mistyped argument -> the class (or flag) the paragraph must name, and the suggestion it must make
    "optimizer": (["--model.optimizer.init_args.lrr", "0.1"], "torch.optim.SGD", "--model.optimizer.init_args.lr?"),
    "schedule": (["--model.lr_scheduler.init_args.eta_mn", "0"], "torch.optim.lr_scheduler.CosineAnnealingLR",
                 "--model.lr_scheduler.init_args.eta_min?"),
    "network": (["--model.net.init_args.hiden1", "3"], "mnist_lit.model.MLP", "--model.net.init_args.hidden1 or"),
    "module": (["--model.label_smoothin", "0.1"], "mnist_lit.model.MNISTClassifier", "--model.label_smoothing?"),
    "logger": (["--trainer.logger.init_args.save_dirr", "x"], "lightning.pytorch.loggers.TensorBoardLogger",
               "--trainer.logger.init_args.save_dir or"),
    "callback": (["--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitr", "x"],
                 "lightning.pytorch.callbacks.EarlyStopping", "--trainer.callbacks.init_args.monitor?"),
    "flag": (["--trainer.max_epocs", "2"], "--trainer.max_epocs is not an option of python -m mnist_lit fit.",
             "Did you mean --trainer.max_epochs or"),
    "data module": (["--data.batch_sise", "2"], "mnist_lit.data.MNISTDataModule", "Did you mean --data.batch_size"),
    "abbreviation": (["--trainer.max_epoch", "2"], "--trainer.max_epoch is short for --trainer.max_epochs",
                     "write --trainer.max_epochs."),
}


@pytest.mark.parametrize("case", HINTS)
def test_a_mistyped_argument_names_its_class_the_closest_names_and_a_help_command_that_works(
        case: str, capsys: pytest.CaptureFixture):
    args, named, suggested = HINTS[case]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs" / "default.yaml"), *args])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "usage:" not in err and len(err.splitlines()) == 1, err  # one paragraph
    assert err.startswith("error: ") and named in err and suggested in err, err
    help_command = re.search(r"(python -m mnist_lit fit --\S*help)( \S+)? lists", err)
    assert help_command, err
    with pytest.raises(SystemExit) as exit_:  # the suggested command, run as printed
        main(help_command[0].removesuffix(" lists").split()[3:])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage:")


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tiny_mnist: Path, tmp_path: Path):
    message = fails_with(fit_args(tiny_mnist, tmp_path / "logs", "--data.val_size", "5000"))  # 600 rows
    assert "val_size" in message and not list((tmp_path / "logs").glob("*/version_*"))


def test_mistyped_key_in_a_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  lrr: 0.1\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "default.yaml"), "--config", str(typo)])
    assert "--model.lrr is not an argument of mnist_lit.model.MNISTClassifier" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_data_offline_ends_with_one_paragraph_and_writes_nothing(tmp_path: Path):
    args = fit_args(tmp_path / "nothing", tmp_path / "logs", "--data.download", "false")
    done = launch(args)
    assert done.returncode == 1
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: MNIST files are missing from") and "Traceback" not in done.stderr
    assert "train-images-idx3-ubyte.gz" in last_line and "--data.download true" in last_line
    assert not list((tmp_path / "logs").glob("*/version_*"))  # no empty run folder left behind


def test_tensorboard_steps_count_sgd_steps(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "2", "--model.steps_per_training_step", "4",
                  "--trainer.log_every_n_steps", "8"))
    events = read_events(only_run(tmp_path / "logs"))
    assert [e.step for e in events.Scalars("val/acc")] == [15, 31]  # 16 SGD steps per epoch
    assert [e.step for e in events.Scalars("train/loss")] == [7, 15, 23, 31]


def test_debug_trainer_file_limits_batches_not_training_step_calls(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer", str(REPO / "configs" / "trainer" / "debug.yaml"),
                  "--trainer.limit_train_batches", "6"))
    run = only_run(tmp_path / "logs")
    assert checkpoint(run)["global_step"] == 2 * 6  # debug.yaml: 2 epochs; 6 SGD steps each, not 6 calls of 16
    assert [e.step for e in read_events(run).Scalars("val/acc")] == [5, 11]


@pytest.mark.slow
def test_step_curves_are_lightnings_own_when_calls_do_not_divide_the_interval(tiny_mnist: Path, tmp_path: Path):
    # 16 batches per epoch in calls of 5, 5, 5, 1: Lightning's own loop's points, step for step, value for value.
    curves = {}
    for steps in ("5", "1"):
        main(fit_args(tiny_mnist, tmp_path / steps, "--trainer.max_epochs", "2", "--model.steps_per_training_step",
                      steps, "--trainer.log_every_n_steps", "8", "--test_after_fit", "false"))
        events = read_events(only_run(tmp_path / steps))
        curves[steps] = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
                         for tag in ("train/loss", "train/lr", "train/loss_epoch", "train/acc", "val/acc")}
    assert [step for step, _ in curves["5"]["train/loss"]] == [7, 15, 23, 31]
    assert curves["5"] == curves["1"]


@pytest.mark.slow
def test_the_program_freezes_its_start_up_and_collects_the_run():
    """`python -m mnist_lit` pauses the garbage collector while torch and Lightning load, then freezes what they
    made (mnist_lit/preload.py). The collector must be on again for the run, or its garbage piles up."""
    check = ("import gc, runpy, sys\nsys.argv = ['mnist_lit', '--help']\ntry:\n"
             "    runpy.run_module('mnist_lit', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(gc.isenabled(), gc.get_freeze_count(), 'mnist_lit.cli' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    enabled, frozen, imported = done.stdout.split()[-3:]
    assert enabled == imported == "True" and int(frozen) > 10_000, done.stdout[-500:] + done.stderr[-2000:]


TRIAL_IMPORTS = ["mnist_lit.cli", "torch.utils.tensorboard", "mnist_lit.search.pruning", "optuna.storages._rdb.models",
                 "alembic.script"]


def collector_state(answer) -> None:
    answer.put((gc.isenabled(), gc.get_freeze_count(), [name for name in TRIAL_IMPORTS if name not in sys.modules]))


def test_runs_forked_from_the_server_find_its_imports_frozen_and_collect():
    """The fork server that a search's trials (and this file's launched runs) are forked from imported the CLI with
    the collector paused and froze what it made (mnist_lit/preload.py), and what every trial would import again
    besides (mnist_lit/search/trial_imports.py, among them a private module of Optuna's): a process forked from it
    starts so."""
    fork.run(["--help"], timeout=300)  # the server runs, with its preload (started here or by an earlier test)
    context = multiprocessing.get_context("forkserver")
    answer = context.SimpleQueue()
    child = context.Process(target=collector_state, args=(answer,))
    child.start()
    child.join(120)
    assert child.exitcode == 0 and not answer.empty(), f"the forked child ended with {child.exitcode}"
    enabled, frozen, missing = answer.get()
    assert enabled and frozen > 10_000
    assert not missing, f"the fork server no longer imports {missing}: update mnist_lit/search/trial_imports.py"


def test_the_test_workers_freeze_their_imports_and_collect_during_tests():
    """tests/conftest.py does for the test processes what `python -m mnist_lit` does: the collector paused while the
    test modules import, what they made frozen, and the collector on again for the tests themselves."""
    assert gc.isenabled() and gc.get_freeze_count() > 10_000
