"""Training-time augmentation of whole batches on the device that holds them: no PIL, no per-sample Python.

    python -m mnist_lit fit --config configs/default.yaml --config configs/experiment/mlp_99.yaml

``RandomAffine`` rotates, scales, shears and shifts each image of a batch by its own random amount
with one ``affine_grid`` + ``grid_sample`` call. ``MNISTDataModule(augment=...)`` applies it to
training batches only, before normalization (so the background it fills in is black).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat


class RandomAffine:
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
