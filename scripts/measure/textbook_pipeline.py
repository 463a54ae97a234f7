"""The popular way to feed MNIST to Lightning, for comparison: torchvision dataset, ToTensor/Normalize, DataLoader.

    python scripts/measure/textbook_pipeline.py --data-dir data --epochs 2 --batch-size 128 --num-workers 0

Same LightningModule (mnist_lit's MNISTClassifier, default MLP and SGD settings), same split sizes,
TensorBoard logger and checkpoints; only the data path differs: every sample goes through PIL and
two transforms in a DataLoader, as in Lightning's docs and lightning-hydra-template. Needs the
uncompressed IDX files in <data-dir>/MNIST/raw/ (torchvision's check). benchmark.py runs it.
"""

import argparse
import sys
import tempfile

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, random_split
from torchvision import transforms
from torchvision.datasets import MNIST

from mnist_lit.model import MLP, MNISTClassifier


class TorchvisionMNIST(L.LightningDataModule):
    def __init__(self, data_dir: str, batch_size: int, num_workers: int):
        super().__init__()
        self.data_dir, self.batch_size, self.num_workers = data_dir, batch_size, num_workers
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])

    def setup(self, stage: str) -> None:
        full = MNIST(self.data_dir, train=True, transform=self.transform)
        self.train, self.val = random_split(full, [55_000, 5_000], generator=torch.Generator().manual_seed(0))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, self.batch_size, shuffle=True, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, 1000, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, nargs=2, default=[512, 256])
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-dir", default=None, help="default: a temporary folder")
    parser.add_argument("--callback", default=None, help="module.Class of an extra callback taking no arguments")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    callbacks = [ModelCheckpoint(monitor="val/acc", mode="max"), ModelCheckpoint(filename="last")]
    if args.callback:
        module, name = args.callback.rsplit(".", 1)
        callbacks.append(getattr(__import__(module), name)())
    log_dir = args.log_dir or tempfile.mkdtemp()
    trainer = L.Trainer(max_epochs=args.epochs, logger=TensorBoardLogger(log_dir, name="textbook"),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=32)
    model = MNISTClassifier(net=MLP(*args.hidden))
    trainer.fit(model, TorchvisionMNIST(args.data_dir, args.batch_size, args.num_workers))
    sys.exit(0)


if __name__ == "__main__":
    main()
