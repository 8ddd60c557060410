"""Property-based differential tests (Hypothesis) of both ops, every backend against its reference.

sample_patches: random B, N, C, kept count / keep rate, prefix count, scorer (l1, l2, seeded random,
given scores of every accepted dtype and strided), order, strided inputs (gaps filled with NaN),
repeated rows (ties), ±0, ±inf, NaN, the dtype's largest value and subnormals; the reference is first
checked against the contract of DESIGN.md (a stable NaN-first descending sort in plain Python), then
every backend's indices, kept rows and input gradient must equal it bit for bit.
rpb_attention: random B, H, D, grid, prefix count, index patterns (None, sorted, shuffled, repeated
positions / CLS, from sample_patches), index dtypes and strides, q/k/v strides, dtypes, scale, frozen
or trainable (float32 or activation-dtype) tables, deterministic mode, the CLS attention; out and the
q, k, v, table gradients against the reference within the existing tests' TOLERANCES.
sample_patches_varlen's torch backend against the image-by-image oracle; the budget allocation
against a plain-Python greedy of its contract (ties, ±inf, NaN, any bounds and rate).

Element values are built so that every float32 summation order gives the same score (token_values),
so indices are comparable exactly across kernels; a second sample_patches property puts near ties
that only a 16-bit accumulator would merge into every example. The rpb_attention scale stays where
the TOLERANCES hold (SCALE_FACTOR); test_half_precision_gradients_at_large_logits keeps the smallest
example found past it. Few examples, derandomized, on CPU (the Triton interpreter runs each program
instance in Python); more on a GPU host, and four times as many on CPU for backends that need no
interpreter. PSS_HYPOTHESIS_PROFILE picks a profile (pss-cpu, pss-gpu, or pss-explore: 1000 fresh
random examples per test, for bug hunts).
"""
import contextlib
import math
import os
from unittest import mock

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis")  # the `test` extra installs it
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

from pss_kernels import rpb_attention, sample_patches  # noqa: E402
from pss_kernels.ops.rpb_attention.reference import bias_table_rows, rpb_attention_reference  # noqa: E402
from pss_kernels.ops.sample_patches.reference import sample_patches_reference  # noqa: E402
from attention_cases import TOLERANCES, reference_cls_attention  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
_COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large])
settings.register_profile("pss-cpu", max_examples=15, **_COMMON)
settings.register_profile("pss-gpu", max_examples=200, **_COMMON)
settings.register_profile("pss-explore", **{**_COMMON, "max_examples": 1000, "derandomize": False})  # bug hunts
# Applied per test (not loaded globally, so other Hypothesis tests keep their own settings).
PROFILE = settings.get_profile(os.environ.get("PSS_HYPOTHESIS_PROFILE", "pss-gpu" if HAS_CUDA else "pss-cpu"))


def profile_for(backend: str) -> settings:
    """PROFILE; on CPU four times its examples for the backends that run no Triton interpreter."""
    if HAS_CUDA or backend == "triton" or "PSS_HYPOTHESIS_PROFILE" in os.environ:
        return PROFILE
    return settings(PROFILE, max_examples=4 * PROFILE.max_examples)


