"""Fashion-MNIST, KMNIST and data sets of one's own through the same DataModule, chosen by config."""

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REAL_FASHION, REPO, fit_args, only_run, write_mnist
from mnist_lit.cli import main
from mnist_lit.data import MNISTDataModule
from mnist_lit.idx import DATASETS, IDXDataset, MNISTDataError, read_split

FASHION = REPO / "configs" / "experiment" / "fashion.yaml"


def real_fashion_dir() -> Path:
    if not all((REAL_FASHION / f"{name}.gz").is_file() for name in DATASETS["fashion_mnist"].files):
        pytest.skip(f"Fashion-MNIST not found at {REAL_FASHION}: apt-get install -y dataset-fashion-mnist")
    return REAL_FASHION


def test_real_fashion_mnist_is_read_and_verified_from_debians_folder():
    data = MNISTDataModule(dataset="fashion_mnist", data_dir=str(real_fashion_dir()))
    data.setup("fit")  # verify_checksums is on: Debian recompressed the .gz, the uncompressed MD5s are the originals'
    assert data.raw_dir == REAL_FASHION
    assert {k: len(v[1]) for k, v in data.splits.items()} == {"train": 55000, "val": 5000, "test": 10000}
    assert torch.bincount(data.splits["test"][1]).tolist() == [1000] * 10
    assert data.classes[9] == "Ankle boot"


def test_fashion_experiment_config_trains_on_real_fashion_mnist(tmp_path: Path):
    data_dir = real_fashion_dir()
    args = fit_args(data_dir, tmp_path / "logs", "--trainer.max_epochs", "1", "--data.batch_size", "128",
                    "--data.val_size", "5000", "--data.verify_checksums", "true")
    args[3:3] = ["--config", str(FASHION)]  # composed over the default, as its comment says
    main(args)
    accuracy = json.loads((only_run(tmp_path / "logs") / "metrics.json").read_text())["metrics"]["test/acc"]
    assert 0.78 < accuracy < 0.93  # one epoch of an MLP: well above chance, well below MNIST's 0.97


def test_kmnist_is_verified_by_the_md5_of_torchvisions_download(tmp_path: Path):
    root = write_mnist(tmp_path, folder="KMNIST")
    data = MNISTDataModule(dataset="kmnist", data_dir=str(root), val_size=100)
    expected = r"KMNIST/raw/train-images-idx3-ubyte.gz cannot be verified .*its MD5 is \w+, expected bdb82020997e1d7"
    with pytest.raises(MNISTDataError, match=expected + r".*verify_checksums false"):
        data.setup("fit")
    MNISTDataModule(dataset="kmnist", data_dir=str(root), val_size=100, verify_checksums=False).setup("fit")


def test_a_gz_with_the_published_md5_passes_and_an_uncompressed_copy_is_refused_when_only_that_is_known(tmp_path):
    raw = write_mnist(tmp_path).joinpath("MNIST", "raw")
    gz_md5 = {n: hashlib.md5((raw / f"{n}.gz").read_bytes()).hexdigest() for n in DATASETS["mnist"].files}
    only_gz = IDXDataset("Mine", "MNIST", tuple("0123456789"), {n: (None, md5) for n, md5 in gz_md5.items()})
    images, labels = read_split(raw, "train", verify=True, dataset=only_gz)
    assert images.shape == (600, 28, 28)
    name = "train-images-idx3-ubyte"
    (raw / name).write_bytes(gzip.decompress((raw / f"{name}.gz").read_bytes()))
    (raw / f"{name}.gz").unlink()
    with pytest.raises(MNISTDataError, match="uncompressed, and only the MD5 of the published .gz is known"):
        read_split(raw, "train", verify=True, dataset=only_gz)


def test_missing_fashion_files_are_named_with_their_folder(tmp_path: Path):
    data = MNISTDataModule(dataset="fashion_mnist", data_dir=str(tmp_path), download=False)
    with pytest.raises(MNISTDataError, match=r"Fashion-MNIST files are missing from .*FashionMNIST/raw: "
                                             r"train-images-idx3-ubyte.gz.*--data.download true"):
        data.setup("fit")


def test_a_folder_holding_the_four_files_directly_is_read(tmp_path: Path):
    root = write_mnist(tmp_path / "nested")
    flat = tmp_path / "flat"
    shutil.copytree(root / "MNIST" / "raw", flat)
    data = MNISTDataModule(data_dir=str(flat), val_size=100, verify_checksums=False)
    data.setup("fit")
    assert data.raw_dir == flat and len(data.splits["train"][1]) == 500


def test_unknown_dataset_name_lists_the_choices(capsys: pytest.CaptureFixture, tmp_path: Path):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "default.yaml"), "--data.dataset", "cifar"])
    assert "fashion_mnist" in capsys.readouterr().err
