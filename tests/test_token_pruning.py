"""In-network token selection (Tri-Level E-ViT token and attention levels): the CLS attention of every
attention implementation against the dense softmax, the selectors' kept tokens and composed
positions against a forward written out by hand from dense attention, the attention-level mask,
quantised counts, and the refusal of scorer="given" at the input.

`python tests/test_token_pruning.py` measures what the attention level costs and saves on the CPU.
"""
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from attention_cases import timm_relative_position_index
from pss_kernels.models import create_model
from pss_kernels.models.attention import PlainAttention, RelPosBlockAttention
from pss_kernels.models.token_pruning import (TRI_LEVEL_PRESETS, TokenPruning, kept_count, quantise,
                                              top_key_mask)
from pss_kernels.ops.rpb_attention.module import IMPLS, RelPosAttention
from pss_kernels.ops.rpb_attention.peers import cls_attention
from pss_kernels.ops.sample_patches.module import PatchSampler
from pss_kernels.ops.sample_patches.reference import sample_patches_reference
from pss_kernels.schedules import WarmupCosine

pytestmark = pytest.mark.usefixtures("single_thread")

# deit_tiny with embed 32, depth 4, img 32, patch 8: a 4 x 4 grid, N = 17 tokens.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5, drop_path_rate=0.0)
GRID = (4, 4)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = create_model("deit_tiny", **{**TINY, **overrides})
    for block in model.blocks:  # non-zero tables and biases: every bias entry matters below
        if isinstance(block.attn, RelPosAttention):
            torch.nn.init.normal_(block.attn.relative_position_bias_table, std=0.5)
            torch.nn.init.normal_(block.attn.q_bias, std=0.1)
            torch.nn.init.normal_(block.attn.v_bias, std=0.1)
        else:
            torch.nn.init.normal_(block.attn.qkv.weight, std=0.3)
    return model.eval()


def images(batch=3, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def dense_probs(attn, h, index, key_mask=None):
    """(q, v, probs (B, H, n, n) float64) of a block's attention written out densely: logits, the
    bias from timm's index construction, the mask, softmax."""
    batch, num_tokens, dim = h.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    if isinstance(attn, RelPosAttention):
        qkv = F.linear(h, attn.qkv.weight, torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias]))
    else:
        qkv = attn.qkv(h)
    q, k, v = qkv.reshape(batch, num_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).double()
    logits = q @ k.transpose(-1, -2) * head_dim ** -0.5
    if isinstance(attn, RelPosAttention):
        rows = timm_relative_position_index(GRID, 1)
        positions = index if index is not None else torch.arange(num_tokens).expand(batch, -1)
        bias = torch.stack([attn.relative_position_bias_table.double()[rows[p][:, p]] for p in positions])
        logits = logits + bias.permute(0, 3, 1, 2)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None], float("-inf"))
    return v, logits.softmax(-1)


def hand_mask(attention_map, keep_rate):
    """Key mask by a per-query loop: CLS row and column open, each patch query its top keys."""
    batch, num_tokens, _ = attention_map.shape
    keys = math.ceil(keep_rate * (num_tokens - 1) - 1e-9)
    mask = torch.zeros(batch, num_tokens, num_tokens, dtype=torch.bool)
    mask[:, 0, :] = mask[:, :, 0] = True
    for b in range(batch):
        for i in range(1, num_tokens):
            order = sorted(range(1, num_tokens), key=lambda j: -float(attention_map[b, i, j].detach()))
            mask[b, i, order[:keys]] = True
    return mask


