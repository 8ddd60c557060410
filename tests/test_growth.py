"""Budgeted Training's growth: active widths that really shrink the compute, the weight copy into the
newly active parts (and the x0.5 variant's function preservation), the list of new parameter slices,
the optimizer-moment reset, centre-cropped tokens and the FLOP count per stage."""
import pytest
import torch
import torch.nn.functional as F

from pss_kernels.models import create_model
from pss_kernels.models.flops import count_flops
from pss_kernels.models.growth import (BUDGETED_STAGES, GrowthStage, NewSlice, _copies, _sources, grow,
                                       new_parameter_slices, reset_optimizer_moments, set_stage, stage_flops,
                                       stage_keep_rate, stage_keep_rates, stage_of)
from pss_kernels.models.token_pruning import TokenPruning
from pss_kernels.ops.rpb_attention.reference import rpb_attention_reference

pytestmark = pytest.mark.usefixtures("single_thread")

# deit_tiny with embed 32, depth 4, img 32, patch 8 (a 4 x 4 grid), 4 heads of 8 dims, MLP 128.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=5, drop_path_rate=0.0)
STAGES = (GrowthStage(1, 1.0, 4), GrowthStage(3, 2.0, 9), GrowthStage(4, 4.0, 16))


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = create_model("deit_tiny", **{**TINY, **overrides})
    for name, param in model.named_parameters():  # every entry distinct and non-zero
        if name.endswith(("bias", "relative_position_bias_table")):
            torch.nn.init.normal_(param, std=0.1)
    return model.eval()


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_paper_stage_sources_and_compensation():
    assert _sources(2, 4) == [0, 1] and _sources(4, 6) == [0, 1]  # DeiT-S heads 2 -> 4 -> 6
    assert _sources(384, 768) == list(range(384))  # MLP C -> 2C
    assert _copies(4, 6).tolist() == [2, 2, 1, 1, 2, 2]
    assert _copies(1, 3).tolist() == [3, 3, 3]
    assert BUDGETED_STAGES["deit_small"] == (GrowthStage(2, 1.0, 100), GrowthStage(4, 2.0, 144),
                                             GrowthStage(6, 4.0, 196))
    assert [s.num_heads for s in BUDGETED_STAGES["deit_base"]] == [4, 8, 12]


@pytest.mark.parametrize("rpb", [True, False])
def test_active_heads_and_hidden_units_compute_on_weight_slices(rpb):
    model = tiny_model(rpb=rpb)
    set_stage(model, GrowthStage(2, 1.5, None))
    block = model.blocks[0]
    x = torch.randn(2, 17, 32)
    attn, mlp = block.attn, block.mlp
    # By hand: the first 2 heads' rows of q, k and v, their table columns, the proj columns of 16 dims.
    rows = torch.cat([torch.arange(16) + offset for offset in (0, 32, 64)])
    if rpb:
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])[rows]
    else:
        bias = attn.qkv.bias[rows]
    q, k, v = F.linear(x, attn.qkv.weight[rows], bias).reshape(2, 17, 3, 2, 8).permute(2, 0, 3, 1, 4)
    if rpb:
        heads_out = rpb_attention_reference(q, k, v, attn.relative_position_bias_table[:, :2], None, grid_size=(4, 4))
    else:
        heads_out = ((q @ k.transpose(-1, -2)) * 8 ** -0.5).softmax(-1) @ v
    expected = F.linear(heads_out.transpose(1, 2).reshape(2, 17, 16), attn.proj.weight[:, :16], attn.proj.bias)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)
    hidden = F.gelu(F.linear(x, mlp.fc1.weight[:48], mlp.fc1.bias[:48]))
    torch.testing.assert_close(mlp(x), F.linear(hidden, mlp.fc2.weight[:, :48], mlp.fc2.bias), rtol=1e-5, atol=1e-6)
    # The inactive parts get exactly zero gradient; the model still trains end to end.
    model.train()
    model(images()).sum().backward()
    assert (attn.proj.weight.grad[:, 16:] == 0).all() and (attn.proj.weight.grad[:, :16] != 0).any()
    assert (mlp.fc1.weight.grad[48:] == 0).all() and (mlp.fc2.weight.grad[:, 48:] == 0).all()
    if rpb:
        assert (attn.relative_position_bias_table.grad[:, 2:] == 0).all()


