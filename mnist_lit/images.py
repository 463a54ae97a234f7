"""The user's own pictures made to look like MNIST digits, for ``predict``.

    python -m mnist_lit predict --ckpt_path logs/mnist/version_0/checkpoints/last.ckpt --data.predict_images 'my/*.png'

``load_images`` turns files, globs and folders into (N, 28, 28) uint8 digits prepared the way
MNIST's were: grayscale, white ink on black (a light background is detected and inverted), the
ink's bounding box scaled to fit 20x20 keeping its aspect ratio, then placed so that its centre
of mass is where MNIST's are, pixel (14, 14).
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
INK = 0.2  # share of the brightest ink above which a pixel counts towards the digit's bounding box


def find_images(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named, matched by a glob, or inside a folder (its image files, sorted); plus what matched nothing."""
    found, problems = [], []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                problems.append((item, f"the folder holds no image file ({', '.join(sorted(IMAGE_SUFFIXES))})"))
            found += files
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            files = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
            if not files:
                problems.append((item, "the pattern matches no file"))
            found += files
        else:
            problems.append((item, "no such file or folder"))
    return list(dict.fromkeys(found)), problems  # each file once, in the order given


def without_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels become the background: white behind dark ink, black behind light ink."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return image
    rgba = image.convert("RGBA")
    alpha, gray = (as_tensor(channel) for channel in (rgba.getchannel("A"), rgba.convert("L")))
    dark_ink = gray[alpha > 127].float().mean() < 128 if (alpha > 127).any() else True
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if dark_ink else (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba)


def as_tensor(gray: Image.Image) -> torch.Tensor:
    """(H, W) float pixel values of a one-band 8-bit image."""
    return torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(gray.height, gray.width).float()


def grayscale(image: Image.Image) -> torch.Tensor:
    """(H, W) float values 0..255 of any picture: upright (EXIF), transparency filled, colour or 16-bit reduced."""
    image = without_alpha(ImageOps.exif_transpose(image))
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # 16/32-bit: stretch to 0..255, do not clip
        values = torch.from_numpy(numpy.asarray(image, dtype=numpy.float32).copy())
        low, high = values.min(), values.max()
        return (values - low) * (255 / (high - low)) if high > low else torch.zeros_like(values)
    return as_tensor(image.convert("L"))


def to_mnist(image: Image.Image) -> torch.Tensor:
    """One picture of a digit -> (28, 28) uint8, white ink on black, scaled and centred like MNIST."""
    pixels = grayscale(image)
    border = torch.cat([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = border.median()
    if background > 127:  # dark digit on light paper: MNIST is the reverse
        pixels, background = 255 - pixels, 255 - background
    ink = (pixels - background).clamp(min=0)
    if ink.max() < 32:
        raise ValueError("no digit found: the image is (nearly) one flat colour")
    ink /= ink.max()
    rows, cols = (ink > INK).nonzero().unbind(1)
    ink = ink[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    height, width = ink.shape
    fit = 20 / max(height, width)  # MNIST: the longer side fills a 20x20 box
    size = max(1, round(height * fit)), max(1, round(width * fit))
    small = F.interpolate(ink[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    canvas = torch.zeros(28, 28)
    top, left = (28 - size[0]) // 2, (28 - size[1]) // 2
    canvas[top: top + size[0], left: left + size[1]] = small.clamp(0, 1)
    # Move the centre of mass to pixel (14, 14), where MNIST's lie (training-set mean 14.00 ± 0.29 in rows and in
    # columns, 0-based), keeping the digit inside the field.
    mass = canvas.sum()
    center_y = (canvas.sum(1) * torch.arange(28.0)).sum() / mass
    center_x = (canvas.sum(0) * torch.arange(28.0)).sum() / mass
    dy = int(round(14 - center_y.item()))
    dx = int(round(14 - center_x.item()))
    dy, dx = min(max(dy, -top), 28 - top - size[0]), min(max(dx, -left), 28 - left - size[1])
    return (canvas.roll((dy, dx), dims=(0, 1)) * 255).round().to(torch.uint8)


def load_images(inputs: list[str]) -> tuple[list[Path], torch.Tensor, list[tuple[str, str]]]:
    """The readable pictures among ``inputs`` as (N, 28, 28) uint8 digits, and (file, reason) for the others."""
    paths, problems = find_images(inputs)
    loaded, digits = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                digits.append(to_mnist(image))
            loaded.append(path)
        except Exception as err:  # any failure is this one file's: name it, predict the others
            problems.append((str(path), str(err) or type(err).__name__))
    return loaded, torch.stack(digits) if digits else torch.zeros(0, 28, 28, dtype=torch.uint8), problems
