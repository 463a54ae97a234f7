"""Augmentation of training batches on their tensors: the transforms it promises, only in training, repeatable."""

from pathlib import Path

import pytest
import torch

from conftest import REPO, fit_args, only_run, write_mnist
from mnist_lit.augment import Compose, ElasticAffine, ElasticDeformation, RandomAffine
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


@pytest.mark.parametrize("augment", [RandomAffine(), ElasticDeformation(),
                                     Compose([ElasticDeformation(), RandomAffine()])],
                         ids=["affine", "elastic", "elastic-then-affine"])
def test_a_resumed_epoch_draws_the_same_transforms(tmp_path: Path, augment):
    data = MNISTDataModule(data_dir=str(write_mnist(tmp_path)), val_size=100, verify_checksums=False,
                           batch_size=50, augment=augment)
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(3)
    whole = [x for x, _ in loader]
    loader.resume = (3, 4)  # what MNISTDataModule.load_state_dict hands it after a mid-epoch stop
    rest = [x for x, _ in loader]
    assert len(rest) == len(whole) - 4
    assert all(torch.equal(a, b) for a, b in zip(whole[4:], rest, strict=True))


RECIPES = {"mlp_99.yaml": ("RandomAffine", 1024, 1024), "mlp_990.yaml": ("ElasticAffine", 547, 845),
           "mlp_990_fast.yaml": ("ElasticAffine", 516, 544),
           "mlp_993.yaml": ("ElasticAffine", 1278, 1032)}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_99_percent_recipe_composes_with_the_default_and_trains_two_hidden_layers_with_augmentation(
        tiny_mnist: Path, tmp_path: Path, recipe: str):
    augment, width1, width2 = RECIPES[recipe]
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "1")
    args[3:3] = ["--config", str(REPO / "configs" / "experiment" / recipe)]
    if "WarmupCosine" in (REPO / "configs" / "experiment" / recipe).read_text():  # tiny data: a shorter warm-up
        args += ["--model.lr_scheduler.init_args.warmup_steps", "4"]
    cli = main(args)
    assert type(cli.datamodule.augment).__name__ == augment
    run = only_run(tmp_path / "logs")
    assert f"class_path: mnist_lit.augment.{augment}" in (run / "config.yaml").read_text()
    weights = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert [k for k in weights if k.endswith("weight")] == ["net.layers.1.weight", "net.layers.3.weight",
                                                             "net.layers.5.weight"]  # two hidden layers
    assert weights["net.layers.3.weight"].shape == (width2, width1)


def test_a_known_displacement_field_moves_each_pixel_where_it_says():
    images = blobs(2)  # ink in rows 10..17, columns 11..16
    field = torch.zeros(2, 2, 28, 28)
    field[0, 0] = 2.0  # image 0: every pixel reads 2 px to its right: the ink moves 2 px left
    field[1, 1] = -3.0  # image 1: every pixel reads 3 px above: the ink moves 3 px down
    out = ElasticDeformation.warp(images, field)
    assert torch.equal(out[0, 10:18, 9:15], images[0, 10:18, 11:17]) and out[0, :, 15:].sum() == 0
    assert torch.equal(out[1, 13:21, 11:17], images[1, 10:18, 11:17]) and out[1, :13].sum() == 0
    half = torch.zeros(1, 2, 28, 28)
    half[0, 0] = 0.5  # between two pixels: bilinear, half of each
    torch.testing.assert_close(ElasticDeformation.warp(images[:1], half)[0, 12, 10:12], torch.tensor([127.5, 255.0]))


