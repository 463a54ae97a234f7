"""docs/extending.md, run: a swapped network by config alone, and runs that repeat exactly."""

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO, fails_with, fit_args, launch, only_run, read_events, scalar, write_mnist
from mnist_lit.cli import main

EXPERIMENT = REPO / "configs" / "experiment" / "cnn.yaml"


def test_each_walkthrough_config_is_the_shipped_file_it_names():
    doc = (REPO / "docs" / "extending.md").read_text()
    blocks = re.findall(r"`(configs/(?:experiment|examples)/[\w.]+\.yaml)`:\n\n   ```yaml\n(.*?)```", doc, flags=re.S)
    assert [name for name, _ in blocks] == [f"configs/{name}.yaml" for name in
                                            ("experiment/cnn", "examples/focal", "examples/distill",
                                             "experiment/fashion", "experiment/own_dataset")]
    for name, block in blocks:
        assert "\n".join(line[3:] for line in block.splitlines()).strip() == (REPO / name).read_text().strip()


def test_walkthrough_trains_on_a_data_set_of_ones_own(tmp_path: Path):
    data = write_mnist(tmp_path / "data", folder="MyDigits")  # the folder own_dataset.yaml names
    args = fit_args(data, tmp_path / "logs", "--trainer.max_epochs", "2")
    args[3:3] = ["--config", str(REPO / "configs" / "experiment" / "own_dataset.yaml")]
    main(args)
    run = only_run(tmp_path / "logs")
    assert json.loads((run / "metrics.json").read_text())["metrics"]["test/acc"] > 0.9
    assert "title: My digits" in (run / "config.yaml").read_text()
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["dataset"]["classes"][:2] == ["zero", "one"]


