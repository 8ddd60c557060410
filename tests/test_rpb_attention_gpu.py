"""rpb_attention on a GPU (marker `cuda`, skipped without CUDA): the Triton kernels at ViT shapes
against a float64 reference by the flash-attention error rule (kernel error <= 2x the error of
eager PyTorch in the same dtype), the CLS-attention output, determinism and both accumulators."""
import pytest
import torch

from pss_kernels import rpb_attention
from pss_kernels.ops.rpb_attention.reference import rpb_attention_reference
from attention_cases import DEVICE, TOLERANCES, grads_of, make_inputs, reference_cls_attention

def _low_precision_torch_attention(q, k, v, table, index, grid_size, num_prefix_tokens):
    """Eager attention entirely in the inputs' dtype: the 'same-dtype PyTorch' of the flash rule."""
    from pss_kernels.ops.rpb_attention.reference import gather_bias
    bias = gather_bias(table.to(q.dtype), index, grid_size, num_prefix_tokens)
    logits = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias
    return torch.matmul(logits.softmax(-1), v)


def _flash_rule_case(batch, heads, head_dim, grid_size, keep_rate, dtype, seed=0):
    q, k, v, table, index = make_inputs(grid_size, 1, head_dim, keep_rate=keep_rate, batch=batch, heads=heads,
                                        dtype=dtype, seed=seed)
    leaves = (q, k, v, table)
    grad_out = torch.randn(q.shape, device=DEVICE, dtype=dtype)
    options = dict(grid_size=grid_size, num_prefix_tokens=1)
    exact_leaves = tuple(t.detach().double().requires_grad_() for t in leaves)
    exact = rpb_attention_reference(*exact_leaves, index, **options)
    exact_grads = grads_of(exact, grad_out.double(), exact_leaves)
    baseline = _low_precision_torch_attention(q, k, v, table, index, grid_size, 1)
    baseline_grads = grads_of(baseline, grad_out, leaves)
    out = rpb_attention(q, k, v, table, index, backend="triton", **options)
    kernel_grads = grads_of(out, grad_out, leaves)
    for name, got, base, want in zip(("out", "dq", "dk", "dv", "dbias_table"), (out, *kernel_grads),
                                     (baseline, *baseline_grads), (exact, *exact_grads)):
        kernel_error = (got.double() - want).abs().max().item()
        torch_error = (base.double() - want).abs().max().item()
        assert kernel_error <= 2 * torch_error + 1e-5, (name, kernel_error, torch_error)


@pytest.mark.cuda
@pytest.mark.parametrize("heads, head_dim", [(12, 64), (6, 64)], ids=["vit_base", "deit_small"])
@pytest.mark.parametrize("keep_rate", [None, 0.6, 0.2], ids=["n197", "n118", "n39"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_flash_rule_vit_shapes(heads, head_dim, keep_rate, dtype):
    _flash_rule_case(8, heads, head_dim, (14, 14), keep_rate, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [32, 48, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_flash_rule_head_dims(head_dim, dtype):
    _flash_rule_case(4, 4, head_dim, (14, 14), 0.5, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("grid_size, keep_rate", [((24, 24), 0.3), ((6, 7), None), ((64, 64), None)],
                         ids=["n173", "n43", "n4097"])
def test_gpu_odd_lengths(grid_size, keep_rate):
    _flash_rule_case(2 if grid_size[0] < 64 else 1, 2, 64, grid_size, keep_rate, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("keep_rate", [None, 0.6, 0.2], ids=["n197", "n118", "n39"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_cls_attention_matches_reference(keep_rate, dtype):
    """The optional CLS-attention output (the RETURN_CLS kernel variant) at DeiT-S shapes, against
    the float64 softmax of the same inputs; `out` of that variant against the float64 reference."""
    q, k, v, table, index = make_inputs((14, 14), 1, 64, keep_rate=keep_rate, batch=8, heads=6, dtype=dtype)
    out, cls_attention = rpb_attention(q, k, v, table, index, grid_size=(14, 14), backend="triton",
                                       return_cls_attention=True)
    assert cls_attention.shape == (8, q.shape[2]) and cls_attention.dtype == torch.float32
    want = reference_cls_attention(q, k, table, index, (14, 14), 1).float()
    torch.testing.assert_close(cls_attention, want, rtol=1e-2, atol=1e-4)  # entries ~ 1/n
    torch.testing.assert_close(cls_attention.sum(-1), torch.ones(8, device=DEVICE), rtol=0, atol=1e-3)
    expected = rpb_attention_reference(*(t.double() for t in (q, k, v, table)), index, grid_size=(14, 14))
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[dtype])


@pytest.mark.cuda
def test_gpu_deterministic_bias_grad_is_bit_identical():
    q, k, v, table, index = make_inputs((14, 14), 1, 64, keep_rate=0.6, batch=16, heads=6, dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        out = rpb_attention(q, k, v, table, index, grid_size=(14, 14), backend="triton", deterministic=True)
        grads.append(torch.autograd.grad(out, table, torch.ones_like(out))[0])
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    out = rpb_attention(q, k, v, table, index, grid_size=(14, 14), backend="triton")
    torch.testing.assert_close(torch.autograd.grad(out, table, torch.ones_like(out))[0], grads[0],
                               rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("accumulator", ["slices", "position-grid"])
def test_gpu_bias_grad_accumulators_at_index_none(accumulator, monkeypatch):
    """Both index=None accumulators on the GPU at ViT-B/DeiT-S sizes, with more images (20) than
    position-grid copies (8), so images share copies: dbias_table and dq, dk, dv by the flash rule."""
    from pss_kernels.ops.rpb_attention import triton_backward
    monkeypatch.setenv(triton_backward.DBIAS_ENV_VAR, accumulator)
    assert (triton_backward.position_grid_copies(20, 6, 197) > 0) == (accumulator == "position-grid")
    _flash_rule_case(20, 6, 64, (14, 14), None, torch.bfloat16)


@pytest.mark.cuda
def test_gpu_index_none_equals_arange_index():
    q, k, v, table, _ = make_inputs((14, 14), 1, 64, batch=4, heads=6, dtype=torch.bfloat16)
    arange = torch.arange(197, device=DEVICE).expand(4, -1)
    options = dict(grid_size=(14, 14), backend="triton")
    torch.testing.assert_close(rpb_attention(q, k, v, table, None, **options),
                               rpb_attention(q, k, v, table, arange, **options), rtol=0, atol=0)
