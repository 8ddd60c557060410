"""Packed sequences (issue 19): what packing costs and what the allocation policies cost, at ViT-B shapes.

    python benchmarks/varlen.py                          # GPU: ViT-B, B = 256, 14 x 14, bf16, rho 0.6 / 0.4 / 0.2
    python benchmarks/varlen.py --keep-rates 0.6 --impls dense,packed-fixed
    python benchmarks/varlen.py --device cpu             # a smoke run of tiny shapes (labelled as such)

Per keep rate rho, every image of the dense case keeps k = round(rho N) tokens (T = B k in all); the
rows, each forward and forward+backward (the table trainable), median ms and peak memory:

  dense          rpb_attention on (B, H, k, D) with an index: the dense kernel (triton on a GPU)
  packed-fixed   rpb_attention_varlen's fused Triton kernel, every image k tokens: the cost of packing
                 (target: <= 1.05x dense, forward+backward, bf16)
  packed-budget  the same kernel on the budget policy's counts (one top-K over the batch at the rate
                 k / N: exactly the same T)
  packed-mass    on the mass policy's counts at k / N (its fraction solved for B k tokens, as nearly as
                 the images' steps allow)
  packed-sdpa    rpb_attention_varlen's sdpa backend (padded into one batch: today's default) on the budget
                 counts, its padded layout built each call (a step builds it once for all its layers)
  fa-varlen      PyTorch's FlashAttention varlen kernel (no bias: the lower bound) on the budget counts
  flex-packed    FlexAttention, document block mask + bias score_mod, on the budget counts
  sample-dense   the sampler: sample_patches on x (B, N, H*D) at rho (the anchor of the next row)
  sample-packed  sample_patches_varlen on the budget counts (fused Triton sampler on a GPU; its host
                 sync for T included)
  sample-packed-torch  the same with backend="torch" and total= (the default path today: one batched
                 sort and gather, no host sync)

The per-image scores the policies see are synthetic (synthetic_scores: images of different brightness
and different spread), so the counts differ from image to image as real images' do; the JSON records each case's count
spread. On a GPU the "dense" and "packed-*" rows use the triton backend, on CPU the torch one (the
interpreter is not timed). dense and packed-fixed are timed interleaved (ROUNDS blocks, alternating)
and, on CUDA, also replayed from a CUDA graph (graph_ms: the kernels without the host), which decides
the verdict where both have it. Output: a table, the target line (PASS, MISS or NOT MEASURED, with the
reason), a JSON written whole after every row (varlen_<device>.json) and, with --plot, a PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from _timing import (TimeBudget, TimingStats, context_lost, dynamo_recompile_limit, environment_info, file_slug,
                     host_issue_ms, peak_memory_mb, synchronize, time_graph_replays, time_samples)
from bench_rpb_attention import RowTimeout, _time_limit
from pss_kernels import available_backends, rpb_attention, rpb_attention_varlen, sample_patches, sample_patches_varlen
from pss_kernels.ops.rpb_attention.reference import bias_table_rows
from pss_kernels.ops.sample_patches.reference import num_kept_tokens, select_indices
from pss_kernels.ops.varlen import budget_keep_counts, mass_keep_counts_at_rate
from pss_kernels.ops.varlen.peers import document_block_mask, flex_varlen_rpb_attention, varlen_flash_attention

HERE = Path(__file__).resolve().parent
IMPLS = ("dense", "packed-fixed", "packed-budget", "packed-mass", "packed-sdpa", "fa-varlen", "flex-packed",
         "sample-dense", "sample-packed", "sample-packed-torch")
TARGET_PAIR = ("dense", "packed-fixed")  # timed interleaved (ROUNDS blocks), and from CUDA graphs too
GRAPH_TIMED = TARGET_PAIR
ROUNDS = 4
PRIORITY = (TARGET_PAIR, ("packed-budget", "packed-mass", "fa-varlen", "packed-sdpa"),
            ("sample-dense", "sample-packed", "sample-packed-torch"), ("flex-packed",))
# The row each impl's ms_vs_dense divides by: the dense attention kernel, or the dense sampler.
ANCHORS = {"sample-dense": "sample-dense", "sample-packed": "sample-dense", "sample-packed-torch": "sample-dense"}
POLICIES = {"packed-fixed": "fixed", "dense": "fixed", "sample-dense": "fixed", "packed-mass": "mass"}  # else budget
KEEP_RATES = (0.6, 0.4, 0.2)
PASSES = ("forward", "forward+backward")
PACKING_TARGET = 1.05  # packed-fixed / dense, forward+backward, bf16, ViT-B
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_SHAPE = dict(batch=256, heads=12, head_dim=64, grid=(14, 14))
CPU_SHAPE = dict(batch=4, heads=2, head_dim=16, grid=(4, 4))
PREFIX = 1
FLEX_TIME_LIMIT_S = 90.0  # FlexAttention compiles once per shape, forward and backward
FLEX_MIN_LEFT_S = 20.0
FLEX_RECOMPILE_LIMIT = 16


def synthetic_scores(batch: int, patches: int, generator: torch.Generator, device) -> torch.Tensor:
    """(B, P) positive patch scores: per image a log-normal brightness (what the budget policy sees) times
    log-normal patch scores of a per-image spread (a cluttered image flat, an object on a plain
    background peaked: what the mass policy sees)."""
    brightness = torch.randn(batch, 1, generator=generator).mul(0.5).exp()
    spread = torch.randn(batch, 1, generator=generator).mul(0.5).exp()
    return (torch.randn(batch, patches, generator=generator).mul(spread).exp() * brightness).to(device)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    cu_seqlens = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    cu_seqlens[1:] = counts.cumsum(0)
    return cu_seqlens


def _positions(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(T,) each image's kept positions, the CLS token first, as sample_patches_varlen keeps them."""
    return torch.cat([select_indices(scores[b:b + 1], int(c), PREFIX, "score")[0]
                      for b, c in enumerate(counts.tolist())])


