"""load_pretrained without timm: each source filter on hand-made state dicts, the resampling helpers
against hand computations, the report, refusals, strict mode, file round trips, pool="cls" against a
forward written out by hand, and the shared SimMIM table in every block. (Against timm itself:
tests/timm_equivalence.py, run by .ci/timm_equivalence.sh.)"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pss_kernels.models import LoadReport, create_model, create_model_for, load_pretrained
from pss_kernels.models.pretrained import (detect_format, filter_beit_original, filter_pss, filter_timm_beit,
                                           filter_timm_vit, read_checkpoint, resize_pos_embed,
                                           resize_rel_pos_table, unwrap)
from pss_kernels.ops.rpb_attention.reference import rpb_attention_reference
from pss_kernels.ops.sample_patches.reference import sample_patches_reference

pytestmark = pytest.mark.usefixtures("single_thread")

C, HEADS, DEPTH = 16, 2, 2
# img 32, patch 8: a 4x4 grid, N = 17 tokens, tables of 7 * 7 + 3 = 52 rows.
TINY = dict(img_size=32, patch_size=8, embed_dim=C, depth=DEPTH, num_heads=HEADS, num_classes=5, drop_path_rate=0.0)


def tiny(name="deit_tiny", **overrides):
    return create_model(name, **{**TINY, **overrides}).eval()


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def common_keys(grid=4, classes=5, patch=8, seed=0):
    """Keys every ViT family shares, random values."""
    sd = {"cls_token": randn(1, 1, C, seed=seed), "patch_embed.proj.weight": randn(C, 3, patch, patch, seed=seed + 1),
          "patch_embed.proj.bias": randn(C, seed=seed + 2), "head.weight": randn(classes, C, seed=seed + 3),
          "head.bias": randn(classes, seed=seed + 4)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        for j, (name, shape) in enumerate([("norm1.weight", (C,)), ("norm1.bias", (C,)), ("attn.qkv.weight", (3 * C, C)),
                                           ("attn.proj.weight", (C, C)), ("attn.proj.bias", (C,)), ("norm2.weight", (C,)),
                                           ("norm2.bias", (C,)), ("mlp.fc1.weight", (4 * C, C)), ("mlp.fc1.bias", (4 * C,)),
                                           ("mlp.fc2.weight", (C, 4 * C)), ("mlp.fc2.bias", (C,))]):
            sd[p + name] = randn(*shape, seed=seed + 10 * i + j + 100)
    return sd


def timm_vit_state(seed=0, layer_scale=False):
    """timm VisionTransformer keys (vit_* / deit_*): pos_embed, one qkv.bias, ls1/ls2, final norm."""
    sd = common_keys(seed=seed)
    sd["pos_embed"] = randn(1, 17, C, seed=seed + 5)
    sd["norm.weight"], sd["norm.bias"] = randn(C, seed=seed + 6), randn(C, seed=seed + 7)
    for i in range(DEPTH):
        sd[f"blocks.{i}.attn.qkv.bias"] = randn(3 * C, seed=seed + 50 + i)
        if layer_scale:
            sd[f"blocks.{i}.ls1.gamma"], sd[f"blocks.{i}.ls2.gamma"] = randn(C, seed=60 + i), randn(C, seed=70 + i)
    return sd


def beit_state(seed=0, original=False):
    """timm Beit keys (beit_*), or with original=True the BEiT / SimMIM repositories' file."""
    sd = common_keys(seed=seed)
    sd["fc_norm.weight"], sd["fc_norm.bias"] = randn(C, seed=seed + 6), randn(C, seed=seed + 7)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd[p + "attn.q_bias"], sd[p + "attn.v_bias"] = randn(C, seed=seed + 50 + i), randn(C, seed=seed + 60 + i)
        sd[p + "gamma_1"], sd[p + "gamma_2"] = randn(C, seed=seed + 70 + i), randn(C, seed=seed + 80 + i)
        if not original:
            sd[p + "attn.relative_position_bias_table"] = randn(52, HEADS, seed=seed + 90 + i)
    if original:
        sd["rel_pos_bias.relative_position_bias_table"] = randn(52, HEADS, seed=seed + 99)
        sd["rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
        sd["mask_token"] = torch.zeros(1, 1, C)
        sd["decoder.0.weight"], sd["decoder.0.bias"] = torch.zeros(3 * 64, C, 1, 1), torch.zeros(3 * 64)
        sd = {"model": {f"encoder.{k}" if not k.startswith("decoder.") else k: v for k, v in sd.items()},
              "epoch": 3}
    return sd


def images(size=32, batch=3, seed=1):
    return randn(batch, 3, size, size, seed=seed)


# ---------------------------------------------------------------------------------------------- filters


def test_timm_vit_filter_splits_the_qkv_bias_and_keeps_every_other_key():
    sd = timm_vit_state(layer_scale=True)
    model = tiny(pool="cls", layer_scale_init=0.1)
    out = filter_timm_vit(sd, model)
    for i in range(DEPTH):
        bias = sd[f"blocks.{i}.attn.qkv.bias"]
        assert torch.equal(out[f"blocks.{i}.attn.q_bias"], bias[:C])
        assert torch.equal(out[f"blocks.{i}.attn.v_bias"], bias[2 * C:])
        assert f"blocks.{i}.attn.qkv.bias" not in out
    renamed = {k for k in sd if k.endswith("qkv.bias")}
    assert all(torch.equal(out[k], sd[k]) for k in sd if k not in renamed)
    assert set(out) == set(model.state_dict()) - {f"blocks.{i}.attn.relative_position_bias_table" for i in range(DEPTH)}
    # Into plain SDPA attention the bias stays whole, the key third included.
    plain = filter_timm_vit(sd, tiny(pool="cls", layer_scale_init=0.1, rpb=False))
    assert set(plain) == set(sd) and all(torch.equal(plain[k], sd[k]) for k in sd)
    assert filter_timm_vit(sd, model) is not sd and "blocks.0.attn.qkv.bias" in sd  # pure: input untouched


def test_dropping_the_key_bias_is_exact():
    # The same timm-layout weights, with a large key bias, in plain attention (keeps it) and in the
    # RPB attention (drops it, zero tables): softmax cancels q . b_k, so the logits agree.
    sd = timm_vit_state()
    for i in range(DEPTH):
        sd[f"blocks.{i}.attn.qkv.bias"][C:2 * C] = 10 * randn(C, seed=200 + i)
    plain, rpb = tiny(pool="cls", rpb=False), tiny(pool="cls")
    load_pretrained(plain, sd)
    load_pretrained(rpb, sd)
    x = images()
    torch.testing.assert_close(rpb(x), plain(x), rtol=1e-5, atol=1e-5)
    assert (plain.blocks[0].attn.qkv.bias[C:2 * C] != 0).all()


def test_beit_q_v_biases_into_plain_attention_get_a_zero_key_bias():
    """BEiT's q_bias / v_bias into a model with plain attention (rpb=False: one qkv.bias) become
    qkv.bias = [q_bias, 0, v_bias]; the model then computes what the RPB model computes with zero
    tables, and the checkpoint's tables have no place in it."""
    sd = beit_state()
    for i in range(DEPTH):
        sd[f"blocks.{i}.attn.relative_position_bias_table"].zero_()
        sd[f"blocks.{i}.attn.q_bias"].mul_(3)  # biases large enough that a misplaced third shows
        sd[f"blocks.{i}.attn.v_bias"].mul_(3)
    plain = tiny("vit_base", rpb=False, abs_pos_embed=False)
    out = filter_timm_beit(sd, plain)
    for i in range(DEPTH):
        q_bias, v_bias = sd[f"blocks.{i}.attn.q_bias"], sd[f"blocks.{i}.attn.v_bias"]
        assert torch.equal(out[f"blocks.{i}.attn.qkv.bias"], torch.cat([q_bias, torch.zeros(C), v_bias]))
        assert f"blocks.{i}.attn.q_bias" not in out and f"blocks.{i}.attn.v_bias" not in out
    report = load_pretrained(plain, sd)
    assert report.source == "timm_beit" and report.missing == []
    assert sorted(report.unexpected) == [f"blocks.{i}.attn.relative_position_bias_table" for i in range(DEPTH)]
    bias = plain.blocks[1].attn.qkv.bias
    assert torch.equal(bias[:C], sd["blocks.1.attn.q_bias"]) and torch.equal(bias[C:2 * C], torch.zeros(C))
    assert torch.equal(bias[2 * C:], sd["blocks.1.attn.v_bias"])
    rpb = tiny("vit_base")
    load_pretrained(rpb, sd)
    x = images()
    torch.testing.assert_close(plain(x), rpb(x), rtol=1e-5, atol=1e-5)


def test_timm_beit_filter_renames_layer_scale_and_drops_index_buffers():
    sd = beit_state()
    sd["blocks.0.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    sd["blocks.0.attn.k_bias"] = torch.zeros(C)
    model = tiny("vit_base")
    out = filter_timm_beit(sd, model)
    assert set(out) == set(model.state_dict())
    for i in range(DEPTH):
        assert torch.equal(out[f"blocks.{i}.ls1.gamma"], sd[f"blocks.{i}.gamma_1"])
        assert torch.equal(out[f"blocks.{i}.ls2.gamma"], sd[f"blocks.{i}.gamma_2"])
        assert torch.equal(out[f"blocks.{i}.attn.relative_position_bias_table"],
                           sd[f"blocks.{i}.attn.relative_position_bias_table"])
    assert torch.equal(out["fc_norm.weight"], sd["fc_norm.weight"])


def test_original_simmim_filter_strips_the_wrapper_and_prefix_and_copies_the_shared_table():
    checkpoint = beit_state(original=True)
    state_dict, wrapped = unwrap(checkpoint)
    assert wrapped and all(k.startswith(("encoder.", "decoder.")) for k in state_dict)
    assert detect_format(state_dict, wrapped=True) == "beit_original"
    model = tiny("vit_base")
    out = filter_beit_original(state_dict, model)
    shared = state_dict["encoder.rel_pos_bias.relative_position_bias_table"]
    for i in range(DEPTH):
        assert torch.equal(out[f"blocks.{i}.attn.relative_position_bias_table"], shared)
        assert torch.equal(out[f"blocks.{i}.ls1.gamma"], state_dict[f"encoder.blocks.{i}.gamma_1"])
    assert out["blocks.0.attn.relative_position_bias_table"].data_ptr() != shared.data_ptr()  # copies, not views
    assert not any("relative_position_index" in k or k.startswith(("encoder.", "rel_pos_bias")) for k in out)
    assert set(out) - set(model.state_dict()) == {"mask_token", "decoder.0.weight", "decoder.0.bias"}


def test_the_shared_simmim_table_lands_in_every_block():
    checkpoint = beit_state(original=True)
    model = tiny("vit_base")
    report = load_pretrained(model, checkpoint)
    shared = checkpoint["model"]["encoder.rel_pos_bias.relative_position_bias_table"]
    for block in model.blocks:
        assert torch.equal(block.attn.relative_position_bias_table, shared)
    tables = [f"blocks.{i}.attn.relative_position_bias_table" for i in range(DEPTH)]
    assert set(tables) <= set(report.loaded)
    assert report.source == "beit_original" and report.missing == []
    assert sorted(report.unexpected) == ["decoder.0.bias", "decoder.0.weight", "mask_token"]
    # Blocks stay independent after loading: training one table leaves the others.
    with torch.no_grad():
        model.blocks[0].attn.relative_position_bias_table.add_(1.0)
    assert torch.equal(model.blocks[1].attn.relative_position_bias_table, shared)


def test_simmim_pretraining_layout_reports_its_final_norm_and_the_new_head():
    # SimMIM pre-training: a final `norm`, no fc_norm and no head (fine-tuning adds them).
    checkpoint = beit_state(original=True)
    inner = checkpoint["model"]
    for key in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"):
        del inner[f"encoder.{key}"]
    inner["encoder.norm.weight"], inner["encoder.norm.bias"] = torch.ones(C), torch.zeros(C)
    report = load_pretrained(tiny("vit_base"), checkpoint)
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(report.unexpected) == ["decoder.0.bias", "decoder.0.weight", "mask_token", "norm.bias", "norm.weight"]
    assert "fc_norm" in report.summary()


def test_pss_filter_is_the_identity_on_the_models_own_state_dict():
    model = tiny()
    sd = model.state_dict()
    out = filter_pss(sd, tiny())
    assert set(out) == set(sd) and all(torch.equal(out[k], sd[k]) for k in sd)


def test_format_detection():
    model = tiny()
    assert detect_format(model.state_dict(), model) == "pss"
    assert detect_format(timm_vit_state(), model) == "timm_vit"
    assert detect_format(beit_state(), model) == "timm_beit"
    assert detect_format(unwrap(beit_state(original=True))[0], model, wrapped=True) == "beit_original"
    assert detect_format(beit_state(), model, wrapped=True) == "beit_original"  # BEiT's own fine-tuned files
    with pytest.raises(ValueError, match="does not look like a ViT"):
        detect_format({"fc.weight": torch.zeros(2, 2)})


def test_distilled_deit_is_refused_with_the_reason():
    sd = timm_vit_state()
    sd["dist_token"] = torch.zeros(1, 1, C)
    sd["head_dist.weight"], sd["head_dist.bias"] = torch.zeros(5, C), torch.zeros(5)
    for call in (lambda: load_pretrained(tiny(pool="cls"), sd), lambda: filter_timm_vit(sd, tiny())):
        with pytest.raises(ValueError, match="distillation token"):
            call()
    with pytest.raises(ValueError, match="distillation token"):
        create_model_for("deit_small_distilled_patch16_224")


# ---------------------------------------------------------------------------------------------- resampling


def cubic_weights(x):
    """PyTorch's bicubic convolution kernel (A = -0.75) at the 4 taps around x (by hand)."""
    a = -0.75
    t = x - math.floor(x)

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_by_hand(image: np.ndarray, out_shape) -> np.ndarray:
    """Separable bicubic resize, align_corners=False, taps clamped at the border, in float64."""
    def matrix(n_in, n_out):
        m = np.zeros((n_out, n_in))
        for o in range(n_out):
            x = (o + 0.5) * n_in / n_out - 0.5
            for tap, w in zip(range(math.floor(x) - 1, math.floor(x) + 3), cubic_weights(x)):
                m[o, min(max(tap, 0), n_in - 1)] += w
        return m
    rows, cols = matrix(image.shape[0], out_shape[0]), matrix(image.shape[1], out_shape[1])
    return rows @ image @ cols.T


def test_bicubic_weights_by_hand():
    # Numbers worked out on paper for 3 -> 5: output 0 samples x = -0.2 and output 1 x = 0.4.
    torch.testing.assert_close(torch.tensor(cubic_weights(-0.2)[3]), torch.tensor(-0.096), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.tensor(cubic_weights(0.4)[2]), torch.tensor(0.46), rtol=0, atol=1e-12)


def test_rel_pos_table_known_bicubic_case_and_prefix_rows():
    # Grid 2x2 -> 3x3: the 3x3 offset image becomes 5x5. A unit impulse at offset (0, 0) gives 1 at
    # the new (0, 0), 0.46 one row away (x = 0.4 -> weight of the middle tap), 0.096^2 in the corner.
    table = torch.zeros(9 + 3, 1)
    table[4, 0] = 1.0
    table[9:, 0] = torch.tensor([7.0, 8.0, 9.0])
    out = resize_rel_pos_table(table, (3, 3))
    assert out.shape == (25 + 3, 1)
    offsets = out[:25, 0].reshape(5, 5)
    torch.testing.assert_close(offsets[2, 2], torch.tensor(1.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(offsets[1, 2], torch.tensor(0.46), rtol=0, atol=1e-6)
    torch.testing.assert_close(offsets[0, 0], torch.tensor(0.096 ** 2), rtol=0, atol=1e-6)
    assert torch.equal(out[25:, 0], torch.tensor([7.0, 8.0, 9.0]))


@pytest.mark.parametrize("old,new", [((4, 4), (6, 6)), ((6, 6), (3, 3)), ((3, 3), (2, 5))])
def test_rel_pos_table_against_a_bicubic_written_out_by_hand(old, new):
    span = (2 * old[0] - 1, 2 * old[1] - 1)
    table = randn(span[0] * span[1] + 3, HEADS, seed=4)
    out = resize_rel_pos_table(table, new)
    new_span = (2 * new[0] - 1, 2 * new[1] - 1)
    assert out.shape == (new_span[0] * new_span[1] + 3, HEADS)
    for h in range(HEADS):
        # The table's row-major layout: row index = (row offset) * (2Gw - 1) + column offset.
        expected = bicubic_by_hand(table[:-3, h].double().numpy().reshape(span), new_span)
        torch.testing.assert_close(out[:-3, h].reshape(new_span).double(), torch.from_numpy(expected),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(out[-3:], table[-3:])


def test_resampling_from_a_grid_that_is_not_square():
    """old_grid (2, 3): the table's offsets are a 3 x 5 image (row offset major) and the position
    embedding a 2 x 3 grid; a swapped height and width reshapes the same entries into 5 x 3 / 3 x 2."""
    table = randn(3 * 5 + 3, HEADS, seed=8)
    out = resize_rel_pos_table(table, (3, 4), old_grid=(2, 3))
    assert out.shape == (5 * 7 + 3, HEADS) and torch.equal(out[-3:], table[-3:])
    for h in range(HEADS):
        expected = bicubic_by_hand(table[:-3, h].double().numpy().reshape(3, 5), (5, 7))
        torch.testing.assert_close(out[:-3, h].reshape(5, 7).double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
    pos = randn(1, 1 + 6, 2, seed=9)
    out = resize_pos_embed(pos, (3, 3), old_grid=(2, 3))
    assert out.shape == (1, 1 + 9, 2) and torch.equal(out[:, 0], pos[:, 0])
    for c in range(2):
        expected = bicubic_by_hand(pos[0, 1:, c].double().numpy().reshape(2, 3), (3, 3))
        torch.testing.assert_close(out[0, 1:, c].reshape(3, 3).double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="position embedding has 7 tokens, not 10 as for grid"):
        resize_pos_embed(pos, (3, 3), old_grid=(3, 3))
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(pos, (3, 3))  # 6 patches: no square grid to assume


def test_rel_pos_table_without_prefix_and_errors():
    table = randn(49, 1, seed=5)
    assert resize_rel_pos_table(table, (5, 5), num_prefix_tokens=0).shape == (81, 1)
    with pytest.raises(ValueError, match="square"):
        resize_rel_pos_table(randn(50 + 3, 1, seed=0), (4, 4))
    with pytest.raises(ValueError, match="rows"):
        resize_rel_pos_table(randn(52, 1, seed=0), (4, 4), old_grid=(3, 3))


def test_resampling_is_the_identity_at_the_same_size():
    table, pos = randn(52, HEADS, seed=1), randn(1, 17, C, seed=2)
    assert resize_rel_pos_table(table, (4, 4)) is table
    assert resize_pos_embed(pos, (4, 4)) is pos


def test_pos_embed_cls_row_kept_and_grid_bicubic():
    pos = randn(1, 1 + 9, 3, seed=3)
    out = resize_pos_embed(pos, (5, 4))
    assert out.shape == (1, 1 + 20, 3)
    assert torch.equal(out[:, 0], pos[:, 0])
    for c in range(3):
        expected = bicubic_by_hand(pos[0, 1:, c].double().numpy().reshape(3, 3), (5, 4))
        torch.testing.assert_close(out[0, 1:, c].reshape(5, 4).double(), torch.from_numpy(expected),
                                   rtol=1e-5, atol=1e-5)
    half = resize_pos_embed(pos.half(), (5, 4))  # half checkpoints: resampled in float32, returned in half
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), out, rtol=0, atol=2e-2)


# ---------------------------------------------------------------------------------------------- load_pretrained


def test_report_lists_resized_reinitialised_missing_and_unexpected():
    source = tiny(layer_scale_init=0.1)
    sd = source.state_dict()
    model = create_model("deit_tiny", **{**TINY, "img_size": 48, "num_classes": 7}).eval()
    head_before = model.head.weight.clone()
    torch.manual_seed(0)
    report = load_pretrained(model, sd)
    assert isinstance(report, LoadReport) and report.source == "pss"
    tables = [f"blocks.{i}.attn.relative_position_bias_table" for i in range(DEPTH)]
    assert sorted(report.resized) == sorted(["pos_embed"] + tables)
    assert sorted(report.reinitialised) == ["head.bias", "head.weight"]
    # Layer scale is in the checkpoint but not in this model.
    assert sorted(report.unexpected) == sorted(f"blocks.{i}.ls{j}.gamma" for i in range(DEPTH) for j in (1, 2))
    assert report.missing == []
    assert set(report.loaded) == set(model.state_dict()) - {"head.weight", "head.bias"}
    assert torch.equal(model.pos_embed, resize_pos_embed(sd["pos_embed"], (6, 6)))
    assert torch.equal(model.blocks[1].attn.relative_position_bias_table, resize_rel_pos_table(sd[tables[1]], (6, 6)))
    assert torch.equal(model.blocks[0].mlp.fc1.weight, sd["blocks.0.mlp.fc1.weight"])
    # A fresh head: zero bias, std 0.02 weight, not the one the model had.
    assert torch.equal(model.head.bias, torch.zeros(7)) and not torch.equal(model.head.weight, head_before)
    assert 0.01 < model.head.weight.std().item() < 0.03
    text = report.summary()
    assert "re-initialised" in text and "pos_embed" in text and "blocks.*.ls1.gamma (x2)" in text
    assert "layer_scale_init" in text  # the hint for the unexpected layer scale
    assert "17 -> 37 tokens" in text


def test_strict_mode_names_the_keys():
    sd = tiny().state_dict()
    load_pretrained(tiny(), sd, strict=True)  # exact: fine
    del sd["blocks.1.mlp.fc2.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['blocks.1.mlp.fc2.bias'\], unexpected \['extra.weight'\]"):
        load_pretrained(tiny(), sd, strict=True)
    report = load_pretrained(tiny(), sd)
    assert report.missing == ["blocks.1.mlp.fc2.bias"] and report.unexpected == ["extra.weight"]


def test_strict_mode_leaves_the_model_untouched_when_it_refuses():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = tiny("deit_tiny").state_dict()
    sd["extra"] = torch.zeros(1)
    with torch.no_grad():
        for value in sd.values():
            value.add_(1.0)
    with pytest.raises(ValueError):
        load_pretrained(model, sd, strict=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_shapes_that_cannot_be_resampled_are_refused():
    sd = tiny().state_dict()
    with pytest.raises(ValueError, match="patch size is \\(8, 8\\).*patch_size=8"):
        load_pretrained(create_model("deit_tiny", **{**TINY, "patch_size": 16}), sd)
    with pytest.raises(ValueError, match="do not fit the model.*blocks.0.norm1.weight"):
        load_pretrained(tiny(embed_dim=32), sd)


def test_files_round_trip_and_the_trainers_checkpoint(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    source = tiny(layer_scale_init=0.1)
    for param in source.parameters():
        torch.nn.init.normal_(param)
    sd = source.state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    torch.save({"format": 1, "model": sd, "ema": sd, "optimizer": {"state": {}}, "epoch": 2}, tmp_path / "last.pt")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.bin")
    x = images()
    for name in ("w.safetensors", "w.pth", "last.pt", "ddp.bin"):
        model = tiny(layer_scale_init=0.1)
        report = load_pretrained(model, tmp_path / name, strict=True)
        assert report.source == "pss" and len(report.loaded) == len(sd), name
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items()), name
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    assert set(read_checkpoint(tmp_path / "w.safetensors")) == set(sd)


def test_unreadable_files_say_why(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        read_checkpoint(tmp_path / "weights.npz")
    torch.save({"model": tiny().state_dict(), "config": Opaque()}, tmp_path / "simmim.pth")
    with pytest.raises(ValueError, match="weights_only=False"):
        read_checkpoint(tmp_path / "simmim.pth")
    with pytest.raises(ValueError, match="not tensors"):
        load_pretrained(tiny(), {"cls_token": torch.zeros(1), "blocks.0.x": [1, 2]})


class Opaque:  # stands for SimMIM's pickled yacs config
    pass


# ---------------------------------------------------------------------------------------------- the model


def hand_built_cls_forward(model, x, keep_rate):
    """pool="cls" written out: blocks as in test_models, then LayerNorm over every token, the CLS row."""
    patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=8)
    tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), patches.flatten(2).transpose(1, 2)], 1) + model.pos_embed
    index = None
    if keep_rate < 1.0:
        tokens, index = sample_patches_reference(tokens, keep_rate)
    head_dim = C // HEADS
    for block in model.blocks:
        attn = block.attn
        h = F.layer_norm(tokens, (C,), block.norm1.weight, block.norm1.bias, eps=1e-6)
        qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        q, k, v = F.linear(h, attn.qkv.weight, qkv_bias).reshape(len(x), -1, 3, HEADS, head_dim).permute(2, 0, 3, 1, 4)
        out = rpb_attention_reference(q, k, v, attn.relative_position_bias_table, index, grid_size=(4, 4))
        tokens = tokens + attn.proj(out.transpose(1, 2).reshape(len(x), -1, C))
        h = F.layer_norm(tokens, (C,), block.norm2.weight, block.norm2.bias, eps=1e-6)
        tokens = tokens + block.mlp.fc2(F.gelu(block.mlp.fc1(h)))
    normed = F.layer_norm(tokens, (C,), model.norm.weight, model.norm.bias, eps=1e-6)
    return model.head(normed[:, 0])


@pytest.mark.parametrize("keep_rate", [1.0, 0.5])
def test_cls_pooling_matches_a_forward_written_out_by_hand(keep_rate):
    torch.manual_seed(0)
    model = tiny(pool="cls")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("relative_position_bias_table", "q_bias", "v_bias", "norm.weight", "norm.bias")):
                param.normal_(std=0.5)
    assert isinstance(model.fc_norm, torch.nn.Identity)
    x = images()
    expected = hand_built_cls_forward(model, x, keep_rate)
    torch.testing.assert_close(model(x, keep_rate=keep_rate), expected, rtol=1e-5, atol=1e-5)
    # The CLS token alone decides: changing the final norm moves the logits, the patch tokens' values do not enter the head.
    tokens, _ = model.forward_features(x, keep_rate=keep_rate)
    tokens[:, 1:] = 0
    torch.testing.assert_close(model.forward_head(tokens), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        tiny(pool="max")


def test_mean_pooling_state_dicts_keep_their_names():
    # pss-train writes state dicts of the pool="mean" model: the same keys as before pool existed.
    keys = list(tiny().state_dict())
    assert keys[-4:] == ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]
    assert "norm.weight" not in keys
    cls_keys = list(tiny(pool="cls").state_dict())
    assert cls_keys[-4:] == ["norm.weight", "norm.bias", "head.weight", "head.bias"] and "fc_norm.weight" not in cls_keys
    saved = {k: v.clone() for k, v in tiny().state_dict().items()}
    tiny().load_state_dict(saved, strict=True)


def test_create_model_for_timm_names():
    with torch.device("meta"):
        vit = create_model_for("vit_base_patch16_224.augreg_in21k_ft_in1k")
        deit = create_model_for("deit_small_patch16_224", img_size=384, num_classes=10)
        beit = create_model_for("beit_base_patch16_224")
        large = create_model_for("vit_large_patch32_384")
    assert (vit.pool, vit.pos_embed is not None, vit.blocks[0].ls1.__class__.__name__) == ("cls", True, "Identity")
    assert vit.embed_dim == 768 and vit.grid_size == (14, 14) and vit.rpb
    assert deit.embed_dim == 384 and deit.grid_size == (24, 24) and deit.num_classes == 10 and deit.pool == "cls"
    assert beit.pool == "mean" and beit.pos_embed is None and beit.blocks[0].ls1.gamma.shape == (768,)
    assert large.patch_embed.patch_size == 32 and len(large.blocks) == 24 and large.grid_size == (12, 12)
    for bad in ("resnet50", "deit3_base_patch16_224", "beit_small_patch16_224", "vit_base_patch16_clip_224"):
        with pytest.raises(ValueError, match="timm_name"):
            create_model_for(bad)
