"""Training-time augmentation of whole batches on the device that holds them: no PIL, no per-sample Python.

    python -m mnist_lit fit --config configs/default.yaml --config configs/experiment/mlp_99.yaml

``RandomAffine`` rotates, scales, shears and shifts each image of a batch by its own random amount
with one ``affine_grid`` + ``grid_sample`` call; ``ElasticDeformation`` bends each by its own smooth
random displacement field (Simard et al. 2003); ``Compose`` applies several in turn.
``MNISTDataModule(augment=...)`` applies them to training batches only, before normalization (so the
background they fill in is black). Each draws from the generator it is given, which the data module
seeds per (run, epoch, batch, rank), so that a resumed run draws the same transforms.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveFloat


class BatchAugment:
    """A random transform of a training batch: (B, H, W) float pixel values 0..255 on their device and a seeded
    CPU generator -> the transformed batch. Subclass it (and give every option a typed ``__init__`` argument) to
    choose yours with ``--data.augment``."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class Compose(BatchAugment):
    """Several augmentations in turn, each drawing from the same generator after the one before it.

    Args:
        augments: the augmentations, in the order they apply (e.g. ``ElasticDeformation`` then ``RandomAffine``).
    """

    def __init__(self, augments: list[BatchAugment]):
        self.augments = augments

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for augment in self.augments:
            images = augment(images, generator)
        return images


class RandomAffine(BatchAugment):
    """Per-image random affine transform of a (B, H, W) batch of pixel values, bilinear, zero fill.

    Each image gets an angle in [-degrees, degrees], a scale in [1 - scale, 1 + scale], a horizontal
    shear angle in [-shear, shear] and a shift in [-translate, translate] pixels along each axis,
    drawn from the generator it is given (the data module seeds one per batch, so a resumed run
    draws the same transforms).

    Args:
        degrees: largest rotation, in degrees.
        translate: largest shift along x and along y, in pixels.
        scale: largest relative zoom in or out (0.1: 90 % to 110 %).
        shear: largest horizontal shear, in degrees.
    """

    def __init__(self, degrees: NonNegativeFloat = 10.0, translate: NonNegativeFloat = 2.0,
                 scale: NonNegativeFloat = 0.1, shear: NonNegativeFloat = 0.0):
        if scale >= 1:
            raise ValueError(f"--data.augment.scale is {scale}; it must be below 1 (a zoom factor of 1 ± scale).")
        self.degrees, self.translate, self.scale, self.shear = degrees, translate, scale, shear

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, height, width = images.shape
        # (B, 5) uniform in [-1, 1] on the CPU generator (B*5 numbers), then one copy to the images' device.
        u = (torch.rand(batch, 5, generator=generator) * 2 - 1).to(images.device)
        angle = u[:, 0] * math.radians(self.degrees)
        zoom = 1 + u[:, 1] * self.scale
        shear = u[:, 2] * math.radians(self.shear)
        # affine_grid maps output to input coordinates in [-1, 1]: one pixel is 2 / size.
        shift_x, shift_y = u[:, 3] * self.translate * 2 / width, u[:, 4] * self.translate * 2 / height
        cos, sin, tan = angle.cos() / zoom, angle.sin() / zoom, shear.tan()
        theta = torch.stack([torch.stack([cos, -sin + cos * tan, shift_x], 1),
                             torch.stack([sin, cos + sin * tan, shift_y], 1)], 1)  # (B, 2, 3)
        grid = F.affine_grid(theta, [batch, 1, height, width], align_corners=False)
        return F.grid_sample(images.unsqueeze(1), grid, align_corners=False).squeeze(1)