class Case:
    """The inputs of one keep rate: the dense case and three packed ones at the same total tokens."""

    def __init__(self, shape: dict, keep_rate: float, dtype: torch.dtype, device: torch.device, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.batch, self.heads, self.head_dim, self.grid = (shape[key] for key in ("batch", "heads", "head_dim", "grid"))
        self.keep_rate, self.dtype, self.device = keep_rate, dtype, device
        self.num_positions = PREFIX + self.grid[0] * self.grid[1]
        self.kept = num_kept_tokens(self.num_positions, keep_rate, PREFIX)
        self.total = self.batch * self.kept
        scores = synthetic_scores(self.batch, self.num_positions - PREFIX, generator, device)
        # The policies at the rate of fixed k's total (k / N, not rho: round(rho N) rounds per image), so
        # that budget keeps exactly the B k tokens of the dense rows and mass as nearly as its steps allow.
        policy_rate = self.kept / self.num_positions
        self.counts = {
            "fixed": torch.full((self.batch,), self.kept, dtype=torch.int64, device=device),
            "budget": budget_keep_counts(scores, policy_rate, PREFIX),
            "mass": mass_keep_counts_at_rate(scores, policy_rate, PREFIX),
        }
        self.cu_seqlens = {name: _offsets(c) for name, c in self.counts.items()}
        self.positions = {name: _positions(scores, c) for name, c in self.counts.items()}
        self.index = self.positions["fixed"].view(self.batch, self.kept)
        self.table = (0.1 * torch.randn(bias_table_rows(self.grid, PREFIX), self.heads, generator=generator)
                      ).to(device).requires_grad_()
        # The activations are drawn on the device (a CPU draw of B k H D values per row is seconds of the
        # GPU window's budget).
        self.generator = torch.Generator(device=device).manual_seed(seed + 1)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def tokens(self, total: int):
        """Packed q, k, v (T, H, D), leaves that require grad."""
        return [self.randn(total, self.heads, self.head_dim).requires_grad_() for _ in range(3)]

    def spread(self, name: str) -> dict:
        counts = self.counts[name].float()
        return dict(tokens=int(counts.sum()), min=int(counts.min()), mean=round(float(counts.mean()), 2),
                    max=int(counts.max()))


def _call(impl: str, case: Case, backend: str) -> Tuple[Callable[[], torch.Tensor], Tuple[torch.Tensor, ...], str]:
    """(a function of no arguments running `impl` once, the leaves its backward differentiates, the
    backend it runs on); its inputs are made here."""
    grid = case.grid
    if impl.startswith("sample-"):
        x = case.randn(case.batch, case.num_positions, case.heads * case.head_dim).requires_grad_()
        if impl == "sample-dense":
            return (lambda: sample_patches(x, case.keep_rate, backend=backend)[0]), (x,), backend
        counts = case.counts["budget"]
        if impl == "sample-packed-torch":
            total = int(counts.sum())
            return (lambda: sample_patches_varlen(x, counts, backend="torch", total=total)[0]), (x,), "torch"
        return (lambda: sample_patches_varlen(x, counts, backend=backend)[0]), (x,), backend
    if impl == "dense":
        # (B, H, k, D) views of packed (T, H, D) tokens, as a model's qkv gives them, made the leaves
        # themselves: their gradients are the kernel's own, with no copy into a leaf's strides that the
        # packed rows would not pay.
        q, k, v = (t.detach().view(case.batch, case.kept, case.heads, case.head_dim).transpose(1, 2).requires_grad_()
                   for t in case.tokens(case.total))
        return (lambda: rpb_attention(q, k, v, case.table, case.index, grid_size=grid, backend=backend,
                                      check_index=False)), (q, k, v, case.table), backend
    policy = {"packed-fixed": "fixed", "packed-mass": "mass"}.get(impl, "budget")
    positions, cu_seqlens = case.positions[policy], case.cu_seqlens[policy]
    q, k, v = case.tokens(positions.numel())
    leaves = (q, k, v, case.table)
    if impl == "packed-sdpa":
        from pss_kernels.ops.varlen.sdpa_varlen import _LAYOUTS

        def packed_sdpa():
            # A step builds its padded layout (and reads its length) once for all its layers; timing
            # one layer, the build is counted in full each call: an upper bound on a layer's share.
            _LAYOUTS.clear()
            return rpb_attention_varlen(q, k, v, case.table, positions, cu_seqlens, grid_size=grid, backend="sdpa",
                                        check_inputs=False)
        return packed_sdpa, leaves, "sdpa"
    if impl.startswith("packed-"):
        return (lambda: rpb_attention_varlen(q, k, v, case.table, positions, cu_seqlens, grid_size=grid,
                                             backend=backend, check_inputs=False)), leaves, backend
    if impl == "fa-varlen":
        longest = int(case.counts[policy].max())
        return (lambda: varlen_flash_attention(q, k, v, cu_seqlens, longest)), (q, k, v), "flash varlen (no bias)"
    if impl == "flex-packed":
        # The block mask once, outside the timing, as a model builds it once a step for all its layers.
        block_mask = document_block_mask(cu_seqlens, positions.numel())
        return (lambda: flex_varlen_rpb_attention(q, k, v, case.table, positions, cu_seqlens, grid_size=grid,
                                                  block_mask=block_mask)), leaves, "flex_attention"
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _steps(run: Callable[[], torch.Tensor], leaves: Tuple[torch.Tensor, ...]) -> Dict[str, Callable[[], None]]:
    """The two passes of one impl. The backward is torch.autograd.grad into fresh tensors, not .backward():
    accumulating into .grad would add a pass over every gradient that is not the op's."""
    grad_out = None

    def forward():
        with torch.no_grad():
            run()

    def forward_backward():
        nonlocal grad_out
        out = run()
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        torch.autograd.grad(out, leaves, grad_out, allow_unused=True)

    return {"forward": forward, "forward+backward": forward_backward}


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]


