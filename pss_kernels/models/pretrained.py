"""load_pretrained: start a VisionTransformer from a checkpoint that this package did not write.

    report = load_pretrained(model, "beit_base_patch16_224.safetensors")   # or a state dict
    print(report.summary())

Source formats, detected from the keys (`detect_format`), each with one pure filter
`(state_dict, model) -> state_dict in the model's key layout`, the way timm keeps one
`checkpoint_filter_fn` per model family:

    "pss"            this package's own state dicts (pss-train's checkpoints: the "model" entry),
                     and any whose keys are already exactly the model's
    "timm_vit"       timm VisionTransformer: vit_*, deit_* (qkv.bias, ls1/ls2.gamma, norm, fc_norm)
    "timm_beit"      timm Beit: beit_* (q_bias / v_bias, gamma_1 / gamma_2, a table per block)
    "beit_original"  the BEiT / SimMIM repositories' files: a "model" / "module" wrapper, an
                     "encoder." prefix (SimMIM pre-training), gamma_1 / gamma_2, a shared
                     rel_pos_bias.relative_position_bias_table, relative_position_index buffers

Every filter ends in `fit_to_model`, which resamples what depends on the image size (the
relative position tables and the absolute position embedding; `resize_rel_pos_table`,
`resize_pos_embed`) and sets aside a classifier head of another num_classes. DeiT's distilled
checkpoints (dist_token, head_dist) are refused: the model has no distillation token.
"""
from __future__ import annotations

import math
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .vit import VisionTransformer, init_linear

StateDict = Dict[str, torch.Tensor]

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SOURCE_NAMES = {"pss": "pss_kernels (or already in the model's layout)", "timm_vit": "timm ViT / DeiT", "timm_beit": "timm BEiT",
                "beit_original": "original BEiT / SimMIM"}
HEAD_KEYS = ("head.weight", "head.bias")
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.*)")


@dataclass
class LoadReport:
    """What load_pretrained did, key by key (names in the model's layout).

    loaded: copied into the model (resized ones included). resized: resampled to the model's
    patch grid first. missing: the model's, not in the checkpoint: they keep their current values.
    unexpected: the checkpoint's, with no place in the model: ignored. reinitialised: the head,
    when the checkpoint's has another num_classes. source: the detected format (SOURCE_NAMES).
    """
    source: str
    loaded: List[str] = field(default_factory=list)
    resized: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    reinitialised: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"load_pretrained: {SOURCE_NAMES.get(self.source, self.source)} checkpoint ({self.source}): "
                 f"{len(self.loaded)} tensors loaded, {len(self.resized)} resized, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.reinitialised)} re-initialised"]
        for title, keys in (("resized", self.resized), ("re-initialised", self.reinitialised),
                            ("missing (kept as they were)", self.missing), ("unexpected (ignored)", self.unexpected)):
            if keys:
                lines.append(f"  {title}: {compress_keys(keys)}")
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)


def compress_keys(keys: List[str], limit: int = 8) -> str:
    """'blocks.*.attn.q_bias (x12), head.weight' — one entry per key with block numbers folded."""
    groups: "OrderedDict[str, int]" = OrderedDict()
    for key in keys:
        pattern = _BLOCK_KEY.sub(r"blocks.*.\2", key)
        groups[pattern] = groups.get(pattern, 0) + 1
    shown = [f"{pattern} (x{count})" if count > 1 else pattern for pattern, count in list(groups.items())[:limit]]
    if len(groups) > limit:
        shown.append(f"... {len(groups) - limit} more")
    return ", ".join(shown)


# ---------------------------------------------------------------------------------------------
# Reading and recognising a checkpoint


