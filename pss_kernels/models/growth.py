"""Budgeted Training for Vision Transformer (Xia et al. 2023): stages that grow the model's active
heads, MLP hidden units and tokens, with the active weights copied into the newly active parts.

A stage is a `GrowthStage(num_heads, mlp_ratio, num_patches)`: every block runs its first
`num_heads` heads (RelPosAttention / PlainAttention `active_heads`: the qkv rows, q/v bias, table
columns and proj columns of those heads only) and its first `mlp_ratio * embed_dim` hidden units
(Mlp `active_hidden`: fc1 rows and bias, fc2 columns), so the compute really shrinks; the input
sampler keeps the `num_patches` patches nearest the grid centre (scorer="center": 14 x 14 ->
the centre 10 x 10 = 100, 12 x 12 = 144; all 196 at the last stage, where sampling is skipped).
The paper's stages (Table 6) are in `BUDGETED_STAGES`.

Growing (`grow(model, stage)`), as the paper's Sec. 4.2 and Fig. 5: the weights of the active parts
are copied into the parts that become active, part by part in order (heads 2 -> 4: heads 2, 3 get
heads 0, 1; 4 -> 6: heads 4, 5 get heads 0, 1; MLP C -> 2C: units C..2C-1 get 0..C-1), and the
AdamW moments of the new parts are reset: `grow` returns the `NewSlice`s and
`reset_optimizer_moments(optimizer, slices)` zeroes their exp_avg / exp_avg_sq. `init` is the
ablation switch of the paper's Table 11:
- "copy" (default, the paper's method): parameters copied, moments reset. The grown model then
  computes more than before (a copied head or unit adds its output a second time); the paper
  keeps it so.
- "copy-halved": also the Net2Net compensation x0.5 (Chen et al. 2015; Table 11's "x0.5"): the proj
  columns of a copied head and its copies, and the fc2 columns of a copied unit and its copies,
  are divided by the number of copies, so the grown model computes exactly what it computed
  before (function-preserving, up to rounding).
- "random": the new parts re-initialised as at construction (truncated normal 0.02, zero
  biases and table columns): Table 11's first row.

What the trainer does at a stage boundary (the schedule is `schedules.solve_budget` with the
stage keep rates `stage_keep_rates(model, stages)` and per-stage costs from `count_flops`):

    slices = grow(model, stages[k])               # at the first step of stage k > 0
    reset_optimizer_moments(optimizer, slices)

and on resume `set_stage(model, stages[k])` (widths only, no copy: the weights come from the
checkpoint; the stage index belongs in the checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._checks import check_choice, check_int
from ..ops.rpb_attention.module import RelPosAttention
from .flops import count_flops  # noqa: F401  (re-exported: the stage costs use it)
from .layers import Mlp, PlainAttention

INITS = ("copy", "copy-halved", "random")


@dataclass(frozen=True)
class GrowthStage:
    """Active widths of one stage: heads per block, MLP ratio (hidden = mlp_ratio * embed_dim),
    and the centre-cropped patch tokens (None: leave the input sampler as it is)."""
    num_heads: int
    mlp_ratio: float
    num_patches: Optional[int] = None


# The paper's Table 6 (DeiT-S, DeiT-B: M, C, N per stage); DeiT-T by the same rule (heads linear to
# all, MLP ratio 1 -> 2 -> 4, tokens 50 / 75 / 100 %), not in the paper.
BUDGETED_STAGES: Dict[str, Tuple[GrowthStage, ...]] = {
    "deit_tiny": (GrowthStage(1, 1.0, 100), GrowthStage(2, 2.0, 144), GrowthStage(3, 4.0, 196)),
    "deit_small": (GrowthStage(2, 1.0, 100), GrowthStage(4, 2.0, 144), GrowthStage(6, 4.0, 196)),
    "deit_base": (GrowthStage(4, 1.0, 100), GrowthStage(8, 2.0, 144), GrowthStage(12, 4.0, 196)),
}


@dataclass(frozen=True)
class NewSlice:
    """`param.data.narrow(dim, start, stop - start)` became active at a growth: the entries whose
    optimizer moments `reset_optimizer_moments` zeroes. `name` is the parameter's name in the model."""
    name: str
    param: nn.Parameter
    dim: int
    start: int
    stop: int

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.narrow(self.dim, self.start, self.stop - self.start)


def _attentions(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, (RelPosAttention, PlainAttention)))


def _mlps(model: nn.Module) -> Iterator[Tuple[str, Mlp]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, Mlp))


def _hidden_units(model: nn.Module, mlp_ratio: float) -> int:
    return int(round(model.embed_dim * mlp_ratio))


