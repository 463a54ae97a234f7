"""A researcher's own LightningModule by --model: a subclass that changes the loss, its own training_step, manual
optimization, its own optimizers, validation or per-batch hooks, or a LightningModule not built on the template.
Each trains as Lightning documents it (weights move, every SGD step counted, the module's own loss logged), and
the run machinery serves it: run folder, config.yaml, checkpoints that rebuild the class, metrics.json."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from research_modules import OwnTrainingStep

from conftest import REPO, fit_args, launch, only_run, read_events, scalar
from mnist_lit.cli import main
from mnist_lit.data import MNISTDataModule

TESTS = Path(__file__).parent
STEPS = 2 * 16  # tiny_mnist: 500 training rows at batch 32 = 16 SGD steps an epoch, two epochs
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # research_modules


@pytest.fixture
def said(capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture):
    """What the run told the user so far: stderr and Lightning's info log (where rank_zero_info goes)."""
    caplog.set_level(logging.INFO)
    return lambda: capsys.readouterr().err + caplog.text


def fit(data: Path, logs: Path, model: str, *extra: str):
    return main(fit_args(data, logs, "--trainer.max_epochs", "2", "--test_after_fit", "false",
                         "--model", f"research_modules.{model}", *extra))


def net_weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.")}


def initial_weights() -> dict[str, torch.Tensor]:
    """What seed 0 draws for the default MLP: the weights before any step."""
    L.seed_everything(0)
    from mnist_lit.model import MLP
    return {f"net.{k}": v for k, v in MLP().state_dict().items()}


def assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs by {(a[key] - b[key]).abs().max().item():.3g}"