def read_checkpoint(path: Union[str, Path]) -> dict:
    """The dict stored in a .pth / .pt / .bin (torch.load, weights_only=True) or .safetensors file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError("reading .safetensors needs the safetensors package: "
                              "pip install 'pss-kernels[train]'") from None
        return load_file(str(path), device="cpu")
    if suffix not in TORCH_SUFFIXES:
        raise ValueError(f"checkpoint must be a {', '.join(TORCH_SUFFIXES)} or .safetensors file, got {str(path)!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0]
        raise ValueError(
            f"{str(path)!r} holds pickled objects besides tensors (SimMIM's files keep their yacs config), "
            f"which torch.load(weights_only=True) does not run: {first_line}. If you trust the file, pass "
            f"its state dict instead: torch.load(path, map_location='cpu', weights_only=False)['model'] "
            f"(with the pickled classes importable: pip install yacs for SimMIM's)") from None


def unwrap(checkpoint: Mapping) -> Tuple[StateDict, bool]:
    """(the state dict, whether it sat in a wrapper). Wrappers: a "model", "module" or "state_dict"
    entry (BEiT, SimMIM, pss-train's own checkpoints), a "module." prefix on every key (DDP)."""
    wrapped = False
    for name in ("model", "module", "state_dict"):
        inner = checkpoint.get(name) if isinstance(checkpoint, Mapping) else None
        if isinstance(inner, Mapping):
            checkpoint, wrapped = inner, True
            break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ValueError(f"checkpoint must be a non-empty state dict (or a dict with one under 'model' / 'module'), "
                         f"got {type(checkpoint).__name__}")
    not_tensors = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"checkpoint is not a state dict: entries {not_tensors[:5]} are not tensors")
    state_dict = dict(checkpoint)
    if all(key.startswith("module.") for key in state_dict):
        state_dict, wrapped = {key[len("module."):]: value for key, value in state_dict.items()}, True
    return state_dict, wrapped


def _refuse_distilled(state_dict: Mapping) -> None:
    if "dist_token" in state_dict or any(key.startswith("head_dist.") for key in state_dict):
        raise ValueError("this is a distilled DeiT checkpoint (dist_token, head_dist): it was trained with a "
                         "distillation token and a second head that this model does not have, and its "
                         "logits average both heads; load the non-distilled DeiT checkpoint instead")


def detect_format(state_dict: Mapping, model: Optional[nn.Module] = None, *, wrapped: bool = False) -> str:
    """The source format of an unwrapped state dict (a key of SOURCE_NAMES), from its keys."""
    _refuse_distilled(state_dict)
    keys = list(state_dict)
    if not any(key.startswith(("blocks.", "encoder.blocks.", "patch_embed.", "encoder.patch_embed."))
               for key in keys):
        raise ValueError(f"checkpoint does not look like a ViT state dict (no blocks.* / patch_embed.* keys): "
                         f"first keys {keys[:5]}")
    if model is not None and set(keys) == set(model.state_dict()):
        return "pss"
    if (any(key.startswith("encoder.") for key in keys) or any("relative_position_index" in key for key in keys)
            or SHARED_TABLE in state_dict):
        return "beit_original"
    if any(key.endswith((".gamma_1", ".gamma_2")) for key in keys):
        return "beit_original" if wrapped else "timm_beit"
    if any(key.endswith(".attn.q_bias") for key in keys):
        return "pss"  # q_bias without gamma_1: this package (or a timm Beit without layer scale: same keys)
    return "timm_vit"


# ---------------------------------------------------------------------------------------------
# Resampling helpers (shared by every format)


def _square_side(count: int, what: str) -> int:
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{what}: {count} entries are not a square grid; pass the source grid size")
    return side