def hand_forward(model, x, keep_rate, pruning):
    """The model's forward written out: dense float64 attention, the CLS row averaged over heads,
    the top tokens by a stable sort, positions composed by hand, and the key mask by a loop."""
    patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=8)
    tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    tokens = tokens + model.pos_embed
    index = None
    if keep_rate < 1.0:
        tokens, index = sample_patches_reference(tokens, keep_rate)
    reads = {s - 1 if pruning.placement == "before_block" else s for s in pruning.blocks}
    key_mask = None

    def select(tokens, index, key_mask, probs):
        num_patches = tokens.shape[1] - 1
        kept = math.ceil(quantise(pruning.token_keep_rate, pruning.quantum) * num_patches - 1e-9)
        cls_row = probs[:, :, 0, 1:].mean(1)
        order = torch.sort(cls_row.float(), dim=1, descending=True, stable=True).indices[:, :kept] + 1
        inner = torch.cat([torch.zeros(len(x), 1, dtype=torch.long), order], 1)
        tokens = torch.stack([t[i] for t, i in zip(tokens, inner)])
        full = inner if index is None else torch.stack([p[i] for p, i in zip(index, inner)])
        if pruning.attention_keep_rate < 1.0:
            attention_map = probs.mean(1)
            attention_map = torch.stack([m[i][:, i] for m, i in zip(attention_map, inner)])
            key_mask = hand_mask(attention_map, quantise(pruning.attention_keep_rate, pruning.quantum))
        return tokens, full, key_mask

    for number, block in enumerate(model.blocks, start=1):
        h = F.layer_norm(tokens, (32,), block.norm1.weight, block.norm1.bias, eps=1e-6)
        v, probs = dense_probs(block.attn, h, index, key_mask)
        out = (probs @ v).float().transpose(1, 2).reshape(len(x), -1, 32)
        tokens = tokens + block.attn.proj(out)
        if number in reads and pruning.placement == "after_attention":
            tokens, index, key_mask = select(tokens, index, key_mask, probs)
        h = F.layer_norm(tokens, (32,), block.norm2.weight, block.norm2.bias, eps=1e-6)
        tokens = tokens + block.mlp.fc2(F.gelu(block.mlp.fc1(h)))
        if number in reads and pruning.placement == "before_block":
            tokens, index, key_mask = select(tokens, index, key_mask, probs)
    pooled = F.layer_norm(tokens[:, 1:].mean(1), (32,), model.fc_norm.weight, model.fc_norm.bias, eps=1e-6)
    return model.head(pooled), index


ATTN_CASES = [(impl, True) for impl in IMPLS if impl != "flex"] + [("pss", False)]


