"""Datasets for the trainer: an ImageFolder directory, synthetic images, scikit-learn's digits.

Every dataset is indexed by a *sample key* `(index, seed)` (what `ShardedSampler` yields) or a
plain int: the seed feeds a private torch.Generator for that sample's augmentation, so the
same key gives the same tensor in any worker, on any rank, before or after a resume.
Items are `(image (3, S, S) float32 normalised, label int)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..optional_deps import require
from .decode import GPU_DECODERS, read, resolve_decoder
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, ResizeTransform, TrainTransform

DATASETS = ("digits", "synthetic", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SampleKey = Union[int, Tuple[int, int]]
Transform = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]


def _split_key(key: SampleKey) -> Tuple[int, Optional[torch.Generator]]:
    if isinstance(key, tuple):
        index, seed = key
        return int(index), torch.Generator().manual_seed(int(seed))
    return int(key), None


def require_pillow():
    """PIL.Image, or MissingDependency saying which extra installs it."""
    return require("PIL.Image", "pillow", "--data folder")


def load_image(path: Union[str, Path]) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from a JPEG/PNG (any mode; converted to RGB)."""
    Image = require_pillow()
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)


def find_classes(root: Union[str, Path]) -> List[str]:
    """Sorted names of the class subdirectories of an ImageFolder root."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data directory {str(root)!r} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"data directory {str(root)!r} has no class subdirectories")
    return classes


class ImageFolder(Dataset):
    """root/<class name>/<image>.{jpg,jpeg,png}; classes default to the sorted subdirectory names.

    `decoder` (train/data/decode.py): "auto" (simplejpeg if installed, else Pillow's draft mode) and
    "simplejpeg" / "pillow" decode only the transform's crop, at the smallest JPEG scale that covers
    the output size; "pillow-full" decodes the whole image to float first (the pipeline as it was)."""

    def __init__(self, root: Union[str, Path], transform: Transform, classes: Optional[Sequence[str]] = None,
                 decoder: str = "auto"):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data directory {str(root)!r} does not exist")
        self.classes = list(classes) if classes is not None else find_classes(root)
        if classes is not None:
            # Images of a class the given list lacks (val/ against train/'s classes) would be dropped
            # without a word: refused instead, with the names.
            unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in self.classes
                             and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in p.rglob("*")))
            if unknown:
                raise ValueError(f"data directory {str(root)!r} has images of classes the training classes lack: "
                                 f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''} (the classes are train/'s "
                                 f"folder names, {len(self.classes)} of them: the model cannot predict these)")
        self.samples: List[Tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            class_dir = root / name
            if class_dir.is_dir():
                self.samples += [(p, label) for p in sorted(class_dir.rglob("*"))
                                 if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise ValueError(f"data directory {str(root)!r} has no {'/'.join(IMAGE_EXTENSIONS)} images")
        self.transform = transform
        self.decoder = resolve_decoder(decoder)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: SampleKey):
        index, generator = _split_key(key)
        path, label = self.samples[index]
        if self.decoder == "pillow-full" or not hasattr(self.transform, "from_bytes"):
            return self.transform(load_image(path), generator), label
        return self.transform.from_bytes(read(path), generator, self.decoder), label


class TensorImages(Dataset):
    """Images held in memory as (M, 3, h, w) in [0, 1] with labels (M,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: SampleKey):
        index, generator = _split_key(key)
        return self.transform(self.images[index], generator), int(self.labels[index])


class SyntheticImages(Dataset):
    """Random N(0, 1) images (uniform in [0, 1] with `unit_range`, for the device augmentation) and
    labels, generated per index from (seed, index): for speed runs.

    The image is the same whichever key's seed asks for it (no augmentation)."""

    def __init__(self, num_samples: int, num_classes: int, img_size: int, seed: int = 0, unit_range: bool = False):
        self.num_samples, self.num_classes, self.img_size, self.seed = num_samples, num_classes, img_size, seed
        self.unit_range = unit_range

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: SampleKey):
        index, _ = _split_key(key)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        generator = torch.Generator().manual_seed(self.seed * self.num_samples + index)
        draw = torch.rand if self.unit_range else torch.randn
        image = draw(3, self.img_size, self.img_size, generator=generator)
        return image, int(torch.randint(self.num_classes, (), generator=generator))


