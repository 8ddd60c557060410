"""GPU decoding of the training crops (pss_kernels/train/data/gpu_decode.py), as far as a CPU can check
it: the loader workers' bytes and boxes, the collation, the device-side resize / flip / normalise
against the CPU transform on the same pixels, the per-image fallback with its count, and the errors.
The GPU decoders themselves (nvImageCodec, nvJPEG) need a GPU: a stand-in decoder takes their place."""
from typing import List, Optional, Sequence

import pytest
import torch

from pss_kernels.train.build import build_device_images
from pss_kernels.train.config import TrainConfig
from pss_kernels.train.data import build_dataset, decode
from pss_kernels.train.data import gpu_decode
from pss_kernels.train.data.gpu_decode import (BatchDecoder, DeviceImages, EncodedImage, EncodedTrainTransform,
                                               collate_encoded, finish_crops, make_batch_decoder)
from pss_kernels.train.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, random_resized_crop_box
from pss_kernels.train.optional_deps import MissingDependency
from test_decode import save, smooth_image

pytest.importorskip("PIL")


class CpuStandIn(BatchDecoder):
    """A GPU decoder's contract on the CPU: full decode then the crop, None for what it refuses
    (non-JPEG files, and the items listed in `refuse`)."""

    name = "stand-in"

    def __init__(self, refuse=()):
        super().__init__(torch.device("cpu"))
        self.refuse = set(refuse)
        self.calls = 0

    def decode(self, items: Sequence[EncodedImage]) -> List[Optional[torch.Tensor]]:
        self.calls += 1
        crops = []
        for i, item in enumerate(items):
            data = item.data.numpy().tobytes()
            if i in self.refuse or not decode._is_jpeg(data):
                crops.append(None)
                continue
            top, left, height, width = item.box
            crops.append(decode.decode_full(data)[:, top:top + height, left:left + width])
        return crops


@pytest.fixture
def files(tmp_path):
    """Two JPEGs of different sizes and a PNG (which the GPU decoders do not take)."""
    paths = [save(smooth_image(90, 120, seed=1), tmp_path / "a.jpg"),
             save(smooth_image(150, 110, seed=2), tmp_path / "b.jpg"),
             save(smooth_image(64, 80, seed=3), tmp_path / "c.png", fmt="PNG")]
    return [path.read_bytes() for path in paths]


def test_workers_return_the_bytes_and_draw_the_cpu_paths_box_and_flip(files):
    transform = TrainTransform(32, scale=(0.2, 1.0))
    encoded = EncodedTrainTransform(transform)
    flips = set()
    for seed in range(12):
        item = encoded.from_bytes(files[1], torch.Generator().manual_seed(seed))
        assert item.data.dtype == torch.uint8 and item.data.numpy().tobytes() == files[1]
        assert item.size == (150, 110)
        generator = torch.Generator().manual_seed(seed)  # the CPU path's draws, in its order
        assert item.box == random_resized_crop_box(150, 110, generator, (0.2, 1.0))
        assert item.flip == (torch.rand((), generator=generator).item() < 0.5)
        flips.add(item.flip)
    assert flips == {False, True}
    with pytest.raises(ValueError, match="generator"):
        encoded.from_bytes(files[0], None)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("normalize", [True, False])
def test_device_side_finish_equals_the_cpu_transform_on_the_same_pixels(files, interpolation, normalize):
    """Same boxes and flips from the same seeds, same pixels (a full decode): the batch equals
    TrainTransform.from_bytes(pillow-full) image for image, to the bit."""
    transform = TrainTransform(24, interpolation=interpolation, normalize=normalize)
    images = DeviceImages(CpuStandIn(), 24, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation=interpolation,
                          normalize=normalize)
    seeds = [3, 4, 5, 6]
    items = [EncodedTrainTransform(transform).from_bytes(files[i % 2], torch.Generator().manual_seed(seed))
             for i, seed in enumerate(seeds)]
    assert {item.flip for item in items} == {False, True}
    batch = images(items)
    expected = torch.stack([transform.from_bytes(files[i % 2], torch.Generator().manual_seed(seed), "pillow-full")
                            for i, seed in enumerate(seeds)])
    assert batch.shape == (4, 3, 24, 24) and batch.dtype == torch.float32
    torch.testing.assert_close(batch, expected, rtol=0, atol=1e-6)
    assert images.fallbacks == 0 and images.images == 4