def resize_rel_pos_table(table: torch.Tensor, new_grid: Tuple[int, int], *,
                         old_grid: Optional[Tuple[int, int]] = None, num_prefix_tokens: int = 1) -> torch.Tensor:
    """A (R, H) relative position table (rpb_attention's layout) for another patch grid.

    The (2Gh-1)(2Gw-1) rows of patch-to-patch offsets form an image of offsets (row offset
    major), resampled bicubically (F.interpolate, align_corners=False, in float32; timm's
    resize_rel_pos_bias_table_simple, SimMIM's Swin loader); the 3 prefix rows (CLS as query,
    as key, CLS-CLS) are kept as they are. `old_grid` defaults to a square one.
    """
    extra = 3 if num_prefix_tokens else 0
    rows, heads = table.shape
    if old_grid is None:
        span = _square_side(rows - extra, "relative position table")
        old_span = (span, span)
    else:
        old_span = (2 * old_grid[0] - 1, 2 * old_grid[1] - 1)
        if old_span[0] * old_span[1] + extra != rows:
            raise ValueError(f"relative position table has {rows} rows, not {old_span[0] * old_span[1] + extra} "
                             f"as for grid {tuple(old_grid)}")
    new_span = (2 * new_grid[0] - 1, 2 * new_grid[1] - 1)
    if new_span == old_span:
        return table
    offsets = table[:rows - extra].float().t().reshape(1, heads, *old_span)
    offsets = F.interpolate(offsets, size=new_span, mode="bicubic", align_corners=False)
    offsets = offsets.reshape(heads, -1).t().to(table.dtype)
    return torch.cat([offsets, table[rows - extra:]])


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: Tuple[int, int], *,
                     old_grid: Optional[Tuple[int, int]] = None, num_prefix_tokens: int = 1) -> torch.Tensor:
    """A (1, prefix + Gh*Gw, C) absolute position embedding for another patch grid: the prefix (CLS)
    rows kept, the grid resampled bicubically (F.interpolate, align_corners=False, no antialias, in
    float32: DeiT's and BEiT's fine-tuning at 384). `old_grid` defaults to a square one."""
    _, tokens, channels = pos_embed.shape
    if old_grid is None:
        side = _square_side(tokens - num_prefix_tokens, "position embedding")
        old_grid = (side, side)
    elif old_grid[0] * old_grid[1] + num_prefix_tokens != tokens:
        raise ValueError(f"position embedding has {tokens} tokens, not {old_grid[0] * old_grid[1] + num_prefix_tokens} "
                         f"as for grid {tuple(old_grid)}")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    grid = pos_embed[:, num_prefix_tokens:].float().reshape(1, *old_grid, channels).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, channels).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :num_prefix_tokens], grid], dim=1)


@dataclass
class Fitted:
    state_dict: StateDict
    resized: List[str]
    reinitialised: List[str]
    notes: List[str]


def fit_to_model(state_dict: Mapping[str, torch.Tensor], model: VisionTransformer) -> Fitted:
    """Resample the size-dependent tensors of a state dict in the model's key layout to the model,
    and set aside a head of another num_classes. Other shape mismatches are left for
    load_pretrained to refuse."""
    target = model.state_dict()
    out, resized, reinitialised, notes = dict(state_dict), [], [], []
    weight = out.get("patch_embed.proj.weight")
    if weight is not None and "patch_embed.proj.weight" in target:
        want = target["patch_embed.proj.weight"].shape
        if weight.shape[-2:] != want[-2:]:
            raise ValueError(f"the checkpoint's patch size is {tuple(weight.shape[-2:])}, the model's "
                             f"{tuple(want[-2:])}: build the model with patch_size={weight.shape[-1]} "
                             f"(resampling a patch embedding is not supported)")
    for key, value in state_dict.items():
        if key not in target or value.shape == target[key].shape:
            continue
        if key == "pos_embed" and value.shape[-1] == target[key].shape[-1]:
            out[key] = resize_pos_embed(value, model.grid_size, num_prefix_tokens=model.num_prefix_tokens)
            notes.append(f"pos_embed: {value.shape[1]} -> {out[key].shape[1]} tokens (grid bicubic, CLS row kept)")
        elif key.endswith("relative_position_bias_table") and value.shape[1] == target[key].shape[1]:
            attention = model.get_submodule(key.rsplit(".", 1)[0])
            out[key] = resize_rel_pos_table(value, attention.grid_size, num_prefix_tokens=attention.num_prefix_tokens)
            if not any(done.endswith("relative_position_bias_table") for done in resized):  # one note for all blocks
                notes.append(f"relative_position_bias_table: {value.shape[0]} -> {out[key].shape[0]} rows "
                             f"(offsets bicubic, 3 CLS rows kept)")
        elif key in HEAD_KEYS:
            del out[key]
            reinitialised.append(key)
            continue
        else:
            continue
        resized.append(key)
    if reinitialised:
        classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else state_dict["head.bias"].shape[0]
        notes.append(f"head: the checkpoint's has {classes} classes, the model {model.num_classes}: re-initialised")
    return Fitted(out, resized, reinitialised, notes)


