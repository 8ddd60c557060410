"""Oracles, inputs and tolerances shared by the rpb_attention tests (tests/ is on sys.path under pytest)."""
import torch

from pss_kernels import sample_patches
from pss_kernels.ops.rpb_attention.reference import bias_table_rows

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
              torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def timm_relative_position_index(grid_size, num_prefix_tokens):
    """(N, N) table rows built as timm's Beit `gen_relative_position_index` builds them (meshgrid,
    offsets, CLS rows R-3 / R-2 / R-1): independent of the arithmetic in reference.py and the kernels."""
    grid_h, grid_w = grid_size
    coords = torch.stack(torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += grid_h - 1
    relative[:, :, 1] += grid_w - 1
    relative[:, :, 0] *= 2 * grid_w - 1
    patch_rows = relative.sum(-1)
    if num_prefix_tokens == 0:
        return patch_rows
    num_rows = (2 * grid_h - 1) * (2 * grid_w - 1) + 3
    rows = torch.zeros(grid_h * grid_w + 1, grid_h * grid_w + 1, dtype=torch.long)
    rows[1:, 1:] = patch_rows
    rows[0, 0:] = num_rows - 3
    rows[0:, 0] = num_rows - 2
    rows[0, 0] = num_rows - 1
    return rows


def loop_attention_float64(q, k, v, bias_table, index, grid_size, num_prefix_tokens, scale):
    """out[b, h, i] = sum_j softmax_j(q_i . k_j * scale + table[rows[pos_i, pos_j], h]) v_j, row by row."""
    rows = timm_relative_position_index(grid_size, num_prefix_tokens)
    q, k, v, bias_table = (t.detach().cpu().double() for t in (q, k, v, bias_table))
    batch, heads, num_tokens, _ = q.shape
    out = torch.empty_like(q)
    for b in range(batch):
        pos = index[b].cpu() if index is not None else torch.arange(num_tokens)
        for h in range(heads):
            for i in range(num_tokens):
                logits = torch.stack([q[b, h, i] @ k[b, h, j] * scale + bias_table[rows[pos[i], pos[j]], h]
                                      for j in range(num_tokens)])
                weights = torch.exp(logits - logits.max())
                out[b, h, i] = (weights / weights.sum()) @ v[b, h]
    return out


def make_inputs(grid_size, num_prefix_tokens, head_dim, *, device, keep_rate=None, batch=2, heads=2,
                dtype=torch.float32, seed=0, qkv_view=True):
    """q, k, v (views into one (B, n, 3, H, D) qkv tensor, as a model makes them: non-contiguous),
    a random bias table, and index from sample_patches (None when keep_rate is None)."""
    generator = torch.Generator().manual_seed(seed)
    num_positions = num_prefix_tokens + grid_size[0] * grid_size[1]
    index = None
    if keep_rate is not None:
        tokens = torch.randn(batch, num_positions, 4, generator=generator)
        _, index = sample_patches(tokens, keep_rate, num_prefix_tokens=num_prefix_tokens)
        index = index.to(device)
    num_tokens = index.shape[1] if index is not None else num_positions
    qkv = torch.randn(batch, num_tokens, 3, heads, head_dim, generator=generator).to(device=device, dtype=dtype)
    if qkv_view:
        q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4))
    else:
        q, k, v = (t.contiguous().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4))
    table = torch.randn(bias_table_rows(grid_size, num_prefix_tokens), heads, generator=generator)
    return q, k, v, table.to(device).requires_grad_(), index


def grads_of(out, grad_out, leaves):
    return torch.autograd.grad(out, leaves, grad_out)


def reference_cls_attention(q, k, bias_table, index, grid_size, num_prefix_tokens):
    """Head-averaged softmax row 0 of the float64 reference logits."""
    from pss_kernels.ops.rpb_attention.reference import rpb_attention_logits
    logits = rpb_attention_logits(q.double(), k.double(), bias_table.double(), index, grid_size,
                                  num_prefix_tokens, q.shape[-1] ** -0.5)
    return logits.softmax(-1)[:, :, 0, :].mean(1)
