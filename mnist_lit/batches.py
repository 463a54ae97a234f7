"""Training and evaluation batches gathered by index from uint8 tensors already on the training device.

``ShardedShuffle`` is an epoch's seeded permutation cut into disjoint per-rank shards;
``InMemoryBatches`` serves (x, y) batches from it, normalized on the fly and optionally augmented,
and remembers its position for an exact mid-epoch resume. No DataLoader, PIL or per-sample Python.
"""

from __future__ import annotations

import torch

from mnist_lit.augment import BatchAugment


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


def mix(*numbers: int) -> int:
    """One 63-bit seed from non-negative ints, each of them changing it: xxHash's mixing of a sequence, with
    the constants and steps that CPython's tuple hash uses (so runs made when this was ``hash(tuple)`` draw
    the same augmentations), written out so that it depends on no Python version or hash setting."""
    mask, prime1, prime2, prime5 = 2**64 - 1, 11400714785074694791, 14029467366897019727, 2870177450012600261
    acc = prime5
    for n in numbers:
        lane = n % (2**61 - 1)  # CPython's hash of a non-negative int
        acc = (acc + lane * prime2) & mask
        acc = ((acc << 31) | (acc >> 33)) & mask  # rotate left by 31
        acc = (acc * prime1) & mask
    acc = (acc + (len(numbers) ^ (prime5 ^ 3527539))) & mask
    signed = acc - 2**64 if acc >= 2**63 else acc
    return (1546275796 if signed == -1 else signed) % 2**63


class InMemoryBatches:
    """(x, y) batches gathered by index from uint8 tensors that already live on the training device.

    x is (B, 784) float, normalized on the fly as ``pixel * scale + shift``; y is (B,) int64.
    """

    batch_sampler = None  # Lightning inspects loader.sampler (set_epoch) and loader.batch_sampler

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, sampler: ShardedShuffle,
                 scale: float, shift: float, augment: BatchAugment | None = None):
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
                seed = mix(self.sampler.seed, self.sampler.epoch, self.batches_done, self.sampler.rank)
                x = self.augment(x, torch.Generator().manual_seed(seed))
            self.batches_done += 1
            yield x.flatten(1).mul_(self.scale).add_(self.shift), self.labels[rows]  # (B, 784), (B,)

    def position(self) -> tuple[int, int]:
        """(epoch, batches served in it): saved in checkpoints by MNISTDataModule.state_dict."""
        return self.sampler.epoch, self.batches_done