def test_refused_files_decode_on_the_cpu_and_are_counted(files):
    transform = TrainTransform(16)
    items = [EncodedTrainTransform(transform).from_bytes(data, torch.Generator().manual_seed(i))
             for i, data in enumerate(files)]
    stand_in = CpuStandIn(refuse={1})  # item 1 refused (a CMYK / progressive JPEG), item 2 is a PNG
    images = DeviceImages(stand_in, 16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    batch = images(items)
    assert images.fallbacks == 2 and batch.shape == (3, 3, 16, 16) and torch.isfinite(batch).all()
    # The fallback decodes the same box (Pillow's draft path, at a scale that still covers 16 px): close
    # to the full decode of that box (the reduced DCT scale rounds differently), far from another box.
    for i in (1, 2):
        expected = transform.from_bytes(files[i], torch.Generator().manual_seed(i), "pillow-full")
        other = transform.from_bytes(files[i], torch.Generator().manual_seed(i + 40), "pillow-full")
        assert (batch[i] - expected).abs().mean() < 0.2 < (batch[i] - other).abs().mean(), i
    images(items[:1])
    assert images.fallbacks == 2 and images.images == 4  # counts accumulate over batches


def test_a_decoder_that_loses_items_is_an_error_not_a_short_batch(files):
    class Short(CpuStandIn):
        def decode(self, items):
            return super().decode(items)[:-1]
    item = EncodedTrainTransform(TrainTransform(8)).from_bytes(files[0], torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="returned 1 crops for 2 images"):
        DeviceImages(Short(), 8, mean=IMAGENET_MEAN, std=IMAGENET_STD)([item, item])
    with pytest.raises(TypeError, match="EncodedImage"):
        DeviceImages(CpuStandIn(), 8, mean=IMAGENET_MEAN, std=IMAGENET_STD)([torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match="same length"):
        finish_crops([torch.zeros(3, 4, 4, dtype=torch.uint8)], [], 8, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def test_collate_keeps_encoded_images_as_a_list_beside_labels_and_indices(files):
    encoded = EncodedTrainTransform(TrainTransform(8))
    samples = [(encoded.from_bytes(files[i], torch.Generator().manual_seed(i)), i + 5, 10 + i) for i in range(2)]
    images, labels, indices = collate_encoded(samples)
    assert isinstance(images, list) and [item.size for item in images] == [(90, 120), (150, 110)]
    assert labels.tolist() == [5, 6] and indices.tolist() == [10, 11]
    plain = collate_encoded([(torch.zeros(3, 2, 2), 1), (torch.ones(3, 2, 2), 2)])
    assert plain[0].shape == (2, 3, 2, 2) and plain[1].tolist() == [1, 2]


def test_gpu_decoders_need_cuda_and_name_their_extra(monkeypatch):
    with pytest.raises(ValueError, match="--decoder nvjpeg decodes the training crops on a CUDA device"):
        decode.resolve_decoder("nvjpeg", torch.device("cpu"))
    with pytest.raises(ValueError, match="--decoder nvimgcodec"):
        decode.resolve_decoder("nvimgcodec")
    with pytest.raises(ValueError, match="CUDA device"):
        make_batch_decoder("nvjpeg", torch.device("cpu"))
    real_import = gpu_decode.importlib.import_module

    def missing(name, *args):
        if name in ("nvidia.nvimgcodec", "torchvision.io"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)
    monkeypatch.setattr(gpu_decode.importlib, "import_module", missing)
    for name, package in (("nvimgcodec", "nvidia-nvimgcodec-cu13"), ("nvjpeg", "torchvision")):
        with pytest.raises(MissingDependency, match=rf"--decoder {name} needs {package}.*pss-kernels\[gpu-data\]"):
            make_batch_decoder(name, torch.device("cuda"))
    assert gpu_decode.importable_gpu_decoder() is None


def test_auto_stays_on_the_cpu_until_the_gpu_path_is_validated(monkeypatch):
    monkeypatch.setattr(gpu_decode, "importable_gpu_decoder", lambda: "nvjpeg")
    monkeypatch.setattr(decode, "_simplejpeg", lambda: None)
    assert decode.resolve_decoder("auto", torch.device("cuda")) == "pillow"  # never run on a GPU yet
    monkeypatch.setattr(gpu_decode, "GPU_DECODE_VALIDATED", True)
    assert decode.resolve_decoder("auto", torch.device("cuda")) == "nvjpeg"
    assert decode.resolve_decoder("auto", torch.device("cpu")) == "pillow"
    monkeypatch.setattr(gpu_decode, "importable_gpu_decoder", lambda: None)
    assert decode.resolve_decoder("auto", torch.device("cuda")) == "pillow"


def test_a_cuda_run_with_a_gpu_decoder_reads_bytes_in_the_loader(tmp_path, monkeypatch):
    for split in ("train", "val"):
        for label in ("x", "y"):
            (tmp_path / split / label).mkdir(parents=True)
            save(smooth_image(60, 80, seed=len(label)), tmp_path / split / label / "0.jpg")
    train, info = build_dataset("folder", train=True, img_size=16, data_dir=str(tmp_path), decoder="nvjpeg",
                                device=torch.device("cuda"))
    assert info.gpu_decoder == "nvjpeg" and isinstance(train[(0, 7)][0], EncodedImage)
    val, val_info = build_dataset("folder", train=False, img_size=16, data_dir=str(tmp_path), decoder="nvjpeg",
                                  device=torch.device("cuda"))
    assert val_info.gpu_decoder is None and val[0][0].shape == (3, 16, 16)  # validation decodes on the CPU
    _, cpu_info = build_dataset("folder", train=True, img_size=16, data_dir=str(tmp_path))
    assert cpu_info.gpu_decoder is None
    assert build_device_images(TrainConfig(), cpu_info, torch.device("cpu")) is None
    monkeypatch.setattr(gpu_decode, "make_batch_decoder", lambda name, device: CpuStandIn())
    images = build_device_images(TrainConfig(interpolation="bicubic"), info, torch.device("cuda"), normalize=False)
    assert images.size == 16 and images.interpolation == "bicubic" and not images.normalize
    batch = images(collate_encoded([train[(0, 1)], train[(1, 2)]])[0])
    assert batch.shape == (2, 3, 16, 16) and 0.0 <= batch.min() and batch.max() <= 1.0


def test_data_benchmark_skips_gpu_decoders_without_a_gpu_and_names_the_limit(tmp_path, monkeypatch):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import data as data_benchmark

    monkeypatch.chdir(tmp_path)
    report = data_benchmark.main(["--images", "16", "--batch-size", "4", "--batches", "2", "--workers", "0",
                                  "--img-size", "32", "--model", "deit_tiny", "--keep-rates", "1.0",
                                  "--decoders", "pillow", "nvjpeg", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert [row["decoder"] for row in report["loader"]] == ["pillow"]  # nvjpeg: skipped, no GPU
    assert report["loader"][0]["gpu_decode"] is False and report["loader"][0]["decode_fallbacks"] is None
    (verdict,) = report["verdicts"]
    loader_fast = report["loader"][0]["images_per_s"] >= verdict["model_images_per_s"]
    assert verdict["limit"] == ("model" if loader_fast else "loader")
