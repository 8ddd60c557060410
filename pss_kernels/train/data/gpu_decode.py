"""Decoding the training crops on the GPU: loader workers read bytes, the training process decodes.

At rho = 0.2 a ViT step is several times cheaper than at rho = 1, and a CPU loader (about one core
per 250 images/s at 224 px here) stops keeping up long before. So with a GPU decoder:

    worker (CPU)    the file's bytes; its size from the header; the random-resized-crop box and the
                    flip drawn from the sample's generator, in the same order as TrainTransform does
                    (EncodedTrainTransform): same seeds -> same boxes and flips as the CPU path
    trainer (GPU)   the batch's crops decoded on the device (nvImageCodec: the hardware JPEG engines
                    of A100 / H100 / H200, batched, only the crop's region; else torchvision's batched
                    nvJPEG decode_jpeg(device="cuda") and a crop), then resized to the training size,
                    flipped and normalised on the device (finish_crops: the same order and the same
                    torch ops as TrainTransform._finish)

The pixels differ from the CPU path only by the decoder's rounding (and the DCT scale a CPU decode
may reduce to). A file the GPU decoder does not take (PNG, CMYK or progressive JPEGs it refuses, a
decode error) is decoded on the CPU in the training process, uploaded, and counted
(`DeviceImages.fallbacks`, logged per step): never a crash, never an image silently dropped.

Neither library is a requirement: `pip install "pss-kernels[gpu-data]"` (nvImageCodec); torchvision
with CUDA brings nvJPEG. Asking for a decoder that is missing is a one-line error naming the extra.

Status: the GPU decoders (`NvImageCodecDecoder`, `NvJpegDecoder`) have not run on a GPU yet; what the
CPU can check (the workers' bytes and boxes, the collation, the fallbacks and errors, finish_crops
against the CPU transform on the same pixels, the batch logic with a stand-in decoder) is tested.
"""
from __future__ import annotations

import importlib
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.utils.data import default_collate

from ..optional_deps import MissingDependency
from .decode import GPU_DECODERS, Box, _is_jpeg, decode_box, image_size
from .transforms import TrainTransform, random_resized_crop_box, resize

# `--decoder auto` picks a GPU decoder on CUDA only once this path has run and been measured on a GPU
# (as backend=None picks a kernel only once it has passed there); until then it is opt-in.
GPU_DECODE_VALIDATED = False
GPU_DATA_EXTRA = 'pip install "pss-kernels[gpu-data]"'


class EncodedImage(NamedTuple):
    """What a loader worker returns in place of pixels when the GPU decodes."""
    data: torch.Tensor          # (L,) uint8: the file's bytes
    box: Box                    # (top, left, height, width) of the crop in full-size pixels
    flip: bool                  # horizontal flip after the resize
    size: Tuple[int, int]       # (H, W) of the full image


class EncodedTrainTransform:
    """TrainTransform's randomness without its pixels (runs in the loader workers)."""

    def __init__(self, transform: TrainTransform):
        self.transform = transform

    def from_bytes(self, data: bytes, generator: Optional[torch.Generator], decoder: str = "pillow") -> EncodedImage:
        if generator is None:
            raise ValueError("EncodedTrainTransform needs a generator (its randomness must not touch the global RNG)")
        height, width = image_size(data, "pillow")  # the header only
        # The draws of TrainTransform.from_bytes, in its order: the box, then the flip (after the resize).
        box = random_resized_crop_box(height, width, generator, self.transform.scale)
        flip = torch.rand((), generator=generator).item() < 0.5
        return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip, (height, width))

    def __call__(self, image, generator=None):
        raise TypeError("EncodedTrainTransform encodes files only (ImageFolder with a GPU decoder)")


def collate_encoded(batch):
    """default_collate, except that EncodedImages stay a list (the files differ in length)."""
    first = batch[0]
    if isinstance(first, EncodedImage):
        return list(batch)
    if isinstance(first, tuple):
        return [collate_encoded(list(items)) for items in zip(*batch)]
    return default_collate(batch)


