"""Packed sequences (pss_kernels/ops/varlen/): rpb_attention_varlen against per-image dense
rpb_attention (values and every gradient), sample_patches_varlen against per-image sample_patches,
the allocation policies, and the argument checks."""
import pytest
import torch

from pss_kernels import rpb_attention, rpb_attention_varlen, sample_patches, sample_patches_varlen
from pss_kernels.ops.rpb_attention.reference import bias_table_rows
from pss_kernels.ops.varlen import budget_keep_counts, fixed_keep_counts, keep_counts, mass_keep_counts
from pss_kernels._backends import cuda_extension
from pss_kernels.ops.varlen.reference import rpb_attention_varlen_reference

pytestmark = pytest.mark.filterwarnings(
    # The interpreter computes the masked lanes of the spare work entries (0 / 0, log2 0), as a GPU does silently.
    "ignore:invalid value encountered in divide:RuntimeWarning", "ignore:divide by zero encountered:RuntimeWarning")

GRID = (3, 4)
N = 1 + GRID[0] * GRID[1]


def packed_case(counts, heads=2, head_dim=8, dtype=torch.float32, seed=0, device="cpu", grid=GRID, repeat=False):
    """Random packed q, k, v, table and positions: image b keeps counts[b] tokens, CLS first, the
    others a random subset of its patches in random order (repeat: an image of more than 3 tokens
    repeats a position)."""
    generator = torch.Generator().manual_seed(seed)
    positions = []
    for count in counts:
        patches = torch.randperm(grid[0] * grid[1], generator=generator)[:count - 1] + 1
        if repeat and count > 3:
            patches[1] = patches[0]
        positions.append(torch.cat([torch.zeros(1, dtype=torch.int64), patches]))
    positions = torch.cat(positions).to(device)
    total = positions.numel()
    q, k, v = (torch.randn(total, heads, head_dim, generator=generator).to(device, dtype).requires_grad_()
               for _ in range(3))
    table = torch.randn(bias_table_rows(grid, 1), heads, generator=generator).to(device).requires_grad_()
    cu = torch.zeros(len(counts) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(counts).cumsum(0)
    return q, k, v, table, positions, cu.to(device)


@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
@pytest.mark.parametrize("counts", [[5, 13, 2], [7], [13, 13]])
def test_varlen_attention_equals_each_image_through_the_dense_op(backend, counts, device):
    q, k, v, table, positions, cu = packed_case(counts, device=device)
    out, cls = rpb_attention_varlen(q, k, v, table, positions, cu, grid_size=GRID, backend=backend,
                                    return_cls_attention=True)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, table), grad)
    expected, expected_grads, expected_cls = [], [], []
    start = 0
    for count in counts:
        end = start + count
        dense = [t[start:end].detach().transpose(0, 1)[None].requires_grad_() for t in (q, k, v)]
        dense_table = table.detach().clone().requires_grad_()
        o, c = rpb_attention(*dense, dense_table, positions[start:end][None], grid_size=GRID, backend="torch",
                             return_cls_attention=True)
        dense_grads = torch.autograd.grad(o, (*dense, dense_table), grad[start:end].transpose(0, 1)[None])
        expected.append(o[0].transpose(0, 1))
        expected_cls.append(c[0])
        expected_grads.append(dense_grads)
        start = end
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cls, torch.cat(expected_cls), rtol=1e-4, atol=1e-6)
    for i in range(3):
        torch.testing.assert_close(grads[i], torch.cat([g[i][0].transpose(0, 1) for g in expected_grads]),
                                   rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[3], sum(g[3] for g in expected_grads), rtol=1e-4, atol=1e-5)
    # No attention across images: changing image 0's values leaves the others' outputs alone.
    if len(counts) > 1:
        v2 = v.detach().clone()
        v2[:counts[0]] += 10.0
        moved = rpb_attention_varlen(q, k, v2, table, positions, cu, grid_size=GRID, backend=backend)
        torch.testing.assert_close(moved[counts[0]:], out[counts[0]:], rtol=0, atol=1e-6)
        assert (moved[:counts[0]] - out[:counts[0]]).abs().max() > 1.0


# ----------------------------------------------------------------------------- the fused Triton kernels

BIG_GRID = (6, 6)
BIG_N = 1 + BIG_GRID[0] * BIG_GRID[1]


def big_packed_case(counts, head_dim=16, **options):
    """packed_case on a 6 x 6 grid: images of up to 37 tokens, so that an image spans several 16-row
    blocks and the work table mixes long and short images."""
    return packed_case(counts, head_dim=head_dim, grid=BIG_GRID, **options)


def _run(backend, case, grad, **options):
    q, k, v, table, positions, cu = case
    out, cls = rpb_attention_varlen(q, k, v, table, positions, cu, grid_size=BIG_GRID, backend=backend,
                                    return_cls_attention=True, **options)
    return (out, cls, *torch.autograd.grad(out, (q, k, v, table), grad))


