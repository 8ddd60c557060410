"""load_pretrained against timm itself (run by .ci/timm_equivalence.sh in a venv with timm).

timm's beit_base_patch16_224, deit_small_patch16_224 and vit_base_patch16_224 with random
weights (every parameter, the zero-initialised ones too: layer scale, position embedding,
relative position tables, and a large key bias that the package's attention drops), saved as
.pth and .safetensors, loaded into create_model_for(name) with load_pretrained: the logits at
rho = 1 must equal timm's. Also: at another image size (the resampled tables / embedding against
timm's own resampling helpers in a timm model built at that size), and an original SimMIM-layout
checkpoint ("model" wrapper, "encoder." prefix, gamma_1 / gamma_2, one shared table, index
buffers, mask_token and decoder keys). Exits non-zero on any difference.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table_simple
from timm.models.beit import gen_relative_position_index

from pss_kernels.models import create_model_for, load_pretrained

ATOL = RTOL = 1e-4  # float32 through 12 blocks differs by ~1e-6 here; a wrong mapping by O(1)
BATCH = 2
rows = []
failures = []


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, at scales that keep a 12-block network well conditioned and make
    each piece matter (a wrong or dropped mapping moves the logits by O(1))."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                value = 1.0 + 0.2 * noise
            elif leaf in ("gamma", "gamma_1", "gamma_2"):
                value = 0.3 + 0.2 * noise
            elif leaf == "relative_position_bias_table":
                value = noise
            elif leaf in ("pos_embed", "cls_token"):
                value = 0.5 * noise
            elif leaf == "bias" and name.endswith("attn.qkv.bias"):
                value = noise  # the key third of it too: dropping the key bias must be exact
            elif leaf in ("bias", "q_bias", "v_bias"):
                value = 0.05 * noise
            elif name.startswith("head"):
                value = 0.1 * noise
            else:  # linear and conv weights: unit-variance outputs
                fan_in = param[0].numel() if param.dim() > 1 else 1
                value = noise / fan_in ** 0.5
            param.copy_(value)


def images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))


def save_both(state_dict, folder: Path, stem: str):
    pth, safetensors = folder / f"{stem}.pth", folder / f"{stem}.safetensors"
    torch.save(state_dict, pth)
    save_file({key: value.contiguous() for key, value in state_dict.items()}, str(safetensors))
    return [pth, safetensors]


def check(label: str, fmt: str, size: int, ours: torch.Tensor, theirs: torch.Tensor, report, *,
          expect_missing=(), expect_unexpected=(), expect_resized=()) -> None:
    diff = (ours - theirs).abs().max().item()
    ok = torch.allclose(ours, theirs, rtol=RTOL, atol=ATOL)
    problems = []
    if not ok:
        problems.append(f"logits differ by {diff:.3g}")
    for what, got, want in (("missing", report.missing, expect_missing),
                            ("unexpected", report.unexpected, expect_unexpected),
                            ("resized", report.resized, expect_resized)):
        if sorted(got) != sorted(want):
            problems.append(f"report.{what} = {got}, expected {sorted(want)}")
    rows.append((label, fmt, size, report.source, theirs.abs().max().item(), diff, len(report.resized),
                 "ok" if not problems else "FAIL"))
    if problems:
        failures.append(f"{label} {fmt} {size}px: " + "; ".join(problems) + "\n" + report.summary())


def tables_of(model) -> list:
    return [name for name, _ in model.named_parameters() if name.endswith("relative_position_bias_table")]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pss-timm-") as folder:  # ~2 GB of checkpoints
        return run(Path(folder))


@torch.no_grad()
def run(folder: Path) -> int:
    torch.manual_seed(0)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    x224 = images(224)
    cases = [("beit_base_patch16_224", 1), ("deit_small_patch16_224", 2), ("vit_base_patch16_224", 3)]
    timm_models = {}
    for name, seed in cases:
        reference = timm.create_model(name, pretrained=False).eval()
        randomise(reference, seed)
        timm_models[name] = reference
        expected = reference(x224)
        for path in save_both(reference.state_dict(), folder, name):
            model = create_model_for(name).eval()
            report = load_pretrained(model, path)
            # ViT / DeiT have no relative position tables: the model's stay zero (no bias).
            missing = tables_of(model) if not name.startswith("beit") else ()
            check(name, path.suffix, 224, model(x224), expected, report, expect_missing=missing)
        if name == "vit_base_patch16_224":  # the same file into plain SDPA attention (qkv.bias kept whole)
            model = create_model_for(name, rpb=False).eval()
            report = load_pretrained(model, folder / f"{name}.safetensors")
            check(name + " rpb=False", ".safetensors", 224, model(x224), expected, report)

    # Another image size: the package's resampling inside a model at that size, against a timm model
    # built at that size holding timm's own resampled tensors (bicubic, align_corners=False, no antialias).
    for name, size in (("beit_base_patch16_224", 288), ("deit_small_patch16_224", 160)):
        grid = (size // 16, size // 16)
        state = dict(timm_models[name].state_dict())
        resized_keys = []
        for key, value in list(state.items()):
            if key.endswith("relative_position_bias_table"):
                rows_new = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
                state[key] = resize_rel_pos_bias_table_simple(value, grid, (rows_new, value.shape[1]))
                resized_keys.append(key)
            elif key == "pos_embed":
                state[key] = resample_abs_pos_embed(value, list(grid), num_prefix_tokens=1, antialias=False)
                resized_keys.append(key)
        reference = timm.create_model(name, pretrained=False, img_size=size).eval()
        reference.load_state_dict(state)
        x = images(size, seed=1)
        model = create_model_for(name, img_size=size).eval()
        report = load_pretrained(model, folder / f"{name}.pth")
        missing = tables_of(model) if not name.startswith("beit") else ()
        check(name, ".pth", size, model(x), reference(x), report, expect_missing=missing,
              expect_resized=resized_keys)

    # An original SimMIM / BEiT layout from the timm BEiT weights: one shared table (set into every
    # timm block for the reference), keys under "encoder.", the index buffers, pre-training extras.
    name = "beit_base_patch16_224"
    reference = timm_models[name]
    shared = torch.randn(reference.blocks[0].attn.relative_position_bias_table.shape,
                         generator=torch.Generator().manual_seed(7))
    for block in reference.blocks:
        block.attn.relative_position_bias_table.copy_(shared)
    expected = reference(x224)
    original = {f"encoder.{key}": value for key, value in reference.state_dict().items()
                if not key.endswith("relative_position_bias_table")}
    assert any(key.endswith("gamma_1") for key in original), "timm's Beit no longer names layer scale gamma_1"
    original["encoder.rel_pos_bias.relative_position_bias_table"] = shared.clone()
    original["encoder.rel_pos_bias.relative_position_index"] = gen_relative_position_index((14, 14))
    original["encoder.mask_token"] = torch.zeros(1, 1, 768)
    original["decoder.0.weight"] = torch.zeros(768, 768, 1, 1)
    original["decoder.0.bias"] = torch.zeros(768)
    path = folder / "simmim_original.pth"
    torch.save({"model": original, "epoch": 99}, path)
    model = create_model_for(name).eval()
    report = load_pretrained(model, path)
    check("SimMIM original (shared table)", ".pth", 224, model(x224), expected, report,
          expect_unexpected=["mask_token", "decoder.0.weight", "decoder.0.bias"])
    if report.source != "beit_original":
        failures.append(f"SimMIM original detected as {report.source!r}")
    for i, block in enumerate(model.blocks):
        if not torch.equal(block.attn.relative_position_bias_table, shared):
            failures.append(f"SimMIM original: block {i} does not hold the shared table")

    print(f"\ntimm {timm.__version__}, torch {torch.__version__}: package logits vs timm's at rho = 1 "
          f"(batch {BATCH}, float32, rtol = atol = {ATOL:g})")
    header = ("model", "file", "img", "source", "max|logit|", "max|diff|", "resized", "")
    widths = (32, 12, 4, 14, 10, 10, 7, 4)
    print("  ".join(f"{h:<{w}}" for h, w in zip(header, widths)))
    for label, fmt, size, source, scale, diff, resized, status in rows:
        print(f"{label:<32}  {fmt:<12}  {size:<4}  {source:<14}  {scale:<10.3g}  {diff:<10.2e}  {resized:<7}  {status}")
    if failures:
        print("\nFAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    print(f"\ntimm equivalence: all {len(rows)} checks agree with timm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
