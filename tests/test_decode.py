"""Decoding only the crop (pss_kernels/train/data/decode.py) and the data benchmark (benchmarks/data.py)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pss_kernels.train.data import ImageFolder, decode, load_image
from pss_kernels.train.data.transforms import EvalTransform, TrainTransform

REPO = Path(__file__).resolve().parents[1]
# simplejpeg is optional (the train extra): without it its cases skip and say so.
SIMPLEJPEG = pytest.param("simplejpeg", marks=pytest.mark.skipif(decode._simplejpeg() is None,
                                                                 reason="simplejpeg is not installed (train extra)"))
DECODERS = ["pillow", "pillow-full", SIMPLEJPEG]


def smooth_image(height=375, width=500, seed=0):
    """A photograph-like image: a bicubic upsampling of coarse random colours (little high frequency,
    so a JPEG decoded at a reduced DCT scale is close to the full decode downscaled)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def save(pixels, path, fmt="JPEG"):
    from PIL import Image

    Image.fromarray(pixels).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def test_resolve_decoder(monkeypatch):
    assert decode.resolve_decoder("pillow") == "pillow" and decode.resolve_decoder("pillow-full") == "pillow-full"
    with pytest.raises(ValueError, match="decoder must be one of"):
        decode.resolve_decoder("turbo")
    monkeypatch.setattr(decode, "_simplejpeg", lambda: None)
    assert decode.resolve_decoder("auto") == "pillow"
    with pytest.raises(ValueError, match="needs the simplejpeg package"):
        decode.resolve_decoder("simplejpeg")


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_header_size_and_full_scale_crop_equal_the_full_decode(decoder, fmt, tmp_path):
    pixels = smooth_image()
    data = save(pixels, tmp_path / "a.img", fmt).read_bytes()
    assert decode.image_size(data, decoder) == (375, 500)
    full = decode.decode_full(data)
    box = (40, 70, 200, 300)
    # An output as large as the box: no reduced scale is allowed, so the crop is the full decode's.
    crop = decode.decode_box(data, (375, 500), box, (200, 300), decoder)
    assert crop.dtype == torch.uint8 and torch.equal(crop, full[:, 40:240, 70:370])


@pytest.mark.parametrize("decoder", ["pillow", SIMPLEJPEG])
def test_small_outputs_decode_at_a_reduced_scale_that_still_covers_them(decoder, tmp_path):
    data = save(smooth_image(600, 800), tmp_path / "a.jpg").read_bytes()
    crop = decode.decode_box(data, (600, 800), (0, 0, 600, 800), (100, 100), decoder)
    assert 100 <= crop.shape[1] < 600 and 100 <= crop.shape[2] < 800  # smaller than full, never below the output
    box = (100, 200, 300, 300)  # a 300 x 300 box for a 120 x 120 output: scale >= 0.4
    crop = decode.decode_box(data, (600, 800), box, (120, 120), decoder)
    assert crop.shape[1] >= 120 and crop.shape[2] >= 120 and crop.shape[1] < 300
    # The pixels: the full decode's box, downscaled to the crop's size, within a few levels.
    full = decode.decode_full(data)[:, 100:400, 200:500].float()[None]
    expected = torch.nn.functional.interpolate(full, size=crop.shape[1:], mode="bilinear", antialias=True)[0]
    assert (crop.float() - expected).abs().mean() < 3.0


@pytest.mark.parametrize("decoder", DECODERS)
def test_transforms_from_bytes_draw_the_same_crops_and_flips(decoder, tmp_path):
    path = save(smooth_image(), tmp_path / "a.jpg")
    data = path.read_bytes()
    transform = TrainTransform(96, interpolation="bicubic")
    for seed in range(4):
        generator_a, generator_b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        from_bytes = transform.from_bytes(data, generator_a, decoder)
        reference = transform(load_image(path), generator_b)
        assert torch.equal(generator_a.get_state(), generator_b.get_state())  # the same draws, in order
        assert from_bytes.shape == reference.shape == (3, 96, 96)
        # A reduced-scale decode moves the box by up to half a decoded pixel: a sub-pixel shift of a
        # random crop. A wrong box (axes swapped, scale misread) differs by ~0.5-1 in these units.
        assert (from_bytes - reference).abs().mean() < 0.15
    evaluation = EvalTransform(96)
    assert (evaluation.from_bytes(data, None, decoder) - evaluation(load_image(path))).abs().mean() < 0.15


def test_image_folder_pillow_full_is_the_pipeline_as_it_was(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            save(smooth_image(seed=i), tmp_path / label / f"{i}.jpg")
    transform = TrainTransform(64)
    old = ImageFolder(tmp_path, transform, decoder="pillow-full")
    new = ImageFolder(tmp_path, transform, decoder="pillow")
    for key in ((0, 5), (3, 9)):
        image, label = old[key]
        path, want_label = old.samples[key[0]]
        assert label == want_label
        assert torch.equal(image, transform(load_image(path), torch.Generator().manual_seed(key[1])))
        assert (new[key][0] - image).abs().mean() < 0.15


def test_data_benchmark_runs_and_compares_decoders(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import data as data_benchmark

    monkeypatch.chdir(tmp_path)
    report = data_benchmark.main(["--images", "24", "--batch-size", "4", "--batches", "3", "--workers", "0",
                                  "--img-size", "64", "--model", "deit_tiny", "--keep-rates", "1.0", "0.5",
                                  "--device", "cpu", "--out-dir", str(tmp_path)])
    assert [row["decoder"] for row in report["loader"]] == ["pillow-full", "auto"]
    assert all(row["images_per_s"] > 0 and row["images"] == 12 for row in report["loader"])
    assert [row["keep_rate"] for row in report["model"]] == [1.0, 0.5]
    assert all(0 < verdict["auto_feeds_fraction"] <= 1 for verdict in report["verdicts"])
    (json_path,) = tmp_path.glob("data_*.json")
    assert json.loads(json_path.read_text())["config"]["model"] == "deit_tiny"
    assert len(list(tmp_path.glob("data_*.png"))) == 1