def finish_crops(crops: Sequence[torch.Tensor], flips: Sequence[bool], size: int, *, mean: Sequence[float],
                 std: Sequence[float], interpolation: str = "bilinear", normalize: bool = True) -> torch.Tensor:
    """(B, 3, size, size) float32 on the crops' device from uint8 (3, h, w) crops: TrainTransform._finish
    per image (antialiased uint8 resize, flip), then one normalisation of the batch."""
    if len(crops) != len(flips):
        raise ValueError(f"crops and flips must have the same length, got {len(crops)} and {len(flips)}")
    if not crops:
        raise ValueError("finish_crops needs at least one crop")
    device = crops[0].device
    out = torch.empty(len(crops), 3, size, size, device=device)
    for i, (crop, flip) in enumerate(zip(crops, flips)):
        image = resize(crop, (size, size), interpolation)
        out[i] = image.flip(-1) if flip else image
    if normalize:
        mean_t = torch.tensor(mean, dtype=out.dtype, device=device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=out.dtype, device=device).view(1, -1, 1, 1)
        out = (out - mean_t) / std_t
    return out


# ---- the GPU decoders --------------------------------------------------------------------------------
class BatchDecoder:
    """Decodes a batch's crops on `device`: a list with a uint8 (3, h, w) crop per item, or None for an
    item it does not take (DeviceImages decodes those on the CPU)."""

    name = "decoder"

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def decode(self, items: Sequence[EncodedImage]) -> List[Optional[torch.Tensor]]:
        raise NotImplementedError


class NvImageCodecDecoder(BatchDecoder):
    """nvImageCodec (nvidia-nvimgcodec-cu13): one batched call, each JPEG decoded only in its crop's
    region (the hardware JPEG engines where the GPU has them)."""

    name = "nvimgcodec"

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.nvimgcodec = _import("nvidia.nvimgcodec", "--decoder nvimgcodec", "nvidia-nvimgcodec-cu13")
        self.decoder = self.nvimgcodec.Decoder(device_id=self.device.index or 0)

    def _source(self, item: EncodedImage):
        """The item's file restricted to its crop's region (DecodeSource in nvImageCodec >= 0.7, a sub
        code stream before)."""
        nv = self.nvimgcodec
        top, left, height, width = item.box
        region = nv.Region(start=(top, left), end=(top + height, left + width))
        stream = nv.CodeStream(item.data.numpy().tobytes())
        if hasattr(nv, "DecodeSource"):
            return nv.DecodeSource(stream, region=region)
        return stream.get_sub_code_stream(region=region)

    def _decode(self, items: Sequence[EncodedImage], params) -> list:
        try:
            return list(self.decoder.decode([self._source(item) for item in items], params=params))
        except RuntimeError:  # a stream that fails the whole call: decode one by one to find it
            if len(items) == 1:
                return [None]
            return [self._decode([item], params)[0] for item in items]

    def decode(self, items: Sequence[EncodedImage]) -> List[Optional[torch.Tensor]]:
        crops: List[Optional[torch.Tensor]] = [None] * len(items)
        jpegs = [i for i, item in enumerate(items) if _is_jpeg(item.data[:3].numpy().tobytes())]
        if not jpegs:
            return crops
        params = self.nvimgcodec.DecodeParams(color_spec=self.nvimgcodec.ColorSpec.RGB, allow_any_depth=False)
        decoded = self._decode([items[i] for i in jpegs], params)
        for i, image in zip(jpegs, decoded):
            if image is not None:  # None: nvImageCodec could not decode that stream
                crops[i] = torch.as_tensor(image, device=self.device).permute(2, 0, 1)
        return crops