def _row(base: dict, name: str, **values) -> dict:
    row = dict(base, **{"pass": name}, ms=None, q1_ms=None, q3_ms=None, host_ms=None, graph_ms=None,
               peak_mem_mb=None, error=None)
    row.update(values)
    return row


def _base(impl: str, case: Optional[Case], keep_rate: float, shape: dict, dtype: torch.dtype, warmup: int,
          iters: int) -> dict:
    counts = (case.spread(POLICIES.get(impl, "budget")) if case is not None
              else dict(tokens=0, min=0, mean=0, max=0))
    return dict(impl=impl, keep_rate=keep_rate, B=shape["batch"], H=shape["heads"], D=shape["head_dim"],
                grid=list(shape["grid"]), dtype=str(dtype).replace("torch.", ""), backend=None, warmup=warmup,
                iters=iters, counts=counts)


def measure(impls: Sequence[str], case: Case, backend: str, warmup: int, iters: int, *, shape: dict,
            time_limit: Optional[float] = None, budget: Optional[TimeBudget] = None, rounds: int = 1) -> List[dict]:
    """Rows (forward, forward+backward) of each impl; an impl or a pass that cannot run gives its row
    the error, and the other pass is still measured. Several impls are timed interleaved: `rounds`
    blocks of iters / rounds calls each, in alternating order, so that they share the machine's drift
    (the packing target compares two of them within 5 %). CUDA: also graph_ms, the step's kernels
    replayed from a CUDA graph (no host work between them), and host_ms. time_limit: seconds for each
    impl's building and each pass (SIGALRM, compilation included); with `budget`, each of those phases
    also stops where the run's budget ends (FlexAttention: a row has up to six phases, and a limit
    re-armed in full for each would overrun the stage that started it with little left)."""

    def limit() -> Optional[float]:
        if budget is None:
            return time_limit
        left = budget.left()
        if left <= 0:  # _time_limit(0) would mean no limit at all
            raise RowTimeout(f"stopped: the run's time budget of {budget.seconds:g} s ran out in this row")
        return min(time_limit, left) if time_limit else left  # 0 or None: no limit of its own

    bases = {impl: _base(impl, case, case.keep_rate, shape, case.dtype, warmup, iters) for impl in impls}
    rows: Dict[Tuple[str, str], dict] = {}
    steps: Dict[str, Dict[str, Callable[[], None]]] = {}
    for impl in impls:
        try:
            with _time_limit(limit()):
                run, leaves, label = _call(impl, case, backend)
            bases[impl]["backend"] = label
            steps[impl] = _steps(run, leaves)
        except Exception as err:
            for name in PASSES:
                rows[impl, name] = _row(bases[impl], name, error=_error_text(err))
    device = case.device
    for name in PASSES:
        live = [impl for impl in impls if impl in steps and (impl, name) not in rows]
        samples: Dict[str, List[float]] = {impl: [] for impl in live}

        def fail(impl, err):
            rows[impl, name] = _row(bases[impl], name, error=_error_text(err))
            live.remove(impl)

        for impl in list(live):
            try:
                with _time_limit(limit()):
                    for _ in range(max(warmup, 1)):  # at least one: compilation stays out of the samples
                        steps[impl][name]()
                    synchronize(device)
            except Exception as err:
                fail(impl, err)
        per_round = max(1, iters // rounds)
        for round_number in range(rounds):
            for impl in (list(live) if round_number % 2 == 0 else list(reversed(live))):
                try:
                    with _time_limit(limit()):
                        samples[impl] += time_samples(steps[impl][name], warmup=0, iters=per_round, device=device)
                except Exception as err:
                    fail(impl, err)
        for impl in live:
            stats = TimingStats.from_samples(samples[impl])
            row = _row(bases[impl], name, ms=stats.median_ms, q1_ms=stats.q1_ms, q3_ms=stats.q3_ms)
            try:
                with _time_limit(limit()):
                    row["host_ms"] = host_issue_ms(steps[impl][name], device, calls=5)
                    row["peak_mem_mb"] = peak_memory_mb(steps[impl][name], device)
                    if device.type == "cuda" and impl in GRAPH_TIMED:
                        try:
                            row["graph_ms"] = time_graph_replays(steps[impl][name], warmup=1, iters=iters,
                                                                 device=device).median_ms
                        except Exception as err:  # e.g. a host sync in the step: the eager figure stands
                            row["graph_error"] = _error_text(err)
            except Exception as err:
                row["graph_error"] = _error_text(err)
            rows[impl, name] = row
    return [rows[impl, name] for impl in impls for name in PASSES]


def add_ratios(rows: List[dict]) -> None:
    """ms_vs_dense: each row against its anchor's row (ANCHORS: the dense attention kernel, the dense
    sampler) of the same keep rate and pass; graph_vs_dense the same of graph_ms."""
    for field, ratio in (("ms", "ms_vs_dense"), ("graph_ms", "graph_vs_dense")):
        anchors = {(r["impl"], r["keep_rate"], r["pass"]): r.get(field) for r in rows}
        for r in rows:
            anchor = anchors.get((ANCHORS.get(r["impl"], "dense"), r["keep_rate"], r["pass"]))
            r[ratio] = r[field] / anchor if r.get(field) is not None and anchor else None


HOST_BOUND = 0.8  # a row whose host time to issue a call reaches this share of its time measured the host


def is_host_bound(row: dict) -> bool:
    """The row's eager time is the host's: issuing a call takes HOST_BOUND of it or more."""
    return row.get("host_ms") is not None and row.get("ms") is not None and row["host_ms"] >= HOST_BOUND * row["ms"]


def packing_target(rows: List[dict], keep_rates: Sequence[float], *, on_gpu: bool, backend: str,
                   dtype: torch.dtype) -> List[dict]:
    """packed-fixed / dense forward+backward per keep rate: PASS at <= PACKING_TARGET, MISS above, NOT
    MEASURED (with the reason) when a row is missing, or the run is not the target's: the fused Triton
    kernels on a GPU in bf16. `basis` says which ratio decides:

    The eager medians where neither row is host-bound (is_host_bound: issuing a call takes under
    HOST_BOUND of its time): they hit the caches as a model's layers do, while a graph replay rebuilds
    what depends on the offsets (the packed work table, in the forward, dq and dkdv: a model builds it
    once a step), which would charge the packed side a few dozen small kernels the dense side does not
    pay. Host-bound rows take the CUDA-graph replays, and with none the target is NOT MEASURED."""
    verdicts = []
    for keep_rate in keep_rates:
        pair = {r["impl"]: r for r in rows if r["impl"] in TARGET_PAIR and r["keep_rate"] == keep_rate
                and r["pass"] == "forward+backward"}
        packed, dense = pair.get("packed-fixed"), pair.get("dense")
        eager = packed.get("ms_vs_dense") if packed else None
        graph = packed.get("graph_vs_dense") if packed else None
        host_bound = any(r is not None and is_host_bound(r) for r in (packed, dense))
        if graph is not None and (host_bound or eager is None):
            ratio, basis = graph, "cuda graph replays (the packed side rebuilding its work tables)"
        elif eager is not None and host_bound:
            ratio, basis = None, None  # host-bound and no graph: the kernels were not what was timed
        else:
            ratio, basis = eager, "eager calls"
        reason = None
        if not on_gpu:
            reason = "off a GPU (a CPU smoke run: the target is the fused kernels' on a GPU)"
        elif backend != "triton":
            reason = f"the {backend} backend ran, not the fused Triton kernels"
        elif dtype != torch.bfloat16:
            reason = f"{str(dtype).replace('torch.', '')}, not bf16"
        elif packed is None or dense is None:
            reason = "packed-fixed and dense were not both run (--impls)"
        elif ratio is None and eager is not None and host_bound:
            reason = "host-bound eager calls and no CUDA-graph time: the kernels were not what was timed"
        elif ratio is None:
            reason = "not measured: " + "; ".join(f"{r['impl']}: {r['error']}" for r in (dense, packed) if r["error"])
        verdicts.append(dict(keep_rate=keep_rate, ratio=None if reason else ratio, basis=None if reason else basis,
                             eager_ratio=eager, graph_ratio=graph,
                             status="NOT MEASURED" if reason else "PASS" if ratio <= PACKING_TARGET else "MISS",
                             reason=reason))
    return verdicts


def print_table(rows: List[dict]) -> None:
    print(f"{'rho':>4} {'impl':<19} {'pass':<17} {'tokens':>7} {'min/mean/max':>16} {'ms':>9} {'vs dense':>8} "
          f"{'graph ms':>9} {'vs dense':>8} {'MiB':>8}  error / note")
    for r in rows:
        c = r["counts"]
        cells = ["-" if r.get(key) is None else format(r[key], spec)
                 for key, spec in (("ms", ".3f"), ("ms_vs_dense", ".3f"), ("graph_ms", ".3f"),
                                   ("graph_vs_dense", ".3f"), ("peak_mem_mb", ".0f"))]
        note = r["error"] or ""
        if is_host_bound(r):
            note = f"host-bound eager (host {r['host_ms']:.3f} ms a call): see graph ms"
        spread = f"{c['min']}/{c['mean']:g}/{c['max']}"
        print(f"{r['keep_rate']:>4} {r['impl']:<19} {r['pass']:<17} {c['tokens']:>7} {spread:>16} {cells[0]:>9} "
              f"{cells[1]:>8} {cells[2]:>9} {cells[3]:>8} {cells[4]:>8}  {note}")


def describe_shape(shape: dict) -> str:
    grid = shape["grid"]
    return (f"B={shape['batch']} H={shape['heads']} D={shape['head_dim']} grid {grid[0]}x{grid[1]} + CLS, "
            f"{str(shape.get('dtype', '')).replace('torch.', '')}, {shape.get('backend', '')} backend")


def plot(results: dict, path: Path) -> None:
    """Forward+backward per impl against the keep rate: ms (log scale), and ms / dense with the packing
    target's line at PACKING_TARGET (graph replays where measured, dashed: eager)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in results["rows"] if r["pass"] == "forward+backward" and r["ms"] is not None]
    figure, (times, ratios) = plt.subplots(1, 2, figsize=(12, 4.8))
    for impl in IMPLS[:IMPLS.index("sample-dense")]:  # attention only: the sampler rows are another op
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["keep_rate"])
        if not mine:
            continue
        line, = times.plot([r["keep_rate"] for r in mine], [r["ms"] for r in mine], marker="o", label=impl)
        for field, style in (("graph_vs_dense", "-"), ("ms_vs_dense", "--")):
            points = [(r["keep_rate"], r[field]) for r in mine if r.get(field) is not None]
            if points and impl != "dense":
                ratios.plot(*zip(*points), marker="o", linestyle=style, color=line.get_color(),
                            label=f"{impl} ({'graph' if field == 'graph_vs_dense' else 'eager'})")
    ratios.axhline(PACKING_TARGET, color="red", linewidth=1, label=f"target: packed-fixed <= {PACKING_TARGET}x")
    ratios.axhline(1.0, color="grey", linewidth=0.8)
    times.set_xlabel("keep rate rho (every row: T = B round(rho N) tokens)")
    times.set_ylabel("forward+backward ms (median, eager)")
    times.set_yscale("log")
    times.legend(fontsize=7)
    ratios.set_xlabel("keep rate rho")
    ratios.set_ylabel("ms / dense kernel's ms")
    ratios.legend(fontsize=7)
    env = results["environment"]
    label = f" | {results['label']}" if results.get("label") else ""
    figure.suptitle(f"packed attention: {describe_shape(results['shape'])}\n{env['device']} | torch {env['torch']} | "
                    f"triton {env.get('triton')}{label}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_json(json_path: Path) -> Path:
    """Draw the PNG of a varlen JSON beside it (also how keep_window.py draws a window's plot)."""
    path = json_path.with_suffix(".png")
    plot(json.loads(json_path.read_text()), path)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="bf16 on a GPU (default), fp32 on CPU")
    parser.add_argument("--keep-rates", nargs="+", type=float, metavar="RHO", help=f"default {KEEP_RATES}")
    parser.add_argument("--impls", help=f"comma-separated, of {','.join(IMPLS)} (default: all, in that order)")
    parser.add_argument("--warmup", type=int, help="untimed calls per row (default 5 GPU, 1 CPU)")
    parser.add_argument("--iters", type=int, help="timed calls per row (default 20 GPU, 2 CPU)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="stop starting rows after this long; the rest are written as not measured")
    parser.add_argument("--flex-timeout", type=float, default=FLEX_TIME_LIMIT_S, metavar="SECONDS",
                        help=f"limit of each FlexAttention row's building and pass, compilation included "
                             f"(default {FLEX_TIME_LIMIT_S:g}), within what is left of --time-budget; after one "
                             f"times out the others are skipped")
    parser.add_argument("--out-dir", type=Path, help="default: benchmarks/results (GPU) or runs/ (CPU)")
    parser.add_argument("--plot", action="store_true", help="also write a PNG beside the JSON")
    return parser


def write_json(results: dict, path: Path) -> None:
    """Atomically: a run killed mid-write (the GPU session's stage limit) leaves the previous file whole."""
    scratch = path.with_suffix(".json.partial")
    scratch.write_text(json.dumps(results, indent=1))
    os.replace(scratch, path)


def _skipped(impls: Sequence[str], keep_rate: float, reason: str, shape: dict, dtype: torch.dtype, warmup: int,
             iters: int, case: Optional[Case] = None) -> List[dict]:
    return [_row(_base(impl, case, keep_rate, shape, dtype, warmup, iters), name, error=reason)
            for impl in impls for name in PASSES]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    impls = tuple(args.impls.split(",")) if args.impls else IMPLS
    unknown = [impl for impl in impls if impl not in IMPLS]
    if unknown:
        print(f"varlen.py: --impls must name some of {IMPLS}, got {unknown}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    shape = GPU_SHAPE if gpu else CPU_SHAPE
    backend = "triton" if gpu else "torch"
    if gpu and not available_backends(device)["triton"].available:
        backend = "torch"
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    iters = args.iters if args.iters is not None else (20 if gpu else 2)
    keep_rates = tuple(args.keep_rates or KEEP_RATES)
    budget = TimeBudget(args.time_budget)
    env = environment_info(device)
    out_dir = args.out_dir or (HERE / "results" if gpu else HERE.parent / "runs")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"varlen_{file_slug(env['device'])}.json"
    label = "" if gpu else "CPU smoke run (tiny shapes; the figures are not the GPU targets)"
    results = dict(environment=env, label=label, shape=dict(shape, dtype=str(dtype), backend=backend),
                   warmup=warmup, iters=iters, rounds=ROUNDS,
                   target=f"packed-fixed <= {PACKING_TARGET}x dense, forward+backward, bf16, triton", rows=[])
    print(f"varlen.py on {env['device']}: {describe_shape(results['shape'])} {label}", flush=True)

    def write() -> None:
        add_ratios(results["rows"])
        results["packing_target"] = packing_target(results["rows"], keep_rates, on_gpu=gpu, backend=backend,
                                                   dtype=dtype)
        write_json(results, path)

    # The target pair of every keep rate first, then the policies and the peers, FlexAttention (a
    # compilation per shape) last: a run cut short by its budget still has what matters most.
    cases: Dict[float, Case] = {}
    lost: Optional[str] = None  # the error that left the CUDA context unusable
    flex_failed: Optional[str] = None
    for tier in PRIORITY:
        for keep_rate in keep_rates:
            wanted = [impl for impl in impls if impl in tier]
            if not wanted:
                continue
            groups = [wanted] if tier == TARGET_PAIR else [[impl] for impl in wanted]
            for group in groups:
                common = (shape, dtype, warmup, iters)
                if lost:
                    rows = _skipped(group, keep_rate, f"not measured: the CUDA context was lost earlier ({lost})",
                                    *common)
                elif budget.spent():
                    rows = _skipped(group, keep_rate, budget.skip_reason(), *common)
                elif group == ["flex-packed"] and flex_failed:
                    rows = _skipped(group, keep_rate, f"skipped: an earlier FlexAttention row failed ({flex_failed})",
                                    *common)
                elif group == ["flex-packed"] and budget.left() < FLEX_MIN_LEFT_S:
                    rows = _skipped(group, keep_rate, f"skipped: FlexAttention compiles for 30-90 s a shape, "
                                                      f"{budget.left():.0f} s of the budget were left", *common)
                else:
                    try:
                        if keep_rate not in cases:
                            cases[keep_rate] = Case(shape, keep_rate, dtype, device)
                    except Exception as err:  # e.g. out of memory: this keep rate's rows carry it
                        rows = _skipped(group, keep_rate, f"not measured: building the inputs failed: "
                                                          f"{_error_text(err)}", *common)
                    else:
                        flex = group == ["flex-packed"]
                        with dynamo_recompile_limit(FLEX_RECOMPILE_LIMIT) if flex else contextlib.nullcontext():
                            rows = measure(group, cases[keep_rate], backend, warmup, iters, shape=shape,
                                           time_limit=args.flex_timeout if flex else None,
                                           budget=budget if flex else None, rounds=ROUNDS if len(group) > 1 else 1)
                        if flex and any(r["error"] for r in rows):
                            flex_failed = next(r["error"] for r in rows if r["error"])
                    lost = lost or next((r["error"] for r in rows if context_lost(r["error"])), None)
                results["rows"] += rows
                write()
                for row in rows:
                    timing = "-" if row["ms"] is None else format(row["ms"], ".3f")
                    print(f"  rho {keep_rate} {row['impl']:<19} {row['pass']:<17} {timing} ms {row['error'] or ''}",
                          flush=True)
    write()
    print()
    print_table(results["rows"])
    for verdict in results["packing_target"]:
        ratio = "-" if verdict["ratio"] is None else f"{verdict['ratio']:.3f} ({verdict['basis']})"
        print(f"target rho {verdict['keep_rate']}: packed-fixed / dense forward+backward = {ratio} "
              f"(<= {PACKING_TARGET}): {verdict['status']}{'; ' + verdict['reason'] if verdict['reason'] else ''}")
    if args.plot:
        plot_json(path)
    print(f"wrote {path}")
    if lost:  # the rows after it are not measured: the session records the stage as failed
        print(f"the CUDA context was lost: {lost}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
