"""The "torch" backend of rpb_attention: forward and analytic backward in plain PyTorch.

It materialises the (B, H, n, n) logits, as the reference does (it is the CPU path and the
oracle's twin); the Triton backend never does. Computes in float32 (float64 for float64
inputs). dbias_table is a scatter-add of dS by table row with `index_put_(accumulate=True)`:
sort-based (deterministic) on CUDA, but on CPU large inputs take a multi-threaded atomic path,
so `deterministic=True` runs it under torch.use_deterministic_algorithms.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Tuple

import torch

from .reference import relative_index, rpb_attention_logits


def rpb_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                          index: Optional[torch.Tensor], grid_size: Tuple[int, int], num_prefix_tokens: int,
                          scale: float, out: torch.Tensor, lse: torch.Tensor,
                          cls_attention: Optional[torch.Tensor]) -> None:
    """Fill out (B, H, n, D), lse (B, H, n) (natural log) and, if given, cls_attention (B, n)."""
    logits = rpb_attention_logits(q, k, bias_table, index, grid_size, num_prefix_tokens, scale)
    lse.copy_(logits.logsumexp(-1))
    probs = torch.exp(logits - lse[..., None])
    out.copy_(torch.matmul(probs, v.to(probs.dtype)))
    if cls_attention is not None:
        cls_attention.copy_(probs[:, :, 0, :].mean(1))


@contextmanager
def deterministic_algorithms(enabled: bool = True):
    """torch.use_deterministic_algorithms(True) for the block, when `enabled` and not already on."""
    if not enabled or torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def rpb_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           bias_table: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor,
                           lse: torch.Tensor, grid_size: Tuple[int, int], num_prefix_tokens: int, scale: float,
                           deterministic: bool, bias_grad: bool = True):
    """(dq, dk, dv, dbias_table): dS = P * (dP - rowsum(dO * O)), dP = dO v^T (see triton_backward.py).
    bias_grad=False (a frozen table) skips the scatter and returns zeros for dbias_table."""
    _, heads, num_tokens, _ = q.shape
    dtype = q.dtype
    logits = rpb_attention_logits(q, k, bias_table, index, grid_size, num_prefix_tokens, scale)
    compute_dtype = logits.dtype
    probs = torch.exp(logits - lse.to(compute_dtype)[..., None])
    grad_out = grad_out.to(compute_dtype)
    q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    grad_probs = torch.matmul(grad_out, v.transpose(-1, -2))
    # rowsum(dO * O) = rowsum(P * dP): from the float32 P and dP, not from the stored O, which is in
    # the activation dtype (a half-precision O makes delta, and with it dq / dk, 3-5x less accurate
    # than plain half-precision PyTorch when the softmax is peaked: tests/test_properties.py).
    delta = (probs * grad_probs).sum(-1, keepdim=True)
    logit_grads = probs * (grad_probs - delta)
    dq = torch.matmul(logit_grads, k) * scale
    dk = torch.matmul(logit_grads.transpose(-1, -2), q) * scale
    dv = torch.matmul(probs.transpose(-1, -2), grad_out)
    if not bias_grad:
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), torch.zeros_like(bias_table)

    if index is None:
        # Every image shares one (n, n) row map: reduce over the batch before scattering, so the
        # scatter moves n*n rows instead of B*n*n.
        positions = torch.arange(num_tokens, device=q.device)[None]
        logit_grads = logit_grads.sum(0, keepdim=True)
    else:
        positions = index
    rel = relative_index(positions[:, :, None], positions[:, None, :], grid_size, num_prefix_tokens).reshape(-1)
    dbias_table = torch.zeros(bias_table.shape, device=q.device, dtype=compute_dtype)
    with deterministic_algorithms(deterministic):
        dbias_table.index_put_((rel,), logit_grads.permute(0, 2, 3, 1).reshape(-1, heads), accumulate=True)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype), dbias_table.to(bias_table.dtype)
