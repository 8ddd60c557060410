"""Dynamic-inference sweep of a trained checkpoint (the PSS paper's Fig. 6 and Fig. 5).

`python -m pss_kernels.evaluate --checkpoint runs/pss/checkpoint.pt` (or `pss-evaluate`)
evaluates the validation split at every keep rate rho in {1.0, 0.9, ..., 0.2} and writes to
--out-dir (default: <checkpoint dir>/eval):

    sweep.json    per rho: kept tokens, top-1 %, loss, images/s (forward passes only, after one
                  warm-up batch), plus the device and library versions; a packed model (allocation
                  budget / mass) also the per-image spread of its kept tokens
    sweep.png     top-1 and throughput against rho
    patches.png   a few validation images per rho with the dropped patches greyed out (after
                  the last token-pruning selector), titled with the prediction and its probability;
                  a packed model's images each with its own kept count

Backends: --sampler-backend / --attn-backend (the flags of pss-train) choose them for the
evaluation; "auto" is the package's choice for the device. Without a flag the checkpoint's
setting is kept where it can run on the evaluation device, else the package's choice is used
and a note says so (a checkpoint trained with triton on a GPU evaluates on a CPU). A flag that
cannot run here, like any other problem, is a one-line error with exit status 2. The plots need
matplotlib and --data digits scikit-learn: `pip install "pss-kernels[train]"`.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from ._backends import OP_BACKENDS, BackendError, backend_status
from ._checks import check_keep_rate
from .ops.sample_patches import num_kept_tokens
from .ops.varlen.reference import image_ids
from .train.checkpoint import CheckpointError, load_checkpoint, load_state
from .train.cli import NON_NEGATIVE, POSITIVE, PRECISIONS, HelpFormatter, device_flag
from .train.config import TrainConfig, config_from_dict
from .train.data import DataInfo
from .train.distributed import resolve_device
from .train.validation import autocast_context, validate
from .train.optional_deps import MissingDependency, require
from .train.methods import apply_method_states
from .train.build import autocast_dtype_for, build_data, build_model, check_backend_flag

SAMPLER_BACKENDS, ATTN_BACKENDS = OP_BACKENDS["sample_patches"], OP_BACKENDS["rpb_attention"]
DEFAULT_KEEP_RATES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
PICTURE_KEEP_RATES = (1.0, 0.8, 0.6, 0.4, 0.2)
# A dropped pixel shows as 15 % image on mid grey: distinct from both dark and light content.
DROPPED_GREY, DROPPED_IMAGE_WEIGHT = 0.6, 0.15


def parse_keep_rates(text: str) -> List[float]:
    try:
        rates = [check_keep_rate(float(part)) for part in text.split(",") if part.strip()]
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"keep rates must be comma-separated numbers in (0, 1]: {err}") from err
    if not rates:
        raise argparse.ArgumentTypeError(f"no keep rate in {text!r}")
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pss-evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a pss-train checkpoint.pt")
    parser.add_argument("--out-dir", help="where the JSON and PNGs go (default: <checkpoint dir>/eval)")
    parser.add_argument("--keep-rates", type=parse_keep_rates, default=list(DEFAULT_KEEP_RATES),
                        help=f"comma-separated keep rates (default: {','.join(map(str, DEFAULT_KEEP_RATES))})")
    parser.add_argument("--batch-size", type=POSITIVE, default=128, help="evaluation batch")
    parser.add_argument("--max-images", type=POSITIVE, help="evaluate only the first N validation images")
    parser.add_argument("--num-pictures", type=NON_NEGATIVE, default=4, help="images in patches.png (0: no picture)")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--data-dir", help="override the checkpoint's --data-dir (data moved)")
    parser.add_argument("--device", type=device_flag, default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 autocast on CUDA")
    parser.add_argument("--workers", type=NON_NEGATIVE, default=2, help="data loader processes")
    parser.add_argument("--sampler-backend", choices=("auto",) + SAMPLER_BACKENDS,
                        help="sample_patches backend; auto: the package's choice for the device (default: the "
                             "checkpoint's where it can run here, else auto)")
    parser.add_argument("--attn-backend", choices=("auto",) + ATTN_BACKENDS,
                        help="rpb_attention backend; auto: the package's choice for the device (default: the "
                             "checkpoint's where it can run here, else auto)")
    return parser


def evaluation_backend(flag: str, requested: Optional[str], trained: Optional[str],
                       device: torch.device) -> Tuple[Optional[str], Optional[str]]:
    """(backend for the model, None = the package's choice; a note for the user or None).

    `requested` is the flag's value (None: not given, "auto": the package's choice), `trained` the
    checkpoint's setting. A requested backend that cannot run on `device` raises ValueError."""
    if requested == "auto":
        return None, None
    if requested is not None:
        check_backend_flag(flag, requested, device)
        return requested, None
    if trained is None:
        return None, None
    status = backend_status(trained, device)
    if status.available:
        return trained, None
    return None, (f"the checkpoint's {flag} {trained} cannot run on {device} ({status.reason}); evaluating with "
                  f"the package's choice instead (choose with {flag})")