def test_elastic_alpha_zero_is_the_identity_and_the_fields_are_smooth_and_seeded():
    images = torch.rand(8, 28, 28) * 255
    same = ElasticDeformation(alpha=0)(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, images, atol=1e-3, rtol=0)
    elastic = ElasticDeformation(alpha=34, sigma=4)
    a, b = (elastic(images, torch.Generator().manual_seed(s)) for s in (0, 0))
    assert torch.equal(a, b) and not torch.equal(a, elastic(images, torch.Generator().manual_seed(1)))
    raw = torch.rand(8, 2, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    field = elastic.smooth(raw, 28, 28) * 34
    step = (field[..., 1:] - field[..., :-1]).abs().mean() / field.abs().mean()  # neighbours move together
    assert step < 0.3 < (raw[..., 1:] - raw[..., :-1]).abs().mean() / raw.abs().mean()
    assert 0.5 < field.abs().mean() < 3 and field.abs().max() < 10  # a few pixels, as Simard's alpha 34, sigma 4


def test_one_draw_per_pixel_is_simards_gaussian_blur_of_uniform_noise():
    """noise_spacing 1 (the default) is the separable Gaussian blur of per-pixel uniform noise, zero padded: written
    out here as two 1-D convolutions, it gives the same field to rounding, so a seed's draws are what they were."""
    elastic = ElasticDeformation(alpha=34, sigma=4)
    taps = torch.exp(-0.5 * (torch.arange(-12, 13, dtype=torch.float32) / 4) ** 2)
    taps /= taps.sum()
    images = torch.rand(4, 28, 28) * 255
    noise = torch.rand(4, 2, 28, 28, generator=torch.Generator().manual_seed(5)) * 2 - 1
    blurred = torch.nn.functional.conv2d(noise.reshape(8, 1, 28, 28), taps.view(1, 1, 25, 1), padding=(12, 0))
    blurred = torch.nn.functional.conv2d(blurred, taps.view(1, 1, 1, 25), padding=(0, 12)).reshape(4, 2, 28, 28)
    expected = ElasticDeformation.warp(images, blurred * 34)
    torch.testing.assert_close(elastic(images, torch.Generator().manual_seed(5)), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("spacing", [2, 4])
def test_a_coarser_noise_grid_gives_the_same_field_statistics_from_fewer_draws(spacing: int):
    """The field is linear in its noise, K_H @ noise @ K_W^T, so its covariance is exactly (var) K_H K_H^T (x)
    K_W K_W^T: at spacing 2 and 4 that matrix is the per-pixel one's to within 1 and 3 %; and sampled fields
    have that variance, and are different draws than spacing 1's."""
    exact, coarse = ElasticDeformation(34, 4.0), ElasticDeformation(34, 4.0, noise_spacing=spacing)
    like = torch.zeros(1)
    k1, kh = exact.band(28, like), coarse.band(28, like)
    assert kh.shape == (28, 28 // spacing)
    cov1, covh = k1 @ k1.T, kh @ kh.T  # (28, 28) covariance along one axis, up to the noise's variance
    tolerance = {2: 0.01, 4: 0.03}[spacing] * cov1.max().item()  # what the docstring promises (sigma 4)
    torch.testing.assert_close(covh, cov1, atol=tolerance, rtol=0)
    images = torch.zeros(2000, 28, 28)
    images[:, 14, 14] = 255.0  # one lit pixel: where it lands shows the displacement there
    noise = torch.randn(2000, 2, 28 // spacing, 28 // spacing, generator=torch.Generator().manual_seed(0)) / 3 ** .5
    field = coarse.smooth(noise, 28, 28) * 34
    variance = 34 ** 2 * cov1.diag()[14] ** 2 / 3  # at the centre pixel, per axis
    assert abs(field[:, :, 14, 14].var().item() / variance - 1) < 0.1  # 4000 draws: within 10 %
    a = exact(images[:8], torch.Generator().manual_seed(0))
    b = coarse(images[:8], torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="noise_spacing is 4, wider than sigma 3"):
        ElasticDeformation(34, 3.0, noise_spacing=4)


@pytest.mark.slow
def test_elastic_and_affine_compose_by_config_and_train(tiny_mnist: Path, tmp_path: Path):
    config = tmp_path / "elastic.yaml"
    config.write_text("data:\n  augment:\n    class_path: mnist_lit.augment.Compose\n    init_args:\n      augments:\n"
                      "        - class_path: mnist_lit.augment.ElasticDeformation\n          init_args: {alpha: 20}\n"
                      "        - class_path: mnist_lit.augment.RandomAffine\n")
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "2")
    args[3:3] = ["--config", str(config)]
    cli = main(args)
    composed = cli.datamodule.augment
    assert [type(a).__name__ for a in composed.augments] == ["ElasticDeformation", "RandomAffine"]
    assert composed.augments[0].alpha == 20
    assert "mnist_lit.augment.ElasticDeformation" in (only_run(tmp_path / "logs") / "config.yaml").read_text()


@pytest.mark.slow
def test_elastic_affine_draws_as_its_compose_and_each_strength_is_a_flat_cli_argument(tiny_mnist: Path,
                                                                                      tmp_path: Path):
    images = torch.rand(16, 28, 28) * 255
    flat = ElasticAffine(alpha=20, sigma=5, degrees=12, translate=1.5, scale=0.05)
    composed = Compose([ElasticDeformation(20, 5), RandomAffine(12, 1.5, 0.05)])
    a, b = (augment(images, torch.Generator().manual_seed(3)) for augment in (flat, composed))
    assert torch.equal(a, b) and not torch.equal(a, images)
    args = fit_args(tiny_mnist, tmp_path / "logs", "--trainer.max_epochs", "1", "--data.augment",
                    "mnist_lit.augment.ElasticAffine", "--data.augment.init_args.alpha", "12",
                    "--data.augment.init_args.degrees", "0")
    augments = main(args).datamodule.augment.augments
    assert (augments[0].alpha, augments[0].sigma, augments[1].degrees, augments[1].translate) == (12, 4, 0, 2)
