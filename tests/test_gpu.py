"""GPU behaviour, skipped without CUDA: data resident on the device, mixed precision, FSDP, torch.compile.

Run on a GPU machine with `bash scripts/gpu_check.sh` (these tests, a bf16 fit and the benchmark).
"""

from pathlib import Path

import pytest
import torch

from conftest import REPO, fit_args, only_run, read_events, scalar
from mnist_lit.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_fit(data: Path, logs: Path, *extra: str) -> float:
    cli = main(fit_args(data, logs, "--trainer", str(REPO / "configs" / "trainer" / "gpu.yaml"),
                        "--trainer.max_epochs", "3", *extra))
    assert cli.trainer.train_dataloader.images.device.type == "cuda"  # the data set lives on the GPU
    return scalar(read_events(only_run(logs)), "val/acc")[-1]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_trains_on_gpu_in_each_precision(tiny_mnist: Path, tmp_path: Path, precision: str):
    val_acc = gpu_fit(tiny_mnist, tmp_path / "logs", "--trainer.precision", precision)
    print(f"{precision}: val/acc {val_acc:.4f}")
    assert val_acc > 0.9


def test_compiled_network_trains_on_gpu(tiny_mnist: Path, tmp_path: Path):
    assert gpu_fit(tiny_mnist, tmp_path / "logs", "--model.compile", "true") > 0.9


def test_fsdp_config_trains(tiny_mnist: Path, tmp_path: Path):
    main(fit_args(tiny_mnist, tmp_path / "logs", "--trainer", str(REPO / "configs" / "trainer" / "fsdp.yaml"),
                  "--trainer.devices", "1", "--trainer.max_epochs", "3"))
    assert scalar(read_events(only_run(tmp_path / "logs")), "val/acc")[-1] > 0.9
