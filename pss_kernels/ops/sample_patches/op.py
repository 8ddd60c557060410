"""Public `sample_patches`: argument checks, the keep_rate == 1 shortcut, backend
dispatch, and the torch.library custom ops that make it one opaque node under torch.compile.

    sample_patches(x, keep_rate, ...)                       checks; keep_rate == 1 -> (x, arange)
      -> pss_kernels::sample_patches(x, scores, num_kept, scorer, num_prefix_tokens, order, backend)
           -> (x_kept (B, k, C), index (B, k) int64, slot (B, N) int32)
    backward: pss_kernels::sample_patches_backward(grad_kept, index, slot, num_tokens, backend) -> grad_x

`slot[b, t]` is the row of x_kept that token t went to, or -1: the backward kernels write
grad_x[b, t] = grad_kept[b, slot[b, t]] or zeros in one pass. The keep_rate == 1 shortcut stays
outside the custom op, which may not return an alias of its input. The "random" scorer draws its
scores here, with the caller's generator, and hands them to the op as given scores: every
backend then shares one RNG contract (the reference's) and the op stays a pure function.
"""
from typing import Optional

import torch

from ..._backends import resolve_backend
from ..._checks import check_choice, check_int, check_keep_rate, check_same_device, check_tensor
from .reference import ORDERS, SCORERS, num_kept_tokens, patch_scores, select_indices

# Kernels that never ran on a GPU stay out of backend=None's choice (see README).
GPU_DEFAULT_BACKEND = "torch"

SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _kernel_module(backend: str):
    # Imported on first use: triton.jit reads TRITON_INTERPRET when the module is imported.
    if backend == "triton":
        from . import triton_sample
        return triton_sample
    from . import cuda
    return cuda


def _torch_forward(x, scores, num_kept, scorer, num_prefix_tokens, order):
    batch, num_tokens, channels = x.shape
    index = select_indices(patch_scores(x, scorer, num_prefix_tokens, scores), num_kept, num_prefix_tokens, order)
    x_kept = x.gather(1, index[..., None].expand(-1, -1, channels))
    slot = torch.full((batch, num_tokens), -1, dtype=torch.int32, device=x.device)
    slot.scatter_(1, index, torch.arange(num_kept, dtype=torch.int32, device=x.device).expand(batch, num_kept))
    return x_kept, index, slot


@torch.library.custom_op(
    "pss_kernels::sample_patches", mutates_args=(),
    schema="(Tensor x, Tensor? scores, int num_kept, str scorer, int num_prefix_tokens, str order, str backend)"
           " -> (Tensor, Tensor, Tensor)")
def _sample_patches_op(x, scores, num_kept, scorer, num_prefix_tokens, order, backend):
    """scorer is "l1", "l2" or "given"; backend is resolved. Returns (x_kept, index, slot)."""
    if backend == "torch":
        return _torch_forward(x, scores, num_kept, scorer, num_prefix_tokens, order)
    # Triton launches on the current device, not x's: guard it (a no-op for CPU tensors).
    with torch.cuda.device_of(x):
        return _kernel_module(backend).sample_patches_forward(x, scores, num_kept, scorer, num_prefix_tokens, order)


@_sample_patches_op.register_fake
def _(x, scores, num_kept, scorer, num_prefix_tokens, order, backend):
    batch, num_tokens, channels = x.shape
    return (x.new_empty(batch, num_kept, channels),
            x.new_empty(batch, num_kept, dtype=torch.int64),
            x.new_empty(batch, num_tokens, dtype=torch.int32))


@torch.library.custom_op(
    "pss_kernels::sample_patches_backward", mutates_args=(),
    schema="(Tensor grad_kept, Tensor index, Tensor slot, int num_tokens, str backend) -> Tensor")
def _sample_patches_backward_op(grad_kept, index, slot, num_tokens, backend):
    """grad_x (B, N, C): grad_kept[b, j] at token index[b, j], exact zeros at dropped tokens."""
    if backend == "torch":
        batch, _, channels = grad_kept.shape
        grad_x = grad_kept.new_zeros(batch, num_tokens, channels)
        return grad_x.scatter_(1, index[..., None].expand(-1, -1, channels), grad_kept)
    with torch.cuda.device_of(grad_kept):
        return _kernel_module(backend).sample_patches_backward(grad_kept, slot, num_tokens)


@_sample_patches_backward_op.register_fake
def _(grad_kept, index, slot, num_tokens, backend):
    return grad_kept.new_empty(grad_kept.shape[0], num_tokens, grad_kept.shape[2])


def _setup_context(ctx, inputs, output):
    x, _, _, _, _, _, backend = inputs
    _, index, slot = output
    ctx.save_for_backward(index, slot)
    ctx.num_tokens = x.shape[1]
    ctx.backend = backend


