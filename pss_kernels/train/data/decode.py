"""Decode only what a transform keeps: the crop box, at the smallest JPEG scale that still gives the
output size.

At keep rate 0.2 a ViT step is several times faster than at 1, and the loader must keep up; what it
spends its time on is decoding. A JPEG can be decoded at M/8 of its size for about that fraction of
the work (the inverse DCT at reduced size, as libjpeg-turbo offers: simplejpeg's `min_height` /
`min_width`, Pillow's `Image.draft`), and a random-resized crop of ImageNet's ~500 x 375 images to
224 px rarely needs the full size. So:

    (H, W) = the file's size from its header (no pixel decoded)
    box    = the transform's crop (top, left, h, w) in full-size pixels, drawn as before
    decode at the smallest scale s with h*s >= out_h and w*s >= out_w, crop the scaled box (uint8)

then the transform resizes that uint8 crop (torch's antialiased uint8 interpolation) and converts
to float once, at the output size. Decoders: "simplejpeg" (libjpeg-turbo, when installed),
"pillow" (draft mode), or "pillow-full" (decode everything, then crop: the pipeline as it was, kept
for the data benchmark's before/after). PNG and other formats always decode in full with Pillow.
On a CUDA device the training crops can be decoded on the GPU instead ("nvimgcodec", "nvjpeg";
gpu_decode.py): the loader workers then only read the bytes and draw the boxes.
The pixels of a reduced-scale decode differ slightly from a full decode followed by a resize; the
crop boxes and flips (the randomness) are the same.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Tuple, Union

import numpy as np
import torch

from ..optional_deps import require

CPU_DECODERS = ("simplejpeg", "pillow", "pillow-full")
GPU_DECODERS = ("nvimgcodec", "nvjpeg")  # train/data/gpu_decode.py: the training crops on the device
DECODERS = ("auto",) + CPU_DECODERS + GPU_DECODERS
Box = Tuple[int, int, int, int]  # top, left, height, width


def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def resolve_decoder(decoder: str, device=None) -> str:
    """The decoder "auto" means here: on a CUDA `device` (the training crops) a GPU decoder when one
    can be imported (nvimgcodec, else torchvision's nvjpeg) once that path has been validated on a GPU
    (gpu_decode.GPU_DECODE_VALIDATED), else simplejpeg when it can be imported, else Pillow's draft mode. A GPU decoder needs a CUDA `device` (ValueError naming --decoder)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if decoder in GPU_DECODERS and not on_cuda:
        raise ValueError(f"--decoder {decoder} decodes the training crops on a CUDA device; this run's device is "
                         f"{device if device is not None else 'not one'} (use auto, simplejpeg or pillow)")
    if decoder == "auto":
        from .gpu_decode import GPU_DECODE_VALIDATED, importable_gpu_decoder
        if on_cuda and GPU_DECODE_VALIDATED:
            gpu = importable_gpu_decoder()
            if gpu is not None:
                return gpu
        return "simplejpeg" if _simplejpeg() is not None else "pillow"
    if decoder == "simplejpeg" and _simplejpeg() is None:
        raise ValueError('decoder="simplejpeg" needs the simplejpeg package: pip install simplejpeg '
                         '(or pip install "pss-kernels[train]")')
    return decoder


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(3, h, w) uint8 from an (h, w, 3) array; a copy (Pillow's arrays are read-only views, and a crop
    of a larger decode should not keep the whole image alive)."""
    return torch.from_numpy(np.array(rgb, dtype=np.uint8, order="C")).permute(2, 0, 1)


def _pillow_open(data: bytes):
    import io
    Image = require("PIL.Image", "pillow", "--data folder")
    return Image.open(io.BytesIO(data))


def read(path: Union[str, Path]) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def image_size(data: bytes, decoder: str) -> Tuple[int, int]:
    """(height, width) of an encoded image from its header."""
    if decoder == "simplejpeg" and _is_jpeg(data):
        height, width, _, _ = _simplejpeg().decode_jpeg_header(data)
        return height, width
    with _pillow_open(data) as image:
        return image.height, image.width


def decode_full(data: bytes) -> torch.Tensor:
    """(3, H, W) uint8, the whole image with Pillow (any format, any mode -> RGB)."""
    with _pillow_open(data) as image:
        return _to_tensor(np.asarray(image.convert("RGB")))


def decode_box(data: bytes, size: Tuple[int, int], box: Box, out_size: Tuple[int, int], decoder: str) -> torch.Tensor:
    """(3, h', w') uint8: the region `box` of the image of full size `size` = (H, W), decoded at the
    smallest scale whose crop is still at least `out_size` = (out_h, out_w) (never above full size)."""
    (height, width), (top, left, box_h, box_w), (out_h, out_w) = size, box, out_size
    if decoder == "pillow-full" or not _is_jpeg(data):
        with _pillow_open(data) as image:
            return _to_tensor(np.asarray(image.convert("RGB"))[top:top + box_h, left:left + box_w])
    # The whole image at a scale s where the box still has out_h x out_w pixels.
    need_h = min(height, math.ceil(out_h * height / box_h))
    need_w = min(width, math.ceil(out_w * width / box_w))
    if decoder == "simplejpeg":
        rgb = _simplejpeg().decode_jpeg(data, colorspace="RGB", min_height=need_h, min_width=need_w)
    else:  # Pillow's draft mode: a scale 1/1, 1/2, 1/4 or 1/8 with the image at least the requested size
        with _pillow_open(data) as image:
            image.draft("RGB", (need_w, need_h))
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    # The box in the decoded image's pixels, rounded: it moves by at most half a decoded pixel (1/(2s)
    # source pixels) against the box drawn, which for a random crop is no different a crop.
    scale_h, scale_w = rgb.shape[0] / height, rgb.shape[1] / width
    y0, x0 = min(rgb.shape[0] - 1, round(top * scale_h)), min(rgb.shape[1] - 1, round(left * scale_w))
    y1 = max(y0 + 1, min(rgb.shape[0], round((top + box_h) * scale_h)))
    x1 = max(x0 + 1, min(rgb.shape[1], round((left + box_w) * scale_w)))
    return _to_tensor(rgb[y0:y1, x0:x1])
