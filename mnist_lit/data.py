"""MNIST from IDX bytes on disk to batches on the training device.

    python -m mnist_lit fit --config configs/default.yaml --data.data_dir data

The path of one batch: the four IDX files under ``<data_dir>/MNIST/raw/`` (gzipped or not)
are read once and verified (magic number, dimensions, counts, MD5 of the original bytes),
kept as uint8 tensors (all of MNIST is 55 MB), split 55,000/5,000 by a seeded generator,
moved to the training device, and served as index-gathered batches normalized on the fly.
No per-sample Python, PIL or DataLoader work: an epoch is one ``randperm`` and a gather per
batch. Under DDP every rank takes its own disjoint shard of the epoch's permutation.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import lightning as L
import torch
from jsonargparse.typing import PositiveInt

# torchvision's file names -> MD5 of the uncompressed original (shared/datasets/README.md).
MNIST_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
IDX_UINT8 = 0x08  # the IDX type code of unsigned bytes, the only one MNIST uses


class MNISTDataError(RuntimeError):
    """A data problem the user can fix; its message is one paragraph naming the file and the fix."""


def read_idx(path: Path, md5: str | None = None) -> torch.Tensor:
    """Read one IDX file (``.gz`` or raw) into a uint8 tensor of the shape its header declares.

    Checks, in order: the gzip stream is whole, the magic number says uint8 with 1-3 dims, the
    payload holds exactly prod(dims) bytes, and (when ``md5`` is given) the uncompressed bytes
    are the original ones.
    """
    fix = f"Delete {path} and download it again (or copy a good copy there)."
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
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
    if md5 is not None and hashlib.md5(raw).hexdigest() != md5:
        raise MNISTDataError(f"{path} is a well-formed IDX file but not the original MNIST file (MD5 of "
                             f"its uncompressed bytes is {hashlib.md5(raw).hexdigest()}, expected {md5}). "
                             f"{fix} If you changed it on purpose, set --data.verify_checksums false.")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).view(dims)


def find_idx(raw_dir: Path, name: str) -> Path | None:
    """The file torchvision would have saved as ``name``, uncompressed or gzipped, if present."""
    return next((p for p in (raw_dir / name, raw_dir / f"{name}.gz") if p.is_file()), None)


def read_split(raw_dir: Path, prefix: str, verify: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) and labels (N,) of one official split ('train' or 't10k'), cross-checked."""
    paths = {kind: find_idx(raw_dir, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")}
    images_path, labels_path = paths.values()
    images, labels = (read_idx(p, MNIST_FILES[p.name.removesuffix(".gz")] if verify else None)
                      for p in (images_path, labels_path))
    if images.dim() != 3 or images.shape[1:] != (28, 28):
        raise MNISTDataError(f"{images_path} holds images of shape {list(images.shape[1:])}, expected "
                             "28x28 (N, 28, 28). Replace it with the MNIST images file.")
    if labels.dim() != 1 or len(labels) != len(images):
        raise MNISTDataError(f"{labels_path} holds {len(labels)} labels (dims {list(labels.shape)}) but "
                             f"{images_path} holds {len(images)} images: the two files do not belong "
                             "together. Replace both with the files of one download.")
    if labels.numel() and labels.max() > 9:
        raise MNISTDataError(f"{labels_path} holds label {labels.max().item()}; digits are 0-9. Replace it.")
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
                 scale: float, shift: float):
        self.images, self.labels, self.batch_size, self.sampler = images, labels, batch_size, sampler
        self.scale, self.shift = scale, shift
        self.batches_done, self.resume = 0, None  # (epoch, batches) to skip after a mid-epoch restore

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        skip = self.resume[1] if self.resume and self.resume[0] == self.sampler.epoch else 0
        self.resume, self.batches_done = None, skip
        for rows in self.sampler.indices().to(self.images.device).split(self.batch_size)[skip:]:
            x = self.images[rows].flatten(1).float().mul_(self.scale).add_(self.shift)  # (B, 28, 28) u8 -> (B, 784)
            self.batches_done += 1
            yield x, self.labels[rows]

    def position(self) -> tuple[int, int]:
        """(epoch, batches served in it): saved in checkpoints by MNISTDataModule.state_dict."""
        return self.sampler.epoch, self.batches_done


class MNISTDataModule(L.LightningDataModule):
    """MNIST's official splits as in-memory tensors: train/val from the 60k set, test = t10k.

    Args:
        data_dir: folder holding ``MNIST/raw/`` with torchvision's file names (gz or not).
        download: fetch missing files with torchvision's downloader (its mirrors).
        verify_checksums: check each file's MD5 against the known original.
        val_size: rows of the 60k training set held out for validation.
        split_seed: seed of the train/val split; fixed apart from ``seed_everything`` so that
            runs with different training seeds are validated on the same rows.
        batch_size: training batch size per device (under DDP the global batch is
            ``batch_size * world_size``).
        eval_batch_size: batch size for validation, test and predict (no gradients: larger is faster).
        standardize: subtract the training-set mean and divide by its std after scaling to [0, 1].
    """

    def __init__(self, data_dir: str = "data", download: bool = True, verify_checksums: bool = True,
                 val_size: int = 5000, split_seed: int = 0, batch_size: PositiveInt = 128,
                 eval_batch_size: PositiveInt = 1000, standardize: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.raw_dir = Path(data_dir) / "MNIST" / "raw"
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.train_loader: InMemoryBatches | None = None
        self.resume: tuple[int, int] | None = None  # the training position restored from a checkpoint

    # Lightning stores these in every checkpoint and restores them before any loader is built, so a run
    # stopped in the middle of an epoch continues with the very next batch of the same permutation.
    def state_dict(self) -> dict:
        return {"train_position": list(self.train_loader.position())} if self.train_loader else {}

    def load_state_dict(self, state: dict) -> None:
        self.resume = tuple(state["train_position"]) if "train_position" in state else None

    def missing_files(self) -> list[str]:
        return [name for name in MNIST_FILES if find_idx(self.raw_dir, name) is None]

    def prepare_data(self) -> None:
        """Download what is missing (once per node, before ``setup``)."""
        if not self.missing_files():
            return
        missing = ", ".join(f"{n}.gz" for n in self.missing_files())
        offline = (f"MNIST files are missing from {self.raw_dir.resolve()}: {missing}. Copy those four "
                   f"files (gzipped or not) into that folder, or point --data.data_dir at the folder "
                   f"that holds MNIST/raw/")
        if not self.hparams.download:
            raise MNISTDataError(offline + ", or set --data.download true to fetch them.")
        from torchvision.datasets import MNIST  # imported here: it costs a second at start-up

        try:
            MNIST(str(self.raw_dir.parent.parent), train=True, download=True)
        except (RuntimeError, OSError) as err:
            reason = str(err).strip().splitlines()[-1].strip()
            raise MNISTDataError(f"{offline}; the download failed ({reason}).") from None

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        if self.missing_files():
            self.prepare_data()  # raises the message naming the folder and files
        verify = self.hparams.verify_checksums
        train_images, train_labels = read_split(self.raw_dir, "train", verify)
        val_size = self.hparams.val_size
        if not 0 < val_size < len(train_images):
            raise MNISTDataError(f"--data.val_size is {val_size}, but it must be between 1 and "
                                 f"{len(train_images) - 1} (the training set has {len(train_images)} rows).")
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(self.hparams.split_seed))
        train_rows, val_rows = order[val_size:], order[:val_size]
        self.splits = {
            "train": (train_images[train_rows], train_labels[train_rows]),
            "val": (train_images[val_rows], train_labels[val_rows]),
            "test": read_split(self.raw_dir, "t10k", verify),
        }
        self.scale, self.shift = self.normalization(self.splits["train"][0])

    def normalization(self, train_images: torch.Tensor) -> tuple[float, float]:
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
        sampler = ShardedShuffle(len(labels), seed=torch.initial_seed() % 2**62 if train else 0,
                                 shuffle=train, rank=rank, world_size=world_size)
        hp = self.hparams
        return InMemoryBatches(images, labels, hp.batch_size if train else hp.eval_batch_size, sampler,
                               self.scale, self.shift)

    def train_dataloader(self) -> InMemoryBatches:
        self.train_loader = self.loader("train", train=True)
        self.train_loader.resume, self.resume = self.resume, None
        return self.train_loader

    def val_dataloader(self) -> InMemoryBatches:
        return self.loader("val")

    def test_dataloader(self) -> InMemoryBatches:
        return self.loader("test")

    def predict_dataloader(self) -> InMemoryBatches:
        return self.loader("test")