@pytest.mark.triton
@pytest.mark.parametrize("accumulator", ["auto", "position-grid", "csr", "slices"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_varlen_kernel_equals_the_oracle_with_every_accumulator(accumulator, deterministic, device,
                                                                       monkeypatch):
    """One fused launch over images of 37 (three blocks), 3, 20, 2 and 33 tokens: out, CLS attention and
    every gradient as the float32 torch backend gives them, with each bias-gradient accumulator, and
    bit-identical twice in deterministic mode."""
    monkeypatch.setenv("PSS_KERNELS_RPB_DBIAS", accumulator)
    case = big_packed_case([BIG_N, 3, 20, 2, 33], device=device)
    grad = torch.randn(case[0].shape, generator=torch.Generator().manual_seed(1)).to(device)
    got = _run("triton", case, grad, deterministic=deterministic)
    want = _run("torch", case, grad)
    for name, g, w in zip(("out", "cls", "dq", "dk", "dv", "dtable"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-5, msg=name)
    if deterministic:
        again = _run("triton", case, grad, deterministic=True)
        assert torch.equal(again[-1], got[-1])


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_varlen_kernel_in_half_precision(dtype, device):
    """fp16/bf16 operands with a float32 table: within the dense Triton kernel's tolerance of the float32
    oracle run on the same rounded inputs (the table gradient comes back float32)."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        # Triton 3.9's interpreter runs tl.dot on bf16 bit patterns as integers (test_rpb_attention.py).
        pytest.skip("the Triton interpreter cannot multiply bf16 (tl.dot); the GPU tests cover it")
    case = big_packed_case([17, BIG_N, 9], dtype=dtype, seed=5, device=device)
    grad = torch.randn(case[0].shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    got = _run("triton", case, grad)
    q, k, v, table, positions, cu = case
    as_float = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want = _run("torch", (*as_float, table, positions, cu), grad.float())
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    for name, g, w in zip(("out", "cls", "dq", "dk", "dv", "dtable"), got, want):
        assert g.dtype == (dtype if name in ("out", "dq", "dk", "dv") else torch.float32), name
        torch.testing.assert_close(g.float(), w.float(), msg=name, **tolerance)


@pytest.mark.triton
def test_triton_varlen_frozen_table_and_unchecked_inputs(device):
    """A frozen table gets no gradient (None) and the rest is unchanged; check_inputs=False gives the same
    values (no host check, nothing else differs); deterministic mode refuses a repeated position."""
    case = big_packed_case([12, 30], device=device, seed=7)
    q, k, v, table, positions, cu = case
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(device)
    out = rpb_attention_varlen(q, k, v, table.detach(), positions, cu, grid_size=BIG_GRID, backend="triton",
                               check_inputs=False)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    want = _run("torch", case, grad)
    torch.testing.assert_close(out, want[0], rtol=1e-4, atol=2e-5)
    for g, w in zip(grads, want[2:5]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-5)
    repeated = big_packed_case([12, 30], device=device, seed=7, repeat=True)
    with pytest.raises(ValueError, match="must not repeat within an image"):
        rpb_attention_varlen(*repeated[:5], repeated[5], grid_size=BIG_GRID, backend="triton", deterministic=True)
    # Repeated positions are fine without the deterministic mode (the position grid adds atomically).
    got = _run("triton", repeated, grad)
    for g, w in zip(got, _run("torch", repeated, grad)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-5)


@pytest.mark.triton
def test_triton_varlen_reads_strided_offsets_and_runs_in_inference_mode(device):
    """Offsets given as a strided view reach the kernels contiguous (they read offset b at cu + b), and
    inference tensors (no version counter for the work-table cache) run: the torch backend's values."""
    case = big_packed_case([12, 30, 5], device=device, seed=8)
    q, k, v, table, positions, cu = case
    want = rpb_attention_varlen(q, k, v, table, positions, cu, grid_size=BIG_GRID, backend="torch")
    spaced = torch.full((2 * cu.numel(),), -99, dtype=torch.int32, device=device)
    spaced[::2] = cu
    got = rpb_attention_varlen(q, k, v, table, positions, spaced[::2], grid_size=BIG_GRID, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    with torch.inference_mode():
        inference_cu = cu.clone()
        for _ in range(2):  # the second call would hit the cache
            got = rpb_attention_varlen(q, k, v, table, positions, inference_cu, grid_size=BIG_GRID, backend="triton")
            torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


def test_packed_work_table_covers_every_block_once_longest_image_first():
    """(image, block) entries: each block of each image exactly once, images by descending length (ties:
    the lower image first), then spare (-1, 0) entries up to ceil(T / block) + B."""
    from pss_kernels.ops.rpb_attention.triton_common import PackedSequences, packed_work_table
    counts = [5, 40, 16, 17, 1, 40]
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    packed = PackedSequences(cu, len(counts), 40)
    total = sum(counts)
    for block in (16, 7, None):
        work = packed_work_table(packed, total, block)
        size = block or 40
        assert work.dtype == torch.int32 and work.shape == (2, -(-total // size) + len(counts))
        images, blocks = work.tolist()
        used = [(i, b) for i, b in zip(images, blocks) if i >= 0]
        expected_order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
        assert used == [(i, b) for i in expected_order for b in range(-(-counts[i] // size))]
        assert all((i, b) == (-1, 0) for i, b in zip(images[len(used):], blocks[len(used):]))
        # Every layer of a step shares the offsets: the table is built once per offsets and block.
        assert packed_work_table(packed, total, block) is work
    before = packed_work_table(packed, total, 16)
    cu[1] += 0  # in place: a new version, a new table
    after = packed_work_table(packed, total, 16)
    assert after is not before and torch.equal(after, before)


@pytest.mark.triton
def test_opcheck_packed_ops(device):
    """The registered packed ops: real and fake kernels agree, autograd is registered, for the torch
    backend and the fused Triton one."""
    case = big_packed_case([9, 4, 20], device=device, seed=2)
    q, k, v, table, positions, cu = (t.detach() for t in case)
    for backend in ("torch", "triton"):
        forward_args = (q, k, v, table, positions, cu, list(BIG_GRID), 1, 0.25, backend, False, True, True)
        torch.library.opcheck(torch.ops.pss_kernels.rpb_attention_varlen_fwd.default, forward_args)
        out, lse, _ = torch.ops.pss_kernels.rpb_attention_varlen_fwd(*forward_args)
        for bias_grad in (True, False):
            torch.library.opcheck(torch.ops.pss_kernels.rpb_attention_varlen_bwd.default,
                                  (torch.randn_like(q), q, k, v, table, positions, cu, out, lse, list(BIG_GRID), 1, 0.25,
                                   backend, False, bias_grad))


def test_varlen_torch_compile_fullgraph(device):
    """The packed op traces whole (the registered op hides its host check), and the compiled loss and
    gradients equal eager ones."""
    q, k, v, table, positions, cu = packed_case([5, 13, 2], device=device)

    def attention(q, k, v, table):
        out, cls_attention = rpb_attention_varlen(q, k, v, table, positions, cu, grid_size=GRID, backend="torch",
                                                  return_cls_attention=True)
        return out.square().sum() + cls_attention.sum()

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    loss, eager_loss = compiled(q, k, v, table), attention(q, k, v, table)
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(torch.autograd.grad(loss, (q, k, v, table)), torch.autograd.grad(eager_loss, (q, k, v, table))):
        torch.testing.assert_close(got, want)


def test_varlen_torch_compile_fullgraph_with_row_column_cells():
    """(T, 2) cells trace whole too (flat_positions is tensor ops; its host check is left to the op's own
    check of the positions while tracing), and a cell outside the grid is still refused, by that check."""
    cells, _, cu, q, k, v, table = native_case()

    def attention(q, k, v, table, cells):
        return rpb_attention_varlen(q, k, v, table, cells, cu, grid_size=MAX_GRID, backend="torch").square().sum()

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    loss, eager_loss = compiled(q, k, v, table, cells), attention(q, k, v, table, cells)
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(torch.autograd.grad(loss, (q, k, v, table)), torch.autograd.grad(eager_loss, (q, k, v, table))):
        torch.testing.assert_close(got, want)
    outside = cells.clone()
    outside[3] = torch.tensor([0, MAX_GRID[1]])
    with pytest.raises(ValueError, match=r"positions must be in \[0, 17\)"):
        compiled(q, k, v, table, outside)


def test_varlen_reference_is_an_independent_oracle_of_the_op():
    q, k, v, table, positions, cu = packed_case([4, 9, 13], dtype=torch.float64, seed=3)
    out = rpb_attention_varlen(q, k, v, table, positions, cu, grid_size=GRID, backend="torch", scale=0.3)
    reference = rpb_attention_varlen_reference(q, k, v, table, positions, cu, grid_size=GRID, scale=0.3)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-12)


def test_varlen_gradients_pass_gradcheck_in_float64():
    q, k, v, table, positions, cu = packed_case([3, 5], heads=1, head_dim=2, dtype=torch.float64, seed=4)
    table = table.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_, t_: rpb_attention_varlen(q_, k_, v_, t_, positions, cu, grid_size=GRID, backend="torch"),
        (q, k, v, table))


NATIVE_GRIDS = [(2, 3), (4, 4), (3, 2), (1, 4)]
MAX_GRID = (4, 4)


def native_case(seed=0, device="cpu", dtype=torch.float32, heads=2, head_dim=8):
    """Images of the grids NATIVE_GRIDS, each keeping its CLS and a random subset of its own patches:
    (row, column) cells (T, 2), each image's positions in its own grid, offsets, q, k, v, the MAX_GRID table."""
    generator = torch.Generator().manual_seed(seed)
    cells, own_positions, counts = [], [], []
    for grid_h, grid_w in NATIVE_GRIDS:
        patches = grid_h * grid_w
        kept = torch.randperm(patches, generator=generator)[:max(1, patches * 2 // 3)]
        cells.append(torch.cat([torch.tensor([[-1, -1]]), torch.stack([kept // grid_w, kept % grid_w], 1)]))
        own_positions.append(torch.cat([torch.zeros(1, dtype=torch.int64), kept + 1]))
        counts.append(kept.numel() + 1)
    cells = torch.cat(cells).to(device)
    cu = torch.zeros(len(counts) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(counts).cumsum(0)
    total = int(cu[-1])
    q, k, v = (torch.randn(total, heads, head_dim, generator=generator).to(device, dtype).requires_grad_()
               for _ in range(3))
    table = torch.randn(bias_table_rows(MAX_GRID, 1), heads, generator=generator).to(device).requires_grad_()
    return cells, own_positions, cu.to(device), q, k, v, table


@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
def test_images_of_different_grids_share_the_largest_grids_table(backend, device):
    """Native resolution: (row, column) cells of images of different grid sizes, one batch, the largest
    grid's table. Each image must get what the dense op gives it on its own grid with that grid's view
    of the table (sub_grid_table): values, and gradients to q, k, v and the shared table."""
    from pss_kernels.ops.rpb_attention.reference import sub_grid_table
    cells, own_positions, cu, q, k, v, table = native_case(device=device)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(device)
    out = rpb_attention_varlen(q, k, v, table, cells, cu, grid_size=MAX_GRID, backend=backend)
    got = (out, *torch.autograd.grad(out, (q, k, v, table), grad))
    outs = []
    for b, grid in enumerate(NATIVE_GRIDS):
        part = slice(int(cu[b]), int(cu[b + 1]))
        own_table = sub_grid_table(table, MAX_GRID, grid)
        qb, kb, vb = (t[part].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(rpb_attention(qb, kb, vb, own_table, own_positions[b][None].to(device), grid_size=grid,
                                  backend="torch")[0].transpose(0, 1))
    want_out = torch.cat(outs)
    want = (want_out, *torch.autograd.grad(want_out, (q, k, v, table), grad))
    for name, g, w in zip(("out", "dq", "dk", "dv", "dtable"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def test_sub_grid_table_and_cells_are_checked():
    from pss_kernels.ops.rpb_attention.reference import relative_index, sub_grid_table
    from pss_kernels.ops.varlen import flat_positions
    table = torch.arange(bias_table_rows((4, 5), 1), dtype=torch.float32)[:, None]
    small = sub_grid_table(table, (4, 5), (2, 3))
    assert small.shape == (bias_table_rows((2, 3), 1), 1)
    # Patches (0, 0) and (1, 2) of a 2 x 3 grid: the same offset's row in either layout.
    small_row = relative_index(torch.tensor(1), torch.tensor(1 + 5), (2, 3))
    big_row = relative_index(torch.tensor(1), torch.tensor(1 + 7), (4, 5))
    assert small[small_row] == table[big_row] and small[-1] == table[-1]
    with pytest.raises(ValueError, match="sub_grid_size must fit"):
        sub_grid_table(table, (4, 5), (5, 1))
    assert flat_positions(torch.tensor([[-1, -1], [0, 0], [2, 3]]), (4, 5)).tolist() == [0, 1, 14]
    with pytest.raises(ValueError, match=r"cell 1 is \(0, 5\), outside the 4 x 5 grid"):
        flat_positions(torch.tensor([[-1, -1], [0, 5]]), (4, 5))
    with pytest.raises(ValueError, match="cell 0 is"):
        flat_positions(torch.tensor([[-1, -1]]), (4, 5), num_prefix_tokens=0)
    # Unchecked, a cell outside the grid becomes position -1 (refused by the op's check of positions,
    # clamped by the kernels), never another patch's position: (0, 5) is not (1, 0).
    assert flat_positions(torch.tensor([[-1, -1], [0, 5], [1, 0]]), (4, 5), check=False).tolist() == [0, -1, 6]
    assert flat_positions(torch.tensor([[-1, -1], [0, 1]]), (4, 5), num_prefix_tokens=0, check=False).tolist() == [-1, 1]
    cells, _, cu, q, k, v, table = native_case()
    with pytest.raises(ValueError, match="outside the 3 x 3 grid"):
        rpb_attention_varlen(q, k, v, torch.zeros(bias_table_rows((3, 3), 1), 2), cells, cu, grid_size=(3, 3))
    with pytest.raises(ValueError, match=r"positions must be \(T,\) positions or \(T, 2\)"):
        rpb_attention_varlen(q, k, v, table, cells[:, :1].repeat(1, 3), cu, grid_size=MAX_GRID)


def test_varlen_attention_refuses_bad_offsets_and_positions():
    q, k, v, table, positions, cu = packed_case([5, 6])
    options = dict(grid_size=GRID, backend="torch")
    bad = {"must start at 0": [1, 5, 11], "must end at the number of tokens T = 11": [0, 5, 10],
           "increase by at least 2": [0, 1, 11], "increase by at least 2 per image": [0, 6, 5, 11]}
    for message, offsets in bad.items():
        with pytest.raises(ValueError, match=message):
            rpb_attention_varlen(q, k, v, table, positions, torch.tensor(offsets, dtype=torch.int32), **options)
    with pytest.raises(TypeError, match="cu_seqlens"):
        rpb_attention_varlen(q, k, v, table, positions, cu.long(), **options)
    wrong = positions.clone()
    wrong[3] = N
    with pytest.raises(ValueError, match=r"positions must be in \[0, 13\)"):
        rpb_attention_varlen(q, k, v, table, wrong, cu, **options)
    no_cls = positions.clone()
    no_cls[5] = 7
    with pytest.raises(ValueError, match="start with its prefix token"):
        rpb_attention_varlen(q, k, v, table, no_cls, cu, **options)
    with pytest.raises(ValueError, match="one entry per token"):
        rpb_attention_varlen(q, k, v, table, positions[:-1], cu, **options)
    with pytest.raises(ValueError, match="backend must be one of"):
        rpb_attention_varlen(q, k, v, table, positions, cu, grid_size=GRID, backend="cuda")
    with pytest.raises(TypeError, match="check_inputs"):
        rpb_attention_varlen(q, k, v, table, positions, cu, check_inputs=1, **options)
    heads_first = [t.detach()[:5].transpose(0, 1) for t in (q, k, v)]  # (H, T, D) = (2, 5, 8): blamed on q
    with pytest.raises(ValueError, match=r"q must be \(T, H, D\).* needs \.transpose\(0, 1\)"):
        rpb_attention_varlen(*heads_first, table, positions[:5], torch.tensor([0, 5], dtype=torch.int32), **options)
    tokens = torch.randn(N + 1, 2, 8)
    with pytest.raises(ValueError, match="an image of 14 tokens, more than the N = 13"):
        rpb_attention_varlen(tokens, tokens, tokens, table.detach(), torch.zeros(N + 1, dtype=torch.int64),
                             torch.tensor([0, N + 1], dtype=torch.int32), **options)


@pytest.mark.parametrize("scorer", ["l1", "l2", "random", "given"])
def test_varlen_sampling_keeps_what_the_dense_sampler_keeps_per_image(scorer):
    torch.manual_seed(0)
    x = torch.randn(3, N, 6)
    x[1, 4] = x[1, 5]  # a tie: the lower position first, as sample_patches
    given = torch.rand(3, N - 1) if scorer == "given" else None
    counts = torch.tensor([4, 13, 7])
    generator = torch.Generator().manual_seed(5) if scorer == "random" else None
    tokens, positions, cu = sample_patches_varlen(x, counts, scorer=scorer, scores=given, generator=generator)
    assert cu.tolist() == [0, 4, 17, 24] and tokens.shape == (24, 6) and positions.dtype == torch.int64
    for b, count in enumerate(counts.tolist()):
        dense_rate = count / N  # round(rate * N) == count
        dense_x = x[b:b + 1]
        dense_scores = None if given is None else given[b:b + 1]
        if scorer == "random":  # one draw of (B, P) scores for the whole batch
            all_scores = torch.rand(3, N - 1, generator=torch.Generator().manual_seed(5))
            dense_x, dense_scores = dense_x, all_scores[b:b + 1]
        kept, index = sample_patches(dense_x, dense_rate, scorer="given" if scorer == "random" else scorer,
                                     scores=dense_scores, backend="torch")
        start, end = cu[b].item(), cu[b + 1].item()
        assert positions[start:end].tolist() == index[0].tolist(), b
        torch.testing.assert_close(tokens[start:end], kept[0], rtol=0, atol=0)


def test_varlen_sampling_gradient_reaches_the_kept_tokens_only():
    x = torch.randn(2, N, 4, requires_grad=True)
    tokens, positions, cu = sample_patches_varlen(x, torch.tensor([3, 6]))
    tokens.sum().backward()
    kept = torch.zeros(2, N)
    kept[0, positions[:3]] = 1
    kept[1, positions[3:]] = 1
    torch.testing.assert_close(x.grad, kept[..., None].expand_as(x))


def test_varlen_sampling_refuses_bad_counts():
    x = torch.randn(2, N, 4)
    with pytest.raises(ValueError, match=r"keep_counts must be in \[num_prefix_tokens \+ 1, N\] = \[2, 13\]"):
        sample_patches_varlen(x, torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="got min 3, max 14"):
        sample_patches_varlen(x, torch.tensor([3, 14]))
    with pytest.raises(ValueError, match="one count per image"):
        sample_patches_varlen(x, torch.tensor([3]))
    with pytest.raises(TypeError, match="keep_counts"):
        sample_patches_varlen(x, torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="scores is only read with scorer='given'"):
        sample_patches_varlen(x, torch.tensor([3, 4]), scores=torch.rand(2, N - 1))
    with pytest.raises(ValueError, match="generator is only used with scorer='random'"):
        sample_patches_varlen(x, torch.tensor([3, 4]), generator=torch.Generator())
    with pytest.raises(ValueError, match="backend"):
        sample_patches_varlen(x, torch.tensor([3, 4]), backend="sdpa")


@pytest.mark.triton
def test_triton_varlen_sampler_refuses_float64(device):
    with pytest.raises(TypeError, match="x"):  # float64 is the torch backend's only
        sample_patches_varlen(torch.randn(2, N, 4, dtype=torch.float64, device=device),
                              torch.tensor([3, 4], device=device), backend="triton")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_varlen_sampling_with_a_known_total_equals_the_read_one(backend, device):
    """total= (T known to the caller) gives what reading the counts gives."""
    x = torch.randn(3, N, 4, device=device)
    counts = torch.tensor([3, N, 2], device=device)
    for got, want in zip(sample_patches_varlen(x, counts, backend=backend, total=3 + N + 2),
                         sample_patches_varlen(x, counts, backend=backend)):
        assert torch.equal(got, want)


def test_varlen_sampling_checks_counts_against_a_known_total(monkeypatch):
    """With total= the counts are checked on the host where that is free (CPU tensors, eagerly: a
    ValueError naming keep_counts), else on the device (torch._assert_async: a RuntimeError on CPU; on a
    GPU a device-side assert, which ends the CUDA context, so the device path is forced here, on CPU);
    total itself on the host."""
    from pss_kernels.ops.varlen import op as varlen_op
    x = torch.randn(3, N, 4)
    counts = torch.tensor([3, N, 2])
    with pytest.raises(ValueError, match="keep_counts must sum to total = 17, got 18"):
        sample_patches_varlen(x, counts, total=17)
    with pytest.raises(ValueError, match=r"keep_counts must be in \[num_prefix_tokens \+ 1, N\] = \[2, 13\]"):
        sample_patches_varlen(x, torch.tensor([1, N, 4]), total=N + 5)
    with pytest.raises(ValueError, match=r"total must be"):
        sample_patches_varlen(x, counts, total=3 * N + 1)
    monkeypatch.setattr(varlen_op, "_counts_readable_for_free", lambda keep_counts: False)
    with pytest.raises(RuntimeError, match="keep_counts must sum to total = 17"):
        sample_patches_varlen(x, counts, total=17)
    with pytest.raises(RuntimeError, match=r"keep_counts must be in \[num_prefix_tokens \+ 1, N\] = \[2, 13\]"):
        sample_patches_varlen(x, torch.tensor([1, N, 4]), total=N + 5)
    tokens, _, _ = sample_patches_varlen(x, counts, total=18)  # good counts pass the device check
    assert tokens.shape == (18, 4)
    with pytest.raises(TypeError, match="scores must have dtype"):
        sample_patches_varlen(x, counts, scorer="given", scores=torch.ones(3, N - 1, dtype=torch.int64))


def _sample_both(x, counts, backend, weight_seed=1, **options):
    """(tokens, positions, cu_seqlens, grad of x under a fixed random weighting of the tokens)."""
    tokens, positions, cu = sample_patches_varlen(x, counts, backend=backend, **options)
    weight = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(weight_seed)).to(tokens)
    (grad,) = torch.autograd.grad((tokens * weight).sum(), x)
    return tokens, positions, cu, grad


@pytest.mark.triton
@pytest.mark.parametrize("scorer", ["l1", "l2", "random", "given"])
@pytest.mark.parametrize("order", ["score", "spatial"])
@pytest.mark.parametrize("num_prefix_tokens", [0, 1])
def test_triton_varlen_sampler_equals_the_torch_backend(scorer, order, num_prefix_tokens, device):
    """One fused launch (scores, each image's top-k_b, the offsets, the copy) keeps exactly what the
    oracle keeps: ties to the lower position, an image kept whole in position order, a 2-token image."""
    torch.manual_seed(0)
    x = torch.randn(4, N, 6, device=device)
    x[1, 4] = x[1, 5]  # a tie
    x[2, 7] = -x[2, 9]  # an l1 / l2 tie of opposite signs
    x.requires_grad_()
    given = torch.rand(4, N - num_prefix_tokens, device=device) if scorer == "given" else None
    counts = torch.tensor([4, N, 7, num_prefix_tokens + 1], device=device)
    results = {}
    for backend in ("torch", "triton"):
        generator = torch.Generator(device=device).manual_seed(5) if scorer == "random" else None
        results[backend] = _sample_both(x, counts, backend, scorer=scorer, scores=given, order=order,
                                        num_prefix_tokens=num_prefix_tokens, generator=generator)
    for name, expected, actual in zip(("tokens", "positions", "cu_seqlens", "grad"), results["torch"],
                                      results["triton"]):
        assert expected.dtype == actual.dtype, name
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_varlen_sampler_in_half_precision_on_strided_input(dtype, device):
    """Half-precision rows scored in float32, x a non-contiguous view, given scores a strided view,
    and the stride-0 gradient of tokens.sum()."""
    torch.manual_seed(1)
    base = torch.randn(3, 8, N, device=device, dtype=dtype)
    x = base[:, 1:7].transpose(1, 2).requires_grad_()  # (3, N, 6), channels strided
    counts = torch.tensor([3, 9, N], dtype=torch.int32, device=device)
    scores = torch.rand(N - 1, 3, device=device).t()
    for options in ({"scorer": "l1"}, {"scorer": "given", "scores": scores}):
        expected = sample_patches_varlen(x, counts, backend="torch", **options)
        actual = sample_patches_varlen(x, counts, backend="triton", **options)
        for e, a in zip(expected, actual):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        (grad,) = torch.autograd.grad(actual[0].sum(), x)
        kept = torch.zeros(3, N, device=device, dtype=dtype)
        image = torch.repeat_interleave(torch.arange(3, device=device), counts.long())
        kept[image, actual[1]] = 1
        torch.testing.assert_close(grad, kept[..., None].expand_as(x))


@pytest.mark.triton
def test_triton_varlen_sampler_scores_first_past_the_fused_limit(device):
    """Past FUSED_MAX_PATCHES: the row-parallel score kernel, the select program without the copy, the
    scatter of the kept rows (forced here on small images), for computed and given scores."""
    from pss_kernels.ops.sample_patches import triton_sample
    torch.manual_seed(2)
    x = torch.randn(3, N, 5, device=device)
    counts = torch.tensor([5, 2, 11], device=device)
    given = torch.rand(3, N - 1, device=device)
    for scorer, scores in (("l1", None), ("l2", None), ("given", given)):
        expected = sample_patches_varlen(x, counts, scorer=scorer, scores=scores, backend="torch")
        actual = triton_sample.sample_patches_varlen_forward(x, scores, counts, 18, scorer, 1, "score", fused=False)
        for e, a in zip(expected, actual[:3]):
            torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_varlen_sampler_stays_in_bounds_on_bad_counts(backend, device):
    """Counts the public function refuses (0, above N), given straight to the registered op with a
    too-small T: the backend clamps them and writes nothing past T, and slot maps into [-1, T) so that
    the backward reads no row it does not have."""
    x = torch.randn(3, N, 4, device=device)
    counts = torch.tensor([0, N + 5, 3], device=device)
    total = 6
    tokens, positions, cu, slot = torch.ops.pss_kernels.sample_patches_varlen(x, None, counts, total, "l1", 1,
                                                                                "score", backend)
    assert tokens.shape == (total, 4) and positions.shape == (total,)
    assert cu.tolist() == [0, 2, 2 + N, 2 + N + 3]  # the clamped counts: 2, N, 3
    assert int(slot.min()) >= -1 and int(slot.max()) < total
    assert (slot >= 0).sum().item() == total  # exactly the rows that fit are mapped
    grad = torch.ops.pss_kernels.sample_patches_varlen_backward(torch.ones(total, 4, device=device), slot, backend)
    assert grad.sum().item() == 4 * total
    # Too many rows for the counts (they sum to 18 after the clamp; T = 20): every row in bounds.
    tokens, positions, cu, slot = torch.ops.pss_kernels.sample_patches_varlen(x, None, counts, 20, "l1", 1,
                                                                                "score", backend)
    assert tokens.shape == (20, 4) and int(positions.min()) >= 0 and int(positions.max()) < N
    assert (slot >= 0).sum().item() == 18


@pytest.mark.triton
@pytest.mark.parametrize("deterministic", [False, True])
def test_varlen_triton_attention_stays_in_bounds_on_unchecked_bad_offsets(deterministic, device):
    """check_inputs=False trusts the offsets and positions: bad ones give wrong values, never an access
    outside the tensors (the kernels clamp the offsets into [0, T] and the positions into the grid; the
    csr store stays in each image's (N, N) slot). The images whose offsets are good still get the
    oracle's values."""
    q, k, v, table, positions, _ = packed_case([5, 6, 2], device=device)  # T = 13
    good = {0: (0, 5), 1: (5, 11)}
    cases = [([0, 5, 11, 15], good),  # past T
             ([0, 5, 11, 9], good),  # the last offset goes back, ends before T
             ([0, 5, 11, -4], good),  # negative
             ([0, 11, 5, 13], {}),  # not increasing
             ([0, 13, 13, 13], {})]  # two empty images
    wide = packed_case([13, 13], device=device)  # one image of 20 tokens > N, the next of 6
    bad_positions = positions.clone()
    bad_positions[2], bad_positions[7] = 99, -3
    for offsets, images in cases + [("wide", {1: (20, 26)}), ("positions", {})]:
        args = (q, k, v, table, positions)
        if offsets == "wide":
            args, offsets = wide[:5], [0, 20, 26]
        elif offsets == "positions":
            args, offsets = (q, k, v, table, bad_positions), [0, 5, 11, 13]
        cu = torch.tensor(offsets, dtype=torch.int32, device=device)
        out = rpb_attention_varlen(*args, cu, grid_size=GRID, backend="triton", deterministic=deterministic,
                                   check_inputs=False)
        grads = torch.autograd.grad(out, args[:4], torch.ones_like(out))
        assert out.shape == args[0].shape and all(g.shape == t.shape for g, t in zip(grads, args[:4]))
        for start, end in images.values():
            want = rpb_attention_varlen(*(t[start:end] for t in args[:3]), args[3], args[4][start:end],
                                        torch.tensor([0, end - start], dtype=torch.int32, device=device),
                                        grid_size=GRID, backend="torch", check_inputs=False)
            torch.testing.assert_close(out[start:end], want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(cuda_extension() is None, reason="pss_kernels._C is not built")
@pytest.mark.parametrize("spatial", [False, True])
def test_cuda_packed_selection_host_model_matches_the_reference(spatial):
    """The CUDA packed kernel's selection (its count clamp, keys, bitonic network and row bound), run on
    the host by pss_kernels._C: the torch backend's positions and offsets, ties and whole images
    included; bad counts clamped with no row written past T."""
    from pss_kernels.ops.varlen.reference import sample_patches_varlen_reference
    ext = cuda_extension()
    generator = torch.Generator().manual_seed(0)
    for num_patches, num_prefix in ((1, 1), (12, 1), (12, 0), (196, 1), (577, 0)):
        num_tokens = num_patches + num_prefix
        scores = torch.randint(0, 4, (4, num_patches), generator=generator).float()  # many ties
        counts = torch.tensor([num_prefix + 1, num_tokens, max(num_prefix + 1, num_tokens // 3),
                               max(num_prefix + 1, num_tokens - 1)])
        total = int(counts.sum())
        positions = torch.empty(total, dtype=torch.int64)
        cu = torch.empty(5, dtype=torch.int32)
        ext.select_patches_varlen_host(scores.data_ptr(), counts.data_ptr(), positions.data_ptr(), cu.data_ptr(), 4,
                                       num_patches, num_prefix, total, spatial)
        x = torch.zeros(4, num_tokens, 1)
        _, want_positions, want_cu = sample_patches_varlen_reference(
            x, counts, scorer="given", scores=scores, num_prefix_tokens=num_prefix,
            order="spatial" if spatial else "score")
        assert torch.equal(positions, want_positions), (num_patches, num_prefix)
        assert torch.equal(cu, want_cu)
    counts = torch.tensor([0, 30, 3])  # clamped to 2, 13, 3; only T = 6 rows exist
    positions = torch.full((6,), -7, dtype=torch.int64)
    ext.select_patches_varlen_host(torch.rand(3, 12).data_ptr(), counts.data_ptr(), positions.data_ptr(),
                                   cu.data_ptr(), 3, 12, 1, 6, spatial)
    assert cu[:4].tolist() == [0, 2, 15, 18]
    assert positions[0] == 0 and 1 <= positions[1] < 13 and positions[2:].tolist() == [0, 1, 2, 3]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_packed_sampler_kernels_at_vit_shapes(backend, dtype, device):
    """The fused packed samplers on a GPU at ViT-B shapes (B = 256 and B = 8: the CUDA backend's fused and
    split plans), every scorer: bit-equal to the torch backend, forward and backward. The rows are
    multiples of 1/4 in [-2, 2] (sampling_cases.quantized_on_device): their l1 and l2 scores are exact in
    float32 whatever the summation order, so each kernel's own order cannot reorder near-ties (with
    randn rows it would, in a few images of 256), and the many exact ties test the tie rule."""
    from sampling_cases import quantized_on_device
    generator = torch.Generator().manual_seed(0)
    for batch in (256, 8):
        x = quantized_on_device((batch, 197, 768), dtype, device, seed=batch).requires_grad_()
        counts = torch.randint(2, 198, (batch,), generator=generator).to(device)
        counts[0] = 197
        given = torch.rand(batch, 196, generator=generator).to(device)
        for scorer, scores in (("l1", None), ("l2", None), ("given", given)):
            expected = _sample_both(x, counts, "torch", scorer=scorer, scores=scores)
            actual = _sample_both(x, counts, backend, scorer=scorer, scores=scores)
            for name, e, a in zip(("tokens", "positions", "cu_seqlens", "grad"), expected, actual):
                torch.testing.assert_close(a, e, rtol=0, atol=0, msg=f"{name} {scorer} B={batch}")


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_opcheck_packed_sampler(backend, device):
    """The registered sampler ops: real and fake kernels agree, autograd and the double backward are
    registered."""
    torch.manual_seed(3)
    x = torch.randn(3, N, 4, device=device, requires_grad=True)
    counts = torch.tensor([3, 6, N], device=device)
    scores = torch.rand(3, N - 1, device=device)
    for scorer, given in (("l1", None), ("given", scores)):
        torch.library.opcheck(torch.ops.pss_kernels.sample_patches_varlen.default,
                              (x, given, counts, 3 + 6 + N, scorer, 1, "score", backend))
    _, _, _, slot = torch.ops.pss_kernels.sample_patches_varlen(x.detach(), None, counts, 3 + 6 + N, "l1", 1,
                                                                  "score", backend)
    torch.library.opcheck(torch.ops.pss_kernels.sample_patches_varlen_backward.default,
                          (torch.randn(3 + 6 + N, 4, device=device, requires_grad=True), slot, backend))


def test_packed_sampler_op_compiles_fullgraph():
    """The registered sampler op traces whole under torch.compile(fullgraph=True) when T is known (as the
    budget policy knows it: round(rho B N)); the public function's host read of the counts is the one
    thing outside. Loss and gradient equal eager ones."""
    x = torch.randn(3, N, 4, requires_grad=True)
    counts = torch.tensor([3, 6, N])

    def loss(x):
        tokens, positions, cu, _ = torch.ops.pss_kernels.sample_patches_varlen(x, None, counts, 3 + 6 + N, "l1", 1,
                                                                                "score", "torch")
        return (tokens.square().sum(1) * positions).sum() + cu.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), loss(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


def test_varlen_sampler_gradients_pass_gradgradcheck_in_float64():
    x = torch.randn(2, N, 3, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([4, 9])
    torch.autograd.gradgradcheck(lambda t: sample_patches_varlen(t, counts, backend="torch")[0], (x,))


# ---- allocation ------------------------------------------------------------------------------------
def test_fixed_allocation_is_pss_k():
    assert fixed_keep_counts(3, 197, 0.2).tolist() == [39, 39, 39]
    assert keep_counts("fixed", torch.rand(2, 196), 0.5).tolist() == [98, 98]


def test_budget_allocation_keeps_the_batch_total_and_the_bounds():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 0.1, 0.1],
                           [0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
                           [5.0, 0.3, 0.3, 0.3, 0.3, 0.3]])
    # N = 7, rho 0.5 -> T = round(10.5) = 10 (round half to even), K = 10 - 3 prefix = 7 patches.
    counts = budget_keep_counts(scores, 0.5, min_patches=1)
    assert counts.sum().item() == 10 and counts.tolist() == [5, 2, 3]  # 9 8 7 6 | 0.2 | 5 0.3 (tie: image 2 first)
    capped = budget_keep_counts(scores, 0.5, min_patches=2, max_patches=3)
    assert capped.tolist() == [4, 3, 3] and capped.sum().item() == 10
    for rho in (0.3, 0.6, 0.9):
        counts = budget_keep_counts(torch.rand(4, 6), rho)
        assert counts.sum().item() == round(rho * 4 * 7) and counts.min() >= 2 and counts.max() <= 7
    with pytest.raises(ValueError, match=r"more than B \* max_patches = 12"):
        budget_keep_counts(scores, 0.95, max_patches=4)
    with pytest.raises(ValueError, match="min_patches"):
        budget_keep_counts(scores, 0.5, min_patches=0)
    # At a rate too low for every image's minimum, each keeps its minimum (as fixed k keeps one patch).
    assert budget_keep_counts(scores, 0.05).tolist() == [2, 2, 2]
    assert budget_keep_counts(scores, 0.05, min_patches=2).tolist() == [3, 3, 3]


def test_budget_allocation_respects_the_bounds_whatever_the_scores():
    """-inf and NaN scores never pull a closed slot (past max_patches, or before min_patches' own) into
    the top-K: the bounds hold and the total is kept."""
    for fill in (float("-inf"), float("nan"), float("inf")):
        scores = torch.full((2, 3), fill)
        assert budget_keep_counts(scores, 0.75, max_patches=2).tolist() == [3, 3]
        counts = budget_keep_counts(scores, 0.875)
        assert counts.tolist() == [4, 3] and counts.max() <= 4, fill
    mixed = torch.tensor([[float("-inf"), 1.0, 2.0], [float("nan"), 0.5, float("-inf")]])
    for rho in (0.5, 0.625, 0.75, 0.875, 1.0):
        counts = budget_keep_counts(mixed, rho)
        assert counts.sum().item() == round(rho * 8) and counts.max() <= 4 and counts.min() >= 2, rho


def _nearest_mass_total_by_search(scores, budget, min_patches):
    """The mass total nearest to budget (the smaller on a tie) over a fine grid of fractions and a
    bisection: the policy's exact solution must be at least as near (an independent search)."""
    totals = {int(mass_keep_counts(scores, f, min_patches=min_patches).sum())
              for f in torch.linspace(0, 1, 501)[1:].tolist()}
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        total = int(mass_keep_counts(scores, middle, min_patches=min_patches).sum())
        totals.add(total)
        low, high = (middle, high) if total < budget else (low, middle)
    return min(totals, key=lambda total: (abs(total - budget), total))


def test_mass_at_a_rate_is_the_nearest_total_any_fraction_reaches():
    """Random batches with ties (integer scores), images with no mass, twins and zero scores, at several
    rates and minimums: the exact solution's total is as near round(rho B N) as any searched fraction
    gets, and on equal distance not larger."""
    from pss_kernels.ops.varlen import mass_keep_counts_at_rate
    generator = torch.Generator().manual_seed(11)
    for case in range(12):
        batch, patches = int(torch.randint(1, 7, (1,), generator=generator)), int(torch.randint(2, 30, (1,),
                                                                                                  generator=generator))
        scores = torch.randint(0, 4, (batch, patches), generator=generator).double()
        if case % 3 == 1:
            scores[0] = 0.0  # no mass
        if case % 3 == 2 and batch > 1:
            scores[1] = scores[0]  # twins: their steps coincide
        for min_patches in sorted({1, min(3, patches)}):
            for rho in (0.1, 0.35, 0.6, 0.9, 1.0):
                counts = mass_keep_counts_at_rate(scores, rho, min_patches=min_patches)
                budget = round(rho * batch * (patches + 1))
                searched = _nearest_mass_total_by_search(scores, budget, min_patches)
                got = int(counts.sum())
                assert (abs(got - budget), got) <= (abs(searched - budget), searched), (case, min_patches, rho)
                assert counts.min() >= 1 + min_patches and counts.max() <= patches + 1


def test_mass_at_a_rate_separates_breakpoints_closer_than_float_tolerance():
    """Three images whose one breakpoint each lies within 2e-14 of the others: passing two of them is
    reachable (f between the second and the third), and at a budget of 8 tokens it is the nearest."""
    from pss_kernels.ops.varlen import mass_keep_counts_at_rate
    d = 1e-14
    scores = torch.tensor([[0.5, 0.5], [0.5 + d, 0.5 - d], [0.5 + 2 * d, 0.5 - 2 * d]], dtype=torch.float64)
    counts = mass_keep_counts_at_rate(scores, 8 / 9)  # budget round(8/9 * 3 * 3) = 8
    assert counts.tolist() == [3, 3, 2]  # the two smallest fractions passed: images 0 and 1 keep both patches


def test_keep_counts_refuses_options_its_policy_does_not_read():
    scores = torch.rand(2, 6)
    with pytest.raises(ValueError, match="fraction is read by the mass policy only, got policy='budget'"):
        keep_counts("budget", scores, 0.5, fraction=0.5)
    with pytest.raises(ValueError, match="max_patches is read by the budget policy only, got policy='mass'"):
        keep_counts("mass", scores, 0.5, max_patches=3)
    with pytest.raises(ValueError, match="min_patches is read by the budget and mass policy only"):
        keep_counts("fixed", scores, 0.5, min_patches=2)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        keep_counts("budget", scores, 0.5, num_prefix_tokens=-1)
    with pytest.raises(ValueError, match="keep_rate"):  # checked even where the fraction replaces it
        keep_counts("mass", scores, 7.0, fraction=0.5)


def test_static_total_is_the_policys_batch_total():
    """fixed and budget know T from the rate alone (the counts they give sum to it); mass does not."""
    from pss_kernels.ops.varlen import static_total
    scores = torch.rand(5, 16)
    for rho in (0.25, 0.5, 0.8):
        for policy in ("fixed", "budget"):
            assert static_total(policy, 5, 17, rho) == keep_counts(policy, scores, rho).sum().item(), (policy, rho)
        assert static_total("mass", 5, 17, rho) is None
    with pytest.raises(ValueError, match="policy must be one of"):
        static_total("greedy", 5, 17, 0.5)
    # The budget's floor: every image its prefix and min_patches patches, as budget_keep_counts keeps.
    assert static_total("budget", 2, 10, 0.05) == 4 == budget_keep_counts(torch.rand(2, 9), 0.05).sum().item()
    assert static_total("budget", 2, 10, 0.05, min_patches=3) == 8 == \
        budget_keep_counts(torch.rand(2, 9), 0.05, min_patches=3).sum().item()
    for bad, options in (("num_tokens", dict(num_tokens=1)), ("batch", dict(batch=0)),
                         ("keep_rate", dict(keep_rate=1.5)), ("min_patches", dict(min_patches=17))):
        with pytest.raises(ValueError, match=bad):
            static_total(**{"policy": "budget", "batch": 5, "num_tokens": 17, "keep_rate": 0.5, **options})


def test_mass_allocation_keeps_the_fewest_patches_holding_the_fraction():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0],    # 10: 0.7 -> 4 + 3 = 7 (two patches)
                           [1.0, 1.0, 1.0, 1.0],    # 4: 2.8 -> three
                           [0.0, 0.0, 0.0, 0.0]])   # no mass: the minimum
    assert mass_keep_counts(scores, 0.7).tolist() == [3, 4, 2]
    assert mass_keep_counts(scores, 1.0).tolist() == [5, 5, 2]
    assert mass_keep_counts(scores, 0.7, min_patches=3).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match=">= 0"):
        mass_keep_counts(-scores - 1, 0.5)
    with pytest.raises(ValueError, match="policy must be one of"):
        keep_counts("greedy", scores, 0.5)


def test_mass_allocation_at_a_keep_rate_keeps_the_batch_at_that_rate():
    """keep_counts("mass", ..., rho): one fraction for the batch, bisected so that the batch keeps
    round(rho B N) tokens as nearly as its steps allow; peaked images keep fewer than flat ones."""
    from pss_kernels.ops.varlen import mass_keep_counts_at_rate
    generator = torch.Generator().manual_seed(0)
    spread = torch.linspace(0.2, 3.0, 16)[:, None]
    scores = torch.randn(16, 196, generator=generator).mul(spread).exp()
    grid_totals = {int(mass_keep_counts(scores, f).sum()) for f in torch.linspace(0, 1, 1001)[1:].tolist()}
    for rho in (0.2, 0.5, 0.8):
        counts = keep_counts("mass", scores, rho)
        budget = round(rho * 16 * 197)
        assert abs(int(counts.sum()) - budget) <= 16  # one step of each image at most
        # at least as near as any fraction of a fine grid (a brute-force search)
        assert abs(int(counts.sum()) - budget) <= min(abs(total - budget) for total in grid_totals)
        assert counts[0] > counts[-1]  # the flattest image keeps the most
        assert counts.min() >= 2 and counts.max() <= 197
    # Two identical images: totals step by 2 (4, 6, 8, 10 for N = 5), so a budget between two of them
    # is a tie, which goes to the smaller total (the smaller fraction).
    twins = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 2)
    assert mass_keep_counts_at_rate(twins, 0.5).tolist() == [2, 2]  # budget 5: 4 beside 6
    assert mass_keep_counts_at_rate(twins, 0.7).tolist() == [3, 3]  # budget 7: 6 beside 8
    assert mass_keep_counts_at_rate(twins, 1.0).tolist() == [5, 5]
    explicit = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert keep_counts("mass", explicit, 0.5, fraction=0.7).tolist() == [3, 4, 2]  # the fraction, not the rate


# ---- the ViT on packed tokens (models/packed.py) ---------------------------------------------------
def packed_model(allocation, **options):
    from pss_kernels.models import create_model
    torch.manual_seed(0)
    options = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5, **options}
    return create_model("deit_tiny", img_size=32, patch_size=8, allocation=allocation, **options)


def give_every_image_k(monkeypatch):
    """The packed path's policy made fixed k (its counts and its known total), whatever the model's."""
    from pss_kernels.models import packed
    from pss_kernels.ops.varlen import fixed_keep_counts, static_total
    monkeypatch.setattr(packed, "keep_counts", lambda policy, scores, rate, prefix: fixed_keep_counts(
        scores.shape[0], scores.shape[1] + prefix, rate, prefix, device=scores.device))
    monkeypatch.setattr(packed, "static_total", lambda policy, *args: static_total("fixed", *args))


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_packed_model_with_equal_counts_equals_the_dense_model(pool, monkeypatch):
    """Every image given round(rho N) tokens: the packed path computes the dense path's logits."""
    dense, budget = packed_model("fixed", pool=pool), packed_model("budget", pool=pool)
    budget.load_state_dict(dense.state_dict())
    give_every_image_k(monkeypatch)
    images = torch.randn(3, 3, 32, 32)
    for model in (dense, budget):
        model.eval()
    torch.testing.assert_close(budget(images, keep_rate=0.6), dense(images, keep_rate=0.6), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(budget(images, keep_rate=1.0), dense(images, keep_rate=1.0), rtol=0, atol=0)


def test_packed_mean_pool_leaves_the_cls_token_out_even_when_it_overflows():
    """An infinite CLS token does not reach its image's patch mean (0 * inf would be NaN)."""
    from pss_kernels.models.packed import packed_pool
    model = packed_model("budget", pool="mean").eval()
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    tokens = torch.randn(5, 32)
    tokens[0] = float("inf")
    pooled = packed_pool(model, tokens, cu)
    torch.testing.assert_close(pooled, model.fc_norm(torch.stack([tokens[1:3].mean(0), tokens[4:5].mean(0)])))


@pytest.mark.parametrize("placement", ["after_attention", "before_block"])
def test_packed_token_level_with_equal_counts_equals_the_dense_model(placement, monkeypatch):
    """Tri-Level's token level on packed tokens: with every image given round(rho N) tokens, the
    selectors keep what the dense selectors keep and the logits and gradients are the dense path's."""
    from pss_kernels.models import TokenPruning
    models = {allocation: packed_model(allocation, depth=4, token_pruning=TokenPruning((2, 3), placement=placement))
              for allocation in ("fixed", "budget")}
    models["budget"].load_state_dict(models["fixed"].state_dict())
    give_every_image_k(monkeypatch)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    results = {}
    for allocation, model in models.items():
        model.token_keep_rate = 0.7
        logits = model.eval()(images, keep_rate=0.6)
        logits.square().sum().backward()
        results[allocation] = (logits, model.blocks[0].attn.qkv.weight.grad, model.patch_embed.proj.weight.grad)
    for got, want in zip(results["budget"], results["fixed"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_packed_token_level_keeps_a_count_per_image():
    """select_packed: image b keeps its CLS and kept_count(n_b - 1) patches by CLS attention, as the
    dense selector keeps them in a batch of that image alone; a 2-token image keeps both."""
    from pss_kernels.models import TokenPruning
    from pss_kernels.models.token_pruning import kept_count
    pruning = TokenPruning((1,), token_keep_rate=0.5, quantum=None)
    lengths = [9, 2, 6, 13]
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(total, 4, generator=generator)
    positions = torch.arange(total) * 3
    cls_attention = torch.randint(0, 3, (total,), generator=generator).float()  # ties
    new_tokens, new_positions, new_cu = pruning.select_packed(tokens, positions, cu, cls_attention)
    want_lengths = [1 + kept_count(n - 1, 0.5, None) for n in lengths]
    assert (new_cu[1:] - new_cu[:-1]).tolist() == want_lengths
    for b, n in enumerate(lengths):
        start = int(cu[b])
        x, index, _ = pruning.select(tokens[start:start + n][None], positions[start:start + n][None], None,
                                     cls_attention[start:start + n][None], None)
        part = slice(int(new_cu[b]), int(new_cu[b + 1]))
        assert torch.equal(new_tokens[part], x[0]) and torch.equal(new_positions[part], index[0]), b
    # A NaN attention (as a diverged step gives) never moves a patch before its image's CLS token.
    cls_attention[[1, 10, 13]] = float("nan")
    _, nan_positions, nan_cu = pruning.select_packed(tokens, positions, cu, cls_attention)
    assert torch.equal(nan_cu, new_cu) and torch.equal(nan_positions[nan_cu[:-1].long()], positions[cu[:-1].long()])


@pytest.mark.parametrize("allocation", ["budget", "mass"])
def test_packed_model_trains_with_per_image_counts(allocation, monkeypatch):
    from pss_kernels.models import packed
    model = packed_model(allocation, drop_path_rate=0.1).train()
    seen = []
    real = packed.keep_counts

    def spy(*args):
        counts = real(*args)
        seen.append(counts.clone())
        return counts
    monkeypatch.setattr(packed, "keep_counts", spy)
    images = torch.randn(4, 3, 32, 32)
    images[0] = 0.0
    images[0, :, :8, :8] = 50.0  # one bright patch on a plain background: little to keep, and it scores low overall
    images[0, :, :8, :8] *= -1 if allocation == "budget" else 1
    logits = model(images, keep_rate=0.5)
    logits.sum().backward()
    (counts,) = seen
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()
    if allocation == "budget":
        assert counts.sum().item() == round(0.5 * 4 * 17) and counts[0] == counts.min()
    assert len(set(counts.tolist())) > 1  # the images keep different numbers of tokens
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.blocks[0].attn.relative_position_bias_table.grad.abs().sum() > 0


@pytest.mark.triton
def test_packed_model_on_the_fused_kernel_equals_the_torch_backend(device, monkeypatch):
    """attn_backend='triton' and sampler_backend='triton' reach the packed ops' fused kernels: the same
    logits and gradients as the float32 torch backends, for a budget allocation (images of different
    lengths). cuDNN's TF32 (on by default) is turned off: the patch embedding's weight gradient would
    round the two backends' slightly different upstream gradients to different TF32 values."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    models = {backend: packed_model("budget", attn_backend=backend, sampler_backend=backend).to(device)
              for backend in ("torch", "triton")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)).to(device)
    results = {}
    for backend, model in models.items():
        logits = model.eval()(images, keep_rate=0.5)
        logits.square().sum().backward()
        results[backend] = (logits, model.blocks[0].attn.relative_position_bias_table.grad,
                            model.blocks[0].attn.qkv.weight.grad, model.patch_embed.proj.weight.grad)
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_packed_budget_step_traces_whole_and_once_under_torch_compile():
    """With the budget policy T is known on the host, so the packed forward's code around the ops
    (scores, policy, checks, blocks, pooling) has no host read and no data-dependent shape:
    torch.compile(fullgraph=True) traces it whole, once for batches whose images keep different counts,
    and computes the eager logits and gradients. (A host read or a data-dependent shape would break the
    graph, which fullgraph turns into an error.) The ops' torch backends are opaque custom ops here; the
    fused ones add no sync of their own (the cuda test below)."""
    from pss_kernels.models.packed import input_keep_counts, packed_features, packed_pool
    model = packed_model("budget", drop_path_rate=0.0, attn_backend="torch", sampler_backend="torch").train()
    graphs = []

    def counting_aot_eager(graph, example_inputs):
        graphs.append(graph)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(graph, example_inputs)

    def forward(images):
        tokens, _, cu_seqlens = packed_features(model, model.embed(images), 0.5)
        return model.head(packed_pool(model, tokens, cu_seqlens))

    compiled = torch.compile(forward, fullgraph=True, backend=counting_aot_eager)
    generator = torch.Generator().manual_seed(6)
    seen_counts = set()
    for _ in range(2):
        images = torch.randn(4, 3, 32, 32, generator=generator) * torch.rand(4, 1, 1, 1, generator=generator)
        seen_counts.add(tuple(input_keep_counts(model, model.embed(images), 0.5).tolist()))
        got = compiled(images)
        (got_grad,) = torch.autograd.grad(got.square().sum(), model.blocks[0].attn.relative_position_bias_table)
        want = forward(images)
        (want_grad,) = torch.autograd.grad(want.square().sum(), model.blocks[0].attn.relative_position_bias_table)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    assert len(seen_counts) == 2  # the two batches spread their tokens differently ...
    assert len(graphs) == 1  # ... and share one graph


@pytest.mark.cuda
def test_gpu_packed_budget_step_makes_no_host_sync(device):
    """On a GPU the budget step on the fused backends (sampler and attention, forward and backward)
    runs with torch.cuda's sync debug mode set to error: nothing in it waits for the device."""
    model = packed_model("budget", attn_backend="triton", sampler_backend="triton").to(device).train()
    images = torch.randn(4, 3, 32, 32, device=device)
    model(images, keep_rate=0.5).sum().backward()  # warm-up: compilation, autotuning, caches
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(images, keep_rate=0.5).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


def test_packed_model_refuses_what_it_does_not_run():
    from pss_kernels.models import TokenPruning
    with pytest.raises(ValueError, match="allocation must be one of"):
        packed_model("greedy")
    model = packed_model("budget", token_pruning=TokenPruning((2,)))
    model.token_keep_rate, model.attention_keep_rate = 0.7, 0.5
    with pytest.raises(ValueError, match="the attention level .* runs on dense tokens only"):
        model(torch.randn(2, 3, 32, 32), keep_rate=0.5)
    with pytest.raises(ValueError, match="needs the relative position bias"):
        packed_model("mass", rpb=False)
    with pytest.raises(ValueError, match="dense peer"):
        packed_model("budget", attn_impl="published")
    with pytest.raises(ValueError, match="allocation='mass' spreads each image's score mass"):
        packed_model("mass", scorer="center")


@pytest.mark.parametrize("flags, message", [
    (["--attention-keep", "0.3"], "--attention-keep 0.3 with --allocation budget: Tri-Level's attention level runs"),
    (["--budget", "0.5"], "--budget 0.5 with --allocation budget: Budgeted Training's growth stages run on dense"),
])
def test_pss_train_refuses_dense_only_methods_with_packed_tokens_at_start(flags, message, tmp_path, capsys):
    """Refused before any data or model is built (not at the first step the method's warm-up reaches),
    naming the user's flags."""
    from pss_kernels.train.__main__ import main
    status = main(["--data", "digits", "--allocation", "budget", "--schedule", "fixed:0.6", "--epochs", "1",
                   "--out-dir", str(tmp_path / "run"), *flags])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_pss_train_runs_and_resumes_with_a_budget_allocation(tmp_path):
    from pss_kernels.train import Trainer, TrainConfig, load_checkpoint
    from pss_kernels.train.distributed import DistInfo
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    options = dict(model="deit_tiny", embed_dim=16, depth=2, num_heads=2, patch_size=8, data="digits", img_size=16,
                   batch_size=32, lr=2e-3, workers=0, progress=False, epochs=2, schedule="fixed:0.6",
                   allocation="budget", scorer="l1")
    straight = Trainer(TrainConfig(**options, out_dir=str(tmp_path / "straight")), cpu).fit()
    assert straight["finished"] and straight["final_eval"]["top1"] >= 0
    assert load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["config"]["allocation"] == "budget"
    Trainer(TrainConfig(**options, out_dir=str(tmp_path / "resumed"), stop_at_step=30), cpu).fit()
    resumed = Trainer(TrainConfig(**options, out_dir=str(tmp_path / "resumed"), resume="auto"), cpu).fit()
    assert resumed["params_sha256"] == straight["params_sha256"]


def test_pss_train_times_and_counts_a_packed_step_by_what_its_images_kept(tmp_path, monkeypatch):
    """A packed run whose policy keeps fewer tokens than round(rho N) (here: each image the fewest
    patches holding 0.6 of its L1 mass, far fewer on digits): each step's record holds its images'
    mean kept tokens (packed_tokens), and the step is timed and FLOP-counted at that count."""
    import json
    from pss_kernels.models import packed
    from pss_kernels.train import Trainer, TrainConfig
    monkeypatch.setattr(packed, "keep_counts", lambda policy, scores, rate, prefix: mass_keep_counts(scores, rate,
                                                                                                      prefix))
    from pss_kernels.train.distributed import DistInfo
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    config = TrainConfig(model="deit_tiny", embed_dim=16, depth=2, num_heads=2, patch_size=4, data="digits",
                         img_size=16, batch_size=64, lr=2e-3, workers=0, progress=False, epochs=1,
                         schedule="fixed:0.6", allocation="mass", scorer="l1", eval_every=0, out_dir=str(tmp_path))
    trainer = Trainer(config, cpu)
    trainer.fit()
    train = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"train"' in line]
    train = [r for r in train if r["type"] == "train"]
    assert all(r["tokens"] == min(17, max(2, round(r["packed_tokens"]))) for r in train)
    assert len({r["packed_tokens"] for r in train}) > 1  # the mass policy keeps what each batch needs
    assert {r["tokens"] for r in train} != {round(0.6 * 17)}
    assert set(trainer.times.count) <= {r["tokens"] for r in train}  # timed by those counts
    summary = json.loads((tmp_path / "summary.json").read_text())
    per_tokens = summary["timing"]["per_tokens"]  # the time summary by the counts the steps kept
    assert set(per_tokens) == {str(k) for k in trainer.times.count}
    assert sum(entry["share"] for entry in per_tokens.values()) == pytest.approx(1.0)
    assert all(entry["source"] == "measured" for entry in per_tokens.values())
    by_tokens = {r["tokens"]: r["flops"] for r in train}
    if len(by_tokens) > 1:
        fewest, most = min(by_tokens), max(by_tokens)
        assert by_tokens[fewest] < by_tokens[most]


def test_pss_train_runs_tri_level_token_pruning_on_packed_tokens(tmp_path):
    """--allocation budget with --token-pruning: the selectors prune each image's own tokens; the run
    finishes and its model keeps different lengths per image after the selectors."""
    from pss_kernels.train import Trainer, TrainConfig
    from pss_kernels.train.distributed import DistInfo
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    config = TrainConfig(model="deit_tiny", embed_dim=16, depth=3, num_heads=2, patch_size=4, data="digits",
                         img_size=16, batch_size=64, lr=2e-3, workers=0, progress=False, epochs=2,
                         schedule="fixed:0.6", allocation="budget", scorer="l1", token_pruning="0.7,2",
                         pruning_warmup="0,1", out_dir=str(tmp_path))
    trainer = Trainer(config, cpu)
    summary = trainer.fit()
    assert summary["finished"] and summary["final_eval"]["top1"] >= 0
    from pss_kernels.models import packed
    model = trainer.model
    assert model.token_keep_rate == pytest.approx(0.7)
    x = torch.randn(4, 1 + 16, 16)
    x[0] *= 5  # a bright image: the budget policy gives it more tokens
    _, _, cu = packed.packed_features(model.eval(), x, 0.6)
    lengths = (cu[1:] - cu[:-1]).tolist()
    assert len(set(lengths)) > 1 and sum(lengths) < round(0.6 * 4 * 17)  # per image, and pruned

    # pss-evaluate on the packed checkpoint: the sweep records each rate's per-image spread, the
    # pictures show what each image kept.
    import json
    from pss_kernels import evaluate
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--out-dir", str(out), "--keep-rates",
                          "1.0,0.6", "--max-images", "64", "--batch-size", "32", "--workers", "0",
                          "--num-pictures", "2"]) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert report["allocation"] == "budget"
    full, packed_rate = report["results"]
    assert "mean_tokens" not in full and packed_rate["min_tokens"] <= packed_rate["mean_tokens"] <= \
        packed_rate["max_tokens"]
    assert packed_rate["mean_tokens"] == pytest.approx(round(0.6 * 32 * 17) / 32, abs=0.01)  # budget: T = round(rho B N)
    assert (out / "patches.png").stat().st_size > 0


def test_evaluate_pictures_what_a_packed_model_keeps_per_image():
    """kept_and_probabilities on a packed model: each image's mask holds the patches it kept (its own
    count, after the selectors) and the probabilities are the model's own packed forward's."""
    from pss_kernels import evaluate
    from pss_kernels.models import TokenPruning, packed
    model = packed_model("budget", depth=3, token_pruning=TokenPruning((2,))).eval()
    model.token_keep_rate = 0.7
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    images[0] *= 4
    with torch.no_grad():
        kept, probs = evaluate.kept_and_probabilities(model, images, 0.5)
        _, positions, cu = packed.packed_features(model, model.embed(images), 0.5)
        torch.testing.assert_close(probs, model(images, keep_rate=0.5).softmax(-1))
    lengths = (cu[1:] - cu[:-1]).tolist()
    assert kept.flatten(1).sum(1).tolist() == [n - 1 for n in lengths] and len(set(lengths)) > 1
    mask = evaluate.packed_kept_patch_mask(torch.tensor([0, 2, 3, 0, 1]), torch.tensor([0, 3, 5], dtype=torch.int32),
                                           (2, 2))
    assert mask.tolist() == [[[False, True], [True, False]], [[True, False], [False, False]]]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_varlen_peers_on_cpu():
    """FlexAttention with the document mask equals the oracle (its forward: FlexAttention has no CPU
    backward); FlashAttention varlen says why it cannot run here."""
    from pss_kernels.ops.varlen.peers import flex_varlen_rpb_attention, varlen_flash_attention
    q, k, v, table, positions, cu = (t.detach() for t in packed_case([5, 13, 2, 7], head_dim=16))
    flex = flex_varlen_rpb_attention(q, k, v, table, positions, cu, grid_size=GRID, scale=0.3)
    reference = rpb_attention_varlen_reference(q, k, v, table, positions, cu, grid_size=GRID, scale=0.3)
    torch.testing.assert_close(flex, reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="varlen flash attention is unavailable"):
        varlen_flash_attention(q, k, v, cu, 13)


# ----------------------------------------------------------------------------- GPU only

def _vit_packed_case(device, dtype=torch.bfloat16, images=32, seed=0):
    """ViT-B attention shapes on a 14 x 14 grid: 32 images keeping 20..197 tokens (budget-like spread)."""
    from pss_kernels.ops.varlen import budget_keep_counts
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(images, 196, generator=generator).exp() * torch.randn(images, 1, generator=generator).exp()
    counts = budget_keep_counts(scores, 0.5, 1, min_patches=19)
    x = torch.randn(images, 197, 8, generator=generator)
    _, positions, cu = sample_patches_varlen(x, counts, scorer="given", scores=scores)
    total = positions.numel()
    q, k, v = (torch.randn(total, 12, 64, generator=generator).to(device, dtype).requires_grad_() for _ in range(3))
    table = (0.1 * torch.randn(bias_table_rows((14, 14), 1), 12, generator=generator)).to(device).requires_grad_()
    return q, k, v, table, positions.to(device), cu.to(device)


@pytest.mark.cuda
@pytest.mark.parametrize("accumulator", ["auto", "csr", "slices"])
def test_gpu_varlen_kernel_at_vit_shapes(accumulator, device, monkeypatch):
    """The compiled fused kernel at ViT-B shapes in bf16: within bf16 tolerance of the float32 oracle on
    the same rounded inputs; deterministic mode bit-identical run to run."""
    monkeypatch.setenv("PSS_KERNELS_RPB_DBIAS", accumulator)
    q, k, v, table, positions, cu = _vit_packed_case(device)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, q.dtype)
    options = dict(grid_size=(14, 14), return_cls_attention=True)
    out, cls = rpb_attention_varlen(q, k, v, table, positions, cu, backend="triton", **options)
    got = torch.autograd.grad(out, (q, k, v, table), grad)
    as_float = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want_out, want_cls = rpb_attention_varlen(*as_float, table, positions, cu, backend="torch", **options)
    want = torch.autograd.grad(want_out, (*as_float, table), grad.float())
    torch.testing.assert_close(out.float(), want_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(cls, want_cls, rtol=2e-2, atol=1e-3)
    for name, g, w in zip(("dq", "dk", "dv", "dtable"), got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=3e-2, atol=3e-2, msg=name)
    for _ in range(2):
        first = torch.autograd.grad(rpb_attention_varlen(q, k, v, table, positions, cu, backend="triton",
                                                         deterministic=True, grid_size=(14, 14)), table, grad)[0]
        second = torch.autograd.grad(rpb_attention_varlen(q, k, v, table, positions, cu, backend="triton",
                                                          deterministic=True, grid_size=(14, 14)), table, grad)[0]
        assert torch.equal(first, second)


@pytest.mark.cuda
def test_gpu_varlen_flash_peer_is_the_op_without_bias(device):
    """The benchmark's lower bound computes what it claims: FlashAttention varlen equals the op with a
    zero table."""
    from pss_kernels.ops.varlen.peers import varlen_flash_attention
    q, k, v, table, positions, cu = _vit_packed_case(device, images=8)
    longest = int((cu[1:] - cu[:-1]).max())
    try:
        flash = varlen_flash_attention(q, k, v, cu, longest)
    except RuntimeError as err:
        pytest.skip(str(err))
    expected = rpb_attention_varlen(q, k, v, torch.zeros_like(table), positions, cu, grid_size=(14, 14),
                                    backend="torch")
    torch.testing.assert_close(flash.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_gpu_varlen_flex_peer_is_the_op(device):
    """The benchmark's Flex peer computes what it claims: FlexAttention with the document mask and the
    bias in its score_mod equals the op with the table (values and table grad). Compiles FlexAttention
    (tens of seconds): apart from the flash check, so that either runs without the other."""
    from pss_kernels.ops.varlen.peers import flex_varlen_rpb_attention
    q, k, v, table, positions, cu = _vit_packed_case(device, images=8)
    try:
        flex = flex_varlen_rpb_attention(q, k, v, table, positions, cu, grid_size=(14, 14))
    except RuntimeError as err:
        if "flex_attention is unavailable" not in str(err):
            raise
        pytest.skip(str(err))
    ours = rpb_attention_varlen(q, k, v, table, positions, cu, grid_size=(14, 14), backend="torch")
    torch.testing.assert_close(flex.float(), ours.float(), rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(flex)
    torch.testing.assert_close(torch.autograd.grad(flex, table, grad)[0], torch.autograd.grad(ours, table, grad)[0],
                               rtol=5e-2, atol=5e-2)


def test_sdpa_backend_builds_the_padded_layout_once_for_every_layer(monkeypatch):
    """Every layer of a packed step shares its offsets and positions, so the sdpa backend builds their
    padded layout (one host sync, the table rows) once, in the first layer's forward; a new batch, or
    positions changed in place, build a new one, and the cached layout gives the uncached values."""
    from pss_kernels.ops.varlen import sdpa_varlen
    builds = []
    build = sdpa_varlen._padded_layout
    monkeypatch.setattr(sdpa_varlen, "_padded_layout", lambda *args: builds.append(1) or build(*args))
    model = packed_model("budget", depth=3, attn_backend="sdpa").train()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model.keep_rate = 0.5
    model(images).sum().backward()
    assert len(builds) == 1  # three layers, forward and backward
    model(images * torch.rand(4, 1, 1, 1, generator=torch.Generator().manual_seed(4)))
    assert len(builds) == 2
    q, k, v = (torch.randn(9, 2, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    table = torch.randn(bias_table_rows(GRID, 1), 2)
    positions, cu = torch.tensor([0, 3, 1, 0, 2, 5, 7, 1, 4]), torch.tensor([0, 3, 9], dtype=torch.int32)
    first = rpb_attention_varlen(q, k, v, table, positions, cu, grid_size=GRID, backend="sdpa")
    positions[2] = 6  # in place: the version changes, the layout is rebuilt
    second = rpb_attention_varlen(q, k, v, table, positions, cu, grid_size=GRID, backend="sdpa")
    assert len(builds) == 4
    want = rpb_attention_varlen(q, k, v, table, positions, cu, grid_size=GRID, backend="torch")
    torch.testing.assert_close(second, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(first, second)


def test_sdpa_layout_cache_is_safe_across_inference_mode_and_cells(monkeypatch):
    """A layout built under torch.inference_mode is not cached (its tensors could not be saved for a
    later backward with the same offsets and positions); (row, column) cells are converted once per
    cells tensor, so every layer given the same cells shares one layout too."""
    from pss_kernels.ops.varlen import sdpa_varlen
    builds = []
    build = sdpa_varlen._padded_layout
    monkeypatch.setattr(sdpa_varlen, "_padded_layout", lambda *args: builds.append(1) or build(*args))
    q, k, v = (torch.randn(9, 2, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    table = torch.randn(bias_table_rows(GRID, 1), 2)
    positions, cu = torch.tensor([0, 3, 1, 0, 2, 5, 7, 1, 4]), torch.tensor([0, 3, 9], dtype=torch.int32)
    with torch.inference_mode():
        rpb_attention_varlen(q, k, v, table, positions, cu, grid_size=GRID, backend="sdpa")
    q.requires_grad_(), table.requires_grad_()
    rpb_attention_varlen(q, k, v, table, positions, cu, grid_size=GRID, backend="sdpa").sum().backward()
    assert table.grad is not None and len(builds) == 2
    cells, own_positions, cu, q, k, v, table = native_case()
    builds.clear()
    outs = [rpb_attention_varlen(q, k, v, table, cells, cu, grid_size=MAX_GRID, backend="sdpa") for _ in range(3)]
    assert len(builds) == 1 and all(torch.equal(out, outs[0]) for out in outs)


def test_tensor_keyed_cache_is_thread_safe():
    """nn.DataParallel runs its replicas in threads: hits, misses and evictions of one small cache from
    several threads at once must neither raise nor hand a thread another key's value."""
    import sys
    import threading
    from pss_kernels._cache import TensorKeyedCache
    cache = TensorKeyedCache(kept=2)
    shared = torch.arange(3)
    errors = []

    def hammer(worker):
        try:
            for i in range(20000):
                mine = shared if worker % 2 else torch.full((1,), i)  # hits of one key, misses evicting it
                value = cache.get((mine,), (), lambda: int(mine.sum()))
                assert value == int(mine.sum())
        except Exception as err:  # reported below, with the thread's error
            errors.append(err)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and len(cache.entries) <= 2


def test_sdpa_padding_keys_are_masked_by_the_gather_in_aligned_storage():
    """The padding keys' table rows point at a row of -inf appended to the table, so the gathered bias
    masks them without a separate (B, H, L, L) pass and keeps gather_bias's storage, whose rows are
    padded to MASK_ALIGNMENT for SDPA's kernels on CUDA (pad=True, forced here on CPU)."""
    from pss_kernels.ops.rpb_attention.sdpa_attention import MASK_ALIGNMENT, gather_bias
    from pss_kernels.ops.varlen.sdpa_varlen import _padded_layout
    positions, cu = torch.tensor([0, 3, 1, 0, 2, 5, 7, 1, 4]), torch.tensor([0, 3, 9], dtype=torch.int32)
    rows, valid, longest, table_index = _padded_layout(cu, positions, 9, GRID, 1, True)
    table = torch.randn(bias_table_rows(GRID, 1), 2)
    bias = gather_bias(torch.cat((table, torch.full((1, 2), float("-inf")))), table_index, longest, torch.float32)
    assert longest == 6 and bias.shape == (2, 2, 6, 6)
    assert bias.stride(-2) % MASK_ALIGNMENT == 0 and bias.stride(-2) > 6  # the aligned rows, not a copy
    assert torch.isinf(bias[0, :, :, 3:]).all() and torch.isfinite(bias[0, :, :, :3]).all()
    assert torch.isfinite(bias[1]).all()  # the longest image has no padding key
