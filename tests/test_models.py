"""The reference ViT: shapes and gradients at several keep rates, the rho = 1 fast path, and the
sampled + RPB forward against a forward assembled by hand from the op references."""
import pytest
import torch
import torch.nn.functional as F

from pss_kernels.models import MODEL_CONFIGS, VisionTransformer, create_model
from pss_kernels.models.layers import DropPath, PlainAttention
from pss_kernels.ops.rpb_attention.reference import rpb_attention_reference
from pss_kernels.ops.sample_patches.reference import num_kept_tokens, sample_patches_reference

# Tiny models: see conftest.single_thread.
pytestmark = pytest.mark.usefixtures("single_thread")


# img 32, patch 8: a 4x4 grid, N = 17 tokens.
TINY = dict(img_size=32, num_classes=5, embed_dim=32, depth=2, num_heads=2, patch_size=8, drop_path_rate=0.0)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = create_model("deit_tiny", **{**TINY, **overrides})
    # Non-zero tables and layer-scale-free blocks: every bias entry matters in the comparisons below.
    for block in model.blocks:
        if hasattr(block.attn, "relative_position_bias_table"):
            torch.nn.init.normal_(block.attn.relative_position_bias_table, std=0.5)
            torch.nn.init.normal_(block.attn.q_bias, std=0.1)
            torch.nn.init.normal_(block.attn.v_bias, std=0.1)
    return model


def images(batch=3, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def hand_built_forward(model: VisionTransformer, x: torch.Tensor, keep_rate: float):
    """The model's math written out with the op references (eval mode, no dropout)."""
    patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=8)
    tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    tokens = tokens + model.pos_embed
    index = None
    if keep_rate < 1.0:
        tokens, index = sample_patches_reference(tokens, keep_rate)
    for block in model.blocks:
        attn = block.attn
        h = F.layer_norm(tokens, (tokens.shape[-1],), block.norm1.weight, block.norm1.bias, eps=1e-6)
        qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        q, k, v = F.linear(h, attn.qkv.weight, qkv_bias).reshape(len(x), -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        out = rpb_attention_reference(q, k, v, attn.relative_position_bias_table, index, grid_size=(4, 4))
        tokens = tokens + attn.proj(out.transpose(1, 2).reshape(len(x), -1, 32))
        h = F.layer_norm(tokens, (32,), block.norm2.weight, block.norm2.bias, eps=1e-6)
        tokens = tokens + block.mlp.fc2(F.gelu(block.mlp.fc1(h)))
    pooled = F.layer_norm(tokens[:, 1:].mean(1), (32,), model.fc_norm.weight, model.fc_norm.bias, eps=1e-6)
    return model.head(pooled), index


@pytest.mark.parametrize("rpb", [True, False])
@pytest.mark.parametrize("keep_rate", [1.0, 0.7, 0.3])
def test_forward_backward_shapes_and_gradients(keep_rate, rpb):
    model = tiny_model(rpb=rpb, layer_scale_init=0.1).train()
    x = images()
    tokens, index = model.forward_features(x, keep_rate=keep_rate)
    kept = num_kept_tokens(17, keep_rate) if keep_rate < 1.0 else 17
    assert tokens.shape == (3, kept, 32)
    assert (index is None) == (keep_rate == 1.0)
    if index is not None:
        assert index.shape == (3, kept) and index.dtype == torch.int64
        assert (index[:, 0] == 0).all() and (index[:, 1:] >= 1).all() and (index < 17).all()
    logits = model(x, keep_rate=keep_rate)
    assert logits.shape == (3, 5)
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    tables = [p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == (2 if rpb else 0)
    assert all(t.grad.abs().sum() > 0 for t in tables)


def test_keep_rate_one_skips_the_sampler_and_equals_the_unsampled_path():
    model = tiny_model().eval()
    x = images()

    def sampler_must_not_run(*args, **kwargs):
        raise AssertionError("the sampler ran at keep_rate == 1")

    expected = model(x)
    model.sampler.forward = sampler_must_not_run
    for call in (lambda: model(x, keep_rate=1.0), lambda: model(x)):
        torch.testing.assert_close(call(), expected, rtol=0, atol=0)
    # The same math by hand, no sampling, index=None in every attention.
    reference, _ = hand_built_forward(model, x, 1.0)
    torch.testing.assert_close(expected, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_impl,sampler_impl", [("pss", "pss"), ("published", "eager"), ("eager-index", "eager"),
                                                   ("sdpa-bias", "pss")])
@pytest.mark.parametrize("keep_rate", [0.8, 0.5, 0.2])
def test_sampled_rpb_path_matches_hand_built_reference(keep_rate, attn_impl, sampler_impl):
    model = tiny_model(attn_impl=attn_impl, sampler_impl=sampler_impl).eval()
    x = images()
    tokens, index = model.forward_features(x, keep_rate=keep_rate)
    expected_logits, expected_index = hand_built_forward(model, x, keep_rate)
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    logits = model.forward_head(tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    # Gradients too: the ops' registered backward inside the model against autograd of the references.
    params = [p for _, p in model.named_parameters()]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((logits * weights).sum(), params, allow_unused=True)
    expected_grads = torch.autograd.grad((expected_logits * weights).sum(), params, allow_unused=True)
    for (name, _), got, want in zip(model.named_parameters(), grads, expected_grads):
        assert (got is None) == (want is None), name
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_all_tokens_in_score_order_equal_the_unsampled_output():
    # keep_rate 0.99 keeps all 17 tokens but permuted by score: with the bias gathered by index,
    # attention is permutation-equivariant, so pooled logits must match the rho = 1 path.
    model = tiny_model().eval()
    x = images()
    _, index = model.forward_features(x, keep_rate=0.99)
    assert index.shape == (3, 17) and not torch.equal(index[0], torch.arange(17))
    torch.testing.assert_close(model(x, keep_rate=0.99), model(x), rtol=1e-5, atol=1e-5)


def test_keep_rate_attribute_and_per_call_override():
    model = tiny_model().eval()
    x = images()
    model.keep_rate = 0.5
    assert model.keep_rate == 0.5 and model.sampler.keep_rate == 0.5
    assert model.forward_features(x)[0].shape[1] == num_kept_tokens(17, 0.5)
    assert model.forward_features(x, keep_rate=0.3)[0].shape[1] == num_kept_tokens(17, 0.3)
    assert model.keep_rate == 0.5  # a per-call rate does not stick
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="keep_rate"):
            model.keep_rate = bad
        with pytest.raises(ValueError, match="keep_rate"):
            model(x, keep_rate=bad)
    with pytest.raises(TypeError, match="keep_rate"):
        model.keep_rate = "0.5"


def test_plain_variant_is_sdpa_without_bias():
    model = tiny_model(rpb=False).eval()
    assert all(isinstance(block.attn, PlainAttention) for block in model.blocks)
    assert not any("relative_position" in name for name, _ in model.named_parameters())
    attn = model.blocks[0].attn
    h = torch.randn(2, 9, 32)
    q, k, v = attn.qkv(h).reshape(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-1, -2) / 4.0).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(attn(h), expected, rtol=1e-5, atol=1e-5)
    # Without RPB the absolute embedding is switched on even for configs that drop it.
    assert create_model("vit_base", **{**TINY, "layer_scale_init": None}, rpb=False).pos_embed is not None
    assert create_model("vit_base", **TINY).pos_embed is None


