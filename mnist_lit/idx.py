"""MNIST-format data sets on disk: the four IDX files of each, found, read and verified.

    python -m mnist_lit fit --config configs/default.yaml --data.dataset fashion_mnist

``read_idx`` checks each file (gzip stream, magic number, dimensions against size, MD5 of the
original bytes) and returns a uint8 tensor; ``read_split`` reads one official split's images and
labels and cross-checks them; ``DATASETS`` names the built-in data sets and their checksums. Every
problem is an ``MNISTDataError`` whose message names the file and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class IDXDataset:
    """A 28x28, 10-class data set in MNIST's four-file IDX layout, as torchvision names and stores it.

    Args:
        title: the name error messages use.
        folder: files live in ``<data_dir>/<folder>/raw/``; a ``torchvision.datasets`` class of that
            name downloads missing ones.
        classes: the names of labels 0..9, in order (predictions and reports use them).
        files: MNIST's four file names -> the MD5s that prove each original: of its uncompressed bytes
            and of torchvision's ``.gz`` download (None where unknown; both None: not checked).
    """

    title: str
    folder: str
    classes: tuple[str, ...]
    files: dict[str, tuple[str | None, str | None]]


DATASETS = {
    "mnist": IDXDataset("MNIST", "MNIST", tuple("0123456789"), {  # checksums: shared/datasets/README.md
        "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", "d53e105ee54ea40749a09fcbcd1e9432"),
        "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", "9fb629c4189551a2d022fa330f9573f3"),
        "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", "ec29112dd5afa0611ce80d1b7f02629c"),
    }),
    "fashion_mnist": IDXDataset("Fashion-MNIST", "FashionMNIST", (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"), {
        "train-images-idx3-ubyte": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "train-labels-idx1-ubyte": ("9018921c3c673c538a1fc5bad174d6f9", "25c81989df183df01b3e8a0aad5dffbe"),
        "t10k-images-idx3-ubyte": ("8181f5470baa50b63fa0f6fddb340f0a", "bef4ecab320f06d8554ea6380940ec79"),
        "t10k-labels-idx1-ubyte": ("15d484375f8d13e6eb1aabb0c3f46965", "bb300cfdad3c16e7a12a480ee83cd310"),
    }),
    "kmnist": IDXDataset("KMNIST", "KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"), {
        "train-images-idx3-ubyte": (None, "bdb82020997e1d708af4cf47b453dcf7"),
        "train-labels-idx1-ubyte": (None, "e144d726b3acfaa3e44228e80efcd344"),
        "t10k-images-idx3-ubyte": (None, "5c965bf0a639b31b8f53240b1b52f4d7"),
        "t10k-labels-idx1-ubyte": (None, "7320c461ea6c1c855c0b718fb2a4b134"),
    }),
}
IDX_UINT8 = 0x08  # the IDX type code of unsigned bytes, the only one MNIST uses


class MNISTDataError(RuntimeError):
    """A data problem the user can fix; its message is one paragraph naming the file and the fix."""


def read_idx(path: Path, md5: str | None = None, gz_md5: str | None = None) -> torch.Tensor:
    """Read one IDX file (``.gz`` or raw) into a uint8 tensor of the shape its header declares.

    Checks, in order: the gzip stream is whole, the magic number says uint8 with 1-3 dims, the
    payload holds exactly prod(dims) bytes, and (when a checksum is given) the file is the original:
    a ``.gz`` whose bytes have MD5 ``gz_md5`` is; otherwise the uncompressed bytes must have ``md5``.
    """
    fix = f"Delete {path} and download it again (or copy a good copy there)."
    try:
        stored = path.read_bytes()
        compressed = path.suffix == ".gz"
        raw = gzip.decompress(stored) if compressed else stored
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise MNISTDataError(f"{path} is not a complete gzip file ({err}); it was probably cut "
                             f"short or damaged while downloading. {fix}") from None
    except OSError as err:
        raise MNISTDataError(f"Cannot read {path}: {err.strerror or err}. Check that the file "
                             "exists and that you may read it.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UINT8 or not 1 <= raw[3] <= 3:
        raise MNISTDataError(f"{path} is not an IDX file of unsigned bytes: its magic number is "
                             f"{raw[:4].hex() or 'missing'}, expected 000008 followed by 01 (labels) "
                             f"or 03 (images). {fix}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MNISTDataError(f"{path} ends inside its header ({len(raw)} bytes). {fix}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + torch.Size(dims).numel()
    if len(raw) != expected:
        what = "is truncated" if len(raw) < expected else "has trailing bytes"
        raise MNISTDataError(f"{path} {what}: its header declares dims {dims}, i.e. {expected} bytes, "
                             f"but it holds {len(raw)}. {fix}")
    if gz_md5 is not None and compressed and hashlib.md5(stored).hexdigest() == gz_md5:
        pass  # torchvision's very download
    elif md5 is not None and hashlib.md5(raw).hexdigest() != md5:
        raise MNISTDataError(f"{path} is a well-formed IDX file but not the original file (MD5 of its "
                             f"uncompressed bytes is {hashlib.md5(raw).hexdigest()}, expected {md5}). "
                             f"{fix} If you changed it on purpose, set --data.verify_checksums false.")
    elif md5 is None and gz_md5 is not None:
        what = ("its MD5 is " + hashlib.md5(stored).hexdigest() + f", expected {gz_md5}" if compressed
                else "it is uncompressed, and only the MD5 of the published .gz is known")
        raise MNISTDataError(f"{path} cannot be verified as the original file ({what}). {fix} Keep the .gz "
                             "file as downloaded, or set --data.verify_checksums false.")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).view(dims)


def find_idx(raw_dir: Path, name: str, gz_first: bool = False) -> Path | None:
    """The file torchvision would have saved as ``name``, uncompressed or gzipped, if present."""
    candidates = (raw_dir / f"{name}.gz", raw_dir / name) if gz_first else (raw_dir / name, raw_dir / f"{name}.gz")
    return next((p for p in candidates if p.is_file()), None)


def read_split(raw_dir: Path, prefix: str, verify: bool,
               dataset: IDXDataset = DATASETS["mnist"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) and labels (N,) of one official split ('train' or 't10k'), cross-checked."""
    names = [f"{prefix}-{kind}" for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    # Where only the .gz checksum is published (KMNIST), torchvision's .gz is the verifiable copy.
    images_path, labels_path = (find_idx(raw_dir, n, gz_first=verify and dataset.files[n][0] is None) for n in names)
    images, labels = (read_idx(p, *(dataset.files[n] if verify else (None, None)))
                      for p, n in zip((images_path, labels_path), names, strict=True))
    if images.dim() != 3 or images.shape[1:] != (28, 28):
        raise MNISTDataError(f"{images_path} holds images of shape {list(images.shape[1:])}, expected "
                             f"28x28 (N, 28, 28). Replace it with the {dataset.title} images file.")
    if labels.dim() != 1 or len(labels) != len(images):
        raise MNISTDataError(f"{labels_path} holds {len(labels)} labels (dims {list(labels.shape)}) but "
                             f"{images_path} holds {len(images)} images: the two files do not belong "
                             "together. Replace both with the files of one download.")
    if labels.numel() and labels.max() > 9:
        raise MNISTDataError(f"{labels_path} holds label {labels.max().item()}; {dataset.title} labels are 0-9. "
                             "Replace it.")
    return images, labels.long()  # cross_entropy wants int64 class indices
