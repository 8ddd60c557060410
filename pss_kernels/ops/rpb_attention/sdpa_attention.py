"""The "sdpa" backend of rpb_attention: the fastest construction from PyTorch's own kernels.

    bias = bias_table[rel(index[b, i], index[b, j]), h]      gathered once, in the activation dtype
    out  = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

It is what `backend=None` runs until a kernel of this package has passed its tests on a device and
beaten it there (op.py's CPU_DEFAULT_BACKEND / GPU_DEFAULT_BACKEND). The float32 "torch" backend stays
the oracle; this one is for speed:

- The bias is gathered from the table cast to q's dtype (an (H, R) copy of a few KB), not gathered in
  float32 and cast: half the bytes of the (B, H, n, n) bias, written once and read by SDPA.
- On CUDA SDPA runs its memory-efficient kernel (the fused kernel that takes a bias and returns its
  gradient; FLASH takes no bias, cuDNN returns no bias gradient), or MATH where that cannot run
  (float64, head dims it does not take). The bias is gathered into rows padded to 16 elements, so
  SDPA takes it as it is instead of copying it into an aligned buffer. On CPU the attention runs as
  matmul, softmax, matmul (faster there than SDPA's CPU paths, see _attend).
- At index=None every image shares one (1, H, N, N) bias; SDPA broadcasts it and autograd sums its
  gradient over the images before the table scatter.
- The table gradient is one float32 scatter of the bias gradient by table row (_GatheredBias),
  deterministic on both devices: PyTorch's sort-based `index_put_(accumulate=True)` on CUDA, one
  `bincount` per head on CPU (index_put_ accumulates serially on CPU, bincount is about 2x faster there).
  So `deterministic` needs nothing more here (SDPA writes each element of the bias gradient once).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .peers import cls_attention as cls_attention_row
from .reference import full_relative_index
from .torch_attention import deterministic_algorithms

MASK_ALIGNMENT = 16  # elements: SDPA's memory-efficient kernel copies a bias whose strides are not multiples


def gather_bias(bias_table: torch.Tensor, rows: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """(B | 1, H, n, n) bias in `dtype` from table rows (B | 1, n, n_pad): a view of the (H, B, n, n_pad)
    gather, whose padding columns (past n) are sliced off."""
    by_head = bias_table.detach().to(dtype).t()  # (H, R): a few KB
    return by_head[:, rows][..., :num_tokens].transpose(0, 1)


class _GatheredBias(torch.autograd.Function):
    """gather_bias with a float32 table gradient (scatter_by_row)."""

    @staticmethod
    def forward(ctx, bias_table: torch.Tensor, rows: torch.Tensor, num_tokens: int, dtype: torch.dtype):
        ctx.save_for_backward(rows)
        ctx.num_tokens, ctx.table_shape, ctx.table_dtype = num_tokens, bias_table.shape, bias_table.dtype
        return gather_bias(bias_table, rows, num_tokens, dtype)

    @staticmethod
    def backward(ctx, grad_bias: torch.Tensor):
        (rows,) = ctx.saved_tensors
        rows = rows[..., :ctx.num_tokens]
        if grad_bias.shape[0] != rows.shape[0]:  # a shared bias whose gradient came per image
            grad_bias = grad_bias.sum(0, keepdim=True)
        return scatter_by_row(grad_bias, rows, ctx.table_shape[0]).to(ctx.table_dtype), None, None, None


def scatter_by_row(grad_bias: torch.Tensor, rows: torch.Tensor, num_table_rows: int,
                   method: Optional[str] = None) -> torch.Tensor:
    """dbias_table (R, H): the sum of grad_bias[b, h, i, j] (B, H, n, n) over the pairs with
    rows[b, i, j] = r (rows (B | 1, n, n)), in float32 (float64 for a float64 gradient). method:
    "sorted" (index_put_, PyTorch's sort-based scatter on CUDA) or "bincount" (one per head, float64
    sums); default: sorted on CUDA, else bincount."""
    heads = grad_bias.shape[1]
    dtype = torch.promote_types(grad_bias.dtype, torch.float32)
    rows = rows.expand(grad_bias.shape[0], -1, -1).reshape(-1)
    if (method or ("sorted" if grad_bias.device.type == "cuda" else "bincount")) == "sorted":
        values = grad_bias.permute(0, 2, 3, 1).reshape(-1, heads).to(dtype)
        out = torch.zeros(num_table_rows, heads, device=grad_bias.device, dtype=dtype)
        with deterministic_algorithms():  # a fixed summation order on either device
            return out.index_put_((rows,), values, accumulate=True)
    by_head = grad_bias.transpose(0, 1).reshape(heads, -1).to(torch.float64)  # one copy for every head
    return torch.stack([torch.bincount(rows, weights=by_head[h], minlength=num_table_rows)
                        for h in range(heads)], 1).to(dtype)


def padded_width(num_tokens: int, pad: bool) -> int:
    """n rounded up to MASK_ALIGNMENT when `pad`, else n."""
    return -(-num_tokens // MASK_ALIGNMENT) * MASK_ALIGNMENT if pad else num_tokens


def table_rows(index: Optional[torch.Tensor], grid_size: Tuple[int, int], num_prefix_tokens: int,
               num_tokens: int, device: torch.device, pad: bool) -> torch.Tensor:
    """(B | 1, n, n_pad) int64 table rows of the token pairs (1 when index is None); n_pad =
    padded_width(n, pad), the padding columns repeat the first token's row."""
    full = full_relative_index(tuple(grid_size), num_prefix_tokens, device)  # (N, N)
    width = padded_width(num_tokens, pad)
    if index is None:  # all N tokens in order: the (N, N) map itself, no gather
        rows = full if width == num_tokens else torch.cat((full, full[:, :1].expand(-1, width - num_tokens)), 1)
        return rows[None]
    columns = index if width == num_tokens else torch.cat((index, index[:, :1].expand(-1, width - num_tokens)), 1)
    return full[index[:, :, None], columns[:, None, :]]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v: SDPA's memory-efficient kernel on CUDA (MATH where it cannot
    run); on CPU the same three ops unfused, which measured faster than SDPA's CPU paths at ViT shapes
    (benchmarks/results/cpu/; SDPA's CPU math path adds work around them, its flash path takes no
    bias gradient). The softmax runs in float32 for half-precision inputs."""
    if q.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    logits = torch.matmul(q * scale, k.transpose(-1, -2)) + bias
    probs = logits.softmax(-1) if logits.dtype in (torch.float32, torch.float64) else logits.float().softmax(-1)
    return torch.matmul(probs.to(v.dtype), v)


def rpb_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                       index: Optional[torch.Tensor], rows: Optional[torch.Tensor], grid_size: Tuple[int, int],
                       num_prefix_tokens: int, scale: float, return_cls_attention: bool):
    """out (B, H, n, D) in q's dtype, and the (B, n) float32 CLS attention when asked (O(B H n D),
    peers.cls_attention); differentiable in q, k, v and bias_table through autograd. `rows` are
    table_rows(index, ..., pad=on CUDA) (op.py makes them with its index check), None at index=None."""
    if rows is None:
        rows = table_rows(None, grid_size, num_prefix_tokens, q.shape[2], q.device, pad=q.device.type == "cuda")
    if bias_table.requires_grad and torch.is_grad_enabled():
        bias = _GatheredBias.apply(bias_table, rows, q.shape[2], q.dtype)
    else:
        bias = gather_bias(bias_table, rows, q.shape[2], q.dtype)
    out = _attend(q, k, v, bias, scale)
    if not return_cls_attention:
        return out
    return out, cls_attention_row(q, k, bias_table, index, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens,
                                  scale=scale)