def checkpoint_config(state: dict, path) -> TrainConfig:
    """The TrainConfig a loaded checkpoint was trained with; CheckpointError if it has none."""
    try:
        return config_from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} has no usable config: {err}") from err


def load_model_from_checkpoint(path, *, ema: bool = False, data_dir: Optional[str] = None,
                               backends: Optional[dict] = None, state: Optional[dict] = None):
    """(model in eval mode on CPU, validation dataset, DataInfo, TrainConfig) of a checkpoint.

    `backends` maps "sampler_backend" / "attn_backend" to the backend to build the model with
    (None = the package's choice) instead of the checkpoint's; see `evaluation_backend`.
    `state`: the checkpoint already loaded from `path` (it is not read again)."""
    state = load_checkpoint(path) if state is None else state
    config = checkpoint_config(state, path)
    if data_dir is not None:
        config.data_dir = data_dir
    for name, backend in (backends or {}).items():
        setattr(config, name, backend)
    val_set, info = build_data(config, train=False)
    model = build_model(config, info)
    if ema and state.get("ema") is None:
        raise CheckpointError(f"checkpoint {str(path)!r} has no EMA weights (trained without --ema-decay)")
    load_state(model, state["ema"] if ema else state["model"], "EMA" if ema else "model", path)
    # Token pruning at the rates the run ended with, the growth stage it reached (the last one, for
    # a finished Budgeted Training run).
    apply_method_states(model, state.get("methods"))
    return model.eval(), val_set, info, config


def is_packed(model, keep_rate: float) -> bool:
    """Whether the model runs this rate on packed tokens (a per-image count: models/packed.py)."""
    return getattr(model, "allocation", "fixed") != "fixed" and keep_rate < 1.0


def sweep(model, loader, keep_rates: Sequence[float], *, device, autocast_dtype) -> List[dict]:
    """Per rate: the nominal kept tokens round(rho N) and, for a packed model, "mean_tokens" / "min_tokens" /
    "max_tokens" per image at the input as its allocation gives them on the warm-up batch."""
    num_tokens = 1 + model.patch_embed.num_patches
    warmup_images = next(iter(loader))[0].to(device)
    results = []
    for rate in keep_rates:
        with torch.no_grad(), autocast_context(device, autocast_dtype):
            model(warmup_images, keep_rate=rate)  # first-call costs (allocation, autotuning) stay out of the timing
        metrics = validate(model, loader, device=device, keep_rate=rate, autocast_dtype=autocast_dtype)
        tokens = num_kept_tokens(num_tokens, rate) if rate < 1.0 else num_tokens
        entry = {"keep_rate": rate, "tokens": tokens}
        if is_packed(model, rate):
            from .models.packed import input_keep_counts
            with torch.no_grad(), autocast_context(device, autocast_dtype):
                counts = input_keep_counts(model, model.embed(warmup_images), rate).float()
            entry.update(mean_tokens=round(float(counts.mean()), 2), min_tokens=int(counts.min()),
                         max_tokens=int(counts.max()))
        results.append({**entry, **metrics})
    return results