@pytest.mark.slow
def test_walkthrough_trains_a_cnn_and_its_checkpoint_tests_in_a_new_process(tiny_mnist: Path, tmp_path: Path):
    args = fit_args(tiny_mnist, tmp_path / "fit")
    args[3:3] = ["--config", str(EXPERIMENT)]  # composed right after the default config, as in the doc
    main(args)
    run = only_run(tmp_path / "fit")
    assert scalar(read_events(run), "val/acc")[-1] > 0.9
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["net"]["class_path"] == "mnist_lit.model.SmallCNN"
    assert ckpt["hyper_parameters"]["_class_path"] == "mnist_lit.model.MNISTClassifier"
    assert any(k.startswith("net.layers.1.weight") and v.dim() == 4 for k, v in ckpt["state_dict"].items())

    last = str(run / "checkpoints" / "last.ckpt")  # the checkpoint alone: the CNN comes back from it
    test_args = ["test", "--ckpt_path", last, "--trainer.logger.init_args.save_dir", str(tmp_path / "test")]
    done = launch(test_args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert scalar(read_events(only_run(tmp_path / "test")), "test/acc")[0] > 0.9
    beside = [*test_args, "--config", str(REPO / "configs" / "default.yaml")]  # names the MLP: refused, by name
    done = launch(beside)
    assert done.returncode == 1 and "model.net.class_path ('mnist_lit.model.SmallCNN' there" in done.stderr


@pytest.mark.slow
def test_same_config_and_seed_repeat_bit_for_bit(tiny_mnist: Path, tmp_path: Path):
    results = []
    for name in ("a", "b"):
        main(fit_args(tiny_mnist, tmp_path / name, "--trainer.max_epochs", "2"))
        run = only_run(tmp_path / name)
        results.append((torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"],
                        scalar(read_events(run), "val/loss")))
    (weights_a, loss_a), (weights_b, loss_b) = results
    assert loss_a == loss_b
    assert all(torch.equal(t, weights_b[k]) for k, t in weights_a.items())
    main(fit_args(tiny_mnist, tmp_path / "c", "--trainer.max_epochs", "2", "--seed_everything", "1"))
    other = torch.load(only_run(tmp_path / "c") / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not torch.equal(other["net.layers.1.weight"], weights_a["net.layers.1.weight"])  # the seed matters


def experiment(name: str) -> list[str]:
    folder = "examples" if name in ("focal", "distill") else "experiment"  # the worked examples' configs
    return ["--config", str(REPO / "configs" / folder / f"{name}.yaml")]


def net_of(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.")}


@pytest.mark.slow
def test_walkthrough_trains_the_focal_loss_on_the_fast_path(tiny_mnist: Path, tmp_path: Path):
    args = fit_args(tiny_mnist, tmp_path / "focal", "--trainer.max_epochs", "2")
    args[3:3] = experiment("focal")
    cli = main(args)
    run = only_run(tmp_path / "focal")
    assert type(cli.model).__name__ == "FocalClassifier" and cli.model.loop == "fast"
    assert json.loads((run / "metrics.json").read_text())["metrics"]["test/acc"] > 0.8  # chance is 0.1
    main(fit_args(tiny_mnist, tmp_path / "ce", "--trainer.max_epochs", "2"))
    ce = net_of(only_run(tmp_path / "ce"))
    assert not any(torch.equal(t, ce[k]) for k, t in net_of(run).items())  # the loss it trained on is its own
    zero = fit_args(tiny_mnist, tmp_path / "gamma0", "--trainer.max_epochs", "2", "--model.gamma", "0")
    zero[3:3] = experiment("focal")
    main(zero)  # gamma 0 is cross-entropy: the same SGD steps, to rounding
    assert all(torch.allclose(t, ce[k], atol=1e-5) for k, t in net_of(only_run(tmp_path / "gamma0")).items())


@pytest.mark.slow
def test_walkthrough_distils_a_student_from_a_teachers_checkpoint(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "teacher", "--trainer.max_epochs", "2", "--test_after_fit", "false"))
    teacher = only_run(tmp_path / "teacher") / "checkpoints" / "last.ckpt"

    def student(logs: str, *extra: str):
        args = fit_args(tiny_mnist, tmp_path / logs, "--trainer.max_epochs", "2", "--model.teacher_checkpoint",
                        str(teacher), "--model.net.init_args.hidden1", "32", "--model.net.init_args.hidden2", "16",
                        *extra)
        args[3:3] = experiment("distill")
        return main(args), only_run(tmp_path / logs)

    cli, run = student("student")
    assert type(cli.model).__name__ == "Distillation" and cli.model.loop == "fast"
    assert json.loads((run / "metrics.json").read_text())["metrics"]["test/acc"] > 0.8  # chance is 0.1
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "net.layers.1.weight" in state and not any(k.startswith("teacher") for k in state)  # the student alone
    # alpha 0 is plain cross-entropy: bit for bit the student trained without a teacher; alpha 1 is the teacher's.
    _, alone = student("alpha0", "--model.alpha", "0")
    main(fit_args(tiny_mnist, tmp_path / "ce", "--trainer.max_epochs", "2", "--model.net.init_args.hidden1", "32",
                  "--model.net.init_args.hidden2", "16"))
    ce = net_of(only_run(tmp_path / "ce"))
    assert all(torch.equal(t, ce[k]) for k, t in net_of(alone).items())
    assert not any(torch.equal(t, ce[k]) for k, t in net_of(run).items())

    teacher.rename(teacher.with_name("moved.ckpt"))  # a student's checkpoint tests without its teacher
    last = str(run / "checkpoints" / "last.ckpt")
    done = launch(["test", "--ckpt_path", last, "--torch_threads", "1",
                   "--trainer.logger.init_args.save_dir", str(tmp_path / "test")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert scalar(read_events(only_run(tmp_path / "test")), "test/acc")[0] > 0.8
    teacher.with_name("moved.ckpt").rename(teacher)

    args = fit_args(tiny_mnist, tmp_path / "other", "--model.teacher_checkpoint", str(teacher),
                    "--data.standardize", "true")  # a teacher that saw other pixels: refused before any step
    args[3:3] = experiment("distill")
    message = fails_with(args)
    assert "standardize (False there, True here)" in message
    assert not list((tmp_path / "other").glob("*/*/checkpoints/*.ckpt"))
