"""docs/extending.md, run: a swapped network by config alone, and runs that repeat exactly."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO, fit_args, only_run, read_events, scalar, write_mnist
from mnist_lit.cli import main

EXPERIMENT = REPO / "configs" / "experiment" / "cnn.yaml"


def test_each_walkthrough_config_is_the_shipped_file_it_names():
    doc = (REPO / "docs" / "extending.md").read_text()
    blocks = re.findall(r"`(configs/experiment/[\w.]+\.yaml)`:\n\n   ```yaml\n(.*?)```", doc, flags=re.S)
    assert [name for name, _ in blocks] == ["configs/experiment/cnn.yaml", "configs/experiment/fashion.yaml",
                                            "configs/experiment/own_dataset.yaml"]
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


def test_walkthrough_trains_a_cnn_and_its_checkpoint_tests_in_a_new_process(tiny_mnist: Path, tmp_path: Path):
    args = fit_args(tiny_mnist, tmp_path / "fit")
    args[3:3] = ["--config", str(EXPERIMENT)]  # composed right after the default config, as in the doc
    main(args)
    run = only_run(tmp_path / "fit")
    assert scalar(read_events(run), "val/acc")[-1] > 0.9
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["net"]["class_path"] == "mnist_lit.model.SmallCNN"
    assert any(k.startswith("net.layers.1.weight") and v.dim() == 4 for k, v in ckpt["state_dict"].items())

    last = str(run / "checkpoints" / "last.ckpt")  # the checkpoint alone: the CNN comes back from it
    test_args = ["test", "--ckpt_path", last, "--trainer.logger.init_args.save_dir", str(tmp_path / "test")]
    done = subprocess.run([sys.executable, "-m", "mnist_lit", *test_args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert scalar(read_events(only_run(tmp_path / "test")), "test/acc")[0] > 0.9
    beside = [*test_args, "--config", str(REPO / "configs" / "default.yaml")]  # names the MLP: refused, by name
    done = subprocess.run([sys.executable, "-m", "mnist_lit", *beside], capture_output=True, text=True)
    assert done.returncode == 1 and "model.net.class_path ('mnist_lit.model.SmallCNN' there" in done.stderr


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