def _check_stage(model: nn.Module, stage: GrowthStage) -> None:
    if not isinstance(stage, GrowthStage):
        raise TypeError(f"stage must be a GrowthStage, got {type(stage).__name__}")
    check_int("stage.num_heads", stage.num_heads, minimum=1)
    for name, attn in _attentions(model):
        if stage.num_heads > attn.num_heads:
            raise ValueError(f"stage.num_heads={stage.num_heads} exceeds the {attn.num_heads} heads of {name}")
    hidden = _hidden_units(model, stage.mlp_ratio)
    for name, mlp in _mlps(model):
        if not 1 <= hidden <= mlp.fc1.out_features:
            raise ValueError(f"stage.mlp_ratio={stage.mlp_ratio} gives {hidden} hidden units; {name} has "
                             f"{mlp.fc1.out_features}")
    if stage.num_patches is not None:
        check_int("stage.num_patches", stage.num_patches, minimum=1, maximum=model.patch_embed.num_patches)


def stage_of(model: nn.Module) -> GrowthStage:
    """The widths the model runs now (block 1's; growth keeps every block alike). The tokens are not
    the model's (the input keep rate is a per-call argument): num_patches is None."""
    _, attn = next(_attentions(model))
    _, mlp = next(_mlps(model))
    return GrowthStage(attn.active_heads, mlp.active_hidden / model.embed_dim)


def stage_keep_rate(model: nn.Module, stage: GrowthStage) -> float:
    """The input keep rate rho (a fraction of all N tokens, CLS included) that keeps
    stage.num_patches patches: (1 + num_patches) / N, or 1.0 for all of them."""
    patches = model.patch_embed.num_patches
    if stage.num_patches is None or stage.num_patches == patches:
        return 1.0
    return (1 + stage.num_patches) / (patches + 1)


def stage_keep_rates(model: nn.Module, stages: Sequence[GrowthStage]) -> Tuple[float, ...]:
    """Keep rates of `stages` for solve_budget(keep_rates=...): DeiT-S 224 -> (101/197, 145/197, 1.0)."""
    return tuple(stage_keep_rate(model, stage) for stage in stages)


def set_stage(model: nn.Module, stage: GrowthStage) -> None:
    """Make the model run `stage`'s widths and tokens, leaving every weight as it is (resume, counts)."""
    _check_stage(model, stage)
    hidden = _hidden_units(model, stage.mlp_ratio)
    for _, attn in _attentions(model):
        attn.active_heads = stage.num_heads
    for _, mlp in _mlps(model):
        mlp.active_hidden = hidden
    if stage.num_patches is not None:
        # The stage's tokens are the input keep rate stage_keep_rate(model, stage), which the caller
        # passes per forward (the trainer's schedule holds it): only the scorer is the model's.
        model.sampler.scorer = "center"


def _sources(old: int, new: int) -> List[int]:
    """Source of each newly active part old..new-1: the active parts in order, cyclically."""
    return [(j - old) % old for j in range(old, new)]


def _copies(old: int, new: int) -> torch.Tensor:
    """(new,) for each part 0..new-1 after a copy from `old` parts: how many parts compute what it
    computes (1 + the copies of its source); the x0.5 compensation divides by it."""
    sources = torch.tensor(_sources(old, new), dtype=torch.long)
    count = torch.ones(old).index_add_(0, sources, torch.ones(len(sources)))
    return torch.cat([count, count[sources]])


def _init_normal(target: torch.Tensor, generator: Optional[torch.Generator]) -> None:
    fresh = torch.empty(target.shape, dtype=torch.float32, device="cpu")
    nn.init.trunc_normal_(fresh, std=0.02, generator=generator)
    target.copy_(fresh)


def _grow_parts(tensor: torch.Tensor, dim: int, old: int, new: int, init: str, random_init: str,
                generator: Optional[torch.Generator]) -> None:
    """tensor's parts along `dim` (already viewed so that dim indexes parts): parts old..new-1 get
    their sources (copy) or a fresh draw / zeros (random)."""
    for j, s in zip(range(old, new), _sources(old, new)):
        part = tensor.select(dim, j)
        if init == "random":
            part.zero_() if random_init == "zeros" else _init_normal(part, generator)
        else:
            part.copy_(tensor.select(dim, s))


def _grow_attention(attn: nn.Module, old: int, new: int, init: str, generator) -> None:
    heads, dim = attn.num_heads, attn.qkv.in_features
    per_head = [(attn.qkv.weight.data.view(3, heads, -1, dim), 1, "normal")]  # (tensor, head axis, random init)
    if isinstance(attn, PlainAttention):
        if attn.qkv.bias is not None:
            per_head.append((attn.qkv.bias.data.view(3, heads, -1), 1, "zeros"))
    else:
        per_head += [(b.data.view(heads, -1), 0, "zeros") for b in (attn.q_bias, attn.v_bias) if b is not None]
        per_head.append((attn.relative_position_bias_table.data, 1, "zeros"))
    proj = attn.proj.weight.data.view(attn.proj.out_features, heads, -1)
    per_head.append((proj, 1, "normal"))
    for tensor, axis, random_init in per_head:
        _grow_parts(tensor, axis, old, new, init, random_init, generator)
    if init == "copy-halved":
        proj[:, :new] /= _copies(old, new).to(proj)[None, :, None]


