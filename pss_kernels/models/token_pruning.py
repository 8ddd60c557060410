"""In-network token selection: the token and attention levels of Tri-Level E-ViT (Kong et al. 2023,
"Peeling the Onion"), with EViT's CLS-attention ranking (Liang et al. 2022).

Token level. A selector at blocks 4, 7 and 10 (1-based, `blocks`) keeps the top R_T of the current
patch tokens by the head-averaged attention of the CLS query (CLS always kept):

    scores = cls_attention[:, 1:]                                   (B, n - 1), no gradient
    x, inner = sample_patches(x, (1 + k) / n, scorer="given", scores=scores)
    index = inner if index is None else index.gather(1, inner)      full-sequence positions

so every kept token keeps its position in the N = 1 + Gh*Gw sequence and the relative position
bias of later blocks is gathered right (at input keep rate 1, index None, `inner` IS the
position). The CLS attention comes from the block the selector reads: rpb_attention's kernel
(return_cls_attention) on impl="pss", `peers.cls_attention` (q_cls and K, O(B H n D), no
(B, H, n, n) tensor) on the peers and the plain ViT. It composes with the input sampler (PSS):
the model may sample at the input and prune inside.

`placement` says which block's attention a selector at block s reads:
- "before_block": the selector runs before block s on the attention of block s - 1
  (EViT / DynamicViT's description, "before the 4th, 7th, 10th layer").
- "after_attention": inside block s, after its attention and before its MLP, on block s's own
  attention: what the authors' released code does (Tri-Level-ViT models_attn_tok.py,
  pruning_loc = [3, 6, 9] 0-based) and the paper's Fig. 2 ("inserted after the self-attention").
  The default, as in the paper presets below and pss-train.

Kept counts: k = ceil(q(R_T) * P - 1e-9) of the P current patches (the released code's ceil;
196 -> 138 -> 97 -> 68 at 0.7), with q(R) = R rounded to the `quantum` grid (default 0.05), so a
warm-up of R_T (schedules.WarmupCosine) passes through at most 1 / quantum distinct token counts
and per-keep-rate timing stays meaningful; `kept_patches(P)` lists them.

Attention level. With R_A < 1 the selector also builds a (B, k+1, k+1) key mask from the
head-averaged attention map of the block it read, restricted to the kept tokens: each patch query
keeps its top ceil(q(R_A) * k) patch keys by its own attention row; the CLS query sees every key and
every query sees the CLS key. The mask holds for the later blocks up to the next selector, which
builds the next one from the masked attention (the paper's "for the rest layers" and the released
code). Masked blocks run `peers.masked_attention`, the dense torch path: the logits are computed in
full and the mask removes entries, so the attention level saves no FLOPs (the paper applies it as
a mask too), and it costs the dense (B, H, n, n) logits plus the mask where the fused kernel would
not build them. `python tests/test_token_pruning.py` measures it on the CPU.

R_T and R_A are attributes a schedule sets each step (`model.token_keep_rate`,
`model.attention_keep_rate`); they apply in train and eval mode alike (the paper evaluates the
pruned model); 1.0 / 1.0 runs the model exactly as without pruning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Sequence, Tuple

import torch
from torch import nn

from .._checks import check_choice, check_int, check_rate
from ..ops.sample_patches.op import sample_patches
from ..ops.varlen.reference import image_ids

TRI_LEVEL_BLOCKS = (4, 7, 10)
PLACEMENTS = ("before_block", "after_attention")
DEFAULT_QUANTUM = 0.05


def quantise(rate: float, quantum: Optional[float]) -> float:
    """`rate` rounded to the nearest multiple of `quantum` (None: as it is), at least one quantum."""
    if quantum is None:
        return rate
    return max(quantum, round(round(rate / quantum) * quantum, 10))


def kept_count(num_items: int, rate: float, quantum: Optional[float] = DEFAULT_QUANTUM) -> int:
    """ceil(q(rate) * num_items), at least 1: tokens (or keys) a selector keeps of `num_items`."""
    return min(num_items, max(1, math.ceil(quantise(rate, quantum) * num_items - 1e-9)))


def top_key_mask(attention_map: torch.Tensor, inner: Optional[torch.Tensor], keep_rate: float,
                 quantum: Optional[float] = DEFAULT_QUANTUM) -> torch.Tensor:
    """(B, k, k) bool key mask of the attention level.

    attention_map: (B, n, n) head-averaged attention of the block a selector read; inner: (B, k)
    positions among those n tokens of the tokens it kept (None: all, in order). Each patch query
    keeps its top kept_count(k - 1, keep_rate) patch keys by its row of the map restricted to the
    kept tokens (ties to the lower position); row 0 (CLS query) and column 0 (CLS key) are all True.
    """
    if inner is not None:
        num_tokens, kept = attention_map.shape[1], inner.shape[1]
        attention_map = attention_map.gather(1, inner[..., None].expand(-1, -1, num_tokens))
        attention_map = attention_map.gather(2, inner[:, None, :].expand(-1, kept, -1))
    batch, kept = attention_map.shape[:2]
    keys = kept_count(kept - 1, keep_rate, quantum)
    mask = torch.ones(batch, kept, kept, dtype=torch.bool, device=attention_map.device)
    if keys < kept - 1:
        # Ties (e.g. keys the previous mask zeroed) go to the lower position, as sample_patches' do.
        top = torch.sort(attention_map[:, 1:, 1:], dim=-1, descending=True, stable=True).indices[..., :keys]
        patch_mask = torch.zeros(batch, kept - 1, kept - 1, dtype=torch.bool, device=attention_map.device)
        mask[:, 1:, 1:] = patch_mask.scatter_(2, top, True)
    return mask


class TokenPruning(nn.Module):
    """The token-pruning plan of a VisionTransformer (`VisionTransformer(token_pruning=...)`).

    Args:
        blocks: 1-based blocks at which a selector runs (Tri-Level / EViT / DynamicViT: 4, 7, 10).
        token_keep_rate: R_T in (0, 1], the fraction of the current patch tokens each selector keeps.
        attention_keep_rate: R_A in (0, 1], the fraction of the kept patch keys each patch query
            attends after a selector (1.0: no attention level).
        placement: "after_attention" (the released code's) or "before_block" (see the module docstring).
        quantum: the grid R_T and R_A are rounded to before counting (None: no rounding).
        backend: the backend of sample_patches (None: the package's choice per device).

    No parameters: the plan changes what the model computes, not what it learns.
    """

    def __init__(self, blocks: Sequence[int] = TRI_LEVEL_BLOCKS, token_keep_rate: float = 1.0,
                 attention_keep_rate: float = 1.0, *, placement: str = "after_attention",
                 quantum: Optional[float] = DEFAULT_QUANTUM, backend: Optional[str] = None):
        super().__init__()
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("blocks must name at least one block")
        for number in blocks:
            check_int("blocks[...]", number, minimum=1)
        if list(blocks) != sorted(set(blocks)):
            raise ValueError(f"blocks must be strictly ascending, got {blocks}")
        check_choice("placement", placement, PLACEMENTS)
        if quantum is not None:
            quantum = check_rate("quantum", quantum)
        self.blocks, self.placement, self.quantum, self.backend = blocks, placement, quantum, backend
        self.token_keep_rate = token_keep_rate
        self.attention_keep_rate = attention_keep_rate

    @property
    def token_keep_rate(self) -> float:
        """R_T: the fraction of the current patch tokens each selector keeps."""
        return self._token_keep_rate

    @token_keep_rate.setter
    def token_keep_rate(self, value: float) -> None:
        self._token_keep_rate = check_rate("token_keep_rate", value)

    @property
    def attention_keep_rate(self) -> float:
        """R_A: the fraction of the kept patch keys each patch query attends after a selector."""
        return self._attention_keep_rate

    @attention_keep_rate.setter
    def attention_keep_rate(self, value: float) -> None:
        self._attention_keep_rate = check_rate("attention_keep_rate", value)

    @property
    def active(self) -> bool:
        """False at R_T = R_A = 1 (after quantisation): the model then runs its plain path."""
        return quantise(self.token_keep_rate, self.quantum) < 1.0 or quantise(self.attention_keep_rate,
                                                                             self.quantum) < 1.0

    @property
    def stats(self) -> str:
        """What a selector reads from the attention of its block: "cls", or "map" with R_A < 1."""
        return "map" if quantise(self.attention_keep_rate, self.quantum) < 1.0 else "cls"

    @property
    def after(self) -> str:
        """Where in the block it reads a selector runs: after the MLP ("mlp") or the attention."""
        return "mlp" if self.placement == "before_block" else "attention"

    def check_depth(self, depth: int) -> None:
        low = 2 if self.placement == "before_block" else 1
        if self.blocks[0] < low or self.blocks[-1] > depth:
            raise ValueError(f"token_pruning blocks must be in [{low}, {depth}] for depth {depth} and "
                             f"placement={self.placement!r} (1-based), got {self.blocks}")

    def reading_blocks(self) -> FrozenSet[int]:
        """1-based blocks whose attention a selector reads (and after which it runs)."""
        shift = 1 if self.placement == "before_block" else 0
        return frozenset(number - shift for number in self.blocks)

    def kept_patches(self, num_patches: int) -> Tuple[int, ...]:
        """Patch tokens after each selector, from `num_patches` entering the blocks."""
        counts = []
        for _ in self.blocks:
            num_patches = kept_count(num_patches, self.token_keep_rate, self.quantum)
            counts.append(num_patches)
        return tuple(counts)

    def select(self, x: torch.Tensor, index: Optional[torch.Tensor], key_mask: Optional[torch.Tensor],
               cls_attention: torch.Tensor, attention_map: Optional[torch.Tensor]):
        """(x (B, n, C), index (B, n) | None, key_mask) -> the same for the kept tokens.

        cls_attention (B, n): the CLS query's head-averaged attention in the block read;
        attention_map (B, n, n): that block's head-averaged attention (needed with R_A < 1).
        """
        num_tokens = x.shape[1]
        kept = kept_count(num_tokens - 1, self.token_keep_rate, self.quantum)
        inner = None
        if kept < num_tokens - 1:
            x, inner = sample_patches(x, (1 + kept) / num_tokens, scorer="given", scores=cls_attention[:, 1:],
                                      num_prefix_tokens=1, backend=self.backend)
            index = inner if index is None else index.gather(1, inner)
        if self.stats == "map":
            key_mask = top_key_mask(attention_map, inner, self.attention_keep_rate, self.quantum)
        return x, index, key_mask

    def select_packed(self, tokens: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
                      cls_attention: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The token level on packed tokens (models/packed.py): (tokens (T, C), positions (T,), cu_seqlens
        (B + 1,)) -> the same for the kept tokens. Image b keeps its CLS token and kept_count(n_b - 1)
        of its n_b - 1 patch tokens by cls_attention (T,), so images of different lengths keep different
        numbers; within an image the order and ties are select()'s (descending score, ties to the lower
        row; an image that keeps every patch keeps its order). One prefix (CLS) token per image."""
        if self.stats == "map":
            raise ValueError("the attention level (attention_keep_rate < 1) runs on dense tokens only; packed "
                             "tokens (allocation 'budget' / 'mass') take the token level")
        total = tokens.shape[0]
        starts = cu_seqlens[:-1].long()
        lengths = cu_seqlens[1:].long() - starts
        image = image_ids(cu_seqlens, total)
        patches = lengths - 1
        # kept_count per image, in float64 as Python's math.ceil computes it.
        kept = torch.ceil(quantise(self.token_keep_rate, self.quantum) * patches.double() - 1e-9).long()
        kept = torch.minimum(patches, kept.clamp(min=1))
        row = torch.arange(total, device=tokens.device)
        # Descending score with ties to the lower row, then grouped by image with its CLS token first
        # (stable): each image's rows in selection order, its segment where it was. The CLS token is
        # put first by the key rather than by an infinite score, which a NaN would outrank.
        order = torch.sort(cls_attention.detach().float(), descending=True, stable=True).indices
        is_patch = torch.ones(total, dtype=torch.int64, device=tokens.device)
        is_patch[starts] = 0
        order = order[torch.sort((image * 2 + is_patch)[order], stable=True).indices]
        rank = row - starts[image]  # the rank of order[row] within its image
        keep_all = (kept == patches)[image]
        chosen = torch.where(keep_all, row, order)[rank < (kept + 1)[image]]
        new_cu = torch.zeros_like(cu_seqlens)
        new_cu[1:] = torch.cumsum(kept + 1, 0).to(cu_seqlens.dtype)
        return tokens.index_select(0, chosen), positions.index_select(0, chosen), new_cu

    def extra_repr(self) -> str:
        return (f"blocks={self.blocks}, token_keep_rate={self.token_keep_rate}, "
                f"attention_keep_rate={self.attention_keep_rate}, placement={self.placement!r}, "
                f"quantum={self.quantum}")


@dataclass(frozen=True)
class TriLevelSetting:
    """A Tri-Level E-ViT token / attention-level setting: the targets R_T and R_A that the warm-up
    reaches (the released code warms both up from 1.0 by a cosine: hold 10 epochs, decay over 100,
    i.e. schedules.WarmupCosine's defaults), at blocks 4, 7, 10 with the released code's placement."""
    token_keep_rate: float
    attention_keep_rate: float = 1.0
    blocks: Tuple[int, ...] = TRI_LEVEL_BLOCKS
    placement: str = "after_attention"

    def token_pruning(self, **overrides) -> TokenPruning:
        """The TokenPruning to build the model with, at R_T = R_A = 1 (where the warm-up starts)."""
        options = dict(blocks=self.blocks, placement=self.placement)
        return TokenPruning(**{**options, **overrides})


# The paper's settings: Table 1 (Tri-Level/0.9, /0.8, /0.7: token keep ratio; the main results
# combine the three levels) and Table 3's attention-level-only rows (R_A 0.4, 0.3, 0.2).
TRI_LEVEL_PRESETS: Dict[str, TriLevelSetting] = {
    "tri-level/0.9": TriLevelSetting(token_keep_rate=0.9),
    "tri-level/0.8": TriLevelSetting(token_keep_rate=0.8),
    "tri-level/0.7": TriLevelSetting(token_keep_rate=0.7),
    "attention/0.4": TriLevelSetting(token_keep_rate=1.0, attention_keep_rate=0.4),
    "attention/0.3": TriLevelSetting(token_keep_rate=1.0, attention_keep_rate=0.3),
    "attention/0.2": TriLevelSetting(token_keep_rate=1.0, attention_keep_rate=0.2),
}
