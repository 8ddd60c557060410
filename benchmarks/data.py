"""Is the data or the model the limit? The training loader's images/s on a folder of JPEGs, per
decoder and worker count, against the model's training images/s at each keep rate.

    python benchmarks/data.py                                  # a generated folder of JPEGs
    python benchmarks/data.py --data-dir /data/imagenet --workers 8 16 --model vit_base

At rho = 0.2 a training step is several times faster than at rho = 1, so the loader must deliver
several times the images: a keep rate the loader cannot feed saves no wall time. This runs, in one
process and on the same files:

- the loader: pss-train's training pipeline (ImageFolder, random-resized crop at --img-size,
  flip; DataLoader with persistent workers, prefetch 4, pinned memory on CUDA) for each --decoders
  entry — `pillow-full` (decode every whole image, then crop: the pipeline as it was) and `auto`
  (decode only the crop at the smallest JPEG scale that covers it: simplejpeg if installed, else
  Pillow's draft mode; pss_kernels/train/data/decode.py) — and each --workers count;
- the model: full training iterations on synthetic images already on the device (benchmarks/
  _train_step.py), at each --keep-rates value.

Output: a table (stdout), JSON and a PNG in --out-dir (default benchmarks/results on a GPU,
runs/data on CPU). Without --data-dir it writes --images JPEGs of ImageNet's typical size
(500 x 375, quality 90, smooth random content) to a temporary folder first.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from torch.utils.data import DataLoader

from _timing import environment_info, file_slug, time_iterations
from _train_step import TrainingStep
from pss_kernels.models import MODEL_CONFIGS, create_model
from pss_kernels.train.data import build_dataset
from pss_kernels.train.data.decode import DECODERS, GPU_DECODERS, resolve_decoder
from pss_kernels.train.data.gpu_decode import DeviceImages, collate_encoded, make_batch_decoder
from pss_kernels.train.distributed import ShardedSampler
from pss_kernels.train.optional_deps import MissingDependency

HERE = Path(__file__).resolve().parent
PREFETCH = 4  # batches in flight per worker, as pss-train's loader


def make_jpeg_folder(root: Path, images: int, classes: int = 4, size=(375, 500), seed: int = 0) -> Path:
    """root/train/<class>/<i>.jpg (and a small val/): smooth random content, so that the JPEGs have
    the size and decoding cost of photographs rather than of noise or flat colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", images), ("val", max(classes, images // 8))):
        for i in range(count):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, size=(size[0] // 25 + 1, size[1] // 25 + 1, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((size[1], size[0]), Image.BICUBIC)
            noise = rng.normal(0, 8, size=(size[0], size[1], 3))
            pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def loader_images_per_second(data_dir: Path, decoder: str, workers: int, batch_size: int, img_size: int,
                             batches: int, device: torch.device) -> dict:
    """Images/s of the training loader over `batches` batches after one warm-up batch (workers started,
    files in the page cache), including the host-to-device copy. The loader runs epoch after epoch
    (persistent workers) until `batches` are taken: keep it well above the 4 batches per worker that
    are prefetched, or the figure is the prefetch buffer's, not the workers'."""
    dataset, info = build_dataset("folder", train=True, img_size=img_size, data_dir=str(data_dir), decoder=decoder,
                                  device=device)
    # A GPU decoder: the workers read bytes and draw boxes, this process decodes on the device (as pss-train).
    device_images = None
    if info.gpu_decoder is not None:
        device_images = DeviceImages(make_batch_decoder(info.gpu_decoder, device), img_size, mean=info.mean,
                                     std=info.std)
    sampler = ShardedSampler(len(dataset), rank=0, world_size=1, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        prefetch_factor=PREFETCH if workers > 0 else None, generator=torch.Generator(),
                        collate_fn=collate_encoded if device_images is not None else None)

    def to_device(images):
        return device_images(images) if device_images is not None else images.to(device, non_blocking=True)
    if len(loader) < 2:
        raise ValueError(f"{len(dataset)} training images give {len(loader)} batches of {batch_size}; "
                         "use more --images or a smaller --batch-size")

    def batches_forever():
        while True:
            yield from loader

    stream = batches_forever()
    to_device(next(stream)[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(batches):
        images, _ = next(stream)
        to_device(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    del stream  # stops the workers
    return {"decoder": decoder, "resolved_decoder": resolve_decoder(decoder, device), "workers": workers,
            "images": batches * batch_size, "seconds": seconds, "images_per_s": batches * batch_size / seconds,
            "gpu_decode": device_images is not None,
            "decode_fallbacks": None if device_images is None else device_images.fallbacks}


def model_images_per_second(model_name: str, keep_rates: List[float], batch_size: int, img_size: int,
                            device: torch.device, warmup: int, iters: int) -> List[dict]:
    amp = torch.bfloat16 if device.type == "cuda" else None
    model = create_model(model_name, img_size=img_size, num_classes=1000).to(device)
    step = TrainingStep(model, batch_size=batch_size, img_size=img_size, num_classes=1000, device=device,
                        amp_dtype=amp, fused_adamw=device.type == "cuda")
    rows = []
    for keep_rate in keep_rates:
        model.keep_rate = keep_rate
        stats = time_iterations(step, warmup=warmup, iters=iters, device=device)
        rows.append({"keep_rate": keep_rate, "median_ms": stats.median_ms,
                     "images_per_s": batch_size / (stats.median_ms / 1e3)})
        print(f"  model {model_name} rho={keep_rate:g}: {rows[-1]['images_per_s']:.1f} images/s", file=sys.stderr,
              flush=True)
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['decoder']} ({r['resolved_decoder']})\n{r['workers']} workers" for r in report["loader"]]
    ax.barh(labels, [r["images_per_s"] for r in report["loader"]], color="tab:blue", label="loader")
    for row in report["model"]:
        ax.axvline(row["images_per_s"], color="tab:red", linestyle="--", linewidth=1)
        ax.text(row["images_per_s"], len(labels) - 0.5, f"model rho={row['keep_rate']:g}", rotation=90,
                va="top", ha="right", fontsize=8, color="tab:red")
    ax.set_xlabel("images / s")
    ax.set_title(f"{report['label']}: loader (bars) vs {report['config']['model']} training (lines)\n"
                 f"{report['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="ImageFolder root with train/ (default: a generated folder)")
    parser.add_argument("--images", type=int, default=None, help="generated training JPEGs (default 1024 GPU, 160 CPU; reused epoch after epoch)")
    parser.add_argument("--source-size", default="375x500", metavar="HxW",
                        help="size of the generated JPEGs (default 375x500, ImageNet's typical; larger photos gain "
                             "more from the reduced-scale decode)")
    parser.add_argument("--decoders", nargs="+", choices=DECODERS, default=["pillow-full", "auto"],
                        help="decoders to compare (default: pillow-full auto); nvimgcodec / nvjpeg decode on the "
                             "GPU (skipped without one)")
    parser.add_argument("--workers", nargs="+", type=int, default=None,
                        help="loader worker counts (default: 8 16 on GPU machines, 2 on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 GPU, 16 CPU")
    parser.add_argument("--batches", type=int, default=None,
                        help="timed loader batches per case (default: 3x the prefetched batches + 8)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--model", choices=tuple(MODEL_CONFIGS), default=None,
                        help="model whose training speed the loader must match (default vit_base GPU, deit_tiny CPU)")
    parser.add_argument("--keep-rates", nargs="+", type=float, default=[1.0, 0.6, 0.2])
    parser.add_argument("--device", default=None)
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--no-plot", action="store_true", help="JSON only (the GPU window returns 8 files at most)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    workers = args.workers or ([8, 16] if on_gpu else [2])
    batch_size = args.batch_size or (128 if on_gpu else 16)
    batches = args.batches or 3 * PREFETCH * max(workers) + 8
    model_name = args.model or ("vit_base" if on_gpu else "deit_tiny")
    images = args.images or (1024 if on_gpu else 160)
    env = environment_info(device)
    label = "GPU run" if on_gpu else "CPU run (not a GPU result)"
    print(f"data benchmark, {label}: {env['device']}, {os.cpu_count()} CPU cores", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir
        if data_dir is None:
            height, width = (int(v) for v in args.source_size.lower().split("x"))
            print(f"  writing {images} JPEGs ({width} x {height}) to a temporary folder", file=sys.stderr, flush=True)
            data_dir = make_jpeg_folder(Path(scratch), images, size=(height, width))
        loader_rows = []
        for decoder in args.decoders:
            if decoder in GPU_DECODERS and not on_gpu:
                print(f"  loader {decoder}: skipped (a GPU decoder; this run's device is {device})", file=sys.stderr,
                      flush=True)
                continue
            for count in workers:
                try:
                    row = loader_images_per_second(data_dir, decoder, count, batch_size, args.img_size, batches,
                                                   device)
                except MissingDependency as err:  # a GPU decoder whose package is not installed
                    print(f"  loader {decoder}: skipped ({err})", file=sys.stderr, flush=True)
                    break
                loader_rows.append(row)
                print(f"  loader {decoder} ({row['resolved_decoder']}), {count} workers: "
                      f"{row['images_per_s']:.1f} images/s", file=sys.stderr, flush=True)
    model_rows = model_images_per_second(model_name, args.keep_rates, batch_size, args.img_size, device,
                                         warmup=2 if on_gpu else 1, iters=10 if on_gpu else 3)

    best: Dict[str, dict] = {}
    for row in loader_rows:
        if row["decoder"] not in best or row["images_per_s"] > best[row["decoder"]]["images_per_s"]:
            best[row["decoder"]] = row
    fastest = max(best.values(), key=lambda row: row["images_per_s"]) if best else None
    # Per rho: which of the two sets the pace, with the fastest loader measured.
    verdicts = [{"keep_rate": m["keep_rate"], "model_images_per_s": m["images_per_s"],
                 **{f"{decoder}_feeds_fraction": min(1.0, b["images_per_s"] / m["images_per_s"])
                    for decoder, b in best.items()},
                 "limit": None if fastest is None else ("loader" if fastest["images_per_s"] < m["images_per_s"]
                                                        else "model")} for m in model_rows]
    report = {"benchmark": "data", "label": label, "environment": {**env, "cpu_cores": os.cpu_count()},
              "config": {"data_dir": str(args.data_dir) if args.data_dir else f"generated ({images} JPEGs {args.source_size})",
                         "img_size": args.img_size, "batch_size": batch_size, "batches": batches,
                         "model": model_name, "keep_rates": args.keep_rates, "workers": workers,
                         "decoders": args.decoders},
              "loader": loader_rows, "model": model_rows, "verdicts": verdicts}

    print(f"\n=== {label}: {env['device']}, {os.cpu_count()} CPU cores ===")
    print(f"{'decoder':<12} {'(resolved)':<12} {'workers':>7} {'images/s':>10}")
    for row in loader_rows:
        print(f"{row['decoder']:<12} {row['resolved_decoder']:<12} {row['workers']:>7} {row['images_per_s']:>10.1f}")
    if "pillow-full" in best and len(best) > 1:
        for decoder, row in best.items():
            if decoder != "pillow-full":
                print(f"{decoder} over pillow-full (best worker count each): "
                      f"{row['images_per_s'] / best['pillow-full']['images_per_s']:.2f}x")
    print(f"\n{model_name} training at batch {batch_size}: images/s, and the share of it each decoder's best loader feeds")
    for verdict in verdicts:
        shares = "  ".join(f"{k.replace('_feeds_fraction', '')} {v:.0%}" for k, v in verdict.items()
                           if k.endswith("_feeds_fraction"))
        print(f"  rho={verdict['keep_rate']:<4g} {verdict['model_images_per_s']:>9.1f} images/s   {shares}   "
              f"limit: {verdict['limit']}")

    out_dir = args.out_dir or (HERE / "results" if on_gpu else Path("runs") / "data")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"data_{file_slug(env['device'])}_{env['date'][:10]}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nJSON: {out_dir / (stem + '.json')}")
    if not args.no_plot:
        plot(report, out_dir / f"{stem}.png")
        print(f"PNG:  {out_dir / (stem + '.png')}")
    return report


if __name__ == "__main__":
    main()