# ---------------------------------------------------------------------------------------------
# Renaming, one step per source format; each filter = its renaming + fit_to_model


def _block_indices(state_dict: Mapping) -> List[int]:
    return sorted({int(match.group(1)) for match in map(_BLOCK_KEY.fullmatch, state_dict) if match})


def _attention_to_model(state_dict: StateDict, model: VisionTransformer) -> StateDict:
    """Convert each block's qkv bias to the model's attention: q_bias / v_bias (RelPosAttention,
    BEiT's layout, no key bias) or one qkv.bias (PlainAttention)."""
    target = model.state_dict()
    out = dict(state_dict)
    for i in _block_indices(state_dict):
        prefix = f"blocks.{i}.attn."
        full, q_key, v_key = prefix + "qkv.bias", prefix + "q_bias", prefix + "v_bias"
        if full in out and q_key in target and full not in target:
            # A key bias b_k adds q . b_k to every score of query q, the same for all keys, and
            # softmax over the keys cancels a constant: dropping it leaves the attention exact.
            q_bias, _, v_bias = out.pop(full).chunk(3)
            out[q_key], out[v_key] = q_bias, v_bias
        elif q_key in out and v_key in out and full in target and q_key not in target:
            q_bias, v_bias = out.pop(q_key), out.pop(v_key)
            out[full] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return out


def rename_timm_vit(state_dict: Mapping, model: VisionTransformer) -> StateDict:
    """timm VisionTransformer keys are this package's (blocks.i.ls1.gamma, norm, fc_norm, head, ...)
    except the attention's one qkv.bias."""
    _refuse_distilled(state_dict)
    return _attention_to_model(dict(state_dict), model)