@pytest.fixture(scope="module")
def smoothed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The loss-only subclass on the fast path: the reference every label-smoothed module must reproduce."""
    from conftest import write_mnist
    root = tmp_path_factory.mktemp("smoothed")
    data = write_mnist(root / "data")
    cli = fit(data, root / "logs", "LabelSmoothing")
    assert cli.model.loop == "fast"
    return data, net_weights(only_run(root / "logs"))


def test_a_loss_of_its_own_keeps_the_fast_path_and_changes_the_weights(smoothed, tmp_path: Path):
    data, weights = smoothed
    main(fit_args(data, tmp_path / "default", "--trainer.max_epochs", "2", "--test_after_fit", "false"))
    default = net_weights(only_run(tmp_path / "default"))
    assert not any(torch.equal(weights[k], default[k]) for k in weights)  # the loss is not the template's


def test_its_own_training_step_trains_with_its_loss_in_lightnings_loop(smoothed, tmp_path: Path,
                                                                      said):
    data, reference = smoothed
    cli = fit(data, tmp_path / "logs", "OwnTrainingStep")
    run = only_run(tmp_path / "logs")
    assert cli.model.loop == "lightning" and cli.trainer.global_step == STEPS
    notice = said()
    assert "OwnTrainingStep writes its own training_step" in notice and "train/acc steps aside" in notice
    # The same loss and optimizer as the loss-only subclass: the same weights, bit for bit.
    assert_equal(net_weights(run), reference, "own training_step vs the fast path's loss-only subclass")
    events = read_events(run)
    assert scalar(events, "train/loss") == pytest.approx(cli.model.seen, abs=1e-6)  # every step's own loss
    assert len(scalar(events, "train/loss_epoch")) == 2 and "train/acc" not in events.Tags()["scalars"]


def test_its_own_training_step_that_logs_its_loss_gets_one_point_a_step(tiny_mnist: Path, tmp_path: Path):
    # Lightning's documented step: self.log("train/loss", loss). The engine must not add a second point per step.
    cli = fit(tiny_mnist, tmp_path / "logs", "OwnTrainingStepThatLogs")
    events = read_events(only_run(tmp_path / "logs"))
    assert cli.trainer.global_step == STEPS and len(cli.model.seen) == STEPS
    assert scalar(events, "train/loss") == pytest.approx(cli.model.seen, abs=1e-6)  # its own points, once each
    assert len(scalar(events, "train/lr")) == STEPS
    sizes = [32] * 15 + [20]  # 500 rows at batch 32: each epoch's mean weighs the last, shorter batch less
    means = [sum(n * loss for n, loss in zip(sizes, cli.model.seen[e * 16:(e + 1) * 16], strict=True)) / 500
             for e in range(2)]
    assert scalar(events, "train/loss_epoch") == pytest.approx(means, rel=1e-5)  # each step counted once


def test_its_own_training_step_trains_from_python_too(tiny_mnist: Path):
    # The case: a plain Trainer, max_epochs 1, no CLI. It used to run training_step 430 times and step 0 times.
    torch.set_num_threads(1)
    model = OwnTrainingStep()
    before = [p.clone() for p in model.parameters()]
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, MNISTDataModule(data_dir=str(tiny_mnist), verify_checksums=False, val_size=100, batch_size=32))
    assert trainer.global_step == 16 == len(model.seen)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # max_steps ends the fit (it used to run forever)
    trainer.fit(OwnTrainingStep(), MNISTDataModule(data_dir=str(tiny_mnist), verify_checksums=False, val_size=100,
                                                  batch_size=32))
    assert trainer.global_step == 20


def test_manual_optimization_is_the_modules_own_loop(smoothed, tmp_path: Path, said):
    data, reference = smoothed
    cli = fit(data, tmp_path / "logs", "ManualOptimization")
    run = only_run(tmp_path / "logs")
    assert cli.model.loop == "manual" and not cli.model.automatic_optimization
    assert cli.trainer.global_step == STEPS and "ManualOptimization trains itself" in said()
    # Its loop takes the same steps as the fast path (zero_grad, backward, step, the schedule's step).
    assert_equal(net_weights(run), reference, "manual optimization vs the fast path's loss-only subclass")
    assert scalar(read_events(run), "train/loss") == pytest.approx(cli.model.seen, abs=1e-6)


def test_manual_optimization_without_a_step_of_its_own_is_the_fast_path_or_refused(smoothed, tmp_path: Path):
    data, _ = smoothed
    cli = fit(data, tmp_path / "fast", "ManualWithoutStep")
    assert cli.model.loop == "fast" and cli.trainer.global_step == STEPS
    message = pytest.raises(SystemExit, fit, data, tmp_path / "clip", "ManualWithoutStep",
                            "--trainer.limit_train_batches", "5").value.code
    assert "ManualWithoutStep sets automatic_optimization = False but writes no training_step" in message
    assert "--trainer.limit_train_batches is set" in message and "\n" not in message
    assert not list((tmp_path / "clip").glob("*/*/checkpoints/*.ckpt"))  # refused before any step


def test_its_own_optimizers_are_stepped_as_it_asks(tiny_mnist: Path, tmp_path: Path, said):
    cli = fit(tiny_mnist, tmp_path / "logs", "OwnOptimizers")
    run = only_run(tmp_path / "logs")
    assert cli.model.loop == "lightning" and "OwnOptimizers overrides configure_optimizers" in said()
    assert cli.trainer.global_step == STEPS
    lrs = scalar(read_events(run), "train/lr")  # one point per step: StepLR halves it after each epoch
    assert lrs == pytest.approx([0.05] * 16 + [0.025] * 16)
    assert not any(torch.equal(a, b) for a, b in zip(net_weights(run).values(), initial_weights().values(),
                                                     strict=True))


def test_its_own_validation_step_steps_the_pictures_aside(tiny_mnist: Path, tmp_path: Path,
                                                          said):
    cli = main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "2",
                        "--model", "research_modules.OwnValidation"))
    run = only_run(tmp_path / "logs")
    assert cli.model.loop == "fast" and cli.trainer.global_step == STEPS
    notice = said()
    assert "the val digits, confusion matrix and per-class accuracy step aside" in notice
    assert "OwnValidation.validation_step returns NoneType" in notice  # the method's own name
    events = read_events(run)
    assert len(scalar(events, "val/acc")) == 2 and "val/acc_best" not in events.Tags()["scalars"]  # not a false 0
    record = json.loads((run / "metrics.json").read_text())
    assert record["metrics"]["val/acc_best"] == max(scalar(events, "val/acc")) and record["metrics"]["test/acc"] > 0.5


def test_a_per_batch_hook_of_its_own_runs_on_every_batch(tiny_mnist: Path, tmp_path: Path):
    cli = fit(tiny_mnist, tmp_path / "logs", "PerBatchHook")
    assert cli.model.loop == "lightning" and cli.model.batches == list(range(16)) * 2
    assert cli.trainer.global_step == STEPS


def test_an_engine_hook_overridden_without_super_still_steps_the_schedule(tiny_mnist: Path, tmp_path: Path):
    cli = fit(tiny_mnist, tmp_path / "logs", "EpochEndWithoutSuper", "--model.lr_scheduler",
              "torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler.step_size", "1",
              "--model.lr_scheduler_interval", "epoch")
    assert cli.model.loop == "fast" and cli.model.epochs_ended == 2
    lrs = scalar(read_events(only_run(tmp_path / "logs")), "train/lr")
    assert lrs == pytest.approx([0.1] * 16 + [0.01] * 16)  # StepLR's gamma 0.1, after epoch 0


@pytest.mark.slow
def test_a_lightning_module_of_its_own_gets_the_run_machinery(tiny_mnist: Path, tmp_path: Path,
                                                             said):
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "2", "--model", "research_modules.Plain",
                    "--model.hidden", "24")
    cli = main(args)
    run = only_run(tmp_path / "logs")
    err = said()
    assert "--model research_modules.Plain does not take net, optimizer" in err  # the default's, dropped: said
    assert cli.trainer.global_step == STEPS and isinstance(cli.model.net, torch.nn.Module)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"] == {"class_path": "research_modules.Plain", "init_args": {"hidden": 24, "lr": 0.1}}
    record = json.loads((run / "metrics.json").read_text())
    assert record["metrics"]["test/acc"] > 0.5 and record["global_step"] == STEPS
    assert scalar(read_events(run), "test/acc") == [pytest.approx(record["metrics"]["test/acc"])]

    # The checkpoint alone rebuilds the class, in a new process: test, resume, export (the CLI's commands forked
    # from a server that never imported research_modules, the export a fresh interpreter).
    last = str(run / "checkpoints" / "last.ckpt")
    done = launch(["test", "--ckpt_path", last, "--torch_threads", "1",
                   "--trainer.logger.init_args.save_dir", str(tmp_path / "test")])
    assert done.returncode == 0, done.stderr[-3000:]
    tested = scalar(read_events(only_run(tmp_path / "test")), "test/acc")
    assert tested == [pytest.approx(record["metrics"]["test/acc"])]
    resume = launch(["fit", "--ckpt_path", last, "--torch_threads", "1", "--trainer.max_epochs", "3",
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "more")])
    assert resume.returncode == 0, resume.stderr[-3000:]
    resumed = only_run(tmp_path / "more")
    assert json.loads((resumed / "metrics.json").read_text())["global_step"] == 3 * 16
    assert yaml.safe_load((resumed / "config.yaml").read_text())["model"]["class_path"] == "research_modules.Plain"
    export = subprocess.run([sys.executable, "-m", "mnist_lit.export", last, "--format", "pt2"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert export.returncode == 0 and "largest difference" in export.stdout, export.stderr[-3000:]
    predict = launch(["predict", "--ckpt_path", last, "--trainer.logger.init_args.save_dir", str(tmp_path / "predict")])
    assert predict.returncode == 1 and "Plain has no predict_step" in predict.stderr
    assert "Traceback" not in predict.stderr and not list((tmp_path / "predict").glob("*/*/predictions.csv"))


@pytest.mark.slow
@pytest.mark.parametrize("model, fix", [
    ("nosuch.Module", "--model nosuch.Module cannot be imported (No module named 'nosuch')"),
    ("torch.nn.Linear", "--model torch.nn.Linear is not a LightningModule"),
    ("mnist_lit.examples.distillation.Distillation",
     "needs arguments that neither the config nor the command line gives: teacher_checkpoint"),
])
def test_a_model_class_that_cannot_be_used_is_refused_in_one_paragraph(tiny_mnist: Path, tmp_path: Path, model: str,
                                                                       fix: str, capfd: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(tiny_mnist, tmp_path / "logs", "--model", model))
    stderr = capfd.readouterr().err
    assert exit_.value.code == 2 and fix in stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr  # one paragraph, no usage
    assert not (tmp_path / "logs").exists()  # before any work


@pytest.mark.slow
def test_a_checkpoint_of_a_subclass_tests_and_resumes_as_that_class(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "fit", "--trainer.max_epochs", "1", "--test_after_fit", "false",
                  "--config", str(REPO / "configs" / "examples" / "focal.yaml"), "--model.gamma", "3"))
    last = only_run(tmp_path / "fit") / "checkpoints" / "last.ckpt"
    cli = main(["test", "--ckpt_path", str(last), "--torch_threads", "1",
                "--trainer.logger.init_args.save_dir", str(tmp_path / "test")])
    assert type(cli.model).__name__ == "FocalClassifier" and cli.model.gamma == 3
    cli = main(["fit", "--ckpt_path", str(last), "--torch_threads", "1", "--trainer.max_epochs", "2",
                "--model.finished_schedule", "restart", "--trainer.logger.init_args.save_dir", str(tmp_path / "more")])
    assert type(cli.model).__name__ == "FocalClassifier" and cli.trainer.global_step == STEPS
    message = pytest.raises(SystemExit, main, ["test", "--ckpt_path", str(last), "--model.gamma", "1",
                                               "--trainer.logger.init_args.save_dir", str(tmp_path / "x")]).value.code
    assert "model.gamma (3.0 there, 1.0 here)" in message  # a checkpoint's own loss is not changed beside it


@pytest.mark.slow
def test_a_checkpoint_written_before_model_took_a_class_still_tests_and_resumes(tiny_mnist: Path, tmp_path: Path):
    old = REPO / "tests" / "data" / "main-3eff60a-last.ckpt"  # written by main at 3eff60a: 2 epochs, MLP 16-16
    assert "class_path" not in yaml.safe_load(torch.load(old, weights_only=True)["run_config"])["model"]
    beside = ["--torch_threads", "1", "--data.data_dir", str(tiny_mnist), "--trainer.enable_progress_bar", "false"]
    cli = main(["test", "--ckpt_path", str(old), *beside, "--trainer.logger.init_args.save_dir", str(tmp_path / "t")])
    assert type(cli.model).__name__ == "MNISTClassifier" and cli.model.net.layers[1].out_features == 16
    test_acc = scalar(read_events(only_run(tmp_path / "t")), "test/acc")[0]
    assert test_acc > 0.9
    cli = main(["fit", "--ckpt_path", str(old), *beside, "--trainer.max_epochs", "3", "--model.finished_schedule",
                "restart", "--trainer.logger.init_args.save_dir", str(tmp_path / "f")])
    assert cli.trainer.global_step == 3 * 16 and cli.model.loop == "fast"
    message = pytest.raises(SystemExit, main, ["test", "--ckpt_path", str(old), *beside,
                                               "--model.net.init_args.hidden1", "32"]).value.code
    assert "model.net.init_args.hidden1 (16 there, 32 here)" in message


def test_label_smoothing_is_refused_for_a_module_whose_own_loss_it_would_not_reach(tiny_mnist: Path, tmp_path: Path):
    # FocalClassifier writes its own loss(): --model.label_smoothing would change nothing there, silently.
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "1", "--model.label_smoothing", "0.1")
    args[3:3] = ["--config", str(REPO / "configs" / "examples" / "focal.yaml")]
    with pytest.raises(SystemExit, match=r"error: --model.label_smoothing is 0.1, but FocalClassifier writes a "
                                         r"loss\(\) of its own"):
        main(args)
    assert not list((tmp_path / "logs").glob("*/*/checkpoints/*.ckpt"))  # refused before any step
