"""Image transforms in plain torch (no torchvision): crop, resize, flip, normalise.

Images are (3, H, W) float tensors in [0, 1]. With `normalize=False` they stay in [0, 1] (for the
device-side augmentation, which normalises after RandAugment / colour jitter: train/data/augment.py). Random transforms draw from the `generator`
they are given, never from the global RNG, so a sample's augmentation is a function of its
seed alone (the sampler derives it from (seed, epoch, index)): resumed runs and any number of
loader workers see the same crops.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .decode import decode_box, image_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")


def resize(image: torch.Tensor, size: Tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Resize to (height, width), antialiased when shrinking; bicubic (DeiT's, timm's
    RandomResizedCrop(interpolation="bicubic")) is clamped to [0, 1] as PIL's 8-bit result is.
    A uint8 image (a decoded crop, train/data/decode.py) is resized in uint8 (torch's vectorised uint8
    path, which saturates) and comes back as float in [0, 1]: one float conversion, at the output size."""
    if image.dtype == torch.uint8:
        if tuple(image.shape[-2:]) != tuple(size):
            image = F.interpolate(image[None].contiguous(), size=size, mode=interpolation, align_corners=False,
                                  antialias=True)[0]
        return image.float().div_(255.0)
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    resized = F.interpolate(image[None], size=size, mode=interpolation, align_corners=False, antialias=True)[0]
    return resized.clamp_(0.0, 1.0) if interpolation == "bicubic" else resized


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float], enabled: bool = True) -> torch.Tensor:
    if not enabled:
        return image
    mean_t = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image - mean_t) / std_t


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def random_resized_crop_box(height: int, width: int, generator: torch.Generator,
                            scale: Tuple[float, float] = (0.08, 1.0),
                            ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a random fraction `scale` of the area with a random
    aspect ratio (log-uniform in `ratio`); Inception's recipe, centre crop after 10 misses."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


class TrainTransform:
    """RandomResizedCrop(size) + horizontal flip (p = 0.5) + normalise (DeiT's geometric part)."""

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 scale: Tuple[float, float] = (0.08, 1.0), interpolation: str = "bilinear", normalize: bool = True):
        self.size, self.mean, self.std, self.scale = size, tuple(mean), tuple(std), scale
        self.interpolation, self.normalize = interpolation, normalize

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if generator is None:
            raise ValueError("TrainTransform needs a generator (its randomness must not touch the global RNG)")
        top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], generator, self.scale)
        return self._finish(image[:, top:top + h, left:left + w], generator)

    def from_bytes(self, data: bytes, generator: Optional[torch.Generator], decoder: str) -> torch.Tensor:
        """The same transform of an encoded image, decoding only the crop (train/data/decode.py): the same
        crop box and flip as __call__ for the same generator state."""
        if generator is None:
            raise ValueError("TrainTransform needs a generator (its randomness must not touch the global RNG)")
        height, width = image_size(data, decoder)
        box = random_resized_crop_box(height, width, generator, self.scale)
        return self._finish(decode_box(data, (height, width), box, (self.size, self.size), decoder), generator)

    def _finish(self, crop: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        image = resize(crop, (self.size, self.size), self.interpolation)
        if torch.rand((), generator=generator).item() < 0.5:
            image = image.flip(-1)
        return normalize(image, self.mean, self.std, self.normalize)


class EvalTransform:
    """Resize the shorter side to size / crop_fraction, centre crop `size`, normalise."""

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 crop_fraction: float = 0.875, interpolation: str = "bilinear"):
        self.size, self.mean, self.std, self.crop_fraction = size, tuple(mean), tuple(std), crop_fraction
        self.interpolation = interpolation

    def _resized_size(self, height: int, width: int) -> Tuple[int, int]:
        scale = int(round(self.size / self.crop_fraction)) / min(height, width)
        return max(self.size, round(height * scale)), max(self.size, round(width * scale))

    def from_bytes(self, data: bytes, generator: Optional[torch.Generator], decoder: str) -> torch.Tensor:
        """The same transform of an encoded image, decoded at the smallest scale that still covers the
        resize (train/data/decode.py)."""
        height, width = image_size(data, decoder)
        return self(decode_box(data, (height, width), (0, 0, height, width), self._resized_size(height, width),
                               decoder))

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        image = resize(image, self._resized_size(*image.shape[-2:]), self.interpolation)
        top = (image.shape[-2] - self.size) // 2
        left = (image.shape[-1] - self.size) // 2
        return normalize(image[:, top:top + self.size, left:left + self.size], self.mean, self.std)


class ResizeTransform:
    """Resize to size x size and normalise (small, pre-cropped images such as digits)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], normalize: bool = True):
        self.size, self.mean, self.std, self.normalize = size, tuple(mean), tuple(std), normalize

    def __call__(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return normalize(resize(image, (self.size, self.size)), self.mean, self.std, self.normalize)
