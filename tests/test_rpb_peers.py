"""The rpb_attention peers of peers.py: `published` (the PSS authors' bias construction) against
`eager-index` (the same numbers, the bias looked up once) and both against the reference; the
peer names everywhere they are selectable; FlexAttention's availability probe."""
import pytest
import torch

from attention_cases import TOLERANCES, grads_of, make_inputs
from pss_kernels import RelPosAttention
from pss_kernels.models import create_model
from pss_kernels.models.vit import ATTN_IMPLS
from pss_kernels.ops.rpb_attention import module as rpb_module
from pss_kernels.ops.rpb_attention import peers
from pss_kernels.ops.rpb_attention.reference import relative_index, rpb_attention_reference
from pss_kernels.train.cli import parse_config

CPU = torch.device("cpu")
CASES = [((4, 5), 1, 0.6), ((4, 5), 1, None), ((3, 3), 0, 0.5), ((3, 3), 0, None)]  # grid, prefix tokens, rho
FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def run_peer(fn, q, k, v, table, index, grid_size, num_prefix_tokens, grad_out):
    out = fn(q, k, v, table, index, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens)
    return (out, *grads_of(out, grad_out, (q, k, v, table)))


def table_gradient_terms(q, k, v, table, index, grid_size, num_prefix_tokens, grad_out):
    """(rows (B, H, n, n), dS (B, H, n, n)): the gradient of each dense bias entry and the table row it
    is summed into. Both peers sum exactly these float32 terms per (row, head), in different orders."""
    bias = peers.dense_bias(table.detach(), index, grid_size, num_prefix_tokens)
    bias = bias.expand(q.shape[0], -1, -1, -1).clone().requires_grad_()
    scale = q.shape[-1] ** -0.5
    logits = torch.matmul(q.detach() * scale, k.detach().transpose(-1, -2)) + bias
    out = torch.matmul(logits.softmax(-1), v.detach())
    (terms,) = torch.autograd.grad(out, bias, grad_out)
    num_positions = num_prefix_tokens + grid_size[0] * grid_size[1]
    positions = index if index is not None else torch.arange(num_positions)[None].expand(q.shape[0], -1)
    rows = relative_index(positions[:, :, None], positions[:, None, :], grid_size, num_prefix_tokens)
    return rows[:, None].expand_as(terms), terms


@pytest.mark.parametrize("grid_size, num_prefix_tokens, keep_rate", CASES)
def test_published_is_bit_identical_to_eager_index_but_for_the_table_gradients_summation_order(
        grid_size, num_prefix_tokens, keep_rate):
    """Output, dq, dk, dv: bit for bit. The table gradient: bit for bit at index=None; with an index the
    published path sums each table row's terms over the images first and the position pairs second,
    eager-index in (image, query, key) order, so float32 rounding may differ by at most what
    reordering a sum of m terms can change: 2 m u sum|term| (u = 2^-24), far below any wrong term."""
    q, k, v, table, index = make_inputs(grid_size, num_prefix_tokens, 16, keep_rate=keep_rate, batch=3, heads=2,
                                        device=CPU)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    published = run_peer(peers.published_rpb_attention, q, k, v, table, index, grid_size, num_prefix_tokens,
                         grad_out)
    eager_index = run_peer(peers.eager_index_rpb_attention, q, k, v, table, index, grid_size, num_prefix_tokens,
                           grad_out)
    for name, got, want in zip(("out", "dq", "dk", "dv"), published[:4], eager_index[:4]):
        assert torch.equal(got, want), name
    got, want = published[4], eager_index[4]
    if index is None:
        assert torch.equal(got, want)
        return
    rows, terms = table_gradient_terms(q, k, v, table, index, grid_size, num_prefix_tokens, grad_out)
    heads = torch.arange(table.shape[1])[None, :, None, None].expand_as(rows)
    flat = (rows * table.shape[1] + heads).reshape(-1)
    abs_sum = torch.zeros(table.numel(), dtype=torch.float64).index_add_(0, flat, terms.abs().reshape(-1).double())
    count = torch.zeros(table.numel(), dtype=torch.float64).index_add_(0, flat, torch.ones(flat.numel(),
                                                                                          dtype=torch.float64))
    bound = (2 * count * FLOAT32_UNIT_ROUNDOFF * abs_sum).view_as(table)
    assert ((got - want).abs().double() <= bound).all(), (got - want).abs().max()
    # The same terms: their exact sum is what both approximate.
    exact = torch.zeros(table.numel(), dtype=torch.float64).index_add_(0, flat, terms.reshape(-1).double())
    assert ((want.double() - exact.view_as(table)).abs() <= bound).all()


