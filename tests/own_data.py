"""A LightningDataModule as a researcher writes one, in plain Lightning (tests/test_own_data.py, --data own_data.X):
2-channel 14x14 images in DataLoaders, whose class is the channel that carries a bright square."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class TwoChannels(L.LightningDataModule):
    """``classes`` classes of (2, 14, 14) float images: class c has a bright square in channel c % 2, at a place
    that depends on c // 2, over noise.

    Args:
        classes: how many classes (2 by default; more puts labels beyond a 2-class model).
        batch_size: training batch size.
        pairs: serve (x, y) batches; False serves {"x": ..., "y": ...} dicts instead.
        declared: the class count it says it has (``num_classes``), if not ``classes``: a module that says wrong.
    """

    def __init__(self, classes: int = 2, batch_size: int = 32, pairs: bool = True, declared: int | None = None):
        super().__init__()
        self.labels, self.batch_size, self.pairs = classes, batch_size, pairs
        self.num_classes = declared or classes
        self.dims = (2, 14, 14)  # one example's shape, as lightning-hydra-template's data modules give it

    def make(self, n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, self.labels, (n,), generator=g)
        x = torch.rand(n, 2, 14, 14, generator=g) * 0.3
        for i, c in enumerate(y.tolist()):
            row = 2 + 3 * (c // 2)
            x[i, c % 2, row:row + 3, 4:10] += 1.0
        return TensorDataset(x, y)

    def setup(self, stage: str) -> None:
        self.train, self.val, self.test = self.make(512, 0), self.make(128, 1), self.make(128, 2)

    def loader(self, data: TensorDataset, shuffle: bool = False) -> DataLoader:
        collate = None if self.pairs else (lambda rows: {"x": torch.stack([r[0] for r in rows]),
                                                          "y": torch.stack([r[1] for r in rows])})
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test)