class NvJpegDecoder(BatchDecoder):
    """torchvision's batched nvJPEG (torchvision.io.decode_jpeg(list, device="cuda")), then the crop."""

    name = "nvjpeg"

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.io = _import("torchvision.io", "--decoder nvjpeg", "torchvision (a CUDA build)")

    def decode(self, items: Sequence[EncodedImage]) -> List[Optional[torch.Tensor]]:
        crops: List[Optional[torch.Tensor]] = [None] * len(items)
        jpegs = [i for i, item in enumerate(items) if _is_jpeg(item.data[:3].numpy().tobytes())]
        if not jpegs:
            return crops
        mode = self.io.ImageReadMode.RGB
        try:
            images = self.io.decode_jpeg([items[i].data for i in jpegs], mode=mode, device=self.device)
        except RuntimeError:  # one refused file fails the batch: decode one by one to find it
            images = []
            for i in jpegs:
                try:
                    images.append(self.io.decode_jpeg(items[i].data, mode=mode, device=self.device))
                except RuntimeError:
                    images.append(None)
        for i, image in zip(jpegs, images):
            if image is not None:
                top, left, height, width = items[i].box
                crops[i] = image[:, top:top + height, left:left + width]
        return crops


def _import(module: str, flag: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(f"{flag} needs {package}, which cannot be imported ({err}): {GPU_DATA_EXTRA}") \
            from None


def importable_gpu_decoder() -> Optional[str]:
    """The GPU decoder `--decoder auto` takes on a CUDA device: nvimgcodec, else nvjpeg (torchvision),
    else None (the CPU decoders)."""
    for name, module in (("nvimgcodec", "nvidia.nvimgcodec"), ("nvjpeg", "torchvision.io")):
        try:
            importlib.import_module(module)
            return name
        except ImportError:
            continue
    return None


def make_batch_decoder(name: str, device: torch.device) -> BatchDecoder:
    """The GPU decoder `name` on `device`; ValueError off CUDA, MissingDependency without its package."""
    if name not in GPU_DECODERS:
        raise ValueError(f"decoder must be one of {GPU_DECODERS} for GPU decoding, got {name!r}")
    if torch.device(device).type != "cuda":
        raise ValueError(f"--decoder {name} decodes on a CUDA device; this run's device is {device}")
    return {"nvimgcodec": NvImageCodecDecoder, "nvjpeg": NvJpegDecoder}[name](device)


class DeviceImages:
    """The training process's side: a batch of EncodedImages -> (B, 3, S, S) float32 on the device,
    decoded by `decoder`, the items it refuses decoded on the CPU (counted in `fallbacks`)."""

    def __init__(self, decoder: BatchDecoder, size: int, *, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear", normalize: bool = True):
        self.decoder, self.size, self.mean, self.std = decoder, size, tuple(mean), tuple(std)
        self.interpolation, self.normalize = interpolation, normalize
        self.fallbacks = 0   # images decoded on the CPU because the GPU decoder did not take them
        self.images = 0

    @property
    def name(self) -> str:
        return self.decoder.name

    def __call__(self, items: Sequence[EncodedImage]) -> torch.Tensor:
        if not items or not all(isinstance(item, EncodedImage) for item in items):
            raise TypeError("DeviceImages takes the list of EncodedImage a GPU-decoding loader yields")
        crops = self.decoder.decode(items)
        if len(crops) != len(items):
            raise RuntimeError(f"{self.decoder.name} returned {len(crops)} crops for {len(items)} images")
        device = self.decoder.device
        for i, crop in enumerate(crops):
            if crop is None:
                item = items[i]
                cpu = decode_box(item.data.numpy().tobytes(), item.size, item.box, (self.size, self.size), "pillow")
                crops[i] = cpu.to(device, non_blocking=True)
                self.fallbacks += 1
        self.images += len(items)
        return finish_crops(crops, [item.flip for item in items], self.size, mean=self.mean, std=self.std,
                            interpolation=self.interpolation, normalize=self.normalize)