class ElasticDeformation(BatchAugment):
    """Simard, Steinkraus and Platt 2003's elastic distortion of each image of a (B, H, W) batch: a displacement
    field per image, uniform in [-1, 1] per pixel and axis, smoothed by a Gaussian of width ``sigma`` and
    multiplied by ``alpha``, moves every pixel (bilinear sampling, zero fill). Built for the whole batch at
    once on its device: one draw, one blur, one ``grid_sample``.

    Drawing the field's random numbers is most of this transform's cost (the CPU generator makes one at a time).
    ``noise_spacing`` 2 or 4 draws one per 2x2 or 4x4 block of pixels instead, 4 or 16 times fewer, each a normal
    draw of the uniform's variance, smoothed by the same Gaussian (its taps scaled by the square root of the spacing
    along each axis): the field has the same mean, and the same covariance to within 1 % of its variance at spacing
    2 and 3 % at spacing 4 (sigma 4; less for a wider sigma; tests/test_augment.py computes it), and is Gaussian, as
    Simard's is by the central limit theorem. It is another stream of draws: a seed gives other fields than at
    spacing 1.

    Args:
        alpha: scale of the smoothed field, in pixels; 0 is the identity (Simard: 34 for 28x28 digits).
        sigma: width of the Gaussian that smooths the field, in pixels (Simard: 4); smaller is more local.
        noise_spacing: pixels between the field's random draws along each axis: 1 is Simard's (one uniform per pixel),
            2 or 4 (at most ``sigma``) the same field from fewer draws, faster.
    """

    def __init__(self, alpha: NonNegativeFloat = 34.0, sigma: PositiveFloat = 4.0, noise_spacing: Literal[1, 2, 4] = 1):
        if noise_spacing > sigma:
            raise ValueError(f"--data.augment.noise_spacing is {noise_spacing}, wider than sigma {sigma}: the field "
                             "would no longer be the smoothed white noise it stands for. Give a noise_spacing of at "
                             "most sigma (1 is always exact).")
        self.alpha, self.sigma, self.noise_spacing = alpha, sigma, noise_spacing
        self.constants: dict[tuple, torch.Tensor] = {}  # band matrices, built once per size, device and dtype

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, height, width = images.shape
        h = self.noise_spacing
        if h == 1:
            noise = torch.rand(batch, 2, height, width, generator=generator) * 2 - 1  # uniform: variance 1/3
        else:
            noise = torch.randn(batch, 2, -(-height // h), -(-width // h), generator=generator) * (1 / 3) ** 0.5
        return self.warp(images, self.smooth(noise.to(images.device), height, width) * self.alpha)

    def smooth(self, noise: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, 2, h, w) noise on the spacing's grid -> (B, 2, H, W), Gaussian-blurred with zero padding, as two
        matrix products: ``K_H @ noise @ K_W^T`` with K the banded (H, h) matrix of the 1-D Gaussian's taps. On 28x28
        that is ~16x faster than two 1-D convolutions, and torchvision's gaussian_blur is slower still."""
        return self.cached_band(height, noise) @ noise @ self.cached_band(width, noise).T

    def cached_band(self, n: int, like: torch.Tensor) -> torch.Tensor:
        key = (n, like.device, like.dtype)
        if key not in self.constants:
            self.constants[key] = self.band(n, like)
        return self.constants[key]

    def band(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(n, ceil(n / spacing)): the normalized Gaussian's weight of each draw (at the centre of its block) in each
        output pixel, cut at 3 sigma (0.3 % of its mass beyond), times sqrt(spacing) so that the sum of the squared
        weights, the field's variance, is the per-pixel one's."""
        h, radius = self.noise_spacing, math.ceil(3 * self.sigma)
        offset = torch.arange(n)[:, None] - (torch.arange(0, n, h)[None, :] + (h - 1) / 2)  # output i - draw j
        taps = torch.exp(-0.5 * (offset / self.sigma) ** 2) * (offset.abs() <= radius)
        norm = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / self.sigma) ** 2).sum()  # per-pixel taps' sum
        return (taps / norm * h ** 0.5).to(like)

    @staticmethod
    def warp(images: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        """(B, H, W) images, each pixel (y, x) of the result read at (y + field[:, 1], x + field[:, 0]) of its input;
        ``field`` (B, 2, H, W) in pixels."""
        batch, height, width = images.shape
        ys, xs = torch.meshgrid(torch.arange(height, device=images.device, dtype=images.dtype),
                                torch.arange(width, device=images.device, dtype=images.dtype), indexing="ij")
        # grid_sample's coordinates are -1..1 across the pixel centres (align_corners=True)
        grid = torch.stack([(xs + field[:, 0]) * 2 / (width - 1) - 1, (ys + field[:, 1]) * 2 / (height - 1) - 1], -1)
        return F.grid_sample(images.unsqueeze(1), grid, align_corners=True).squeeze(1)  # grid: (B, H, W, 2)


class ElasticAffine(Compose):
    """``ElasticDeformation`` then ``RandomAffine`` (Simard 2003's and Cireşan 2010's distortions), with every
    strength a flat argument, so that a search space or the command line reaches each one
    (``--data.augment.init_args.alpha 30``), which the list inside ``Compose`` does not allow. The same draws as
    ``Compose([ElasticDeformation(alpha, sigma), RandomAffine(degrees, translate, scale)])``.

    Args:
        alpha: scale of the elastic field, in pixels; 0: no elastic deformation.
        sigma: width of the Gaussian that smooths the field, in pixels.
        degrees: largest rotation, in degrees.
        translate: largest shift along x and along y, in pixels.
        scale: largest relative zoom in or out.
        noise_spacing: pixels between the elastic field's random draws (``ElasticDeformation``): 1 is Simard's, 2 or 4
            the same field from 4 or 16 times fewer draws.
    """

    def __init__(self, alpha: NonNegativeFloat = 34.0, sigma: PositiveFloat = 4.0, degrees: NonNegativeFloat = 10.0,
                 translate: NonNegativeFloat = 2.0, scale: NonNegativeFloat = 0.1, noise_spacing: Literal[1, 2, 4] = 1):
        super().__init__([ElasticDeformation(alpha, sigma, noise_spacing), RandomAffine(degrees, translate, scale)])