def _backward(ctx, grad_kept, grad_index, grad_slot):
    index, slot = ctx.saved_tensors
    grad_x = _sample_patches_backward_op(grad_kept, index, slot, ctx.num_tokens, ctx.backend)
    return grad_x, None, None, None, None, None, None


_sample_patches_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    _, index, _, _, _ = inputs
    ctx.save_for_backward(index)


def _double_backward(ctx, grad_grad_x):
    # The backward is a scatter of grad_kept's rows; its adjoint gathers them back.
    (index,) = ctx.saved_tensors
    grad_grad_kept = grad_grad_x.gather(1, index[..., None].expand(-1, -1, grad_grad_x.shape[2]))
    return grad_grad_kept, None, None, None, None


_sample_patches_backward_op.register_autograd(_double_backward, setup_context=_setup_backward_context)


def sample_patches(x: torch.Tensor, keep_rate: float, *, scorer: str = "l1", num_prefix_tokens: int = 1,
                   order: str = "score", scores: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None, backend: Optional[str] = None):
    """Keep the top-scoring patch tokens of each image (PSS Algorithm 2).

    x (B, N, C) float32/float16/bfloat16, prefix tokens first. Returns x_kept (B, k, C) and
    index (B, k) int64 with k = max(num_prefix_tokens + 1, round(keep_rate * N)):
    index[:, :num_prefix_tokens] = arange, then the top k - num_prefix_tokens patches by score
    (descending, ties to the lower position; or ascending position with order="spatial").
    x_kept = x.gather(1, index); the gradient reaches kept tokens, dropped ones get exact zeros.
    keep_rate == 1 returns x itself and arange(N) indices. keep_rate is a fraction of all N tokens,
    prefix tokens included (N = 197: 0.5 keeps 98, 0.2 keeps 39).

    Scores are taken over the non-prefix tokens, accumulated in float32: scorer="l1" sum |x| over C
    (the paper's magnitude sorting), "l2" sum x^2, "random" uniform draws from `generator`
    (PatchDropout), "given" the caller's `scores` of shape (B, N - num_prefix_tokens) (any
    importance signal, e.g. rpb_attention's return_cls_attention).
    backend: "torch" | "triton" | "cuda" | None (None: PSS_KERNELS_BACKEND if set, else per device,
    see `GPU_DEFAULT_BACKEND`). Bad arguments raise ValueError/TypeError naming the argument and value.
    """
    check_tensor("x", x, ndim=3)
    keep_rate = check_keep_rate(keep_rate)
    batch, num_tokens, channels = x.shape
    check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
    if channels == 0:
        raise ValueError(f"x must have C > 0 channels, got shape {tuple(x.shape)}")
    if num_tokens <= num_prefix_tokens:
        raise ValueError(f"x must have more tokens than num_prefix_tokens={num_prefix_tokens}, "
                         f"got N={num_tokens}")
    check_choice("scorer", scorer, SCORERS)
    check_choice("order", order, ORDERS)
    if scorer == "given":
        check_tensor("scores", scores, ndim=2, dtypes=SCORE_DTYPES)
        check_same_device(x=x, scores=scores)
        expected = (batch, num_tokens - num_prefix_tokens)
        if tuple(scores.shape) != expected:
            raise ValueError(f"scores must have shape {expected} (B, N - num_prefix_tokens), "
                             f"got {tuple(scores.shape)}")
    elif scores is not None:
        raise ValueError(f"scores is only used with scorer='given', got scorer={scorer!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if scorer != "random":
            raise ValueError(f"generator is only used with scorer='random', got scorer={scorer!r}")
        if generator.device.type != x.device.type:
            raise ValueError(f"generator must be on x's device type ({x.device.type}), got a "
                             f"{generator.device.type} generator")
    if keep_rate == 1.0:
        return x, torch.arange(num_tokens, device=x.device).expand(batch, num_tokens)
    chosen = resolve_backend("sample_patches", backend, x.device, GPU_DEFAULT_BACKEND)
    num_kept = num_kept_tokens(num_tokens, keep_rate, num_prefix_tokens)
    if scorer == "random":
        # The reference's draw (patch_scores): one uniform float32 per patch token. generator=None
        # is left out: under torch.compile its overload rejects symbolic shapes.
        rng = {} if generator is None else {"generator": generator}
        scores = torch.rand((batch, num_tokens - num_prefix_tokens), device=x.device, dtype=torch.float32, **rng)
        scorer = "given"
    elif scorer == "given":
        scores = scores.float()
    x_kept, index, _ = _sample_patches_op(x, scores, num_kept, scorer, num_prefix_tokens, order, chosen)
    return x_kept, index
