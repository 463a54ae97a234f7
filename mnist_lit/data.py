"""The DataModule: MNIST (or Fashion-MNIST, KMNIST) from IDX bytes on disk to batches on the training device.

    python -m mnist_lit fit --config configs/default.yaml --data.data_dir data
    python -m mnist_lit fit --config configs/default.yaml --data.dataset fashion_mnist

The path of one batch: the four IDX files under ``<data_dir>/MNIST/raw/`` (``FashionMNIST/raw/``,
``KMNIST/raw/`` or a declared folder for the others; gzipped or not) are read once and verified
(magic number, dimensions, counts, MD5 of the original bytes), kept as uint8 tensors (all of
MNIST is 55 MB), split 55,000/5,000 by a seeded generator, moved to the training device, and
served as index-gathered batches normalized on the fly.
No per-sample Python, PIL or DataLoader work: an epoch is one ``randperm`` and a gather per
batch. Under DDP every rank takes its own disjoint shard of the epoch's permutation.
The files are read by ``idx.py``, the batches served by ``batches.py``, the user's own pictures
prepared by ``images.py``; this module holds the splits, the normalization and what a checkpoint keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.utilities import rank_zero_info

from mnist_lit.augment import BatchAugment
from mnist_lit.batches import InMemoryBatches, ShardedShuffle
from mnist_lit.idx import DATASETS, IDXDataset, MNISTDataError, find_idx, read_split
from mnist_lit.images import load_images


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
            before normalization, e.g. ``mnist_lit.augment.RandomAffine``, ``ElasticDeformation`` or a ``Compose``
            of them; None trains on the images as they are.
        predict_images: a file, glob or folder of the user's own pictures (PNG, JPEG, ...), or a list of them
            (``[a.png, 'b/*.jpg', c/]``), for ``predict``, prepared like MNIST digits (``mnist_lit.images``);
            None predicts the t10k test set.
    """

    def __init__(self, dataset: Literal["mnist", "fashion_mnist", "kmnist"] | IDXDataset = "mnist",
                 data_dir: str = "data", download: bool = True, verify_checksums: bool = True,
                 val_size: int = 5000, split_seed: int = 0, batch_size: PositiveInt = 128,
                 eval_batch_size: PositiveInt = 1000, standardize: bool = False,
                 augment: BatchAugment | None = None, predict_images: list[str] | str | None = None):
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
        self.shuffle_seed: int | None = None  # of the training permutations (and augmentations); in checkpoints
        self.predict_names: list[str] = []  # what predict_dataloader serves, row by row (predict.PredictionWriter)
        self.predict_labels: torch.Tensor | None = None
        self.unreadable: list[tuple[str, str]] = []  # (input, reason) of the predict_images that were skipped

    # Lightning stores these in every checkpoint and restores them before any loader is built, so a run
    # stopped in the middle of an epoch continues with the very next batch of the same permutation.
    # The normalization goes too, so an exported model (export.py) applies the very same one.
    def state_dict(self) -> dict:
        state = {"normalization": [self.scale, self.shift]} if hasattr(self, "scale") else {}
        if self.train_loader:
            state |= {"train_position": list(self.train_loader.position()), "shuffle_seed": self.shuffle_seed}
        return state

    def load_state_dict(self, state: dict) -> None:
        """From a checkpoint (after ``setup``): the training position, and the normalization the model was trained
        with, which wins over the configured one: a model is only right on inputs scaled as in its training."""
        self.resume = tuple(state["train_position"]) if "train_position" in state else None
        self.shuffle_seed = state.get("shuffle_seed", self.shuffle_seed)  # the same permutations, batch for batch
        if "normalization" in state:
            trained = tuple(float(v) for v in state["normalization"])
            configured = (self.scale, self.shift) if hasattr(self, "scale") else trained
            if not torch.allclose(torch.tensor(configured, dtype=torch.float64), torch.tensor(trained,
                                                                                             dtype=torch.float64)):
                rank_zero_info(f"mnist_lit: inputs are normalized as in the checkpoint's training, pixel * "
                               f"{trained[0]:.6g} + {trained[1]:.6g}, not as configured (pixel * {configured[0]:.6g} "
                               f"+ {configured[1]:.6g}, --data.standardize {self.hparams.standardize}).")
            self.scale, self.shift = trained

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

    def loader(self, split: str, train: bool = False, seed: int = 0) -> InMemoryBatches:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer else torch.device("cpu")
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        images, labels = (t.to(device) for t in self.splits[split])
        # --trainer.overfit_batches: the same first batches every epoch (Lightning can only unshuffle DataLoaders).
        shuffle = train and not (trainer and trainer.overfit_batches > 0)
        sampler = ShardedShuffle(len(labels), seed=seed,
                                 shuffle=shuffle, rank=rank, world_size=world_size)
        hp = self.hparams
        return InMemoryBatches(images, labels, hp.batch_size if train else hp.eval_batch_size, sampler,
                               self.scale, self.shift, self.augment if train else None)

    def train_dataloader(self) -> InMemoryBatches:
        if self.shuffle_seed is None:  # not restored from a checkpoint: the run's seed, rank 0's on every rank
            seed = torch.initial_seed() % 2**62  # seed_everything's, or a random one without it
            self.shuffle_seed = int(self.trainer.strategy.broadcast(seed)) if self.trainer else seed
        self.train_loader = self.loader("train", train=True, seed=self.shuffle_seed)
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