@pytest.mark.parametrize("placement", ["before_block", "after_attention"])
@pytest.mark.parametrize("attn_impl,rpb", ATTN_CASES)
def test_one_selector_keeps_the_top_tokens_by_dense_cls_attention(attn_impl, rpb, placement):
    pruning = TokenPruning(blocks=(3,), token_keep_rate=0.5, placement=placement)
    model = tiny_model(attn_impl=attn_impl, rpb=rpb, token_pruning=pruning)
    x = images()
    tokens, index = model.forward_features(x)
    expected_logits, expected_index = hand_forward(model, x, 1.0, pruning)
    # At input keep rate 1 the first selector's inner index is the position itself.
    assert index.shape == (3, 1 + 8) and (index[:, 0] == 0).all()
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    torch.testing.assert_close(model.forward_head(tokens), expected_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention_keep_rate", [1.0, 0.5])
@pytest.mark.parametrize("placement", ["before_block", "after_attention"])
@pytest.mark.parametrize("keep_rate", [1.0, 0.8])
@pytest.mark.parametrize("attn_impl,rpb", [("pss", True), ("eager-index", True), ("pss", False)])
def test_two_selectors_with_input_sampling_compose_full_sequence_positions(attn_impl, rpb, keep_rate, placement,
                                                                          attention_keep_rate):
    pruning = TokenPruning(blocks=(2, 4), token_keep_rate=0.6, attention_keep_rate=attention_keep_rate,
                           placement=placement)
    model = tiny_model(attn_impl=attn_impl, rpb=rpb, token_pruning=pruning)
    x = images()
    tokens, index = model.forward_features(x, keep_rate=keep_rate)
    expected_logits, expected_index = hand_forward(model, x, keep_rate, pruning)
    patches = 16 if keep_rate == 1.0 else round(keep_rate * 17) - 1
    assert pruning.kept_patches(patches) == (math.ceil(0.6 * patches), math.ceil(0.6 * math.ceil(0.6 * patches)))
    assert index.shape == (3, 1 + pruning.kept_patches(patches)[-1])
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    assert all(len(set(row.tolist())) == len(row) for row in index) and (index[:, 1:] >= 1).all()
    torch.testing.assert_close(model.forward_head(tokens), expected_logits, rtol=1e-4, atol=1e-5)
    # Gradients reach every parameter through the pruned path.
    model.train()
    model(x, keep_rate=keep_rate).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("with_index", [False, True])
@pytest.mark.parametrize("impl", list(IMPLS) + ["plain"])
def test_cls_attention_of_every_implementation_is_row_zero_of_the_dense_softmax(impl, with_index):
    torch.manual_seed(0)
    if impl == "plain":
        attn = PlainAttention(32, 2)
        torch.nn.init.normal_(attn.qkv.weight, std=0.3)
    else:
        attn = RelPosBlockAttention(32, 2, GRID, impl=impl)
        torch.nn.init.normal_(attn.relative_position_bias_table, std=0.5)
        torch.nn.init.normal_(attn.q_bias, std=0.1)
    h = torch.randn(3, 17, 32)
    index = None
    if with_index:
        h, index = sample_patches_reference(h, 0.6, scorer="random", generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # values only (FlexAttention has no CPU backward)
        out, cls, attention_map = attn(h, index, stats="cls")
        _, probs = dense_probs(attn, h, index)
        plain_out = attn(h, index)
        _, cls_from_map, attention_map = attn(h, index, stats="map")
    assert cls.dtype == torch.float32 and not cls.requires_grad
    torch.testing.assert_close(cls, probs[:, :, 0].mean(1).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, plain_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls_from_map, cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_map, probs.mean(1).float(), rtol=1e-5, atol=1e-6)


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_cls_attention_builds_no_n_by_n_tensor():
    batch, heads, num_tokens, head_dim = 2, 3, 65, 8  # an 8 x 8 grid
    q, k = torch.randn(2, batch, heads, num_tokens, head_dim).unbind(0)
    table = torch.randn((2 * 8 - 1) ** 2 + 3, heads)
    index = torch.cat([torch.zeros(batch, 1, dtype=torch.long), torch.randperm(64)[None, :num_tokens - 1].add(1)
                       .expand(batch, -1)], 1)
    with _LargestOutput() as mode:
        cls_attention(q, k, table, index, grid_size=(8, 8))
    assert mode.largest <= batch * heads * num_tokens * head_dim < batch * heads * num_tokens ** 2


def test_key_mask_keeps_each_query_top_keys_of_its_row():
    attention_map = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(0))
    mask = top_key_mask(attention_map, None, 0.5)
    torch.testing.assert_close(mask, hand_mask(attention_map, 0.5), rtol=0, atol=0)
    assert (mask[:, 1:, 1:].sum(-1) == 4).all()
    inner = torch.tensor([[0, 3, 1, 7], [0, 8, 2, 5]])
    sub = torch.stack([m[i][:, i] for m, i in zip(attention_map, inner)])
    torch.testing.assert_close(top_key_mask(attention_map, inner, 0.34), hand_mask(sub, 0.35), rtol=0, atol=0)
    assert top_key_mask(attention_map, None, 1.0).all()


def test_rates_of_one_run_the_unpruned_model_exactly():
    plain = tiny_model()
    pruned = tiny_model(token_pruning=TokenPruning(blocks=(2, 4)))
    x = images()
    torch.testing.assert_close(pruned(x), plain(x), rtol=0, atol=0)
    pruned.token_keep_rate = 0.97  # quantised to 0.95: ceil(0.95 * 16) = 16, every patch kept
    torch.testing.assert_close(pruned(x), plain(x), rtol=0, atol=0)
    pruned.token_keep_rate = 0.5
    assert pruned.forward_features(x)[0].shape[1] == 1 + 4
    # Without a plan, 1.0 is a no-op and anything else is refused.
    plain.token_keep_rate = 1.0
    plain.attention_keep_rate = 1.0
    with pytest.raises(ValueError, match="token_pruning"):
        plain.token_keep_rate = 0.7
    with pytest.raises(ValueError, match="token_keep_rate"):
        pruned.token_keep_rate = 0.0


def test_kept_counts_are_quantised_and_follow_the_released_code():
    pruning = TokenPruning(token_keep_rate=0.7)
    assert pruning.kept_patches(196) == (138, 97, 68)  # ceil(0.7 P) at each selector
    pruning.token_keep_rate = 0.72  # rounds to 0.7 on the 0.05 grid
    assert pruning.kept_patches(196) == (138, 97, 68)
    assert kept_count(140, 0.7) == 98 and kept_count(10, 0.01) == 1
    assert TokenPruning(token_keep_rate=0.72, quantum=None).kept_patches(196)[0] == 142
    # A continuous warm-up passes through at most 7 distinct counts between 1.0 and 0.7.
    schedule = WarmupCosine(0.7, total_steps=3000, steps_per_epoch=10)
    counts = set()
    for step in range(0, 3000, 7):
        pruning.token_keep_rate = schedule.keep_rate_at(step)
        counts.add(pruning.kept_patches(196))
    assert 4 <= len(counts) <= 7


def test_rates_below_one_quantum_keep_one_quantum():
    """q(R) is at least one quantum: R_T = 0.01 on the 0.05 grid is 0.05, so 100 patches keep 5, not
    kept_count's floor of one token; without a grid the rate is used as it is."""
    assert quantise(0.01, 0.05) == 0.05 and quantise(0.024, 0.05) == 0.05
    assert kept_count(100, 0.01) == 5
    assert TokenPruning(token_keep_rate=0.01).kept_patches(100) == (5, 1, 1)  # ceil(0.05 * 5) = 1
    assert quantise(0.01, None) == 0.01 and kept_count(100, 0.01, quantum=None) == 1


def test_quantised_rates_are_the_grid_values_exactly():
    """round(R / quantum) * quantum is 0.30000000000000004 for 0.3 (and 0.7000000000000001 for 0.7):
    q(R) comes back as the clean grid value, on it and from either side of it."""
    for text in ("0.15", "0.3", "0.35", "0.6", "0.7", "0.85", "0.95"):
        rate = float(text)
        assert quantise(rate, 0.05) == rate and repr(quantise(rate, 0.05)) == text
        assert quantise(rate + 0.02, 0.05) == rate and quantise(rate - 0.02, 0.05) == rate
    assert quantise(0.98, 0.05) == 1.0 and quantise(0.97, 0.05) == 0.95


def test_kept_counts_at_products_just_above_an_integer():
    """0.07 * 100 = 7.000000000000001 in floating point: the count is 7, not ceil's 8 (the 1e-9 guard);
    the count never exceeds the items, even where a coarse quantum rounds R = 1 up to 1.2."""
    assert kept_count(100, 0.07, quantum=None) == 7 and kept_count(100, 0.56, quantum=None) == 56
    assert kept_count(100, 0.57, quantum=None) == 57  # 56.99999999999999: ceil as it is
    assert kept_count(140, 0.7) == 98 and kept_count(196, 0.7) == 138
    assert quantise(1.0, 0.6) == 1.2 and kept_count(10, 1.0, quantum=0.6) == 10


def test_pruning_is_active_only_below_one_after_quantisation():
    assert not TokenPruning(token_keep_rate=0.98).active  # 0.98 rounds to 1.0 on the 0.05 grid
    assert TokenPruning(token_keep_rate=0.97).active  # 0.95
    assert TokenPruning(token_keep_rate=0.98, quantum=None).active
    pruning = TokenPruning(attention_keep_rate=0.98)
    assert not pruning.active and pruning.stats == "cls"
    pruning.attention_keep_rate = 0.97
    assert pruning.active and pruning.stats == "map"


def test_selector_blocks_may_sit_at_both_ends_of_the_model():
    """after_attention: blocks 1 .. depth; before_block: 2 .. depth (block 1 has no attention before it)."""
    x = images(batch=2)
    for blocks, placement in (((1, 4), "after_attention"), ((2, 4), "before_block")):
        model = tiny_model(token_pruning=TokenPruning(blocks=blocks, token_keep_rate=0.5, placement=placement))
        tokens, index = model.forward_features(x)
        assert tokens.shape == (2, 1 + 4, 32) and index.shape == (2, 5), (blocks, placement)  # 16 -> 8 -> 4
    for blocks, placement in (((5,), "after_attention"), ((1,), "before_block"), ((2, 5), "before_block")):
        with pytest.raises(ValueError, match=r"blocks must be in \[%d, 4\]" % (2 if placement == "before_block" else 1)):
            tiny_model(token_pruning=TokenPruning(blocks=blocks, placement=placement))


def test_presets_and_construction_checks():
    assert {p.token_keep_rate for p in TRI_LEVEL_PRESETS.values()} == {0.7, 0.8, 0.9, 1.0}
    setting = TRI_LEVEL_PRESETS["tri-level/0.7"]
    pruning = setting.token_pruning()
    assert pruning.blocks == (4, 7, 10) and pruning.placement == "after_attention" == TokenPruning().placement
    assert (pruning.token_keep_rate, pruning.attention_keep_rate) == (1.0, 1.0) and not pruning.active
    create_model("deit_small", img_size=32, num_classes=2, patch_size=8, token_pruning=pruning)
    with pytest.raises(ValueError, match="blocks must be in"):
        tiny_model(token_pruning=TokenPruning())  # 4, 7, 10 in a 4-block model
    with pytest.raises(ValueError, match="blocks must be in"):
        tiny_model(token_pruning=TokenPruning(blocks=(1,), placement="before_block"))  # nothing has attended yet
    with pytest.raises(ValueError, match="ascending"):
        TokenPruning(blocks=(3, 2))
    with pytest.raises(TypeError, match="token_pruning"):
        tiny_model(token_pruning=0.7)


def test_scorer_given_is_refused_at_construction_with_the_alternative():
    with pytest.raises(ValueError, match="token_pruning"):
        create_model("deit_tiny", **TINY, scorer="given")
    sampler = PatchSampler(0.5, scorer="given")
    with pytest.raises(ValueError, match="scores"):
        sampler(torch.randn(2, 17, 8))


@pytest.mark.triton
def test_triton_kernels_give_the_same_selection_and_gradients(device, monkeypatch):
    """The pruned model on the Triton kernels (the interpreter on CPU): CLS attention from the
    kernel's own CLS-row program, the selection through the Triton sampler, and, with growth's
    active heads, a column slice of the table; same index, logits and gradients as torch."""
    from pss_kernels.models.growth import GrowthStage, set_stage
    from pss_kernels.ops.rpb_attention import triton_forward

    cls_launches = []

    def counted(*args, _real=triton_forward.rpb_attention_forward):
        cls_launches.append(args[-1] is not None)  # the cls_attention buffer
        return _real(*args)

    monkeypatch.setattr(triton_forward, "rpb_attention_forward", counted)
    results = []
    for backend in ("torch", "triton"):
        pruning = TokenPruning(blocks=(2, 3), token_keep_rate=0.6, placement="before_block")
        model = tiny_model(attn_backend=backend, sampler_backend=backend, token_pruning=pruning).to(device).train()
        set_stage(model, GrowthStage(1, 2.0))
        x = images(batch=2).to(device)
        tokens, index = model.forward_features(x, keep_rate=0.8)
        model.forward_head(tokens).square().mean().backward()
        results.append((index, tokens.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_index, ref_tokens, ref_grads), (index, tokens, grads) = results
    assert cls_launches == [True, True, False, False]  # blocks 1 and 2 feed the selectors before 2 and 3
    torch.testing.assert_close(index, ref_index, rtol=0, atol=0)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-4, atol=1e-5)
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _median_seconds(run, repeats):
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_attention_level(batch=32, heads=6, head_dim=64, num_tokens=138, attention_keep_rate=0.3, repeats=5):
    """Forward + backward of one DeiT-S attention layer after the first selector at R_T = 0.7 (138
    tokens): the package's op (torch backend on the CPU), the same dense eager path without a mask
    (eager-index), and the attention level's masked path; plus the selector's extra work (the
    head-averaged map and the per-row top-k). FLOPs from FlopCounterMode (the fused op is opaque to
    it: its matmuls are eager-index's)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pss_kernels import rpb_attention
    from pss_kernels.models.attention import masked_attention
    from pss_kernels.ops.rpb_attention.peers import dense_bias, eager_index_rpb_attention

    grid = (14, 14)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, num_tokens, head_dim, generator=generator).requires_grad_()
               for _ in range(3))
    table = torch.randn((2 * 14 - 1) ** 2 + 3, heads, generator=generator).requires_grad_()
    index = torch.cat([torch.zeros(batch, 1, dtype=torch.long),
                       torch.stack([torch.randperm(196, generator=generator)[:num_tokens - 1] + 1
                                    for _ in range(batch)])], 1)
    with torch.no_grad():
        _, probs = masked_attention(q, k, v, dense_bias(table, index, grid), None)
    attention_map = probs.mean(1)
    key_mask = top_key_mask(attention_map, None, attention_keep_rate)

    def fused():
        rpb_attention(q, k, v, table, index, grid_size=grid, check_index=False).sum().backward()

    def dense():
        eager_index_rpb_attention(q, k, v, table, index, grid_size=grid).sum().backward()

    def masked():
        out, _ = masked_attention(q, k, v, dense_bias(table, index, grid), key_mask)
        out.sum().backward()

    results = {}
    for name, run in (("rpb_attention (torch backend)", fused), ("dense eager, no mask", dense),
                      (f"masked, R_A={attention_keep_rate}", masked)):
        with FlopCounterMode(display=False) as counter:
            (dense if run is fused else run)()
        results[name] = (_median_seconds(run, repeats), counter.get_total_flops())
    results["selector: map + top-k mask"] = (_median_seconds(
        lambda: top_key_mask(probs.mean(1), None, attention_keep_rate), repeats), 0)
    return results


def measure_model(batch=8, repeats=3):
    """Forward + backward of DeiT-S at 224 px: dense, Tri-Level token level R_T = 0.7, and R_T = 0.7 with
    R_A = 0.3 (the masked torch path in every block from the first selector on)."""
    from pss_kernels.models.growth import count_flops

    torch.manual_seed(0)
    images = torch.randn(batch, 3, 224, 224)
    results = {}
    for name, rates in (("dense", None), ("R_T=0.7", (0.7, 1.0)), ("R_T=0.7, R_A=0.3", (0.7, 0.3))):
        pruning = None if rates is None else TokenPruning(token_keep_rate=rates[0], attention_keep_rate=rates[1],
                                                          placement="after_attention")
        model = create_model("deit_small", token_pruning=pruning).train()
        results[name] = (_median_seconds(lambda: model(images).sum().backward(), repeats),
                         count_flops(model, batch_size=batch, backward=True))
    return results


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward, median")
    print("one attention layer: B=32, H=6, D=64, n=138")
    for rate in (0.4, 0.3, 0.2):
        for name, (seconds, flops) in measure_attention_level(attention_keep_rate=rate).items():
            print(f"  {name:32s} {seconds * 1e3:8.1f} ms  {flops / 1e9:7.2f} GFLOP")
    print("DeiT-S 224 px, batch 8 (training step without the optimizer)")
    for name, (seconds, flops) in measure_model().items():
        print(f"  {name:32s} {seconds * 1e3:8.1f} ms  {flops / 1e9:7.1f} GFLOP")