def rename_timm_beit(state_dict: Mapping, model: VisionTransformer) -> StateDict:
    """timm Beit: gamma_1 / gamma_2 -> ls1.gamma / ls2.gamma; a shared table (use_shared_rel_pos_bias)
    copied into every block; relative_position_index and k_bias buffers dropped (the kernels compute
    the index from positions; BEiT's key bias is zero, and softmax would cancel it anyway)."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", ".attn.k_bias")):
            continue
        key = re.sub(r"\.gamma_1$", ".ls1.gamma", key)
        out[re.sub(r"\.gamma_2$", ".ls2.gamma", key)] = value
    shared = out.pop(SHARED_TABLE, None)
    if shared is not None:
        for i in _block_indices(out):
            out.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared.clone())
    return _attention_to_model(out, model)


def rename_beit_original(state_dict: Mapping, model: VisionTransformer) -> StateDict:
    """BEiT / SimMIM repositories: the "encoder." prefix of SimMIM pre-training removed (its
    decoder.* and mask_token stay, and are reported unexpected), then as timm Beit. (The wrapper
    is removed by `unwrap` before.)"""
    out = {key[len("encoder."):] if key.startswith("encoder.") else key: value for key, value in state_dict.items()}
    return rename_timm_beit(out, model)


def rename_pss(state_dict: Mapping, model: VisionTransformer) -> StateDict:
    """This package's layout; only the attention's bias layout may differ (rpb on / off)."""
    return _attention_to_model(dict(state_dict), model)


RENAMES: Dict[str, Callable[[Mapping, VisionTransformer], StateDict]] = {
    "pss": rename_pss, "timm_vit": rename_timm_vit, "timm_beit": rename_timm_beit,
    "beit_original": rename_beit_original}


def filter_pss(state_dict: Mapping, model: VisionTransformer) -> StateDict:
    return fit_to_model(rename_pss(state_dict, model), model).state_dict


def filter_timm_vit(state_dict: Mapping, model: VisionTransformer) -> StateDict:
    return fit_to_model(rename_timm_vit(state_dict, model), model).state_dict


def filter_timm_beit(state_dict: Mapping, model: VisionTransformer) -> StateDict:
    return fit_to_model(rename_timm_beit(state_dict, model), model).state_dict


def filter_beit_original(state_dict: Mapping, model: VisionTransformer) -> StateDict:
    return fit_to_model(rename_beit_original(state_dict, model), model).state_dict


FILTERS = {"pss": filter_pss, "timm_vit": filter_timm_vit, "timm_beit": filter_timm_beit,
           "beit_original": filter_beit_original}


# ---------------------------------------------------------------------------------------------


def _hints(report: LoadReport, model: VisionTransformer) -> List[str]:
    missing, unexpected = set(report.missing), set(report.unexpected)
    hints = []
    if "norm.weight" in unexpected and "fc_norm.weight" in missing:
        if report.source == "timm_vit":
            hints.append("hint: the checkpoint classifies from the CLS token after `norm`: build the model with "
                         "pool='cls' (create_model_for) to compute what it computed")
        else:
            hints.append("note: `norm` is the pre-training model's final norm; BEiT / SimMIM fine-tuning "
                         "mean-pools into a new fc_norm, as this model does")
    if "fc_norm.weight" in unexpected and "norm.weight" in missing:
        hints.append("hint: the checkpoint mean-pools (fc_norm): build the model with pool='mean'")
    if "pos_embed" in unexpected:
        hints.append("hint: the checkpoint has an absolute position embedding: build the model with abs_pos_embed=True")
    if "pos_embed" in missing:
        hints.append("hint: the checkpoint has no absolute position embedding: build the model with "
                     "abs_pos_embed=False, or it adds the model's random one")
    if any(key.endswith(".ls1.gamma") for key in unexpected):
        hints.append("hint: the checkpoint has layer scale: build the model with layer_scale_init set")
    if any(key.endswith(".ls1.gamma") for key in missing):
        hints.append("hint: the checkpoint has no layer scale: build the model with layer_scale_init=None")
    if any(key.endswith("relative_position_bias_table") for key in missing):
        hints.append("note: the relative position tables are not in the checkpoint and keep the model's values "
                     "(zero at initialisation: no bias, as the source had)")
    return hints


def load_pretrained(model: VisionTransformer, checkpoint: Union[str, Path, Mapping], *,
                    strict: bool = False) -> LoadReport:
    """Copy a checkpoint's weights into `model` (in place) and report what went where.

    checkpoint: a path (.pth / .pt / .bin through torch.load(weights_only=True); .safetensors
    through the safetensors package) or a state dict, either possibly wrapped ("model" /
    "module" entry, DDP "module." prefix). The source format is detected from the keys (see the
    module docstring); the size-dependent tensors are resampled to the model's patch grid; a head
    of another num_classes is re-initialised. A tensor of another shape that cannot be resampled
    (another width, depth is fine) raises ValueError, as does strict=True with anything missing or
    unexpected. Build the model to match the source (create_model_for, or see the README) so that
    it computes what the source computed.
    """
    if isinstance(checkpoint, (str, Path)):
        checkpoint = read_checkpoint(checkpoint)
    state_dict, wrapped = unwrap(checkpoint)
    source = detect_format(state_dict, model, wrapped=wrapped)
    fitted = fit_to_model(RENAMES[source](state_dict, model), model)
    target = model.state_dict()
    mismatched = [f"{key}: checkpoint {tuple(value.shape)}, model {tuple(target[key].shape)}"
                  for key, value in fitted.state_dict.items() if key in target and value.shape != target[key].shape]
    if mismatched:
        raise ValueError("checkpoint tensors do not fit the model (another width or head count?): "
                         + "; ".join(mismatched[:6]) + ("; ..." if len(mismatched) > 6 else ""))
    report = LoadReport(source=source, resized=fitted.resized, reinitialised=fitted.reinitialised,
                        notes=list(fitted.notes))
    report.loaded = [key for key in fitted.state_dict if key in target]
    report.unexpected = [key for key in fitted.state_dict if key not in target]
    report.missing = [key for key in target if key not in fitted.state_dict and key not in fitted.reinitialised]
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"load_pretrained(strict=True): missing {report.missing}, unexpected {report.unexpected}")
    report.notes.extend(_hints(report, model))
    with torch.no_grad():
        model.load_state_dict({key: fitted.state_dict[key] for key in report.loaded}, strict=False)
        if report.reinitialised:
            init_linear(model.head)
    return report
