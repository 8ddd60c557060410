"""Batched augmentation on the training device (kornia), and the soft targets of Mixup / CutMix.

The CPU loader only decodes, crops and flips; what DeiT / SimMIM add on top runs here, on whole
batches, in this order (timm's):

    images in [0, 1] -> RandAugment (or colour jitter) -> normalise -> random erasing
                     -> Mixup or CutMix (one per batch) -> (images, soft targets)

Every random parameter is drawn from the global RNGs inside `seeded_rng(seed)` (kornia's modules
draw from them), with the seed a function of (run seed, step, rank): a resumed run augments the
batches exactly as the uninterrupted run did, and the training RNG state (dropout, drop-path) is
untouched. RandAugment's own draws are on the CPU; kornia's modules draw on the device the
pipeline was moved to (`.to(device)` moves their generators), which `seeded_rng` seeds too.

kornia is imported lazily: the trainer works without it while no augmentation here is asked for.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..optional_deps import require

_STEP_SEED_MIX = 0xD1B54A32D192ED03  # odd 64-bit constant: (seed, step, rank) -> well-spread 63-bit seeds


def _kornia(needed_for: str):
    """kornia's top-level module, or MissingDependency naming the flag that needs it."""
    return require("kornia", "kornia", needed_for)


def step_seed(seed: int, step: int, rank: int, world_size: int) -> int:
    """The augmentation seed of one rank's batch at `step`: distinct for every (seed, step, rank)."""
    return (seed * _STEP_SEED_MIX + step * world_size + rank) % (1 << 63)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device):
    """The block draws from CPU (and `device`'s) global RNG seeded with `seed`; the previous states
    come back afterwards (torch.random.fork_rng), so training randomness does not see the block."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
        yield


# ---- RandAugment -----------------------------------------------------------------------------

@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's `rand-...` string: m (magnitude, 0..10 scale), n (ops per image), mstd (std of the
    per-op Gaussian noise on m; > 100: uniform in [0, m]), mmax (clip for m), inc (severity grows
    with m for every op)."""
    magnitude: float = 10.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    increasing: bool = False

    @classmethod
    def parse(cls, text: str) -> "RandAugmentSpec":
        parts = text.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment spec must start with 'rand', got {text!r}")
        values = {}
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|mmax|inc|m|n)(\d+(?:\.\d*)?)", part)
            if match is None:
                raise ValueError(f"unknown RandAugment section {part!r} in {text!r} (known: m, n, mstd, mmax, inc)")
            key, value = match.groups()
            values[key] = float(value)
        std = values.get("mstd", 0.0)
        return cls(magnitude=values.get("m", 10.0), num_ops=int(values.get("n", 2)),
                   magnitude_std=math.inf if std > 100 else std, magnitude_max=values.get("mmax", 10.0),
                   increasing=bool(values.get("inc", 0)))


# Level -> argument, level = magnitude / 10 per image (timm's _LEVEL_DENOM), `sign` +-1 per image
# (timm's _randomly_negate). Each returns a (b,) float64 CPU tensor.
def _enhance(level, sign):            # 'Color', 'Contrast', ...: [0.1, 1.9]
    return level * 1.8 + 0.1


def _enhance_increasing(level, sign):  # 'ColorIncreasing', ...: 1 +- 0.9 level, at least 0.1
    return (1.0 + sign * level * 0.9).clamp(min=0.1)


def _posterize(level, sign):           # bits kept: 0 .. 4, severity falls with the level
    return (level * 4).floor()


def _posterize_increasing(level, sign):  # bits kept: 4 .. 0, severity grows with the level
    return 4 - (level * 4).floor()


def _solarize(level, sign):            # threshold on 0..255 pixels: 0 .. 256
    return (level * 256).floor()


def _solarize_increasing(level, sign):
    return 256 - (level * 256).floor()


def _solarize_add(level, sign):        # added to pixels below 128: 0 .. 110
    return (level * 110).floor()


def _rotate(level, sign):              # degrees, counter-clockwise: +-30 level
    return sign * level * 30.0


def _shear(level, sign):               # +-0.3 level
    return sign * level * 0.3


def _translate_rel(level, sign):       # fraction of the side: +-0.45 level
    return sign * level * 0.45


