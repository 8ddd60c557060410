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


# A wide, short box and a tall, narrow one on an 800 x 600 JPEG: one side alone sets the scale. By hand
# (need = ceil(out * full / box) per side; Pillow's draft scales 1/1, 1/2, 1/4, 1/8; simplejpeg's M/8):
#   wide: need_h = ceil(43 * 600 / 190) = 136, need_w = ceil(211 * 800 / 713) = 237 (the width limits)
#         Pillow 1/2 -> 300 x 400 image, box rows round(61.5)..round(156.5) = 62..156, cols 20..377;
#         simplejpeg 3/8 -> 225 x 300, rows round(46.125)..round(117.375) = 46..117, cols 15..283.
#   tall: need_h = ceil(157 * 600 / 546) = 173 (the height limits), need_w = ceil(29 * 800 / 171) = 136
#         Pillow 1/2 -> rows 20..294, cols 62..147; simplejpeg 3/8 -> rows 15..220, cols 46..110.
# A scale chosen from the other side only (1/4: 178 x 133 px wide) would crop narrower than the output.
ONE_SIDED_BOXES = {
    "wide": ((123, 41, 190, 713), (43, 211), {"pillow": (94, 357), "simplejpeg": (71, 268)}),
    "tall": ((41, 123, 546, 171), (157, 29), {"pillow": (274, 85), "simplejpeg": (205, 64)}),
}


@pytest.mark.parametrize("shape", ["wide", "tall"])
@pytest.mark.parametrize("decoder", ["pillow", SIMPLEJPEG])
def test_one_sided_crop_boxes_decode_at_least_the_output_size(decoder, shape, tmp_path):
    data = save(smooth_image(600, 800), tmp_path / "a.jpg").read_bytes()
    box, out_size, expected_size = ONE_SIDED_BOXES[shape]
    top, left, box_h, box_w = box
    crop = decode.decode_box(data, (600, 800), box, out_size, decoder)
    assert crop.shape[1] >= out_size[0] and crop.shape[2] >= out_size[1]  # never below the output
    assert crop.shape[1] < box_h and crop.shape[2] < box_w  # and still a reduced scale
    assert tuple(crop.shape[1:]) == expected_size[decoder]  # the smallest scale that covers both sides
    full = decode.decode_full(data)[:, top:top + box_h, left:left + box_w].float()[None]
    downscaled = torch.nn.functional.interpolate(full, size=crop.shape[1:], mode="bilinear", antialias=True)[0]
    assert (crop.float() - downscaled).abs().mean() < 3.0  # the box's pixels, not a shifted region


@pytest.mark.parametrize("decoder", DECODERS)
def test_output_larger_than_a_corner_box_decodes_the_box_at_full_scale(decoder, tmp_path):
    # Up-sampling (a 187 x 283 box to 224 x 224): the need is capped at the full size, never above it,
    # and a box flush with the bottom-right corner keeps its last row and column.
    data = save(smooth_image(600, 800), tmp_path / "a.jpg").read_bytes()
    crop = decode.decode_box(data, (600, 800), (413, 517, 187, 283), (224, 224), decoder)
    assert torch.equal(crop, decode.decode_full(data)[:, 413:600, 517:800])


@pytest.mark.parametrize("decoder", ["pillow", SIMPLEJPEG])
def test_a_need_just_above_a_scale_rounds_up_to_the_next_scale(decoder, tmp_path):
    # 357 px out of a 713 px wide box: need_w = 357 * 800 / 713 = 400.56, just above the 1/2-scale width
    # (400). Rounded up (401): Pillow decodes in full, simplejpeg at 5/8. Rounded down (400), the 1/2
    # scale would crop cols round(21.5)..round(378) = 22..378: 356 px, one short of the output.
    data = save(smooth_image(600, 800), tmp_path / "a.jpg").read_bytes()
    crop = decode.decode_box(data, (600, 800), (123, 43, 190, 713), (43, 357), decoder)
    assert crop.shape[2] >= 357
    # simplejpeg 5/8 (375 x 500): rows round(76.875)..round(195.625) = 77..196, cols 27..round(472.5) = 472.
    assert tuple(crop.shape[1:]) == {"pillow": (190, 713), "simplejpeg": (119, 445)}[decoder]