def plot_sweep(results: Sequence[dict], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["keep_rate"] for r in results]
    fig, (acc_ax, speed_ax) = plt.subplots(1, 2, figsize=(10, 4))
    acc_ax.plot(rates, [r["top1"] for r in results], "o-")
    acc_ax.set(xlabel="keep rate ρ", ylabel="top-1 accuracy (%)", title="accuracy")
    speed_ax.plot(rates, [r["images_per_s"] for r in results], "o-", color="tab:orange")
    speed_ax.set(xlabel="keep rate ρ", ylabel="images / s (forward)", title="throughput")
    for ax in (acc_ax, speed_ax):
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kept_patch_mask(index: Optional[torch.Tensor], batch: int, grid_size, num_prefix_tokens: int = 1) -> torch.Tensor:
    """(B, Gh, Gw) bool: True where the patch was kept (index holds full-sequence positions)."""
    grid_h, grid_w = grid_size
    if index is None:
        return torch.ones(batch, grid_h, grid_w, dtype=torch.bool)
    mask = torch.zeros(batch, grid_h * grid_w, dtype=torch.bool)
    patches = index[:, num_prefix_tokens:].cpu() - num_prefix_tokens
    mask.scatter_(1, patches, True)
    return mask.view(batch, grid_h, grid_w)


def packed_kept_patch_mask(positions: torch.Tensor, cu_seqlens: torch.Tensor, grid_size,
                           num_prefix_tokens: int = 1) -> torch.Tensor:
    """(B, Gh, Gw) bool from packed positions (T,) and offsets (B + 1,): each image's kept patches."""
    grid_h, grid_w = grid_size
    positions, cu_seqlens = positions.cpu(), cu_seqlens.cpu().long()
    batch = cu_seqlens.numel() - 1
    image = image_ids(cu_seqlens, positions.numel())
    is_patch = positions >= num_prefix_tokens
    mask = torch.zeros(batch, grid_h * grid_w, dtype=torch.bool)
    mask[image[is_patch], positions[is_patch] - num_prefix_tokens] = True
    return mask.view(batch, grid_h, grid_w)