def _grow_mlp(mlp: Mlp, old: int, new: int, init: str, generator) -> None:
    _grow_parts(mlp.fc1.weight.data, 0, old, new, init, "normal", generator)
    _grow_parts(mlp.fc1.bias.data, 0, old, new, init, "zeros", generator)
    _grow_parts(mlp.fc2.weight.data, 1, old, new, init, "normal", generator)
    if init == "copy-halved":
        mlp.fc2.weight.data[:, :new] /= _copies(old, new).to(mlp.fc2.weight)[None, :]


def new_parameter_slices(model: nn.Module, old: GrowthStage, new: GrowthStage) -> List[NewSlice]:
    """The parameter entries that become active going from stage `old` to stage `new` (per block:
    the new heads' q, k, v rows of qkv.weight (three ranges), their q_bias / v_bias (or qkv.bias)
    entries, relative_position_bias_table columns and proj.weight columns; the new hidden units'
    fc1.weight rows, fc1.bias entries and fc2.weight columns). Biases of the outputs (proj.bias,
    fc2.bias) stay: they were active all along."""
    slices: List[NewSlice] = []
    names = {id(p): n for n, p in model.named_parameters()}

    def add(param, dim, start, stop):
        if param is not None and stop > start:
            slices.append(NewSlice(names[id(param)], param, dim, start, stop))

    for _, attn in _attentions(model):
        head_dim = attn.qkv.in_features // attn.num_heads
        start, stop = old.num_heads * head_dim, new.num_heads * head_dim
        width = attn.num_heads * head_dim
        for group in range(3):
            add(attn.qkv.weight, 0, group * width + start, group * width + stop)
        if isinstance(attn, PlainAttention):
            for group in range(3):
                add(attn.qkv.bias, 0, group * width + start, group * width + stop)
        else:
            add(attn.q_bias, 0, start, stop)
            add(attn.v_bias, 0, start, stop)
            add(attn.relative_position_bias_table, 1, old.num_heads, new.num_heads)
        add(attn.proj.weight, 1, start, stop)
    start, stop = _hidden_units(model, old.mlp_ratio), _hidden_units(model, new.mlp_ratio)
    for _, mlp in _mlps(model):
        add(mlp.fc1.weight, 0, start, stop)
        add(mlp.fc1.bias, 0, start, stop)
        add(mlp.fc2.weight, 1, start, stop)
    return slices


@torch.no_grad()
def grow(model: nn.Module, stage: GrowthStage, *, init: str = "copy",
         generator: Optional[torch.Generator] = None) -> List[NewSlice]:
    """Switch the model to `stage`, filling the parts that become active (see the module docstring
    for `init`); returns the new parameter slices for reset_optimizer_moments. `generator` seeds
    init="random" (CPU generator; None: the global RNG). Heads and MLP width may only grow."""
    check_choice("init", init, INITS)
    _check_stage(model, stage)
    current = stage_of(model)
    old_hidden, new_hidden = _hidden_units(model, current.mlp_ratio), _hidden_units(model, stage.mlp_ratio)
    if stage.num_heads < current.num_heads or new_hidden < old_hidden:
        raise ValueError(f"grow can only widen: the model runs {current}, asked for {stage}")
    for _, attn in _attentions(model):
        _grow_attention(attn, current.num_heads, stage.num_heads, init, generator)
    for _, mlp in _mlps(model):
        _grow_mlp(mlp, old_hidden, new_hidden, init, generator)
    slices = new_parameter_slices(model, current, stage)
    set_stage(model, stage)
    return slices


MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


@torch.no_grad()
def reset_optimizer_moments(optimizer: torch.optim.Optimizer, slices: Sequence[NewSlice]) -> int:
    """Zero the optimizer state entries (Adam/AdamW exp_avg, exp_avg_sq, max_exp_avg_sq; SGD
    momentum_buffer) of every slice, as the paper drops the new parts' moments; returns how many
    state tensors were touched. Parameters without state yet are skipped (nothing to reset).

    The per-parameter `step` (Adam's bias correction) is shared by the whole tensor and stays: the
    new entries' first updates are then up to (1 - beta1) / sqrt(1 - beta2) (~3.2 at AdamW's
    defaults) times the lr instead of Adam's first-step lr, until their moments fill.
    Before a slice ever trains its gradient is exactly zero, so its moments are already zero
    unless the model was trained wider before (a pretrained or shrunk model); the reset makes
    "new parts start with fresh moments" hold in every case."""
    touched = 0
    for piece in slices:
        state = optimizer.state.get(piece.param)
        if not state:
            continue
        for key in MOMENT_KEYS:
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.shape == piece.param.shape:
                piece.view(value).zero_()
                touched += 1
    return touched


def stage_flops(model: nn.Module, stages: Sequence[GrowthStage], **options) -> Tuple[int, ...]:
    """count_flops (options: batch_size, backward) at each stage, the stage's tokens given as the
    call's keep rate; the model's widths and scorer are restored afterwards."""
    current, scorer = stage_of(model), model.sampler.scorer
    try:
        counts = []
        for stage in stages:
            set_stage(model, stage)
            counts.append(count_flops(model, keep_rate=stage_keep_rate(model, stage), **options))
        return tuple(counts)
    finally:
        set_stage(model, GrowthStage(current.num_heads, current.mlp_ratio))
        model.sampler.scorer = scorer