@pytest.mark.parametrize("peer", ["published", "eager-index"])
@pytest.mark.parametrize("grid_size, num_prefix_tokens, keep_rate", CASES)
def test_eager_peers_match_the_reference(peer, grid_size, num_prefix_tokens, keep_rate):
    q, k, v, table, index = make_inputs(grid_size, num_prefix_tokens, 16, keep_rate=keep_rate, device=CPU)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    got = run_peer(rpb_module.IMPLS[peer], q, k, v, table, index, grid_size, num_prefix_tokens, grad_out)
    want = run_peer(rpb_attention_reference, q, k, v, table, index, grid_size, num_prefix_tokens, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dtable"), got, want):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32], msg=lambda m: f"{name}: {m}")


def test_published_bias_copies_per_image_and_indexes_rows_then_columns():
    """The published construction's values, entry by entry from the full (N, N, H) bias."""
    _, _, _, table, index = make_inputs((4, 5), 1, 16, keep_rate=0.5, batch=2, heads=3, device=CPU)
    full = peers.published_dense_bias(table, None, (4, 5))  # (1, H, N, N)
    bias = peers.published_dense_bias(table, index, (4, 5))
    assert full.shape == (1, 3, 21, 21) and bias.shape == (2, 3, index.shape[1], index.shape[1])
    for b in range(2):
        for i, p in enumerate(index[b].tolist()):
            for j, p_key in enumerate(index[b].tolist()):
                assert torch.equal(bias[b, :, i, j], full[0, :, p, p_key])
    assert torch.equal(bias, peers.dense_bias(table, index, (4, 5)))


def test_peer_names_are_selectable_everywhere():
    assert ATTN_IMPLS == ("pss", "published", "eager-index", "sdpa-bias", "flex")
    assert "eager" not in rpb_module.IMPLS  # renamed: both eager peers now say how they build the bias
    assert parse_config(["--attn-impl", "published"]).attn_impl == "published"
    assert parse_config(["--attn-impl", "eager-index"]).attn_impl == "eager-index"
    torch.manual_seed(0)
    module = RelPosAttention(32, 4, (3, 3), impl="published")
    with torch.no_grad():
        module.relative_position_bias_table.normal_()
    x = torch.randn(2, 10, 32)
    published = module(x)
    module.impl = "eager-index"
    assert torch.equal(published, module(x))
    images = torch.randn(2, 3, 32, 32)
    outputs = {}
    for impl in ("published", "eager-index"):
        torch.manual_seed(0)
        model = create_model("deit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                             num_classes=3, attn_impl=impl, sampler_impl="eager").eval()
        outputs[impl] = model(images, keep_rate=0.5)
    assert torch.equal(outputs["published"], outputs["eager-index"])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_availability_probe_agrees_with_a_training_call():
    reason = peers.flex_training_unavailable(CPU)
    q, k, v, table, _ = make_inputs((2, 2), 1, 16, device=CPU)
    try:
        peers.flex_rpb_attention(q, k, v, table, grid_size=(2, 2)).sum().backward()
    except RuntimeError as err:
        assert reason is not None and reason == str(err)
        assert "flex_attention is unavailable" in reason
    else:
        assert reason is None