def kept_and_probabilities(model, images: torch.Tensor, keep_rate: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """((B, Gh, Gw) kept patches after the last selector, (B, classes) probabilities) of one forward pass
    as the model runs it at this rate: dense, or packed for a budget / mass allocation."""
    if is_packed(model, keep_rate):
        from .models.packed import packed_features, packed_pool
        tokens, positions, cu_seqlens = packed_features(model, model.pos_drop(model.embed(images)), keep_rate)
        logits = model.head(model.head_drop(packed_pool(model, tokens, cu_seqlens)))
        kept = packed_kept_patch_mask(positions, cu_seqlens, model.grid_size, model.num_prefix_tokens)
    else:
        tokens, index = model.forward_features(images, keep_rate=keep_rate)
        logits = model.forward_head(tokens)
        kept = kept_patch_mask(index, images.shape[0], model.grid_size, model.num_prefix_tokens)
    return kept, logits.float().softmax(-1).cpu()


def grey_out_dropped(images: torch.Tensor, kept: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images (B, 3, H, W) in [0, 1]; dropped patches blended towards light grey."""
    pixel_kept = kept.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)[:, None]
    greyed = DROPPED_IMAGE_WEIGHT * images + (1 - DROPPED_IMAGE_WEIGHT) * DROPPED_GREY
    return torch.where(pixel_kept, images, greyed)


@torch.no_grad()
def plot_kept_patches(model, images: torch.Tensor, info: DataInfo, keep_rates: Sequence[float], path: Path, *,
                      device, autocast_dtype, class_names: Optional[Sequence[str]] = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    pictures = (images * std + mean).clamp(0, 1)
    batch = len(images)
    fig, axes = plt.subplots(batch, len(keep_rates), figsize=(2.2 * len(keep_rates), 2.4 * batch), squeeze=False)
    for column, rate in enumerate(keep_rates):
        with autocast_context(device, autocast_dtype):
            kept, probs = kept_and_probabilities(model, images.to(device), rate)
        per_image = is_packed(model, rate)  # packed: each image keeps its own count
        shown = grey_out_dropped(pictures, kept, model.patch_embed.patch_size)
        for row in range(batch):
            ax = axes[row][column]
            ax.imshow(shown[row].permute(1, 2, 0).numpy(), interpolation="nearest")
            confidence, label = probs[row].max(-1)
            name = class_names[label] if class_names else str(int(label))
            count = f", {int(kept[row].sum())} patches" if per_image else ""
            ax.set_xlabel(f"{name} ({100 * confidence:.0f} %{count})", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                patches = f"{model.allocation}, per image" if per_image else f"{int(kept[0].sum())} patches"
                ax.set_title(f"ρ = {rate:g} ({patches})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def choose_backends(args: argparse.Namespace, trained: TrainConfig, device: torch.device) -> dict:
    """{"sampler_backend": ..., "attn_backend": ...} for the evaluation model; notes go to stderr."""
    chosen = {}
    for name, flag in (("sampler_backend", "--sampler-backend"), ("attn_backend", "--attn-backend")):
        backend, note = evaluation_backend(flag, getattr(args, name), getattr(trained, name), device)
        if note:
            print(f"pss-evaluate: note: {note}", file=sys.stderr, flush=True)
        chosen[name] = backend
    return chosen


def run(args: argparse.Namespace) -> dict:
    require("matplotlib", "matplotlib", "pss-evaluate's plots")  # before the sweep, not after it
    checkpoint = Path(args.checkpoint)
    device = resolve_device(args.device)
    autocast_dtype = autocast_dtype_for(args.precision, device)
    state = load_checkpoint(checkpoint)
    backends = choose_backends(args, checkpoint_config(state, checkpoint), device)
    model, val_set, info, config = load_model_from_checkpoint(checkpoint, ema=args.ema, data_dir=args.data_dir,
                                                              backends=backends, state=state)
    del state  # the model holds the weights now
    out_dir = Path(args.out_dir) if args.out_dir else checkpoint.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    if args.max_images is not None:
        val_set = Subset(val_set, range(min(args.max_images, len(val_set))))
    loader = DataLoader(val_set, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    results = sweep(model, loader, args.keep_rates, device=device, autocast_dtype=autocast_dtype)
    report = {
        "checkpoint": str(checkpoint), "weights": "ema" if args.ema else "model", "model": config.model,
        "rpb": config.rpb, "schedule": config.schedule, "data": config.data, "img_size": info.img_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "precision": str(autocast_dtype or torch.float32),
        "backends": {name: backend or "auto" for name, backend in backends.items()},
        "allocation": getattr(config, "allocation", "fixed"), "results": results,
    }
    (out_dir / "sweep.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_sweep(results, f"{config.model} ({'RPB' if config.rpb else 'no RPB'}), trained with {config.schedule}",
               out_dir / "sweep.png")
    if args.num_pictures > 0:
        count = min(args.num_pictures, len(val_set))
        images = torch.stack([val_set[i][0] for i in range(count)])
        picture_rates = [r for r in PICTURE_KEEP_RATES if r in args.keep_rates] or list(args.keep_rates)
        base = val_set.dataset if isinstance(val_set, Subset) else val_set
        plot_kept_patches(model, images, info, picture_rates, out_dir / "patches.png", device=device,
                          autocast_dtype=autocast_dtype, class_names=getattr(base, "classes", None))
    for entry in results:
        spread = (f" (per image {entry['min_tokens']}-{entry['max_tokens']}, mean {entry['mean_tokens']:g})"
                  if "mean_tokens" in entry else "")
        print(f"rho={entry['keep_rate']:<4g} tokens={entry['tokens']:<4d} top-1={entry['top1']:6.2f} %  "
              f"{entry['images_per_s']:9.1f} img/s{spread}", flush=True)
    print(f"wrote {out_dir / 'sweep.json'}, sweep.png" + (", patches.png" if args.num_pictures > 0 else ""))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CheckpointError, BackendError, MissingDependency, ValueError) as err:
        print(f"pss-evaluate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