def test_named_configs():
    expected = {"deit_tiny": (192, 12, 3), "deit_small": (384, 12, 6), "deit_base": (768, 12, 12),
                "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}
    assert set(MODEL_CONFIGS) == set(expected)
    for name, (dim, depth, heads) in expected.items():
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = create_model(name, img_size=384, num_classes=1000)
        assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (dim, depth, heads)
        assert model.patch_embed.patch_size == 16 and model.grid_size == (24, 24)
        assert model.blocks[0].attn.relative_position_bias_table.shape == (47 * 47 + 3, heads)
    with torch.device("meta"):
        vit_b = create_model("vit_base")
    # timm's vit_base_patch16_224 has 86,567,656 parameters. vit_base here drops the absolute table
    # (197 x 768) and the key bias (768 per layer), adds 12 RPB tables (27 * 27 + 3 rows x 12 heads)
    # and layer scale (2 x 768 per layer); fc_norm replaces timm's final norm one for one.
    expected_count = 86_567_656 - 197 * 768 - 12 * 768 + 12 * (27 * 27 + 3) * 12 + 12 * 2 * 768
    assert sum(p.numel() for p in vit_b.parameters()) == expected_count
    with pytest.raises(ValueError, match="img_size"):
        create_model("deit_tiny", img_size=100)
    with pytest.raises(ValueError, match="name"):
        create_model("resnet50")
    with pytest.raises(ValueError, match="attn_impl"):
        create_model("deit_tiny", attn_impl="fast")
    # Backends are checked at construction, named, not at the first forward at rho < 1.
    with pytest.raises(ValueError, match=r"sampler_backend must be one of \(None, 'torch', 'triton', 'cuda'\)"):
        create_model("deit_tiny", img_size=32, patch_size=8, sampler_backend="sdpa")
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        create_model("deit_tiny", img_size=32, patch_size=8, attn_backend="bogus", allocation="budget")


def test_wrong_image_size_is_rejected():
    with pytest.raises(ValueError, match=r"\(B, C, 32, 32\)"):
        tiny_model()(torch.randn(1, 3, 64, 64))


def test_drop_path_drops_whole_images_and_rescales():
    torch.manual_seed(0)
    layer = DropPath(0.5).train()
    x = torch.ones(64, 4, 8)
    out = layer(x)
    per_image = out.flatten(1)
    assert all(row.eq(0).all() or row.eq(2.0).all() for row in per_image)
    assert 10 < int(per_image[:, 0].eq(0).sum()) < 54
    torch.testing.assert_close(layer.eval()(x), x, rtol=0, atol=0)


def test_layer_scale_and_stochastic_depth_settings():
    model = tiny_model(layer_scale_init=0.1, drop_path_rate=0.2, depth=3)
    assert [round(b.drop_path1.drop_prob, 6) for b in model.blocks] == [0.0, 0.1, 0.2]
    torch.testing.assert_close(model.blocks[0].ls1.gamma, torch.full((32,), 0.1))
    assert not any(name.endswith("gamma") for name, _ in tiny_model().named_parameters())


# Logits here are ~0.3 at most (head std 0.02): tolerances are set from the measured autocast error
# (bf16 1.2e-3, fp16 1.4e-4 on logits; 7e-3 / 1e-3 relative on gradients) with ~8x margin, not from
# the logits' size, so a kernel that mishandles half inputs fails.
AUTOCAST_TOLERANCE = {torch.bfloat16: (1e-2, 5e-2), torch.float16: (2e-3, 1e-2)}  # (logits atol, grad rel)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_fp32(dtype):
    model = tiny_model().eval()
    x = images()
    reference = model(x, keep_rate=0.6)
    reference.sum().backward()
    reference_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        low = model(x, keep_rate=0.6)
        low.float().sum().backward()
    logits_atol, grad_rtol = AUTOCAST_TOLERANCE[dtype]
    torch.testing.assert_close(low.float(), reference, rtol=0, atol=logits_atol)
    for name, p in model.named_parameters():
        want = reference_grads[name]
        assert (p.grad - want).norm() <= grad_rtol * want.norm() + 1e-8, name


def test_torch_compile_matches_eager():
    model = tiny_model().train()
    compiled = torch.compile(model, backend="aot_eager")
    x = images()
    for keep_rate in (1.0, 0.5):
        model.keep_rate = keep_rate
        torch.manual_seed(3)
        out = compiled(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
        out.sum().backward()
    assert torch.isfinite(model.blocks[0].attn.relative_position_bias_table.grad).all()


def test_sampler_and_attention_backends_are_set_separately():
    # sample_patches has a cuda backend that rpb_attention lacks: the model takes one per op.
    model = create_model("deit_tiny", img_size=32, num_classes=10, sampler_backend="cuda", attn_backend="triton")
    assert model.sampler.backend == "cuda"
    assert {block.attn.backend for block in model.blocks} == {"triton"}


@pytest.mark.triton
@pytest.mark.parametrize("keep_rate", [1.0, 0.6])
def test_training_step_on_the_triton_kernels_matches_the_torch_backends(keep_rate, monkeypatch, device):
    """The whole model on the Triton kernels (the interpreter on CPU, the GPU when there is one):
    same logits and same gradient for every parameter as on the torch backends, at rho = 1
    (index=None) and with sampling."""
    from pss_kernels.ops.rpb_attention import triton_backward, triton_forward
    from pss_kernels.ops.sample_patches import triton_sample
    launches = []
    for module, name in ((triton_forward, "rpb_attention_forward"), (triton_backward, "rpb_attention_backward"),
                         (triton_sample, "sample_patches_forward")):
        def counted(*args, _real=getattr(module, name), _name=name, **kwargs):
            launches.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    reference = tiny_model().to(device)
    kernels = tiny_model(sampler_backend="triton", attn_backend="triton").to(device)
    x = images(batch=2).to(device)
    grads = []
    for model in (reference, kernels):
        model.train()
        model.keep_rate = keep_rate
        torch.manual_seed(5)  # drop path draws
        logits = model(x)
        logits.square().mean().backward()
        grads.append((logits.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (ref_logits, ref_grads), (got_logits, got_grads) = grads
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert ref_grads.keys() == got_grads.keys()
    for name, want in ref_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    tables = [name for name in ref_grads if name.endswith("relative_position_bias_table")]
    assert tables and all(ref_grads[name].abs().sum() > 0 for name in tables)
    depth = len(kernels.blocks)  # every launch came from the Triton model (the reference ran first, on torch)
    assert sorted(launches) == sorted(["rpb_attention_forward"] * depth + ["rpb_attention_backward"] * depth
                                      + ["sample_patches_forward"] * (keep_rate < 1))


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_reaches_every_attention_backward(deterministic, monkeypatch):
    # create_model(deterministic=...) -> Block -> RelPosAttention -> rpb_attention(deterministic=...):
    # the backward of every block gets the flag (on the triton backend it picks the ordered accumulation).
    from pss_kernels.ops.rpb_attention import torch_attention
    seen = []

    def spy(*args, _real=torch_attention.rpb_attention_backward, **kwargs):
        seen.append(args[11])  # (grad_out, q, k, v, table, index, out, lse, grid, prefix, scale, deterministic, ..)
        return _real(*args, **kwargs)

    monkeypatch.setattr(torch_attention, "rpb_attention_backward", spy)
    model = tiny_model(deterministic=deterministic, attn_backend="torch").train()
    assert {block.attn.deterministic for block in model.blocks} == {deterministic}
    model(images(batch=2), keep_rate=0.6).sum().backward()
    assert seen == [deterministic] * len(model.blocks)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        tiny_model(deterministic=1)