# Digits are 8x8 grey values 0..16. Mean 0 keeps the background at exactly 0, so the L1 patch
# score ranks strokes above background (a mean-subtracted background would score high).
DIGITS_MEAN, DIGITS_STD = (0.0, 0.0, 0.0), (0.5, 0.5, 0.5)
DIGITS_VAL_FRACTION = 0.2


def digits_split(train: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits (shipped with the package, no download) as (M, 3, 8, 8) in [0, 1],
    split 80/20 by a fixed permutation. Needs scikit-learn (the `train` extra)."""
    digits = require("sklearn.datasets", "scikit-learn", "--data digits").load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None].expand(-1, 3, -1, -1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    num_val = int(round(len(labels) * DIGITS_VAL_FRACTION))
    chosen = order[num_val:] if train else order[:num_val]
    return images[chosen].contiguous(), labels[chosen]


@dataclass(frozen=True)
class DataInfo:
    """What the model and the pictures need to know about a dataset."""
    num_classes: int
    img_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    gpu_decoder: Optional[str] = None   # the training split's GPU decoder (items are EncodedImage), or None


DEFAULT_IMG_SIZE = {"digits": 32, "synthetic": 224, "folder": 224}


def build_dataset(name: str, *, train: bool, img_size: Optional[int] = None, data_dir: Optional[str] = None,
                  num_classes: Optional[int] = None, synthetic_size: int = 1280, seed: int = 0,
                  normalize: bool = True, interpolation: str = "bilinear",
                  decoder: str = "auto", device=None) -> Tuple[Dataset, DataInfo]:
    """The train or validation split of `name` (see DATASETS) and its DataInfo.

    normalize=False: images in [0, 1], normalised later with DataInfo's mean / std (the device
    augmentation does that after RandAugment / colour jitter). `interpolation` (bilinear, bicubic)
    resamples the folder images' crops and resizes; `decoder` decodes them (ImageFolder). On a CUDA
    `device` the training split may decode on the GPU (decode.resolve_decoder; `info.gpu_decoder`
    names it): its items are then gpu_decode.EncodedImage, to collate with collate_encoded and turn
    into pixels with gpu_decode.DeviceImages in the training process. Validation decodes on the CPU.

    folder:    `data_dir`/train and `data_dir`/val in ImageFolder layout (val uses train's classes);
               needs pillow.
    synthetic: `synthetic_size` train images (a quarter of that for val), `num_classes` (default 1000).
    digits:    scikit-learn digits upscaled to img_size (default 32), 10 classes; needs scikit-learn.
    pillow and scikit-learn come with `pip install "pss-kernels[train]"`; without them a
    MissingDependency (an ImportError) says so in one line.
    """
    if name not in DATASETS:
        raise ValueError(f"data must be one of {DATASETS}, got {name!r}")
    size = img_size or DEFAULT_IMG_SIZE[name]
    if name == "digits":
        images, labels = digits_split(train)
        transform = ResizeTransform(size, DIGITS_MEAN, DIGITS_STD, normalize=normalize)
        return TensorImages(images, labels, transform), DataInfo(10, size, DIGITS_MEAN, DIGITS_STD)
    if name == "synthetic":
        classes = num_classes or 1000
        count = synthetic_size if train else max(1, synthetic_size // 4)
        # Train and val draw from disjoint seed ranges.
        dataset = SyntheticImages(count, classes, size, seed=2 * seed + (0 if train else 1), unit_range=not normalize)
        return dataset, DataInfo(classes, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    if data_dir is None:
        raise ValueError("data='folder' needs data_dir (a directory with train/ and val/ subdirectories)")
    require_pillow()  # here, not first in a loader worker where the error would arrive wrapped
    root = Path(data_dir)
    classes = find_classes(root / "train")
    transform = (TrainTransform(size, interpolation=interpolation, normalize=normalize) if train
                 else EvalTransform(size, interpolation=interpolation))
    gpu_decoder = None
    if train:
        resolved = resolve_decoder(decoder, device)
        if resolved in GPU_DECODERS:
            from .gpu_decode import EncodedTrainTransform
            gpu_decoder, transform, decoder = resolved, EncodedTrainTransform(transform), "pillow"
    elif decoder in GPU_DECODERS:
        decoder = "auto"  # validation decodes on the CPU
    dataset = ImageFolder(root / ("train" if train else "val"), transform, classes=classes, decoder=decoder)
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(f"num_classes={num_classes} but {str(root / 'train')!r} has {len(classes)} classes")
    return dataset, DataInfo(len(classes), size, IMAGENET_MEAN, IMAGENET_STD, gpu_decoder)
