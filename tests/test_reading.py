"""Reading IDX files: what a user's data folder can hold, good or bad, and what they are told."""

import gzip
import hashlib
from pathlib import Path

import pytest
import torch

from conftest import idx_bytes, learnable_digits, write_idx, write_mnist
from mnist_lit.data import MNISTDataModule
from mnist_lit.idx import DATASETS, MNISTDataError, read_idx, read_split


@pytest.mark.parametrize("gz", [True, False])
def test_reads_back_what_was_written(tmp_path: Path, gz: bool):
    images, labels = learnable_digits(50, seed=3)
    assert torch.equal(read_idx(write_idx(tmp_path / "img", images, gz)), images)
    assert torch.equal(read_idx(write_idx(tmp_path / "lab", labels, gz)), labels)


def test_md5_of_the_uncompressed_bytes_is_checked(tmp_path: Path):
    images, _ = learnable_digits(20, seed=0)
    path = write_idx(tmp_path / "img", images)
    good = hashlib.md5(idx_bytes(images)).hexdigest()
    assert torch.equal(read_idx(path, md5=good), images)
    with pytest.raises(MNISTDataError, match=r"not the original file.*verify_checksums false"):
        read_idx(path, md5="0" * 32)


def corrupt_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    images, _ = learnable_digits(20, seed=0)
    data = idx_bytes(images)
    compressed = gzip.compress(data)
    cases = {
        "truncated payload": (data[:-100], "is truncated"),
        "trailing bytes": (data + b"\0" * 7, "has trailing bytes"),
        "wrong magic": (b"\x00\x00\x0d\x03" + data[4:], "magic number is 00000d03"),
        "cut inside header": (data[:9], "ends inside its header"),
        "empty file": (b"", "magic number is missing"),
    }
    paths = {}
    for name, (content, message) in cases.items():
        path = tmp_path / name.replace(" ", "_")
        path.write_bytes(content)
        paths[name] = (path, message)
    crc = bytearray(compressed)
    crc[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    paths["gzip CRC error"] = (tmp_path / "crc.gz", "not a complete gzip file")
    paths["gzip CRC error"][0].write_bytes(bytes(crc))
    paths["gzip cut short"] = (tmp_path / "short.gz", "not a complete gzip file")
    paths["gzip cut short"][0].write_bytes(compressed[: len(compressed) // 2])
    return paths


@pytest.mark.parametrize("case", ["truncated payload", "trailing bytes", "wrong magic", "cut inside header",
                                  "empty file", "gzip CRC error", "gzip cut short"])
def test_damaged_file_gets_one_paragraph_naming_it_and_the_fix(tmp_path: Path, case: str):
    path, message = corrupt_cases(tmp_path)[case]
    with pytest.raises(MNISTDataError) as error:
        read_idx(path)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text
    assert "download it again" in text


def test_images_and_labels_must_agree(tmp_path: Path):
    raw = tmp_path / "raw"
    images, labels = learnable_digits(30, seed=0)
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-labels-idx1-ubyte", labels[:29])
    with pytest.raises(MNISTDataError, match="holds 29 labels .* but .* holds 30 images"):
        read_split(raw, "train", verify=False)


def test_images_must_be_28_by_28(tmp_path: Path):
    raw = tmp_path / "raw"
    write_idx(raw / "train-images-idx3-ubyte", torch.zeros(5, 32, 32, dtype=torch.uint8))
    write_idx(raw / "train-labels-idx1-ubyte", torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(MNISTDataError, match=r"shape \[32, 32\], expected 28x28"):
        read_split(raw, "train", verify=False)


def test_labels_must_be_digits(tmp_path: Path):
    raw = tmp_path / "raw"
    write_idx(raw / "train-images-idx3-ubyte", torch.zeros(5, 28, 28, dtype=torch.uint8))
    write_idx(raw / "train-labels-idx1-ubyte", torch.tensor([1, 2, 3, 12, 0], dtype=torch.uint8))
    with pytest.raises(MNISTDataError, match="label 12"):
        read_split(raw, "train", verify=False)


def test_gzipped_and_raw_files_can_be_mixed(tmp_path: Path):
    root = write_mnist(tmp_path / "data", gz=False)
    raw = root / "MNIST" / "raw"
    (raw / "t10k-images-idx3-ubyte").rename(raw / "t10k-images-idx3-ubyte.tmp")
    write_idx(raw / "t10k-images-idx3-ubyte", read_idx(raw / "t10k-images-idx3-ubyte.tmp"), gz=True)
    data = MNISTDataModule(data_dir=str(root), verify_checksums=False, val_size=100)
    data.setup("fit")
    assert len(data.splits["test"][0]) == 200 and len(data.splits["train"][0]) == 500


def test_offline_without_files_names_the_folder_and_the_four_files(tmp_path: Path):
    data = MNISTDataModule(data_dir=str(tmp_path / "empty"), download=False)
    with pytest.raises(MNISTDataError) as error:
        data.setup("fit")
    text = str(error.value)
    assert str((tmp_path / "empty" / "MNIST" / "raw").resolve()) in text and "\n" not in text
    assert all(f"{name}.gz" in text for name in DATASETS["mnist"].files)


def test_failed_download_says_what_to_copy_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # torchvision's real downloader, pointed at a mirror folder that does not exist: no network is touched.
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", [f"file://{tmp_path}/no-mirror/"])
    data = MNISTDataModule(data_dir=str(tmp_path / "data"), download=True)
    with pytest.raises(MNISTDataError, match=r"missing from .*MNIST/raw.*the download failed") as error:
        data.prepare_data()
    assert "\n" not in str(error.value)
