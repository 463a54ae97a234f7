"""Augmentation of training batches on their tensors: the transforms it promises, only in training, repeatable."""

from pathlib import Path

import pytest
import torch

from conftest import REPO, fit_args, only_run, write_mnist
from mnist_lit.augment import RandomAffine
from mnist_lit.cli import main
from mnist_lit.data import MNISTDataModule


def centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """(B, 2) row, column of each (B, H, W) image's centre of mass."""
    grid = torch.arange(images.shape[1], dtype=torch.float32)
    mass = images.sum((1, 2))
    return torch.stack([(images.sum(2) * grid).sum(1) / mass, (images.sum(1) * grid).sum(1) / mass], 1)


def blobs(n: int = 64) -> torch.Tensor:
    """Bright squares well inside a 28x28 field, so no transform pushes ink off its edge."""
    images = torch.zeros(n, 28, 28)
    images[:, 10:18, 11:17] = 255.0
    return images


def test_no_ranges_is_the_identity():
    images = torch.rand(8, 28, 28) * 255
    out = RandomAffine(degrees=0, translate=0, scale=0)(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images, atol=1e-3, rtol=0)


def test_shifts_stay_within_translate_and_keep_the_ink():
    images = blobs()
    out = RandomAffine(degrees=0, translate=3, scale=0)(images, torch.Generator().manual_seed(0))
    moved = centre_of_mass(out) - centre_of_mass(images)
    assert moved.abs().max() <= 3 + 1e-4
    assert moved.abs().max() > 2  # 64 draws from [-3, 3]: some land far out
    torch.testing.assert_close(out.sum((1, 2)), images.sum((1, 2)), rtol=1e-4, atol=0)  # shifts move ink only


def test_rotation_and_zoom_keep_the_centre_and_change_the_shape():
    images = blobs()
    out = RandomAffine(degrees=30, translate=0, scale=0.2)(images, torch.Generator().manual_seed(0))
    # The field's centre is 13.5; the square's centre is (13.5, 13.5): rotating or zooming about it keeps it there.
    torch.testing.assert_close(centre_of_mass(out), centre_of_mass(images), atol=0.05, rtol=0)
    ratio = out.sum((1, 2)) / images.sum((1, 2))  # area scales with zoom^2: between 0.8^2 and 1.2^2
    assert ratio.min() > 0.6 and ratio.max() < 1.5 and ratio.std() > 0.05


def test_scale_of_one_or_more_is_refused():
    with pytest.raises(ValueError, match="augment.scale is 1.0; it must be below 1"):
        RandomAffine(scale=1.0)


def test_only_training_batches_are_augmented_and_each_epoch_draws_anew(tmp_path: Path):
    data = MNISTDataModule(data_dir=str(write_mnist(tmp_path)), val_size=100, verify_checksums=False,
                           batch_size=50, augment=RandomAffine())
    data.setup("fit")
    val_x, _ = next(iter(data.val_dataloader()))
    torch.testing.assert_close(val_x, data.splits["val"][0][:100].flatten(1).float() / 255)
    loader = data.train_dataloader()
    first = [x for x, _ in loader]
    again = [x for x, _ in loader]
    loader.sampler.set_epoch(1)
    later = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # same epoch, same draws
    rows = loader.sampler.indices()[:50]
    plain = data.splits["train"][0][rows].flatten(1).float() / 255
    assert not torch.allclose(first[0], plain, atol=0.05)  # augmented
    torch.testing.assert_close(first[0].sum(1), plain.sum(1), rtol=0.35, atol=0)  # still the same digits' ink
    assert not torch.equal(first[0], later[0])


def test_a_resumed_epoch_draws_the_same_transforms(tmp_path: Path):
    data = MNISTDataModule(data_dir=str(write_mnist(tmp_path)), val_size=100, verify_checksums=False,
                           batch_size=50, augment=RandomAffine())
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(3)
    whole = [x for x, _ in loader]
    loader.resume = (3, 4)  # what MNISTDataModule.load_state_dict hands it after a mid-epoch stop
    rest = [x for x, _ in loader]
    assert len(rest) == len(whole) - 4
    assert all(torch.equal(a, b) for a, b in zip(whole[4:], rest, strict=True))


def test_the_99_percent_recipe_composes_with_the_default_and_trains_with_augmentation(tiny_mnist: Path,
                                                                                        tmp_path: Path):
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "2")
    args[3:3] = ["--config", str(REPO / "configs" / "experiment" / "mlp_99.yaml")]
    main(args)
    run = only_run(tmp_path / "logs")
    config = (run / "config.yaml").read_text()
    assert "class_path: mnist_lit.augment.RandomAffine" in config and "hidden1: 1024" in config
    weights = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert weights["net.layers.3.weight"].shape == (1024, 1024)  # two hidden layers, both 1024 wide
    assert [k for k in weights if k.endswith("weight")] == ["net.layers.1.weight", "net.layers.3.weight",
                                                             "net.layers.5.weight"]