# Triton 3.9's interpreter converts bfloat16 subnormals to float32 wrongly (triton/runtime/interpreter.py,
# _convert_float: 2^-133 -> 0, 3 * 2^-133 -> 2^-127, 65 * 2^-133 -> 2^-132), so l1 / l2 scores of such rows are
# wrong there and only there: the GPU tests keep them (a GPU converts bfloat16 by a shift).
INTERPRETED = not HAS_CUDA
SAMPLING_BACKENDS = ("torch", "triton", "cuda")   # conftest skips, with the reason, what cannot run here
ATTENTION_BACKENDS = ("torch", "sdpa", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-for-bit equality, any strides, -0.0 != +0.0; NaN == NaN whatever its sign and payload
    (PyTorch's CPU gather of bfloat16 rewrites a NaN 0x7fc0 as 0xffff, the kernels copy the bits)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    nan = want.isnan()
    got_bits, want_bits = (t.contiguous().view(INT_VIEW[t.dtype]) for t in (got, want))
    return torch.equal(got.isnan(), nan) and torch.equal(got_bits[~nan], want_bits[~nan])


def smallest_subnormal(dtype: torch.dtype) -> float:
    finfo = torch.finfo(dtype)
    return finfo.smallest_normal * finfo.eps


# =============================================================================================
# sample_patches
# =============================================================================================
SPECIALS = ("+0", "-0", "+inf", "-inf", "nan", "+max", "-max")
X_LAYOUTS = ("contiguous", "channels-major", "token-major", "sliced-channels", "sliced-tokens")


def special_value(name: str, dtype: torch.dtype) -> float:
    return {"+0": 0.0, "-0": -0.0, "+inf": math.inf, "-inf": -math.inf, "nan": math.nan,
            "+max": torch.finfo(dtype).max, "-max": -torch.finfo(dtype).max}[name]


def with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A leaf tensor holding `values` with the strides of `layout`; gaps of sliced layouts hold NaN,
    so a kernel that reads past the strides changes scores or rows."""
    batch, num_tokens, channels = values.shape
    if layout == "contiguous":
        out = values.clone()
    elif layout == "channels-major":
        out = values.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "token-major":
        out = values.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "sliced-channels":
        storage = torch.full((batch, num_tokens, 2 * channels), math.nan, dtype=values.dtype, device=values.device)
        storage[:, :, 1::2] = values
        out = storage[:, :, 1::2]
    else:
        storage = torch.full((batch, 2 * num_tokens, channels), math.nan, dtype=values.dtype, device=values.device)
        storage[:, 1::2] = values
        out = storage[:, 1::2]
    assert same_bits(out, values)
    return out.detach()


ROW_KINDS = ("quarters", "subnormal", "wide")
EVERY_ELEMENT = st.nothing()  # arrays(fill=...): draw every element (the default fills most with one value)


@st.composite
def token_values(draw, batch, num_tokens, channels, dtype, near_ties=False, subnormals=True):
    """(B, N, C) float64 values exactly representable in `dtype`. Each row is one of ROW_KINDS:
    multiples of 1/4 in [-2, 2]; multiples of the dtype's smallest subnormal; m * 2^e with |m| <= 3,
    0 <= e <= 8 (float32 sums exact, while a float16/bfloat16 accumulator of |x| rounds past 2048
    / 256). Then some elements become special values and some rows are copied onto others (exact
    ties, or near ties that only a 16-bit accumulator rounds into ties). Every float32 order of
    summing |x| or x^2 over a row gives one result."""
    multiples = draw(arrays(np.int64, (batch, num_tokens, channels), elements=st.integers(-8, 8), fill=EVERY_ELEMENT))
    kinds = draw(arrays(np.int64, (batch, num_tokens), elements=st.integers(0, len(ROW_KINDS) - 1),
                         fill=EVERY_ELEMENT))
    exponents = draw(arrays(np.int64, (batch, num_tokens, channels), elements=st.integers(0, 8), fill=EVERY_ELEMENT))
    if not subnormals:
        kinds[kinds == 1] = 0
    unit = np.where(kinds == 1, smallest_subnormal(dtype), 0.25)[..., None]
    values = np.where((kinds == 2)[..., None], np.clip(multiples, -3, 3) * 2.0 ** exponents, multiples * unit)
    specials = draw(st.lists(st.tuples(st.integers(0, batch - 1), st.integers(0, num_tokens - 1),
                                       st.integers(0, channels - 1), st.sampled_from(SPECIALS)), max_size=6))
    for b, t, c, name in specials:
        if name.endswith("max") and dtype == torch.float16 and kinds[b, t] == 2:
            name = name[0] + "inf"  # 65504^2 + (m 2^e)^2 is not exact in float32: keep those rows exact
        values[b, t, c] = special_value(name, dtype)
    copies = draw(st.lists(st.tuples(st.integers(0, batch - 1), st.integers(0, num_tokens - 1),
                                     st.integers(0, num_tokens - 1), st.just(True) if near_ties else st.booleans()),
                           min_size=int(near_ties), max_size=4 * (1 + near_ties)))
    wide = np.clip(multiples, -3, 3) * 2.0 ** exponents
    for b, source, target, near in copies:
        if near and source != target:
            # a near tie: a wide source row, and a copy whose smallest-exponent element is one 2^e further
            # from (lower position) or nearer to zero, so that the lower position has the smaller sum
            # (the later position ranks first in float32, the lower one in a 16-bit accumulator's tie)
            values[b, source] = wide[b, source]
            m, e = np.clip(multiples[b, source], -3, 3), exponents[b, source]
            movable = (np.abs(m) > 0) | (target > source)
            if not movable.any():
                continue
            c = int(np.argmin(np.where(movable, e, 99)))
            values[b, target] = values[b, source]
            values[b, target, c] = (abs(m[c]) + (1 if target > source else -1)) * 2.0 ** e[c]
        else:
            values[b, target] = values[b, source]
    return values


GIVEN_SCORE = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 1.0 + 2.0 ** -40, 2.0, math.inf, -math.inf, math.nan, -math.nan, 5e-324]),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True, width=32),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
)
# Few distinct values: ties everywhere, -0.0 next to +0.0 at the keep boundary, NaN among them.
TIED_SCORE = st.sampled_from([-0.0, 0.0, 1.0, math.nan, -math.inf])


@st.composite
def sampling_cases(draw, backend, dtypes=DTYPES, scorers=("l1", "l2", "random", "given"), near_ties=False):
    dtype = draw(st.sampled_from(dtypes))
    num_prefix_tokens = draw(st.sampled_from([0, 1, 2]))
    batch = draw(st.integers(1, 3))
    num_tokens = draw(st.integers(num_prefix_tokens + 1 + near_ties, num_prefix_tokens + 20))
    channels = draw(st.integers(1, 9))
    keep = draw(st.sampled_from(["count", "rate", "count", "rate"] + ([] if near_ties else ["one"])))
    if keep == "count":  # every kept count, 1 patch .. all of them (keep_rate < 1 may still keep all)
        keep_rate = draw(st.integers(num_prefix_tokens + 1, num_tokens)) / num_tokens
        if keep_rate == 1.0:
            keep_rate = math.nextafter(1.0, 0.0)
    elif keep == "rate":
        keep_rate = draw(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True))
    else:
        keep_rate = 1.0
    scorer = draw(st.sampled_from(scorers))
    num_patches = num_tokens - num_prefix_tokens
    case = dict(dtype=dtype, num_prefix_tokens=num_prefix_tokens, keep_rate=keep_rate, scorer=scorer,
                order=draw(st.sampled_from(["score", "spatial"])), layout=draw(st.sampled_from(X_LAYOUTS)),
                values=draw(token_values(batch, num_tokens, channels, dtype, near_ties, subnormals=not (
                    INTERPRETED and backend == "triton" and dtype == torch.bfloat16))),
                grad=draw(st.sampled_from(["dense", "expanded", "special"])), grad_seed=draw(st.integers(0, 2 ** 16)),
                seed=draw(st.integers(0, 2 ** 16)) if scorer == "random" else None,
                unfused=backend == "triton" and draw(st.booleans()))
    if scorer == "given":
        case["scores"] = draw(arrays(np.float64, (batch, num_patches),
                                     elements=draw(st.sampled_from([TIED_SCORE, GIVEN_SCORE])), fill=EVERY_ELEMENT))
        case["scores_dtype"] = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
        case["scores_transposed"] = draw(st.booleans())
    return case


def contract_index(scores: torch.Tensor, num_kept: int, num_prefix_tokens: int, order: str) -> torch.Tensor:
    """DESIGN.md's index, in plain Python: the prefix, then the top patches by float32 score,
    descending, NaN above everything, -0.0 == +0.0, ties to the lower position (or ascending
    position for order="spatial")."""
    rows = []
    for image in scores.tolist():
        def key(t):
            s = image[t]
            return (0, 0.0, t) if math.isnan(s) else (1, -s, t)
        ranked = sorted(range(len(image)), key=key)[:num_kept - num_prefix_tokens]
        if order == "spatial":
            ranked.sort()
        rows.append(list(range(num_prefix_tokens)) + [t + num_prefix_tokens for t in ranked])
    return torch.tensor(rows, dtype=torch.int64)


def contract_scores(x: torch.Tensor, case, scores, generator) -> torch.Tensor:
    """float32 scores of DESIGN.md: l1 / l2 summed exactly (float64, exact for these values) and
    rounded once to float32, the seeded uniform draw, or the given scores cast to float32."""
    patches = x.detach()[:, case["num_prefix_tokens"]:].cpu().double()
    if case["scorer"] == "l1":
        return patches.abs().sum(-1).float()
    if case["scorer"] == "l2":
        return patches.square().sum(-1).float()
    if case["scorer"] == "random":
        return torch.rand(patches.shape[:2], generator=generator, device=x.device, dtype=torch.float32).cpu()
    return scores.float().cpu()


def make_grad(shape, dtype, device, kind, seed):
    if kind == "expanded":  # what x_kept.sum() hands backward: stride 0 everywhere
        return torch.ones((), dtype=dtype, device=device).expand(shape)
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randint(-8, 9, shape, generator=generator) * 0.25
    if kind == "special":
        flat = grad.view(-1)
        picks = torch.randint(0, flat.numel(), (4,), generator=generator)
        flat[picks] = torch.tensor([math.nan, math.inf, -0.0, -math.inf])
    return grad.to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend", SAMPLING_BACKENDS)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # x^2 of the largest values
def test_sample_patches_matches_reference(backend, device):
    @profile_for(backend)
    @given(case=sampling_cases(backend))
    def check(case):
        check_sampling_case(case, backend, device)

    check()


@pytest.mark.parametrize("backend", SAMPLING_BACKENDS)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # x^2 of the largest values
def test_sample_patches_scores_half_precision_rows_in_float32(backend, device):
    """float16 / bfloat16 rows with near ties in every example: sums one 2^e apart, past where a
    16-bit accumulator rounds them into a tie (broken to the lower position, which has the smaller
    float32 score). Scores must accumulate in float32 (DESIGN.md)."""
    @profile_for(backend)
    @given(case=sampling_cases(backend, dtypes=(torch.float16, torch.bfloat16), scorers=("l1", "l2"),
                               near_ties=True))
    def check(case):
        check_sampling_case(case, backend, device)

    check()


def check_sampling_case(case, backend, device):
    dtype, num_prefix_tokens, scorer, order = case["dtype"], case["num_prefix_tokens"], case["scorer"], case["order"]
    x = with_layout(torch.from_numpy(case["values"]).to(dtype).to(device), case["layout"]).requires_grad_()
    batch, num_tokens, channels = x.shape
    scores = None
    if scorer == "given":
        scores = torch.from_numpy(case["scores"]).to(case["scores_dtype"]).to(device)
        if case["scores_transposed"]:
            scores = scores.t().contiguous().t()
    generator = ((lambda: torch.Generator(device=device).manual_seed(case["seed"])) if scorer == "random"
                 else (lambda: None))
    options = dict(scorer=scorer, num_prefix_tokens=num_prefix_tokens, order=order, scores=scores)

    if case["keep_rate"] == 1.0:
        x_kept, index = sample_patches(x, 1.0, generator=generator(), backend=backend, **options)
        assert x_kept is x and torch.equal(index, torch.arange(num_tokens, device=device).expand(batch, -1))
        return

    # The oracle: the reference, first held to DESIGN.md's contract.
    ref_kept, ref_index = sample_patches_reference(x.detach(), case["keep_rate"], generator=generator(), **options)
    num_kept = max(num_prefix_tokens + 1, round(case["keep_rate"] * num_tokens))
    want_index = contract_index(contract_scores(x, case, scores, generator()), num_kept, num_prefix_tokens, order)
    assert torch.equal(ref_index.cpu(), want_index), (ref_index, want_index)
    assert same_bits(ref_kept, x.detach().gather(1, ref_index[..., None].expand(-1, -1, channels)))

    if case["unfused"]:  # the Triton score -> select -> gather path of P > FUSED_MAX_PATCHES
        from pss_kernels.ops.sample_patches import triton_sample
        patch = mock.patch.object(triton_sample, "FUSED_MAX_PATCHES", 0)
    else:
        patch = contextlib.nullcontext()
    with patch:
        x_kept, index = sample_patches(x, case["keep_rate"], generator=generator(), backend=backend, **options)
        grad_kept = make_grad(x_kept.shape, dtype, device, case["grad"], case["grad_seed"])
        (grad_x,) = torch.autograd.grad(x_kept, x, grad_kept)
    assert index.dtype == torch.int64 and not index.requires_grad and index.shape == (batch, num_kept)
    assert torch.equal(index, ref_index), (index, ref_index)
    assert x_kept.dtype == dtype and same_bits(x_kept, ref_kept), (x_kept, ref_kept)
    want_grad = torch.zeros(x.shape, dtype=dtype, device=device).scatter(
        1, ref_index[..., None].expand(-1, -1, channels), grad_kept)
    assert same_bits(grad_x, want_grad), (grad_x, want_grad)  # dropped rows: exact +0.0


# =============================================================================================
# rpb_attention
# =============================================================================================
INDEX_PATTERNS = ("none", "sorted", "shuffled", "repeated", "sampled")
QKV_LAYOUTS = ("qkv-view", "contiguous", "head-dim-strided")
ATTENTION_TOLERANCES = {**TOLERANCES, torch.float64: dict(rtol=1e-10, atol=1e-10)}
# scale = factor * D ** -0.5, logits of the size the TOLERANCES were set for: past them the flash-style
# backward (lse, delta from the stored O) loses precision the reference keeps, see
# test_half_precision_gradients_at_large_logits.
SCALE_FACTOR = (0.25, 2.0)


def attention_dtypes(backend):
    if backend == "triton":
        # The Triton interpreter runs tl.dot on bf16 bit patterns as integers (test_rpb_attention.py).
        return (torch.float32, torch.float16) + ((torch.bfloat16,) if HAS_CUDA else ())
    return DTYPES + (torch.float64,)


@st.composite
def attention_cases(draw, backend):
    dtype = draw(st.sampled_from(attention_dtypes(backend)))
    num_prefix_tokens = draw(st.sampled_from([0, 1]))
    grid_size = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    num_positions = num_prefix_tokens + grid_size[0] * grid_size[1]
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    head_dim = draw(st.one_of(st.sampled_from([16, 32]), st.integers(1, 40)))
    pattern = draw(st.sampled_from(INDEX_PATTERNS))
    index = None
    if pattern in ("sorted", "shuffled"):
        num_tokens = draw(st.integers(1, num_positions))
        rows = [draw(st.permutations(range(num_positions)))[:num_tokens] for _ in range(batch)]
        index = [sorted(row) for row in rows] if pattern == "sorted" else rows
    elif pattern == "repeated":  # a position (the CLS token when there is one) at several places
        num_tokens = draw(st.integers(2, num_positions + 3))
        index = [draw(st.lists(st.integers(0, num_positions - 1), min_size=num_tokens, max_size=num_tokens))
                 for _ in range(batch)]
        for row in index:
            for slot in draw(st.lists(st.integers(0, num_tokens - 1), min_size=2, max_size=4, unique=True)):
                row[slot] = 0
    elif pattern == "sampled" and num_positions > num_prefix_tokens + 1:
        index = dict(keep_rate=draw(st.floats(0.1, 0.99)), order=draw(st.sampled_from(["score", "spatial"])))
    bias_dtype = draw(st.sampled_from(sorted({torch.float32, dtype}, key=str)))
    scale = draw(st.one_of(st.none(), st.floats(*SCALE_FACTOR).map(lambda f: f * head_dim ** -0.5)))
    return dict(dtype=dtype, num_prefix_tokens=num_prefix_tokens, grid_size=grid_size, batch=batch, heads=heads,
                head_dim=head_dim, index=index, index_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
                index_transposed=draw(st.booleans()), layout=draw(st.sampled_from(QKV_LAYOUTS)),
                scale=scale, bias_dtype=bias_dtype,
                trainable=draw(st.booleans()),
                # a constant added to the whole table changes no softmax but tests overflow handling; in
                # float32 at the default scale only, as the existing test of it (a half-precision bias
                # loses the table's detail at that size, and the kernels' lse ~1e-5 of its precision)
                bias_shift=(draw(st.sampled_from([0.0, -80.0, 90.0])) if dtype == torch.float32 and scale is None
                            else 0.0),
                deterministic=draw(st.booleans()), return_cls=num_prefix_tokens == 1 and draw(st.booleans()),
                grad=draw(st.sampled_from(["dense", "expanded"])), seed=draw(st.integers(0, 2 ** 16)))


def make_attention_inputs(case, device):
    generator = torch.Generator().manual_seed(case["seed"])
    grid_size, num_prefix_tokens = case["grid_size"], case["num_prefix_tokens"]
    batch, heads, head_dim = case["batch"], case["heads"], case["head_dim"]
    num_positions = num_prefix_tokens + grid_size[0] * grid_size[1]
    index = case["index"]
    if isinstance(index, dict):
        tokens = torch.randn(batch, num_positions, 4, generator=generator)
        _, index = sample_patches(tokens, index["keep_rate"], num_prefix_tokens=num_prefix_tokens,
                                  order=index["order"], backend="torch")
    elif index is not None:
        index = torch.tensor(index)
    if index is not None:
        index = index.to(device=device, dtype=case["index_dtype"])
        if case["index_transposed"]:
            index = index.t().contiguous().t()
    num_tokens = num_positions if index is None else index.shape[1]
    dtype = case["dtype"]
    if case["layout"] == "qkv-view":  # views into one (B, n, 3, H, D) tensor, as a model makes them
        qkv = torch.randn(batch, num_tokens, 3, heads, head_dim, generator=generator).to(device, dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
    elif case["layout"] == "contiguous":
        q, k, v = torch.randn(3, batch, heads, num_tokens, head_dim, generator=generator).to(device, dtype)
    else:  # head dim with a non-unit stride
        qkv = torch.randn(3, batch, heads, head_dim, num_tokens, generator=generator).to(device, dtype)
        q, k, v = qkv.transpose(-1, -2)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    table = torch.randn(bias_table_rows(grid_size, num_prefix_tokens), heads, generator=generator) + case["bias_shift"]
    table = table.to(device, case["bias_dtype"]).requires_grad_(case["trainable"])
    return q, k, v, table, index


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_rpb_attention_matches_reference(backend, device):
    @profile_for(backend)
    @given(case=attention_cases(backend))
    def check(case):
        q, k, v, table, index = make_attention_inputs(case, device)
        options = dict(grid_size=case["grid_size"], num_prefix_tokens=case["num_prefix_tokens"], scale=case["scale"])
        def call():
            return rpb_attention(q, k, v, table, index, backend=backend, deterministic=case["deterministic"],
                                 return_cls_attention=case["return_cls"], **options)
        repeats = index is not None and any(len(set(row)) < len(row) for row in index.tolist())
        if backend == "triton" and case["deterministic"] and repeats:
            with pytest.raises(ValueError, match="must not repeat a position"):
                call()
            return
        result = call()
        out, cls_attention = result if case["return_cls"] else (result, None)
        expected = rpb_attention_reference(q, k, v, table, index, **options)
        tolerance = ATTENTION_TOLERANCES[case["dtype"]]
        assert out.dtype == q.dtype and out.shape == q.shape
        torch.testing.assert_close(out, expected, **tolerance)

        leaves = (q, k, v, table) if case["trainable"] else (q, k, v)
        if case["grad"] == "expanded":
            grad_out = torch.ones((), dtype=q.dtype, device=device).expand(q.shape)
        else:
            generator = torch.Generator().manual_seed(case["seed"] + 1)
            grad_out = torch.randn(q.shape, generator=generator).to(device, q.dtype)
        wants = torch.autograd.grad(expected, leaves, grad_out)
        if case["bias_shift"]:
            # logits near +-90 keep ~1e-5 of float32 precision in lse; the tolerance of
            # test_padding_query_rows_stay_out_of_the_backward_with_a_large_bias
            tolerance = dict(rtol=1e-4, atol=1e-4)
        out.backward(grad_out)
        for name, leaf, want in zip(("dq", "dk", "dv", "dbias_table"), leaves, wants):
            got = leaf.grad
            assert got is not None and got.dtype == want.dtype and got.shape == want.shape, name
            torch.testing.assert_close(got, want, **tolerance, msg=lambda m: f"{name}: {m}")
        if not case["trainable"]:
            assert table.grad is None
        if cls_attention is not None:
            assert cls_attention.shape == (q.shape[0], q.shape[2]) and cls_attention.dtype == torch.float32
            want = reference_cls_attention(q.detach(), k.detach(), table.detach(), index, case["grid_size"], 1)
            if case["scale"] is None:  # reference_cls_attention uses the default scale
                torch.testing.assert_close(cls_attention, want.float(), **ATTENTION_TOLERANCES[
                    torch.float32 if case["dtype"] in (torch.float32, torch.float64) else case["dtype"]])
            torch.testing.assert_close(cls_attention.sum(-1), torch.ones_like(cls_attention[:, 0]), rtol=0, atol=1e-3)

    check()


# The smallest failing example the property found before SCALE_FACTOR bounded the logits (scale 1.0 at
# D = 32: logits ~ N(0, 32)), as DESIGN.md's half-precision criterion (flash-attention's): each error
# against a float32 reference at most twice that of the same computation in plain float16 PyTorch.
LARGE_LOGITS_CASE = dict(dtype=torch.float16, num_prefix_tokens=0, grid_size=(2, 4), batch=1, heads=1, head_dim=32,
                         index=[[0, 1, 2, 3, 4]], index_dtype=torch.int64, index_transposed=False, layout="qkv-view",
                         scale=1.0, bias_dtype=torch.float16, trainable=False, bias_shift=0.0, deterministic=False,
                         return_cls=False, grad="dense", seed=0)
# The torch backend computes delta as rowsum(P * dP) in float32 (fixed); the Triton backward still reads
# the O its forward stored in the activation dtype (as FlashAttention's does): a known defect, open.
DELTA_FROM_HALF_OUT = pytest.mark.xfail(strict=True, reason=(
    "the triton backward's delta = rowsum(dO * O) reads the float16 O the forward stored: with a peaked softmax "
    "its rounding reaches dq and dk (errors 8.8e-3 / 1.1e-2 against a float32 reference, float16 PyTorch's "
    "2.7e-3 / 2.3e-3; ~1e-3 with delta from a float32 O)"))


@pytest.mark.parametrize("backend", ["torch", "sdpa", pytest.param("triton", marks=DELTA_FROM_HALF_OUT)])
def test_half_precision_gradients_at_large_logits(backend, device):
    from pss_kernels.ops.rpb_attention.reference import gather_bias
    case = LARGE_LOGITS_CASE
    q, k, v, table, index = make_attention_inputs(case, device)
    options = dict(grid_size=case["grid_size"], num_prefix_tokens=case["num_prefix_tokens"], scale=case["scale"])
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, q.dtype)

    def errors(run, dtype):
        leaves = [t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v)]
        out = run(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.cpu().to(dtype))]

    def plain_half(q, k, v):  # what PyTorch computes in float16, op by op
        bias = gather_bias(table.cpu(), index.cpu(), case["grid_size"], case["num_prefix_tokens"])
        logits = q @ k.transpose(-1, -2) * case["scale"] + bias
        return logits.softmax(-1) @ v

    want = errors(lambda q, k, v: rpb_attention_reference(q, k, v, table.cpu().float(), index.cpu(), **options),
                  torch.float32)
    half = errors(plain_half, torch.float16)
    got = errors(lambda q, k, v: rpb_attention(q.to(device), k.to(device), v.to(device), table, index,
                                               backend=backend, **options), torch.float16)
    for name, g, h, w in zip(("out", "dq", "dk", "dv"), got, half, want):
        error, bound = (g.float().cpu() - w).abs().max().item(), 2 * (h.float() - w).abs().max().item()
        assert error <= bound, f"{name}: error {error:.2e} > 2x float16 PyTorch's {bound / 2:.2e}"


@st.composite
def varlen_sampling_cases(draw):
    """Batches of images keeping different counts (some whole, some at the minimum), integer-valued
    rows (many exact ties), or given scores with ties, ±inf and NaN."""
    batch = draw(st.integers(1, 6))
    num_prefix_tokens = draw(st.sampled_from([0, 1]))
    num_tokens = draw(st.integers(num_prefix_tokens + 1, 40))
    counts = draw(st.lists(st.sampled_from([num_prefix_tokens + 1, num_tokens]) | st.integers(num_prefix_tokens + 1,
                                                                                            num_tokens),
                           min_size=batch, max_size=batch))
    scorer = draw(st.sampled_from(["l1", "l2", "given"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    channels = draw(st.integers(1, 5))
    values = st.integers(-2, 2).map(float)
    x = torch.tensor(draw(arrays(np.float64, (batch, num_tokens, channels), elements=values))).to(dtype)
    scores = None
    if scorer == "given":
        special = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0])
        scores = torch.tensor(draw(arrays(np.float64, (batch, num_tokens - num_prefix_tokens),
                                          elements=values | special)))
    return dict(x=x, counts=torch.tensor(counts), scorer=scorer, scores=scores, num_prefix_tokens=num_prefix_tokens,
                order=draw(st.sampled_from(["score", "spatial"])))


def test_batched_torch_varlen_sampler_equals_the_per_image_oracle(device):
    """The torch backend of sample_patches_varlen (one batched sort and gather, no host read) keeps
    what the oracle keeps image by image (reference.py): the same tokens, positions, offsets, bit for
    bit, and its backward map sends each packed row back to its own token."""
    from pss_kernels import sample_patches_varlen
    from pss_kernels.ops.varlen.reference import sample_patches_varlen_reference

    @profile_for("torch")
    @given(case=varlen_sampling_cases())
    def check(case):
        x, counts = case["x"].to(device), case["counts"].to(device)
        scores = None if case["scores"] is None else case["scores"].to(device)
        options = dict(scorer=case["scorer"], num_prefix_tokens=case["num_prefix_tokens"], order=case["order"],
                       scores=scores)
        want = sample_patches_varlen_reference(x, counts, **options)
        x = x.requires_grad_()
        got = sample_patches_varlen(x, counts, backend="torch", **options)
        for name, expected, actual in zip(("tokens", "positions", "cu_seqlens"), want, got):
            assert expected.dtype == actual.dtype, name
            assert torch.equal(actual, expected), name
        total = int(counts.sum())
        weight = torch.arange(1, total + 1, device=device, dtype=x.dtype)[:, None].expand(-1, x.shape[2])
        (grad,) = torch.autograd.grad(got[0], x, weight)
        image = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
        expected = torch.zeros_like(x)
        expected[image, got[1]] = weight
        assert torch.equal(grad, expected)

    check()


def _budget_counts_by_greedy(scores, keep_rate, num_prefix_tokens, min_patches, max_patches):
    """The budget policy as its contract states it, in plain Python: every image first keeps its
    min_patches best patches; the rest of the batch total round(rho B N) (at least that floor) goes
    slot by slot to the best remaining patch of the batch — NaN above every number, equal scores to the
    lower image, then its better-ranked patch — skipping images already at max_patches."""
    batch, patches = len(scores), len(scores[0])
    total = max(round(keep_rate * batch * (num_prefix_tokens + patches)),
                batch * (num_prefix_tokens + min_patches))
    def key(value):  # descending, NaN first
        return (0, 0.0) if math.isnan(value) else (1, -value)
    ranked = [sorted(row, key=key) for row in scores]  # sorted() is stable: ties keep the lower position
    slots = sorted(((key(ranked[b][r]), b, r) for b in range(batch) for r in range(min_patches, max_patches)))
    counts = [min_patches] * batch
    for _, b, _ in slots[:total - batch * (num_prefix_tokens + min_patches)]:
        counts[b] += 1
    return [c + num_prefix_tokens for c in counts], total


@st.composite
def budget_cases(draw):
    """Small batches of patch scores with many exact ties, ±inf and NaN, any bounds and keep rate."""
    batch, patches = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    values = st.integers(0, 3).map(float) | st.sampled_from([math.nan, math.inf, -math.inf, -0.0])
    scores = draw(st.lists(st.lists(values, min_size=patches, max_size=patches), min_size=batch, max_size=batch))
    min_patches = draw(st.integers(1, patches))
    max_patches = draw(st.integers(min_patches, patches))
    return dict(scores=scores, keep_rate=draw(st.floats(0.01, 1.0)), num_prefix_tokens=draw(st.sampled_from([0, 1])),
                min_patches=min_patches, max_patches=max_patches)


def test_budget_allocation_equals_the_greedy_contract(device):
    """budget_keep_counts (one batched top-K on the device, no host read) gives every image the count
    the slot-by-slot greedy of its contract gives, and the batch total static_total promises; a total
    past B * max_patches is refused with the argument named."""
    from pss_kernels.ops.varlen import budget_keep_counts, static_total

    @settings(PROFILE, max_examples=8 * PROFILE.max_examples)
    @given(case=budget_cases())
    def check(case):
        scores = torch.tensor(case["scores"], dtype=torch.float64, device=device)
        options = dict(min_patches=case["min_patches"], max_patches=case["max_patches"])
        want, total = _budget_counts_by_greedy(case["scores"], case["keep_rate"], case["num_prefix_tokens"], **options)
        if total - len(want) * case["num_prefix_tokens"] > len(want) * case["max_patches"]:
            with pytest.raises(ValueError, match="max_patches"):
                budget_keep_counts(scores, case["keep_rate"], case["num_prefix_tokens"], **options)
            return
        got = budget_keep_counts(scores, case["keep_rate"], case["num_prefix_tokens"], **options)
        assert got.device == scores.device and got.dtype == torch.int64
        assert got.tolist() == want
        batch, patches = scores.shape
        assert sum(want) == total == static_total("budget", batch, case["num_prefix_tokens"] + patches,
                                                  case["keep_rate"], case["num_prefix_tokens"],
                                                  min_patches=case["min_patches"])

    check()