def _auto_contrast(images: torch.Tensor, _arg) -> torch.Tensor:
    # PIL's ImageOps.autocontrast: each channel stretched to [0, 1]. Written here because kornia's
    # normalize_min_max maps a constant channel to 0, where PIL leaves it as it is.
    low = images.amin(dim=(-2, -1), keepdim=True)
    high = images.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    stretched = (images - low) / span.clamp(min=1e-12)
    return torch.where(span > 0, stretched, images)


def _solarize_add_op(images: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    # PIL / timm: pixels below 128 get `add`, capped at 255; the rest are kept. kornia's solarize
    # with `additions` adds to every pixel and then inverts above the threshold: a different op.
    add = add.view(-1, 1, 1, 1).to(images)
    return torch.where(images < 128 / 255, (images + add / 255).clamp(max=1.0), images)


def _brightness_op(images, factor):
    return _kornia("RandAugment").enhance.adjust_brightness_accumulative(images, factor.to(images))


def _color_op(images, factor):
    return _kornia("RandAugment").enhance.adjust_saturation_with_gray_subtraction(images, factor.to(images))


def _contrast_op(images, factor):
    return _kornia("RandAugment").enhance.adjust_contrast_with_mean_subtraction(images, factor.to(images))


def _sharpness_op(images, factor):
    return _kornia("RandAugment").enhance.sharpness(images, factor.to(images))


def _posterize_op(images, bits):
    return _kornia("RandAugment").enhance.posterize(images, bits.to(device=images.device, dtype=torch.int64))


def _solarize_op(images, threshold):
    # PIL inverts the 0..255 pixels v >= threshold; in [0, 1] that is x >= threshold / 255.
    return _kornia("RandAugment").enhance.solarize(images, thresholds=(threshold / 255).to(images))


def _equalize_op(images, _arg):
    return _kornia("RandAugment").enhance.equalize(images)


def _invert_op(images, _arg):
    return _kornia("RandAugment").enhance.invert(images)


def _pil_inverse_matrices(kind: str, value: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(b, 3, 3) maps from output to input pixel positions as PIL's Image.transform / rotate take
    them (origin at the top-left corner of the image), float64."""
    b = value.shape[0]
    matrix = torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)
    value = value.to(torch.float64)
    if kind == "shear_x":
        matrix[:, 0, 1] = value
    elif kind == "shear_y":
        matrix[:, 1, 0] = value
    elif kind == "translate_x":
        matrix[:, 0, 2] = value * width
    elif kind == "translate_y":
        matrix[:, 1, 2] = value * height
    elif kind == "rotate":  # PIL's rotate(angle): counter-clockwise about the image centre
        angle = -torch.deg2rad(value)
        cx, cy = width / 2.0, height / 2.0
        cos, sin = torch.cos(angle), torch.sin(angle)
        matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 1, 0], matrix[:, 1, 1] = cos, sin, -sin, cos
        matrix[:, 0, 2] = cx - cos * cx - sin * cy
        matrix[:, 1, 2] = cy + sin * cx - cos * cy
    else:
        raise ValueError(kind)
    return matrix


def _geometric_op(kind: str, fill: torch.Tensor, interpolation: str):
    def apply(images: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        inverse = _pil_inverse_matrices(kind, value, height, width)
        # PIL's pixel centres sit at i + 0.5, kornia's (align_corners=True) at i: conjugate by the shift.
        shift = torch.eye(3, dtype=torch.float64)
        shift[0, 2] = shift[1, 2] = 0.5
        inverse = torch.linalg.inv(shift) @ inverse @ shift
        forward = torch.linalg.inv(inverse)[:, :2].to(images)  # kornia takes the source -> output map
        warped = _kornia("RandAugment").geometry.transform.warp_affine(
            images, forward, (height, width), mode=interpolation, padding_mode="fill", align_corners=True,
            fill_value=fill.to(images))
        return warped.clamp(0.0, 1.0) if interpolation == "bicubic" else warped
    return apply


@dataclass(frozen=True)
class _Op:
    name: str
    level_to_arg: Optional[Callable]
    apply: Callable


def rand_augment_ops(increasing: bool, fill: torch.Tensor, interpolation: str) -> List[_Op]:
    """timm's _RAND_INCREASING_TRANSFORMS (increasing) or _RAND_TRANSFORMS, in timm's order."""
    enhance = _enhance_increasing if increasing else _enhance
    geometric = {kind: _geometric_op(kind, fill, interpolation)
                 for kind in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")}
    return [
        _Op("AutoContrast", None, _auto_contrast),
        _Op("Equalize", None, _equalize_op),
        _Op("Invert", None, _invert_op),
        _Op("Rotate", _rotate, geometric["rotate"]),
        _Op("PosterizeIncreasing" if increasing else "Posterize",
            _posterize_increasing if increasing else _posterize, _posterize_op),
        _Op("SolarizeIncreasing" if increasing else "Solarize",
            _solarize_increasing if increasing else _solarize, _solarize_op),
        _Op("SolarizeAdd", _solarize_add, _solarize_add_op),
        _Op("ColorIncreasing" if increasing else "Color", enhance, _color_op),
        _Op("ContrastIncreasing" if increasing else "Contrast", enhance, _contrast_op),
        _Op("BrightnessIncreasing" if increasing else "Brightness", enhance, _brightness_op),
        _Op("SharpnessIncreasing" if increasing else "Sharpness", enhance, _sharpness_op),
        _Op("ShearX", _shear, geometric["shear_x"]),
        _Op("ShearY", _shear, geometric["shear_y"]),
        _Op("TranslateXRel", _translate_rel, geometric["translate_x"]),
        _Op("TranslateYRel", _translate_rel, geometric["translate_y"]),
    ]


class RandAugment(nn.Module):
    """timm's RandAugment (`rand-m9-mstd0.5-inc1` for DeiT / SimMIM) on a batch (B, 3, H, W) in [0, 1].

    Per image and per layer (num_ops layers): one op drawn uniformly from the 15 (with replacement,
    as timm's np.random.choice), applied with probability 0.5, magnitude m + N(0, mstd) clipped to
    [0, mmax] (timm's AugmentOp), a random sign for the symmetric ops. Geometric ops fill with
    `fill` (the dataset mean, timm's img_mean) and resample with `interpolation`.

    Why not kornia.augmentation.auto.RandAugment: it picks the ops once per *batch* (every image of
    a batch gets the same ops), applies each with probability 1, has no magnitude noise (mstd) and
    no "increasing" op set, and scales m over 0..30 with its own ranges (posterize 4..8 bits,
    translate +-0.1). So the policy above is written here, per image, and each op runs as kornia's
    batched kernel (kornia.enhance / kornia.geometry.warp_affine) on the images that drew it; PIL
    semantics kornia does not have (autocontrast of a flat channel, solarize-add) are written out.
    """

    PROBABILITY = 0.5  # timm's rand_augment_ops(prob=0.5)
    LEVEL_DENOM = 10.0

    def __init__(self, spec: RandAugmentSpec, fill: Sequence[float] = (0.5, 0.5, 0.5),
                 interpolation: str = "bilinear"):
        super().__init__()
        _kornia("RandAugment")
        self.spec = spec
        self.ops = rand_augment_ops(spec.increasing, torch.tensor(fill, dtype=torch.float32), interpolation)

    def draw(self, batch: int) -> Dict[str, torch.Tensor]:
        """One layer's parameters for `batch` images, from the global CPU RNG: op index, applied,
        magnitude, sign."""
        op = torch.randint(len(self.ops), (batch,))
        applied = torch.rand(batch) < self.PROBABILITY
        magnitude = torch.full((batch,), self.spec.magnitude, dtype=torch.float64)
        if math.isinf(self.spec.magnitude_std):
            magnitude = torch.rand(batch, dtype=torch.float64) * self.spec.magnitude
        elif self.spec.magnitude_std > 0:
            magnitude = magnitude + self.spec.magnitude_std * torch.randn(batch, dtype=torch.float64)
        magnitude = magnitude.clamp(0.0, self.spec.magnitude_max)
        sign = torch.where(torch.rand(batch) > 0.5, -1.0, 1.0).to(torch.float64)
        return {"op": op, "applied": applied, "magnitude": magnitude, "sign": sign}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for _ in range(self.spec.num_ops):
            params = self.draw(images.shape[0])
            for index, op in enumerate(self.ops):
                rows = ((params["op"] == index) & params["applied"]).nonzero().flatten()  # CPU: no device sync
                if rows.numel() == 0:
                    continue
                level = params["magnitude"][rows] / self.LEVEL_DENOM
                arg = op.level_to_arg(level, params["sign"][rows]) if op.level_to_arg is not None else None
                rows_on_device = rows.to(images.device, non_blocking=True)
                # index_put_ (not index_copy_): it has a deterministic CUDA path for --deterministic.
                images = images.index_put((rows_on_device,), op.apply(images.index_select(0, rows_on_device), arg))
        return images


# ---- colour jitter, erasing ----------------------------------------------------------------

def build_color_jitter(strength: float) -> nn.Module:
    """kornia's ColorJitter (torchvision's formulas, random order per call): brightness, contrast and
    saturation factors in [1 - s, 1 + s], no hue (timm's color_jitter=s), per image, on [0, 1]."""
    return _kornia("--color-jitter").augmentation.ColorJitter(brightness=strength, contrast=strength,
                                                              saturation=strength, hue=0.0, p=1.0)


class RandomErasing(nn.Module):
    """timm's RandomErasing(probability, mode="pixel", max_count=1) on a normalised batch: per image
    with probability p, one box of area fraction in [0.02, 1/3] and aspect ratio in [0.3, 1/0.3] is
    filled with per-pixel N(0, 1) noise.

    The boxes come from kornia's RandomErasing (run on a ones mask: its erased pixels are the box).
    kornia fills a box with one constant; DeiT fills it with noise ("pixel" mode), written here.
    kornia keeps every box inside the image and draws the ratio uniformly on each side of 1 (timm:
    log-uniform, up to 10 tries): the same family of boxes, a slightly different ratio law.
    """

    SCALE, RATIO = (0.02, 1 / 3), (0.3, 1 / 0.3)

    def __init__(self, probability: float):
        super().__init__()
        self.probability = probability
        self.boxes = _kornia("--random-erasing").augmentation.RandomErasing(
            scale=self.SCALE, ratio=self.RATIO, value=0.0, p=probability)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        erased = self.boxes(images.new_ones(batch, 1, height, width)) == 0
        noise = torch.randn(images.shape, device=images.device, dtype=images.dtype)
        return torch.where(erased, noise, images)


# ---- Mixup / CutMix ------------------------------------------------------------------------

def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B, K) targets: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere (timm)."""
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over the batch of sum_c -targets[c] log softmax(logits)[c] (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


class TrainLoss(nn.Module):
    """Cross-entropy with label smoothing for class labels (B,), soft-target cross-entropy for
    Mixup / CutMix targets (B, K) (which carry the smoothing already)."""

    def __init__(self, label_smoothing: float):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.is_floating_point():
            return soft_target_cross_entropy(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)


class MixupCutmix(nn.Module):
    """timm's Mixup(mixup_alpha, cutmix_alpha, switch_prob, mode="batch", label_smoothing): per batch
    either Mixup or CutMix (CutMix with probability switch_prob when both are on), one lambda for
    the whole batch, each image mixed with a partner (a random permutation of the batch);
    targets = keep * smooth(label) + (1 - keep) * smooth(partner's label), keep = the share of the
    image's own pixels (Mixup: lambda ~ Beta(a, a); CutMix: 1 - box area / image area).

    CutMix is kornia's RandomCutMixV2 (same_on_batch: one box per batch, lambda ~ Beta(a, a);
    use_correct_lambda: it reports 1 - pasted area / image area, the image's own share). Its box
    always lies inside the image; timm's is centred anywhere and clipped, with lambda corrected
    to the clipped area: the same quantity, a slightly different law of box positions.
    What kornia lacks is written here: the per-batch switch between Mixup and CutMix (each is a
    module of its own there), the smoothed soft targets (kornia returns (label, partner's label,
    lambda) rows), and Mixup itself: kornia's RandomMixUpV2 draws lambda uniformly and per image,
    timm's DeiT recipe one Beta(a, a) lambda per batch, with which the mix is one lerp.
    """

    def __init__(self, *, mixup_alpha: float, cutmix_alpha: float, switch_prob: float, label_smoothing: float,
                 num_classes: int):
        super().__init__()
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("MixupCutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mixup_alpha, self.cutmix_alpha, self.switch_prob = mixup_alpha, cutmix_alpha, switch_prob
        self.label_smoothing, self.num_classes = label_smoothing, num_classes
        self.cutmix = _kornia("--cutmix").augmentation.RandomCutMixV2(
            beta=cutmix_alpha, same_on_batch=True, use_correct_lambda=True, data_keys=["input", "class"]) \
            if cutmix_alpha > 0 else None

    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mixed images, partner index (B,), keep (B,)): row i is keep[i] of image i and 1 - keep[i]
        of image partner[i]."""
        use_cutmix = self.cutmix is not None and (self.mixup_alpha <= 0 or float(torch.rand(())) < self.switch_prob)
        if use_cutmix:
            mixed, rows = self.cutmix(images, labels)
            partner = self.cutmix._params["mix_pairs"][0]  # num_mix = 1; _params: the draw kornia just used
            keep = rows[0, :, 2]
        else:
            lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
            partner = torch.randperm(images.shape[0])
            mixed = images.lerp(images.index_select(0, partner.to(images.device)), 1.0 - lam)
            keep = torch.full((images.shape[0],), lam)
        return mixed, partner.to(labels.device), keep.to(device=labels.device, dtype=torch.float32)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mixed, partner, keep = self.mix(images, labels)
        own = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        keep = keep.view(-1, 1)
        return mixed, keep * own + (1.0 - keep) * own.index_select(0, partner)


# ---- the pipeline ----------------------------------------------------------------------------

class DeviceAugment(nn.Module):
    """The batch augmentation of a run, composed once: __call__(images, labels, seed) ->
    (images, targets). `images` arrive in [0, 1] when `unit_range` (RandAugment or colour jitter on:
    they are defined on pixel values) and normalised otherwise; they leave normalised. `targets` are
    the labels, or soft targets (B, K) with Mixup / CutMix."""

    def __init__(self, *, mean: Sequence[float], std: Sequence[float], num_classes: int,
                 rand_augment: Optional[str] = None, color_jitter: float = 0.0, random_erasing: float = 0.0,
                 mixup: float = 0.0, cutmix: float = 0.0, switch_prob: float = 0.5, label_smoothing: float = 0.0,
                 interpolation: str = "bilinear"):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        # timm: colour jitter is off whenever RandAugment is on (DeiT's 0.3 is inactive in its own run).
        self.rand_augment = RandAugment(RandAugmentSpec.parse(rand_augment), fill=mean,
                                        interpolation=interpolation) if rand_augment else None
        self.color_jitter = build_color_jitter(color_jitter) if color_jitter > 0 and self.rand_augment is None else None
        self.random_erasing = RandomErasing(random_erasing) if random_erasing > 0 else None
        self.mixup_cutmix = MixupCutmix(mixup_alpha=mixup, cutmix_alpha=cutmix, switch_prob=switch_prob,
                                        label_smoothing=label_smoothing, num_classes=num_classes) \
            if mixup > 0 or cutmix > 0 else None

    @property
    def unit_range(self) -> bool:
        """True when the loader must deliver un-normalised images in [0, 1]."""
        return self.rand_augment is not None or self.color_jitter is not None

    @property
    def soft_targets(self) -> bool:
        return self.mixup_cutmix is not None

    def forward(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), seeded_rng(seed, images.device):
            if self.unit_range:
                if self.rand_augment is not None:
                    images = self.rand_augment(images)
                if self.color_jitter is not None:
                    images = self.color_jitter(images)
                images = (images - self.mean) / self.std
            if self.random_erasing is not None:
                images = self.random_erasing(images)
            if self.mixup_cutmix is not None:
                return self.mixup_cutmix(images, labels)
            return images, labels


def augment_flags(config) -> List[str]:
    """The flags of `config` that ask for device augmentation (each needs kornia)."""
    asked = {"--rand-augment": bool(config.rand_augment), "--color-jitter": config.color_jitter > 0,
             "--random-erasing": config.random_erasing > 0, "--mixup": config.mixup > 0, "--cutmix": config.cutmix > 0}
    return [flag for flag, on in asked.items() if on]


def needs_unit_range(config) -> bool:
    """Whether the loader must deliver images in [0, 1] (DeviceAugment.unit_range of this config)."""
    return bool(config.rand_augment) or config.color_jitter > 0


def check_augment_dependencies(config) -> None:
    """MissingDependency (one line, naming the flag) when an augmentation is asked for without kornia."""
    flags = augment_flags(config)
    if flags:
        _kornia(" / ".join(flags))


def build_device_augment(config, mean: Sequence[float], std: Sequence[float],
                         num_classes: int) -> Optional[DeviceAugment]:
    """The run's DeviceAugment, or None when the config asks for none of it (kornia not needed)."""
    if not augment_flags(config):
        return None
    check_augment_dependencies(config)
    return DeviceAugment(mean=mean, std=std, num_classes=num_classes, rand_augment=config.rand_augment,
                         color_jitter=config.color_jitter, random_erasing=config.random_erasing, mixup=config.mixup,
                         cutmix=config.cutmix, switch_prob=config.mixup_switch_prob,
                         label_smoothing=config.label_smoothing, interpolation=config.interpolation)
