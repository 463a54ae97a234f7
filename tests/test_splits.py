"""Splits, shuffles and normalization: which rows a model sees, and as what numbers."""

from pathlib import Path

import pytest
import torch

from mnist_lit.batches import InMemoryBatches, ShardedShuffle
from mnist_lit.data import MNISTDataModule
from mnist_lit.idx import MNISTDataError


def row_keys(images: torch.Tensor) -> set[bytes]:
    return {bytes(img.flatten().tolist()) for img in images}


def datamodule(root: Path, **kwargs) -> MNISTDataModule:
    data = MNISTDataModule(data_dir=str(root), verify_checksums=False, **{"val_size": 100} | kwargs)
    data.setup("fit")
    return data


def test_split_sizes_and_test_set_untouched(tiny_mnist: Path):
    data = datamodule(tiny_mnist)
    assert [len(data.splits[s][0]) for s in ("train", "val", "test")] == [500, 100, 200]
    assert all(len(data.splits[s][0]) == len(data.splits[s][1]) for s in data.splits)


def test_train_and_val_are_disjoint_and_cover_the_training_file(tiny_mnist: Path):
    data = datamodule(tiny_mnist)
    # rows are compared by index: images may repeat in content, indices cannot
    train_images, val_images = data.splits["train"][0], data.splits["val"][0]
    full = torch.cat([train_images, val_images])
    assert len(row_keys(train_images) & row_keys(val_images)) == 0
    assert len(row_keys(full)) == 600


def test_same_split_seed_same_split_different_seed_different_split(tiny_mnist: Path):
    a, b, c = datamodule(tiny_mnist), datamodule(tiny_mnist), datamodule(tiny_mnist, split_seed=1)
    assert torch.equal(a.splits["val"][0], b.splits["val"][0])
    assert not torch.equal(a.splits["val"][0], c.splits["val"][0])


def test_split_does_not_move_with_the_training_seed(tiny_mnist: Path):
    torch.manual_seed(1)
    a = datamodule(tiny_mnist)
    torch.manual_seed(2)
    b = datamodule(tiny_mnist)
    assert torch.equal(a.splits["val"][0], b.splits["val"][0])


@pytest.mark.parametrize("val_size", [0, 600, 10_000])
def test_impossible_validation_size_is_named(tiny_mnist: Path, val_size: int):
    with pytest.raises(MNISTDataError, match=f"--data.val_size is {val_size}.*between 1 and 599"):
        datamodule(tiny_mnist, val_size=val_size)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_see_disjoint_shards_covering_the_epoch(world_size: int):
    shards = [ShardedShuffle(103, seed=7, shuffle=True, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in range(3):
        for s in shards:
            s.set_epoch(epoch)
        rows = torch.cat([s.indices() for s in shards])
        assert len(set(rows.tolist())) == len(rows) == 103 - 103 % world_size  # no duplicates, drop < world_size
        assert len({len(s.indices()) for s in shards}) == 1  # same number of steps on every rank


def test_every_epoch_is_reshuffled_and_repeatable():
    sampler = ShardedShuffle(1000, seed=0, shuffle=True)
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.append(sampler.indices())
    assert not torch.equal(orders[0], orders[1]) and torch.equal(orders[0], orders[2])


def test_evaluation_shards_count_every_row_once():
    shards = [ShardedShuffle(1001, seed=0, shuffle=False, rank=r, world_size=2) for r in range(2)]
    assert sorted(torch.cat([s.indices() for s in shards]).tolist()) == list(range(1001))


def test_batches_cover_the_shard_with_a_smaller_last_batch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1).expand(10, 28, 28).contiguous()
    labels = torch.arange(10)
    loader = InMemoryBatches(images, labels, 4, ShardedShuffle(10, seed=0, shuffle=True), scale=1.0, shift=0.0)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert xs.shape == (10, 784) and xs.dtype == torch.float32
    assert torch.equal(xs[:, 0].long(), ys)  # each image stays with its own label
    assert sorted(ys.tolist()) == list(range(10))


def test_pixels_are_scaled_to_unit_range_by_default(tiny_mnist: Path):
    x, _ = next(iter(datamodule(tiny_mnist).val_dataloader()))
    assert x.min() >= 0 and x.max() == 1.0


def test_standardize_uses_the_training_split_statistics(tiny_mnist: Path):
    data = datamodule(tiny_mnist, standardize=True, batch_size=500)
    x, _ = next(iter(data.train_dataloader()))  # the whole training split in one batch
    assert abs(x.mean().item()) < 1e-4 and abs(x.std(unbiased=False).item() - 1) < 1e-4


def test_training_batches_continue_after_a_mid_epoch_restore():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1).expand(20, 28, 28).contiguous()
    sampler = ShardedShuffle(20, seed=3, shuffle=True)
    loader = InMemoryBatches(images, torch.arange(20), 4, sampler, scale=1.0, shift=0.0)
    sampler.set_epoch(2)
    whole = [y.tolist() for _, y in loader]
    partial = iter(loader)
    first_two = [next(partial)[1].tolist() for _ in range(2)]
    assert loader.position() == (2, 2)  # what a checkpoint holds after two batches of epoch 2
    fresh = InMemoryBatches(images, torch.arange(20), 4, ShardedShuffle(20, seed=3, shuffle=True), 1.0, 0.0)
    fresh.resume = loader.position()
    fresh.sampler.set_epoch(2)
    assert first_two + [y.tolist() for _, y in fresh] == whole  # the very next batch, same permutation
    fresh.sampler.set_epoch(3)
    assert len(list(fresh)) == 5  # the skip applies to the restored epoch only
