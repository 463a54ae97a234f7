"""MNIST (or Fashion-MNIST, KMNIST) from IDX bytes on disk to batches on the training device.

    python -m mnist_lit fit --config configs/default.yaml --data.data_dir data
    python -m mnist_lit fit --config configs/default.yaml --data.dataset fashion_mnist

The path of one batch: the four IDX files under ``<data_dir>/MNIST/raw/`` (``FashionMNIST/raw/``,
``KMNIST/raw/`` or a declared folder for the others; gzipped or not) are read once and verified
(magic number, dimensions, counts, MD5 of the original bytes), kept as uint8 tensors (all of
MNIST is 55 MB), split 55,000/5,000 by a seeded generator, moved to the training device, and
served as index-gathered batches normalized on the fly.
No per-sample Python, PIL or DataLoader work: an epoch is one ``randperm`` and a gather per
batch. Under DDP every rank takes its own disjoint shard of the epoch's permutation.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from jsonargparse.typing import PositiveInt

from mnist_lit.augment import RandomAffine
from mnist_lit.predict import load_images


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


class ShardedShuffle:
    """The rows one rank visits in an epoch: a seeded permutation, cut into disjoint per-rank shards.

    Every rank draws the same permutation (same seed, same epoch) and takes every
    ``world_size``-th entry, so across ranks each row is visited once per epoch. Training drops
    the ``n % world_size`` rows left over (different ones each epoch) so that every rank runs the
    same number of steps, as DDP requires; evaluation (``shuffle=False``) drops nothing.
    Lightning calls ``set_epoch`` before each epoch (it looks for ``loader.sampler.set_epoch``).
    """

    def __init__(self, num_rows: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.shuffle:
            return self.num_rows // self.world_size
        return len(range(self.rank, self.num_rows, self.world_size))

    def indices(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.rank, self.num_rows, self.world_size)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_rows, generator=generator)
        return order[self.rank::self.world_size][: len(self)]


class InMemoryBatches:
    """(x, y) batches gathered by index from uint8 tensors that already live on the training device.

    x is (B, 784) float, normalized on the fly as ``pixel * scale + shift``; y is (B,) int64.
    """

    batch_sampler = None  # Lightning inspects loader.sampler (set_epoch) and loader.batch_sampler

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, sampler: ShardedShuffle,
                 scale: float, shift: float, augment: RandomAffine | None = None):
        self.images, self.labels, self.batch_size, self.sampler = images, labels, batch_size, sampler
        self.scale, self.shift, self.augment = scale, shift, augment
        self.batches_done, self.resume = 0, None  # (epoch, batches) to skip after a mid-epoch restore

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        skip = self.resume[1] if self.resume and self.resume[0] == self.sampler.epoch else 0
        self.resume, self.batches_done = None, skip
        for rows in self.sampler.indices().to(self.images.device).split(self.batch_size)[skip:]:
            x = self.images[rows].float()  # (B, 28, 28) pixel values 0..255
            if self.augment is not None:  # seeded by (run, epoch, batch, rank): a resumed run draws the same
                seed = hash((self.sampler.seed, self.sampler.epoch, self.batches_done, self.sampler.rank))
                x = self.augment(x, torch.Generator().manual_seed(seed % 2**63))
            self.batches_done += 1
            yield x.flatten(1).mul_(self.scale).add_(self.shift), self.labels[rows]  # (B, 784), (B,)

    def position(self) -> tuple[int, int]:
        """(epoch, batches served in it): saved in checkpoints by MNISTDataModule.state_dict."""
        return self.sampler.epoch, self.batches_done


class MNISTDataModule(L.LightningDataModule):
    """An MNIST-format data set's official splits as in-memory tensors: train/val from the 60k set, test = t10k.

    Args:
        dataset: ``mnist``, ``fashion_mnist`` or ``kmnist`` (``DATASETS``), or an ``IDXDataset`` given field
            by field in the config (docs/extending.md): which files to read and verify.
        data_dir: folder holding ``<Folder>/raw/`` with torchvision's file names (``MNIST/raw/``,
            ``FashionMNIST/raw/``, ``KMNIST/raw/``; gz or not), or holding the four files themselves
            (e.g. Debian's ``/usr/share/datasets/fashion-mnist``).
        download: fetch missing files with torchvision's downloader (its mirrors).
        verify_checksums: check each file's MD5 against the known original.
        val_size: rows of the 60k training set held out for validation.
        split_seed: seed of the train/val split; fixed apart from ``seed_everything`` so that
            runs with different training seeds are validated on the same rows.
        batch_size: training batch size per device (under DDP the global batch is
            ``batch_size * world_size``).
        eval_batch_size: batch size for validation, test and predict (no gradients: larger is faster).
        standardize: subtract the training-set mean and divide by its std after scaling to [0, 1].
        augment: a transform of training batches ``(B, 28, 28)`` pixel values, applied on their device
            before normalization, e.g. ``mnist_lit.augment.RandomAffine``; None trains on the images as they are.
        predict_images: a file, glob or folder of the user's own pictures (PNG, JPEG, ...), or a list of them
            (``[a.png, 'b/*.jpg', c/]``), for ``predict``, prepared like MNIST digits (``mnist_lit.predict``);
            None predicts the t10k test set.
    """

    def __init__(self, dataset: Literal["mnist", "fashion_mnist", "kmnist"] | IDXDataset = "mnist",
                 data_dir: str = "data", download: bool = True, verify_checksums: bool = True,
                 val_size: int = 5000, split_seed: int = 0, batch_size: PositiveInt = 128,
                 eval_batch_size: PositiveInt = 1000, standardize: bool = False,
                 augment: RandomAffine | None = None, predict_images: list[str] | str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.dataset = DATASETS[dataset] if isinstance(dataset, str) else dataset
        self.classes = self.dataset.classes
        self.augment = augment
        own_folder = Path(data_dir) / self.dataset.folder / "raw"
        files_here = all(find_idx(Path(data_dir), name) for name in self.dataset.files)
        self.raw_dir = Path(data_dir) if files_here and not own_folder.is_dir() else own_folder
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.train_loader: InMemoryBatches | None = None
        self.resume: tuple[int, int] | None = None  # the training position restored from a checkpoint
        self.predict_names: list[str] = []  # what predict_dataloader serves, row by row (predict.PredictionWriter)
        self.predict_labels: torch.Tensor | None = None
        self.unreadable: list[tuple[str, str]] = []  # (input, reason) of the predict_images that were skipped

    # Lightning stores these in every checkpoint and restores them before any loader is built, so a run
    # stopped in the middle of an epoch continues with the very next batch of the same permutation.
    # The normalization goes too, so an exported model (export.py) applies the very same one.
    def state_dict(self) -> dict:
        state = {"normalization": [self.scale, self.shift]} if hasattr(self, "scale") else {}
        return state | ({"train_position": list(self.train_loader.position())} if self.train_loader else {})

    def load_state_dict(self, state: dict) -> None:
        self.resume = tuple(state["train_position"]) if "train_position" in state else None

    def missing_files(self) -> list[str]:
        return [name for name in self.dataset.files if find_idx(self.raw_dir, name) is None]

    def prepare_data(self) -> None:
        """Download what is missing (once per node, before ``setup``)."""
        predicting_files = self.trainer is not None and self.trainer.predicting and self.hparams.predict_images
        if not self.missing_files() or (predicting_files and not self.hparams.standardize):
            return
        title, missing = self.dataset.title, ", ".join(f"{n}.gz" for n in self.missing_files())
        offline = (f"{title} files are missing from {self.raw_dir.resolve()}: {missing}. Copy those four "
                   f"files (gzipped or not) into that folder, or point --data.data_dir at the folder that holds "
                   f"{self.dataset.folder}/raw/ (or the four files themselves)")
        if not self.hparams.download:
            raise MNISTDataError(offline + ", or set --data.download true to fetch them.")
        import torchvision.datasets  # imported here: it costs a second at start-up

        try:
            getattr(torchvision.datasets, self.dataset.folder)(str(self.raw_dir.parent.parent), download=True)
        except (RuntimeError, OSError) as err:
            reason = str(err).strip().splitlines()[-1].strip()
            raise MNISTDataError(f"{offline}; the download failed ({reason}).") from None

    def setup(self, stage: str) -> None:
        if stage == "predict" and self.hparams.predict_images is not None:
            self.read_user_images()
            if not self.hparams.standardize:  # the data set is needed only for its statistics
                self.scale, self.shift = self.normalization(None)
                return
        if "train" in self.splits:
            return
        if self.missing_files():
            self.prepare_data()  # raises the message naming the folder and files
        verify = self.hparams.verify_checksums
        train_images, train_labels = read_split(self.raw_dir, "train", verify, self.dataset)
        val_size = self.hparams.val_size
        if not 0 < val_size < len(train_images):
            raise MNISTDataError(f"--data.val_size is {val_size}, but it must be between 1 and "
                                 f"{len(train_images) - 1} (the training set has {len(train_images)} rows).")
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(self.hparams.split_seed))
        train_rows, val_rows = order[val_size:], order[:val_size]
        self.splits = {
            "train": (train_images[train_rows], train_labels[train_rows]),
            "val": (train_images[val_rows], train_labels[val_rows]),
            "test": read_split(self.raw_dir, "t10k", verify, self.dataset),
        }
        self.scale, self.shift = self.normalization(self.splits["train"][0])

    def read_user_images(self) -> None:
        inputs = self.hparams.predict_images
        paths, images, self.unreadable = load_images([inputs] if isinstance(inputs, str) else inputs)
        if not paths:
            reasons = "; ".join(f"{item} ({reason})" for item, reason in self.unreadable) or "none were given"
            raise MNISTDataError(f"--data.predict_images yielded no readable image: {reasons}. Name PNG or JPEG "
                                 "files, globs such as 'digits/*.png' (quoted), or folders that hold such files.")
        self.splits["predict"] = (images, torch.arange(len(images)))
        self.predict_names, self.predict_labels = [str(p) for p in paths], None

    def normalization(self, train_images: torch.Tensor | None) -> tuple[float, float]:
        """(scale, shift) with x = pixel * scale + shift: [0, 1], or standardized by train-set statistics."""
        if not self.hparams.standardize:
            return 1 / 255, 0.0
        # Exact mean and std from the 256-bin histogram: no float copy of the whole set.
        counts = torch.bincount(train_images.flatten(), minlength=256).double()
        values = torch.arange(256, dtype=torch.float64) / 255
        mean = (counts * values).sum() / counts.sum()
        std = ((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()
        return (1 / (255 * std)).item(), (-mean / std).item()

    def loader(self, split: str, train: bool = False) -> InMemoryBatches:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer else torch.device("cpu")
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        images, labels = (t.to(device) for t in self.splits[split])
        # --trainer.overfit_batches: the same first batches every epoch (Lightning can only unshuffle DataLoaders).
        shuffle = train and not (trainer and trainer.overfit_batches > 0)
        sampler = ShardedShuffle(len(labels), seed=torch.initial_seed() % 2**62 if train else 0,
                                 shuffle=shuffle, rank=rank, world_size=world_size)
        hp = self.hparams
        return InMemoryBatches(images, labels, hp.batch_size if train else hp.eval_batch_size, sampler,
                               self.scale, self.shift, self.augment if train else None)

    def train_dataloader(self) -> InMemoryBatches:
        self.train_loader = self.loader("train", train=True)
        self.train_loader.resume, self.resume = self.resume, None
        return self.train_loader

    def val_dataloader(self) -> InMemoryBatches:
        return self.loader("val")

    def test_dataloader(self) -> InMemoryBatches:
        return self.loader("test")

    def predict_dataloader(self) -> InMemoryBatches:
        """Batches of (x, row number): the user's images, or t10k (predict.PredictionWriter names the rows)."""
        if self.hparams.predict_images is None:
            images, labels = self.splits["test"]
            self.splits["predict"] = (images, torch.arange(len(images)))
            self.predict_names, self.predict_labels = [f"t10k/{i}" for i in range(len(images))], labels
        return self.loader("predict")