def _per_head(attn):
    """(q, k, v rows per head (3, H, 8, 32), proj columns per head (32, H, 8))."""
    return attn.qkv.weight.view(3, 4, 8, 32), attn.proj.weight.view(32, 4, 8)


@pytest.mark.parametrize("rpb", [True, False])
def test_grow_copies_the_active_parts_into_the_new_ones_in_order(rpb):
    model = tiny_model(rpb=rpb)
    set_stage(model, STAGES[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grow(model, STAGES[1])  # heads 1 -> 3 (heads 1, 2 get head 0), MLP 32 -> 64 (units 32..63 get 0..31)
    for number, block in enumerate(model.blocks):
        prefix = f"blocks.{number}."
        qkv, proj = _per_head(block.attn)
        old_qkv = before[prefix + "attn.qkv.weight"].view(3, 4, 8, 32)
        old_proj = before[prefix + "attn.proj.weight"].view(32, 4, 8)
        for head in (1, 2):
            assert torch.equal(qkv[:, head], old_qkv[:, 0]) and torch.equal(proj[:, head], old_proj[:, 0])
        assert torch.equal(qkv[:, 3], old_qkv[:, 3]) and torch.equal(qkv[:, 0], old_qkv[:, 0])
        if rpb:
            table = block.attn.relative_position_bias_table
            assert torch.equal(table[:, 1], table[:, 0]) and torch.equal(table[:, 2], table[:, 0])
            for name in ("q_bias", "v_bias"):
                bias = getattr(block.attn, name).view(4, 8)
                assert torch.equal(bias[1], bias[0]) and torch.equal(bias[2], bias[0])
        else:
            bias = block.attn.qkv.bias.view(3, 4, 8)
            assert torch.equal(bias[:, 1], bias[:, 0]) and torch.equal(bias[:, 2], bias[:, 0])
        mlp = block.mlp
        assert torch.equal(mlp.fc1.weight[32:64], mlp.fc1.weight[:32]) and torch.equal(mlp.fc1.bias[32:64],
                                                                                       mlp.fc1.bias[:32])
        assert torch.equal(mlp.fc2.weight[:, 32:64], mlp.fc2.weight[:, :32])
        assert torch.equal(mlp.fc2.weight[:, 64:], before[prefix + "mlp.fc2.weight"][:, 64:])
    assert stage_of(model) == GrowthStage(STAGES[1].num_heads, STAGES[1].mlp_ratio)  # widths only
    # The paper's copy is not function-preserving: a copied part adds its output once more.
    block = model.blocks[0]
    x = torch.randn(2, 17, 32)
    set_stage(model, GrowthStage(3, 2.0))
    grown = block.mlp(x) - block.mlp.fc2.bias
    block.mlp.active_hidden = 32
    torch.testing.assert_close(grown, 2 * (block.mlp(x) - block.mlp.fc2.bias), rtol=1e-5, atol=1e-6)
    attn_grown = block.attn(x) - block.attn.proj.bias
    block.attn.active_heads = 1
    torch.testing.assert_close(attn_grown, 3 * (block.attn(x) - block.attn.proj.bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rpb", [True, False])
def test_copy_halved_preserves_the_function_at_every_stage(rpb):
    model = tiny_model(rpb=rpb)
    set_stage(model, GrowthStage(STAGES[0].num_heads, STAGES[0].mlp_ratio))
    x = images()
    for stage in STAGES[1:]:
        before = model(x)
        grow(model, GrowthStage(stage.num_heads, stage.mlp_ratio), init="copy-halved")
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    assert stage_of(model).num_heads == 4


@pytest.mark.parametrize("rpb", [True, False])
@pytest.mark.parametrize("old, new", [(GrowthStage(2, 1.0), GrowthStage(3, 1.0)),
                                      (GrowthStage(2, 1.0), GrowthStage(2, 1.5))], ids=["heads 2->3", "mlp 32->48"])
def test_copy_halved_divides_by_the_copies_of_each_part_when_growth_does_not_double(rpb, old, new):
    """heads 2 -> 3: head 0 is copied once (head 2), head 1 not; hidden 32 -> 48: units 0-15 are copied
    once (32-47), units 16-31 not. Only the copied parts and their copies are halved, and the grown
    model computes what it computed before (the doubling stages cannot tell this from halving all)."""
    model = tiny_model(rpb=rpb)
    set_stage(model, old)
    x = images()
    before_logits = model(x)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grow(model, new, init="copy-halved")
    torch.testing.assert_close(model(x), before_logits, rtol=1e-4, atol=1e-5)
    for number, block in enumerate(model.blocks):
        proj = block.attn.proj.weight.view(32, 4, 8)
        old_proj = before[f"blocks.{number}.attn.proj.weight"].view(32, 4, 8)
        fc2, old_fc2 = block.mlp.fc2.weight, before[f"blocks.{number}.mlp.fc2.weight"]
        if new.num_heads == 3:
            assert torch.equal(proj[:, 0], old_proj[:, 0] / 2) and torch.equal(proj[:, 2], old_proj[:, 0] / 2)
            assert torch.equal(proj[:, 1], old_proj[:, 1])
        else:
            assert torch.equal(fc2[:, :16], old_fc2[:, :16] / 2) and torch.equal(fc2[:, 32:48], old_fc2[:, :16] / 2)
            assert torch.equal(fc2[:, 16:32], old_fc2[:, 16:32])


def test_hidden_units_round_the_ratio_of_a_width_that_is_no_power_of_two():
    """embed 22: the ratio of 15 hidden units is 15 / 22, and 22 * (15 / 22) = 14.999999999999998; the
    units are rounded, not truncated, so set_stage, stage_of and grow agree on 15 (and 30) units."""
    torch.manual_seed(0)
    model = create_model("deit_tiny", **{**TINY, "embed_dim": 22, "num_heads": 2}).eval()
    set_stage(model, GrowthStage(2, 15 / 22))
    mlp = model.blocks[0].mlp
    assert mlp.active_hidden == 15 and stage_of(model).mlp_ratio == 15 / 22
    fc1 = mlp.fc1.weight.detach().clone()
    slices = grow(model, GrowthStage(2, 30 / 22))
    assert mlp.active_hidden == 30
    assert torch.equal(mlp.fc1.weight[15:30], fc1[:15]) and torch.equal(mlp.fc1.weight[:15], fc1[:15])
    assert torch.equal(mlp.fc1.weight[30:], fc1[30:])
    assert {(s.dim, s.start, s.stop) for s in slices if s.name == "blocks.0.mlp.fc1.weight"} == {(0, 15, 30)}


def test_random_init_redraws_the_new_parts_only():
    model = tiny_model()
    set_stage(model, STAGES[0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    slices = grow(model, STAGES[1], init="random", generator=torch.Generator().manual_seed(0))
    changed = {n: p.detach() != before[n] for n, p in model.named_parameters()}
    marked = {n: torch.zeros_like(m) for n, m in changed.items()}
    for piece in slices:
        piece.view(marked[piece.name]).fill_(True)
    for name in changed:
        zero_init = name.endswith(("bias", "relative_position_bias_table"))
        # Weights are redrawn (all differ); biases and table columns are zeroed (they were non-zero).
        assert torch.equal(changed[name], marked[name]) or zero_init and not changed[name][~marked[name]].any(), name
    table = model.blocks[0].attn.relative_position_bias_table
    assert (table[:, 1:3] == 0).all() and (table[:, 0] != 0).any()
    weights = model.blocks[0].attn.qkv.weight.view(3, 4, 8, 32)[:, 1:3]
    assert 0.01 < weights.std() < 0.03  # truncated normal(0.02), as at construction


def test_new_parameter_slices_name_every_new_entry():
    model = tiny_model()
    slices = new_parameter_slices(model, GrowthStage(1, 1.0), GrowthStage(3, 2.0))
    block0 = [(s.name, s.dim, s.start, s.stop) for s in slices if s.name.startswith("blocks.0.")]
    assert block0 == [
        ("blocks.0.attn.qkv.weight", 0, 8, 24), ("blocks.0.attn.qkv.weight", 0, 40, 56),
        ("blocks.0.attn.qkv.weight", 0, 72, 88),
        ("blocks.0.attn.q_bias", 0, 8, 24), ("blocks.0.attn.v_bias", 0, 8, 24),
        ("blocks.0.attn.relative_position_bias_table", 1, 1, 3),
        ("blocks.0.attn.proj.weight", 1, 8, 24),
        ("blocks.0.mlp.fc1.weight", 0, 32, 64), ("blocks.0.mlp.fc1.bias", 0, 32, 64),
        ("blocks.0.mlp.fc2.weight", 1, 32, 64)]
    assert len(slices) == 4 * len(block0)
    params = dict(model.named_parameters())
    assert all(isinstance(s, NewSlice) and s.param is params[s.name] for s in slices)
    plain = tiny_model(rpb=False)
    names = {s.name for s in new_parameter_slices(plain, GrowthStage(1, 1.0), GrowthStage(2, 1.0))}
    assert names == {f"blocks.{b}.attn.{n}" for b in range(4) for n in ("qkv.weight", "qkv.bias", "proj.weight")}
    # Heads only: no MLP slice; the same stage: none.
    assert not any("mlp" in s.name for s in new_parameter_slices(model, GrowthStage(1, 2.0), GrowthStage(2, 2.0)))
    assert new_parameter_slices(model, STAGES[1], STAGES[1]) == []


def test_reset_optimizer_moments_zeroes_the_new_slices_only():
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(images()).sum().backward()
    optimizer.step()  # moments everywhere (the model ran at full width)
    set_stage(model, STAGES[1])
    slices = grow(model, STAGES[2])
    saved = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    touched = reset_optimizer_moments(optimizer, slices)
    assert touched == 2 * len(slices)
    marked = {p: torch.zeros_like(p, dtype=torch.bool) for p in model.parameters()}
    for piece in slices:
        piece.view(marked[piece.param]).fill_(True)
    for param in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            value = optimizer.state[param][key]
            assert (value[marked[param]] == 0).all()
            assert torch.equal(value[~marked[param]], saved[param][key][~marked[param]])
        assert torch.equal(optimizer.state[param]["step"], saved[param]["step"])
    assert reset_optimizer_moments(torch.optim.AdamW(model.parameters()), slices) == 0  # no state yet


@pytest.mark.parametrize("optimizer_name, keys", [("sgd", ("momentum_buffer",)),
                                                   ("amsgrad", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))])
def test_reset_optimizer_moments_covers_every_optimizer_moment(optimizer_name, keys):
    """SGD's momentum_buffer and AdamW(amsgrad=True)'s max_exp_avg_sq are moments too: zeroed on the new
    slices, untouched elsewhere."""
    model = tiny_model().train()
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
    model(images()).sum().backward()
    optimizer.step()  # the state exists, non-zero everywhere the model trained (full width)
    set_stage(model, STAGES[1])
    slices = grow(model, STAGES[2])
    saved = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    assert set(keys) <= set(saved[slices[0].param])
    assert reset_optimizer_moments(optimizer, slices) == len(keys) * len(slices)
    marked = {p: torch.zeros_like(p, dtype=torch.bool) for p in model.parameters()}
    for piece in slices:
        piece.view(marked[piece.param]).fill_(True)
    for param in model.parameters():
        for key in keys:
            value = optimizer.state[param][key]
            assert (value[marked[param]] == 0).all(), key
            assert torch.equal(value[~marked[param]], saved[param][key][~marked[param]]), key
    assert any((saved[p.param][keys[-1]][marked[p.param]] != 0).any() for p in slices)  # there was something to zero


def test_token_stages_crop_the_centre_of_the_grid():
    model = tiny_model()
    set_stage(model, STAGES[0])
    # The stage's tokens are the input keep rate of each call (the trainer's schedule holds it); the
    # model keeps its own rate (1.0) and only its scorer changes.
    assert model.sampler.scorer == "center" and model.keep_rate == 1.0 and stage_keep_rate(model, STAGES[0]) == 5 / 17
    _, index = model.forward_features(images(), keep_rate=stage_keep_rate(model, STAGES[0]))
    assert sorted(index[0].tolist()) == [0, 6, 7, 10, 11]  # the centre 2 x 2 of the 4 x 4 grid
    assert torch.equal(index[0], index[1])
    set_stage(model, STAGES[2])
    assert stage_keep_rate(model, STAGES[2]) == 1.0 and model.forward_features(images())[1] is None
    with torch.device("meta"):
        small = create_model("deit_small")
    assert stage_keep_rates(small, BUDGETED_STAGES["deit_small"]) == (101 / 197, 145 / 197, 1.0)
    set_stage(small, BUDGETED_STAGES["deit_small"][0])
    assert stage_of(small) == GrowthStage(2, 1.0) and small.sampler.scorer == "center"


def _tiny_macs(heads, hidden, patches):
    """Multiply-adds of the tiny model's forward by hand: patch embedding of all 16 patches, then per
    block qkv, q k^T, probs v, proj and the MLP on n = 1 + patches tokens, and the head."""
    n, head_dim = 1 + patches, 8
    width = heads * head_dim
    per_block = n * 32 * 3 * width + 2 * heads * n * n * head_dim + n * width * 32 + 2 * n * 32 * hidden
    return 16 * 32 * 3 * 8 * 8 + 4 * per_block + 32 * 5


def test_flops_per_stage_are_counted_on_the_real_model_and_ordered():
    model = tiny_model()
    flops = stage_flops(model, STAGES)
    expected = [2 * _tiny_macs(s.num_heads, int(32 * s.mlp_ratio), s.num_patches) for s in STAGES]
    assert list(flops) == expected and 0 < flops[0] < flops[1] < flops[2]
    assert stage_of(model) == GrowthStage(4, 4.0, None) and model.keep_rate == 1.0  # restored, never written
    assert count_flops(model) == flops[2]
    assert count_flops(model, batch_size=3) == 3 * flops[2]
    assert count_flops(model, backward=True) > 2 * flops[2]
    assert all(p.grad is None for p in model.parameters())  # the real model is untouched
    # The counter sees the pruned token counts too.
    pruned = tiny_model(token_pruning=TokenPruning(blocks=(2,), token_keep_rate=0.5))
    assert count_flops(pruned) < count_flops(model)


def test_deit_small_stage_flops_match_the_paper_table_6():
    with torch.device("meta"):
        model = create_model("deit_small")
    macs = [f / 2e9 for f in stage_flops(model, BUDGETED_STAGES["deit_small"])]
    # Table 6: 0.69G, 1.91G, 4.61G (multiply-adds).
    assert [round(m, 2) for m in macs] == [0.69, 1.90, 4.60]


def test_grow_refuses_to_shrink_and_bad_stages():
    model = tiny_model()
    with pytest.raises(ValueError, match="only widen"):
        grow(model, STAGES[0])
    # Either dimension alone: from 4 heads and MLP ratio 4, fewer heads or fewer hidden units.
    for smaller in (GrowthStage(2, 4.0), GrowthStage(4, 2.0)):
        with pytest.raises(ValueError, match="only widen"):
            grow(model, smaller)
        assert stage_of(model) == GrowthStage(4, 4.0)
    # The same widths are no shrink: nothing new, nothing changed.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert grow(model, GrowthStage(4, 4.0)) == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="gives 0 hidden units"):
        set_stage(model, GrowthStage(4, 0.01))  # round(0.32) = 0
    set_stage(model, GrowthStage(4, 1 / 32))  # one unit is enough
    assert model.blocks[0].mlp.active_hidden == 1
    set_stage(model, GrowthStage(4, 4.0))
    with pytest.raises(ValueError, match="num_heads=5"):
        grow(model, GrowthStage(5, 4.0))
    with pytest.raises(ValueError, match="mlp_ratio=8.0"):
        set_stage(model, GrowthStage(4, 8.0))
    with pytest.raises(ValueError, match="init must be one of"):
        grow(model, STAGES[2], init="noise")
    with pytest.raises(ValueError, match="num_patches"):
        set_stage(model, GrowthStage(4, 4.0, 17))


def test_growth_composes_with_token_pruning():
    model = tiny_model(token_pruning=TokenPruning(blocks=(2, 3), token_keep_rate=0.5, attention_keep_rate=0.5))
    stage = GrowthStage(2, 1.0, 9)
    set_stage(model, stage)
    tokens, index = model.forward_features(images(), keep_rate=stage_keep_rate(model, stage))
    assert tokens.shape == (2, 1 + 3, 32) and index.shape == (2, 4)
    model.train()
    model(images(), keep_rate=stage_keep_rate(model, stage)).sum().backward()
