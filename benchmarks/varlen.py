"""Packed sequences (issue 19): what packing costs and what the allocation policies cost, at ViT-B shapes.

    python benchmarks/varlen.py                          # GPU: ViT-B, B = 256, 14 x 14, bf16, rho 0.6 / 0.4 / 0.2
    python benchmarks/varlen.py --keep-rates 0.6 --impls dense,packed-fixed
    python benchmarks/varlen.py --device cpu             # a smoke run of tiny shapes (labelled as such)

Per keep rate rho, every image of the dense case keeps k = round(rho N) tokens (T = B k in all); the
rows, each forward and forward+backward (the table trainable), median ms and peak memory:

  dense          rpb_attention on (B, H, k, D) with an index: the dense kernel (triton on a GPU)
  packed-fixed   rpb_attention_varlen's fused Triton kernel, every image k tokens: the cost of packing
                 (target: <= 1.05x dense, forward+backward, bf16)
  packed-budget  the same kernel on the budget policy's counts (one top-K over the batch: the same T)
  packed-mass    on the mass policy's counts at rho (its fraction solved for round(rho B N) tokens)
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
interpreter is not timed). Output: a table, the target line (PASS, MISS or NOT MEASURED), a JSON
written after every row (varlen_<device>.json) and, with --plot, a PNG.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from _timing import TimeBudget, environment_info, file_slug, peak_memory_mb, time_iterations
from pss_kernels import available_backends, rpb_attention, rpb_attention_varlen, sample_patches, sample_patches_varlen
from pss_kernels.ops.rpb_attention.reference import bias_table_rows
from pss_kernels.ops.sample_patches.reference import num_kept_tokens, select_indices
from pss_kernels.ops.varlen import budget_keep_counts, mass_keep_counts_at_rate
from pss_kernels.ops.varlen.peers import flex_varlen_rpb_attention, varlen_flash_attention

HERE = Path(__file__).resolve().parent
IMPLS = ("dense", "packed-fixed", "packed-budget", "packed-mass", "packed-sdpa", "fa-varlen", "flex-packed",
         "sample-dense", "sample-packed", "sample-packed-torch")
PRIORITY = (("dense", "packed-fixed"), ("packed-budget", "packed-mass", "fa-varlen", "packed-sdpa"),
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
        self.counts = {
            "fixed": torch.full((self.batch,), self.kept, dtype=torch.int64, device=device),
            "budget": budget_keep_counts(scores, keep_rate, PREFIX),
            "mass": mass_keep_counts_at_rate(scores, keep_rate, PREFIX),
        }
        self.cu_seqlens = {name: _offsets(c) for name, c in self.counts.items()}
        self.positions = {name: _positions(scores, c) for name, c in self.counts.items()}
        self.index = self.positions["fixed"].view(self.batch, self.kept)
        self.table = (0.1 * torch.randn(bias_table_rows(self.grid, PREFIX), self.heads, generator=generator)
                      ).to(device).requires_grad_()
        self.generator = generator

    def tokens(self, total: int):
        return [torch.randn(total, self.heads, self.head_dim, generator=self.generator).to(self.device, self.dtype)
                .requires_grad_() for _ in range(3)]

    def spread(self, name: str) -> dict:
        counts = self.counts[name].float()
        return dict(tokens=int(counts.sum()), min=int(counts.min()), mean=round(float(counts.mean()), 2),
                    max=int(counts.max()))


def _call(impl: str, case: Case, backend: str) -> Optional[Callable[[], torch.Tensor]]:
    """A function of no arguments running `impl` once (its inputs made here), returning its output."""
    grid = case.grid
    if impl.startswith("sample-"):
        x = torch.randn(case.batch, case.num_positions, case.heads * case.head_dim, generator=case.generator)
        x = x.to(case.device, case.dtype).requires_grad_()
        if impl == "sample-dense":
            return lambda: sample_patches(x, case.keep_rate, backend=backend)[0]
        counts = case.counts["budget"]
        if impl == "sample-packed-torch":
            total = int(counts.sum())
            return lambda: sample_patches_varlen(x, counts, backend="torch", total=total)[0]
        return lambda: sample_patches_varlen(x, counts, backend=backend)[0]
    if impl == "dense":
        q, k, v = (t.view(case.batch, case.kept, case.heads, case.head_dim).transpose(1, 2)
                   for t in case.tokens(case.total))
        return lambda: rpb_attention(q, k, v, case.table, case.index, grid_size=grid, backend=backend,
                                     check_index=False)
    policy = {"packed-fixed": "fixed", "packed-mass": "mass"}.get(impl, "budget")
    positions, cu_seqlens = case.positions[policy], case.cu_seqlens[policy]
    q, k, v = case.tokens(positions.numel())
    if impl == "packed-sdpa":
        from pss_kernels.ops.varlen.sdpa_varlen import _LAYOUTS

        def packed_sdpa():
            # A step builds its padded layout (and reads its length) once for all its layers; timing
            # one layer, the build is counted in full each call: an upper bound on a layer's share.
            _LAYOUTS.clear()
            return rpb_attention_varlen(q, k, v, case.table, positions, cu_seqlens, grid_size=grid, backend="sdpa",
                                        check_inputs=False)
        return packed_sdpa
    if impl.startswith("packed-"):
        return lambda: rpb_attention_varlen(q, k, v, case.table, positions, cu_seqlens, grid_size=grid,
                                            backend=backend, check_inputs=False)
    if impl == "fa-varlen":
        longest = int(case.counts[policy].max())
        return lambda: varlen_flash_attention(q, k, v, cu_seqlens, longest)
    if impl == "flex-packed":
        return lambda: flex_varlen_rpb_attention(q, k, v, case.table, positions, cu_seqlens, grid_size=grid)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def measure(impl: str, case: Case, backend: str, warmup: int, iters: int) -> List[dict]:
    """One row per pass (forward, forward+backward); an impl that cannot run gives rows with the error."""
    base = dict(impl=impl, keep_rate=case.keep_rate, B=case.batch, H=case.heads, D=case.head_dim,
                grid=list(case.grid), dtype=str(case.dtype).replace("torch.", ""),
                counts=case.spread(POLICIES.get(impl, "budget")))
    try:
        run = _call(impl, case, backend)
        grad_out = None

        def forward():
            with torch.no_grad():
                run()

        def forward_backward():
            nonlocal grad_out
            out = run()
            grad_out = torch.randn_like(out) if grad_out is None else grad_out
            out.backward(grad_out)

        rows = []
        for name, step in zip(PASSES, (forward, forward_backward)):
            stats = time_iterations(step, warmup=warmup, iters=iters, device=case.device)
            rows.append(dict(base, **{"pass": name}, ms=stats.median_ms, q1_ms=stats.q1_ms, q3_ms=stats.q3_ms,
                             peak_mem_mb=peak_memory_mb(step, case.device), error=None))
        return rows
    except Exception as err:  # a peer that cannot run here: recorded, never fatal
        text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
        return [dict(base, **{"pass": name}, ms=None, q1_ms=None, q3_ms=None, peak_mem_mb=None, error=text)
                for name in PASSES]


def add_ratios(rows: List[dict]) -> None:
    """ms_vs_dense: each row against its anchor's row (ANCHORS: the dense attention kernel, the dense
    sampler) of the same keep rate and pass."""
    anchors = {(r["impl"], r["keep_rate"], r["pass"]): r["ms"] for r in rows}
    for r in rows:
        anchor = anchors.get((ANCHORS.get(r["impl"], "dense"), r["keep_rate"], r["pass"]))
        r["ms_vs_dense"] = r["ms"] / anchor if r["ms"] is not None and anchor else None


def packing_target(rows: List[dict], on_gpu: bool) -> List[dict]:
    """packed-fixed / dense forward+backward per keep rate: PASS at <= PACKING_TARGET, NOT MEASURED when
    either is missing or off a GPU (the target is the fused kernels' on a GPU, not a CPU smoke run's)."""
    verdicts = []
    for r in rows:
        if r["impl"] == "packed-fixed" and r["pass"] == "forward+backward":
            ratio = r.get("ms_vs_dense")
            verdicts.append(dict(keep_rate=r["keep_rate"], ratio=ratio,
                                 status="NOT MEASURED" if ratio is None or not on_gpu else
                                 "PASS" if ratio <= PACKING_TARGET else "MISS"))
    return verdicts


def print_table(rows: List[dict]) -> None:
    print(f"{'rho':>4} {'impl':<19} {'pass':<17} {'tokens':>7} {'min/mean/max':>16} {'ms':>9} {'vs dense':>8} "
          f"{'MiB':>8}  error")
    for r in rows:
        c = r["counts"]
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
        ratio = "-" if r.get("ms_vs_dense") is None else f"{r['ms_vs_dense']:.3f}"
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        spread = f"{c['min']}/{c['mean']:g}/{c['max']}"
        print(f"{r['keep_rate']:>4} {r['impl']:<19} {r['pass']:<17} {c['tokens']:>7} {spread:>16} {ms:>9} {ratio:>8} "
              f"{mem:>8}  {r['error'] or ''}")


def plot(results: dict, path: Path) -> None:
    """ms against the keep rate per impl, forward+backward, on a log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in results["rows"] if r["pass"] == "forward+backward" and r["ms"] is not None]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for impl in IMPLS[:IMPLS.index("sample-dense")]:  # attention only: the sampler rows are another op
        points = sorted((r["keep_rate"], r["ms"]) for r in rows if r["impl"] == impl)
        if points:
            axis.plot(*zip(*points), marker="o", label=impl)
    axis.set_xlabel("keep rate rho (same total tokens per row)")
    axis.set_ylabel("forward+backward ms (median)")
    axis.set_yscale("log")
    env = results["environment"]
    axis.set_title(f"packed attention, {results['shape']}\n{env['device']} | torch {env['torch']}", fontsize=9)
    axis.legend(fontsize=8)
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
    parser.add_argument("--out-dir", type=Path, help="default: benchmarks/results (GPU) or runs/ (CPU)")
    parser.add_argument("--plot", action="store_true", help="also write a PNG beside the JSON")
    return parser


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
    budget = TimeBudget(args.time_budget)
    env = environment_info(device)
    out_dir = args.out_dir or (HERE / "results" if gpu else HERE.parent / "runs")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"varlen_{file_slug(env['device'])}.json"
    label = "" if gpu else "CPU smoke run (tiny shapes; the figures are not the GPU targets)"
    results = dict(environment=env, label=label, shape=dict(shape, dtype=str(dtype), backend=backend),
                   target=f"packed-fixed <= {PACKING_TARGET}x dense, forward+backward", rows=[])
    print(f"varlen.py on {env['device']}: {shape}, {dtype}, backend {backend} {label}", flush=True)
    # The target rows of every keep rate first, then the policies and the peers, FlexAttention (a
    # compilation per shape) last: a run cut short by its budget still has what matters most.
    cases: Dict[float, Case] = {}
    for tier in PRIORITY:
        for keep_rate in args.keep_rates or KEEP_RATES:
            for impl in (impl for impl in impls if impl in tier):
                if budget.spent():
                    rows = [dict(impl=impl, keep_rate=keep_rate, **{"pass": name}, ms=None, peak_mem_mb=None,
                                 error=budget.skip_reason(), counts=dict(tokens=0, min=0, mean=0, max=0))
                            for name in PASSES]
                else:
                    if keep_rate not in cases:
                        cases[keep_rate] = Case(shape, keep_rate, dtype, device)
                    rows = measure(impl, cases[keep_rate], backend, warmup, iters)
                results["rows"] += rows
                add_ratios(results["rows"])
                for row in rows:
                    timing = "-" if row["ms"] is None else format(row["ms"], ".3f")
                    print(f"  rho {keep_rate} {impl:<19} {row['pass']:<17} {timing} ms {row['error'] or ''}", flush=True)
                path.write_text(json.dumps(results, indent=1))
    results["packing_target"] = packing_target(results["rows"], gpu)
    path.write_text(json.dumps(results, indent=1))
    print()
    print_table(results["rows"])
    for verdict in results["packing_target"]:
        ratio = "-" if verdict["ratio"] is None else f"{verdict['ratio']:.3f}"
        print(f"target rho {verdict['keep_rate']}: packed-fixed / dense = {ratio} (<= {PACKING_TARGET}): "
              f"{verdict['status']}")
    if args.plot:
        plot_json(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
