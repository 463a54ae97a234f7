"""--data takes any LightningDataModule by class path, as --model takes any LightningModule: a plain Lightning data
module of another shape and class count trains, tests from its checkpoint alone, and what it cannot give the model
is refused before the first step, in one paragraph naming the data module and the fix."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, fails_with, only_run
from mnist_lit.cli import main
from mnist_lit.export import main as export

OWN = ("--data", "own_data.TwoChannels")


def own_args(logs: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "configs" / "default.yaml"), "--torch_threads", "1",
            "--trainer.logger.init_args.save_dir", str(logs), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.max_epochs", "2", *OWN, *extra]


def test_a_data_module_of_your_own_trains_and_tests_from_its_checkpoint_alone(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture):
    main(own_args(tmp_path / "logs"))  # its class count and shape reach the model and the MLP by themselves
    assert ("sized to --data own_data.TwoChannels: --model.num_classes 2, --model.net.num_classes 2, "
            "--model.net.in_features 392") in caplog.text
    run = only_run(tmp_path / "logs")
    stored = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
    assert stored["num_classes"] == stored["net"]["init_args"]["num_classes"] == 2  # and travel with the run
    fitted = json.loads((run / "metrics.json").read_text())
    assert fitted["metrics"]["test/acc"] > 0.9  # chance is 0.5
    main(["test", "--ckpt_path", fitted["best_checkpoint"]])  # the data module's class and arguments come with it
    tested = json.loads((run / "test" / "version_0" / "metrics.json").read_text())
    assert tested["metrics"]["test/acc"] == fitted["metrics"]["test/acc"]
    # per-example results pair too: the examples identified by a digest of the inputs as served
    identities = [json.loads((folder / "per_example" / "test.json").read_text()) for folder in (run, run / "test"
                                                                                                  / "version_0")]
    assert identities[0]["digest"] == identities[1]["digest"] and identities[0]["rows"] == 128
    assert identities[0]["data_module"] == "own_data.TwoChannels" and identities[0]["classes"] == 2
    with pytest.raises(SystemExit) as exit_:  # export knows MNIST's pixels only, so far: refused, not a traceback
        export([fitted["best_checkpoint"], "--format", "pt2"])
    assert "was trained on --data own_data.TwoChannels, and export takes checkpoints of" in str(exit_.value.code)


@pytest.mark.parametrize("case, extra, said", [
    ("a network for 28x28 images", ("--model.net", "mnist_lit.model.SmallCNN"),  # its num_classes: the data's
     "The network SmallCNN cannot take the inputs of --data own_data.TwoChannels, one example of shape (2, 14, 14) "
     "(392 values)"),
    ("a class count that contradicts the data", ("--model.num_classes", "3"),
     "--model.num_classes is 3, but --data own_data.TwoChannels gives 2 (its num_classes): give 2, or leave "
     "--model.num_classes at its default to take the data module's"),
    ("labels beyond the classes it declares", ("--data.init_args.classes", "4", "--data.init_args.declared", "2"),
     "--data own_data.TwoChannels serves the label 3, outside the 2 classes the model counts (0 to 1)"),
    ("batches that are not pairs", ("--data.init_args.pairs", "false",),
     "--data own_data.TwoChannels serves batches of a dict, but the template trains on (inputs, targets) pairs"),
])
def test_what_the_model_cannot_take_is_refused_before_the_first_step(tmp_path: Path, case: str, extra, said: str):
    message = fails_with(own_args(tmp_path / "logs", *extra))
    assert said in message, message
    assert not list((tmp_path / "logs").glob("*/version_*"))  # refused before any step: no run folder left


def test_a_class_that_is_not_a_data_module_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_:
        main(own_args(tmp_path / "logs", "--data", "torch.nn.Linear"))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: --data torch.nn.Linear is not a LightningDataModule")
