"""Every evaluation on labelled data leaves each example's prediction in the run folder, with the identity of the
examples, so that two runs can be paired example by example: the fit's test pass, the best epoch's validation, and
test --ckpt_path in a process of its own."""

import csv
import hashlib
import json
import re
from pathlib import Path

import pytest

from conftest import fit_args, learnable_digits, only_run
from mnist_lit.cli import main


def rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_the_fit_and_a_test_of_its_checkpoint_leave_per_example_results_that_pair(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "3"))
    run = only_run(tmp_path / "logs")
    fitted = json.loads((run / "metrics.json").read_text())
    test = rows(run / "per_example" / "test.csv")
    images, labels = learnable_digits(200, seed=1)  # what conftest wrote as the tiny t10k, in its order
    assert [int(r["label"]) for r in test] == labels.tolist()
    for r in test:  # the predicted class is the most probable one, and the probabilities are a distribution
        p = [float(r[f"p_{c}"]) for c in range(10)]
        assert int(r["predicted"]) == p.index(max(p)) and sum(p) == pytest.approx(1, abs=1e-4)
    accuracy = sum(r["label"] == r["predicted"] for r in test) / len(test)
    assert accuracy == pytest.approx(fitted["metrics"]["test/acc"])
    identity = json.loads((run / "per_example" / "test.json").read_text())
    assert identity["digest"] == hashlib.sha256(images.numpy().tobytes() + labels.long().numpy().tobytes()).hexdigest()
    assert identity["rows"] == 200 and identity["split"] == "test" and identity["dataset"] == "MNIST"

    val = json.loads((run / "per_example" / "val.json").read_text())  # the best epoch's, not the last one's
    assert val["epoch"] == int(re.search(r"best-epoch(\d+)", fitted["best_checkpoint"])[1])
    assert val["accuracy"] == pytest.approx(fitted["metrics"]["val/acc_best"]) and val["rows"] == 100

    main(["test", "--ckpt_path", fitted["best_checkpoint"]])  # another process would give the same
    again = run / "test" / "version_0" / "per_example"
    assert rows(again / "test.csv") == test  # the same examples, the same predictions: paired row by row
    assert json.loads((again / "test.json").read_text())["digest"] == identity["digest"]

    main(["test", "--ckpt_path", fitted["best_checkpoint"], "--data.eval_batch_size", "50",
          "--trainer.limit_test_batches", "2"])  # the first 100 examples only: the identity says which
    cut = json.loads((run / "test" / "version_1" / "per_example" / "test.json").read_text())
    first = hashlib.sha256(images[:100].numpy().tobytes() + labels[:100].long().numpy().tobytes()).hexdigest()
    assert cut["rows"] == 100 and cut["digest"] == first
