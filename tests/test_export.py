"""python -m mnist_lit.export: the artifact gives the checkpoint's probabilities on real digits, to 1e-5."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REAL_MNIST, REPO, fit_args, only_run, run_main
from mnist_lit.cli import main
from mnist_lit.export import main as export_main
from mnist_lit.export import run_artifact
from mnist_lit.idx import read_idx


def export_command(argv: list[str]) -> None:
    export_main(argv)  # as `python -m mnist_lit.export` runs it: what main returns (the difference) is no exit code


def real_digits(n: int = 500) -> torch.Tensor:
    path = REAL_MNIST / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        pytest.skip(f"real MNIST not found at {REAL_MNIST} (the shared data folder beside the repo)")
    return read_idx(path)[:n]


def checkpoint_probabilities(checkpoint: Path, data: Path, logs: Path, *extra: str) -> torch.Tensor:
    """What `python -m mnist_lit predict` makes of t10k with this checkpoint (the CSV keeps 6 decimals)."""
    main(["predict", "--ckpt_path", str(checkpoint),  # the checkpoint carries its run's config
          "--data.data_dir", str(data), "--data.eval_batch_size", "500", "--trainer.logger.init_args.save_dir",
          str(logs), "--trainer.enable_progress_bar", "false", *extra])
    with (only_run(logs) / "predictions.csv").open() as f:
        return torch.tensor([[float(r[f"p_{d}"]) for d in range(10)] for r in csv.DictReader(f)])


@pytest.fixture(scope="module")
def trained(real_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One epoch on real MNIST with [0, 1] inputs, and one standardized: their last.ckpt."""
    root = tmp_path_factory.mktemp("export")
    runs = {}
    for name, extra in (("plain", []), ("standardized", ["--data.standardize", "true"])):
        main(fit_args(real_mnist, root / name, "--trainer.max_epochs", "1", "--data.batch_size", "128",
                      "--data.val_size", "5000", "--trainer.log_every_n_steps", "50", *extra))
        runs[name] = only_run(root / name) / "checkpoints" / "last.ckpt"
    return runs


@pytest.mark.slow  # trains twice on real MNIST
@pytest.mark.parametrize(("run", "fmt"), [("plain", "onnx"), ("plain", "pt2"), ("standardized", "pt2")])
def test_artifact_matches_the_checkpoint_on_real_digits(trained, real_mnist: Path, tmp_path: Path, run: str,
                                                        fmt: str):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="pip install -e '.[export]' for ONNX")
    artifact = tmp_path / f"model.{fmt}"
    done = run_main(export_command, [str(trained[run]), "--format", fmt, "--output", str(artifact)])  # in this process
    assert done.returncode == 0, done.stderr[-3000:]
    assert "largest difference from the checkpoint" in done.stdout
    digits = real_digits(500)
    with torch.no_grad():
        exported = run_artifact(artifact, digits.float())
    expected = checkpoint_probabilities(trained[run], real_mnist, tmp_path / "logs",
                                        *(["--data.standardize", "true"] if run == "standardized" else []))
    assert exported.shape == (500, 10)
    assert (exported - expected[:500]).abs().max() < 1e-5  # the CSV's 6 decimals leave 5e-7 of it
    assert (exported.argmax(1) == expected[:500].argmax(1)).all()
    assert exported.max(1).values.mean() > 0.9  # a trained model, not a uniform one that would match anyway
    with torch.no_grad():  # any batch size: the first dimension is dynamic
        torch.testing.assert_close(run_artifact(artifact, digits[:3].float()), exported[:3], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_export_of_a_damaged_checkpoint_is_refused_in_one_paragraph(tmp_path: Path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 100)
    done = subprocess.run([sys.executable, "-m", "mnist_lit.export", str(bad)], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 1
    assert done.stderr.strip().startswith(f"error: {bad} is not a readable checkpoint")
    assert not (tmp_path / "bad.onnx").exists()
