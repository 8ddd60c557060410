"""Per-op benchmark: `rpb_attention` and `sample_patches` against their peers (eager PyTorch, SDPA,
FlexAttention), each figure a ratio against a peer timed in the same run.

    python benchmarks/ops.py                    # both ops, the GPU grids (bf16), targets first
    python benchmarks/ops.py --op rpb_attention --iters 50 --impls pss,pss-frozen-table,pss-dbias-csr

On a GPU the run goes in this order, so that one cut short by its time budget (or killed) still has
the figures that matter most, and writes its JSON after every row:

  1. rpb_attention at the target cases (ViT-B, B = 256, 14 x 14 at keep rates 1, 0.6, 0.2): pss and
     sdpa-flash first, then the frozen table, the sdpa backend, sdpa-bias, the eager peers and every
     bias-gradient accumulator;
  2. flex at the target cases, each row under --flex-timeout (its torch.compile included);
  3. sample_patches at its target shape (B = 256, N = 197, C = 768);
  4. the rest of both grids, while the budget lasts.

Without a GPU it runs tiny shapes (a CPU smoke run, labelled as such) so the harness itself is
exercised. Output: tables and the targets on stdout (each PASS, MISS or NOT MEASURED with its
ratio), a JSON file and a PNG plot. GPU results go to benchmarks/results/ (committed), CPU smoke
results to runs/ (not committed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

import bench_rpb_attention
import bench_sample_patches
from _timing import TimeBudget, environment_info, file_slug

HERE = Path(__file__).resolve().parent
OPS = ("rpb_attention", "sample_patches")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The fused sampling forward at B=256, N=197, C=768 is >= 5x faster than the eager path and moves
# bytes at >= 70 % of peak bandwidth.
SAMPLING_TARGET_SHAPE = (256, 197, 768)
SAMPLING_KEEP_RATES = (0.2, 0.5, 0.8)
# rpb_attention forward+backward at n = 197, B = 256: <= 1.25x SDPA FLASH without bias, >= 3x faster
# than the eager peers (published and eager-index), faster than sdpa-bias and flex, peak memory
# within 10 % of SDPA FLASH; at every keep rate the bias gradient costs <= 10 % of the attention
# backward (pss against pss-frozen-table).
RPB_TARGET_BATCH, RPB_TARGET_N = 256, 197
BIAS_GRAD_TARGET = 0.10
TARGET_STATUS = {True: "PASS", False: "MISS", None: "NOT MEASURED"}


def sampling_shapes(device: torch.device):
    """The sampling grid, the target shape first."""
    if device.type != "cuda":
        return [(2, 17, 8)], (0.5,)
    shapes = [(b, n, c) for b in (64, 256) for n in (197, 577) for c in (384, 768)]
    return sorted(shapes, key=lambda shape: shape != SAMPLING_TARGET_SHAPE), SAMPLING_KEEP_RATES


def _fmt(value, spec=".3f"):
    """format(value, spec), or "-" padded to the spec's width for a missing value."""
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def _percent(fraction):
    return "-" if fraction is None else f"{100 * fraction:.1f}"


def print_sampling(rows):
    if not rows:
        return
    print(f"\n== sample_patches ({rows[0]['dtype']}, {rows[0]['device']}) ==")
    print("ms / %peak / vs eager: per eager call; graph: CUDA-graph replay (device time only)")
    print(f"{'B':>4} {'N':>4} {'C':>4} {'rho':>4} {'impl':<14} {'pass':<17} {'ms':>9} {'%peak':>6} {'vs eager':>8} "
          f"{'graph ms':>9} {'%peak':>6} {'vs eager':>8}  error")
    for r in rows:
        print(f"{r['B']:>4} {r['N']:>4} {r['C']:>4} {r['keep_rate']:>4} {r['impl']:<14} {r['pass']:<17} "
              f"{_fmt(r['ms'], '9.4f')} {_percent(r['fraction_of_peak']):>6} {_fmt(r['speedup_vs_eager'], '7.2f')}x "
              f"{_fmt(r['graph_ms'], '9.4f')} {_percent(r['graph_fraction_of_peak']):>6} "
              f"{_fmt(r['speedup_vs_eager_graph'], '7.2f')}x  {r['error'] or r['graph_error'] or ''}")


def print_rpb(rows):
    if not rows:
        return
    print(f"\n== rpb_attention ({rows[0]['dtype']}) ==")
    print("vs flash: time / sdpa-flash's; vs publ, vs e-idx: speed-up over published / eager-index (their time / this)")
    print(f"{'model':<10} {'B':>4} {'grid':>6} {'n':>4} {'impl':<23} {'pass':<17} {'ms':>9} {'MiB':>9} "
          f"{'vs flash':>8} {'vs publ':>8} {'vs e-idx':>8}  error")
    for r in rows:
        grid = "x".join(map(str, r["grid"]))
        print(f"{r['model']:<10} {r['batch']:>4} {grid:>6} {r['num_tokens']:>4} {r['impl']:<23} {r['pass']:<17} "
              f"{_fmt(r['ms'], '9.4f')} {_fmt(r['peak_mem_mb'], '9.1f')} {_fmt(r['ms_vs_sdpa_flash'], '7.2f')}x "
              f"{_fmt(r['speedup_vs_published'], '7.2f')}x {_fmt(r['speedup_vs_eager_index'], '7.2f')}x  "
              f"{r['error'] or ''}")


def _judge(value: Optional[float], passes) -> Optional[bool]:
    """None (NOT MEASURED) where the figure is missing: an unmeasured target is never a MISS."""
    return None if value is None else bool(passes(value))


def sampling_targets(rows):
    out = []
    for r in rows:
        if (r["B"], r["N"], r["C"]) != SAMPLING_TARGET_SHAPE or r["pass"] != "forward" or not r["impl"].startswith("pss-"):
            continue
        name = f"sample_patches {r['impl']} fwd B=256 N=197 C=768 rho={r['keep_rate']}"
        for what, key in (("per call", "speedup_vs_eager"), ("CUDA graph", "speedup_vs_eager_graph")):
            out.append((f"{name}: speed-up vs eager >= 5x ({what})", r[key], _judge(r[key], lambda v: v >= 5)))
        # Bandwidth is a property of the kernel: judged on device time (graph replay), which
        # excludes the per-call host overhead that a ~20 us kernel cannot hide.
        value = r["graph_fraction_of_peak"]
        out.append((f"{name}: fraction of peak bandwidth >= 0.70 (CUDA graph)", value, _judge(value, lambda v: v >= 0.7)))
    return out


def _rpb_cases(rows, pass_name: str = "forward+backward") -> Dict[tuple, Dict[str, dict]]:
    """{(model, batch, grid, keep_rate): {impl: row}} of one pass."""
    cases: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if r["pass"] == pass_name:
            cases.setdefault((r["model"], r["batch"], tuple(r["grid"]), r["keep_rate"]), {})[r["impl"]] = r
    return cases


def _ms(impls: Dict[str, dict], impl: str) -> Optional[float]:
    return (impls.get(impl) or {}).get("ms")


def rpb_targets(rows):
    out = []
    forward = _rpb_cases(rows, "forward")
    for (model, batch, grid, keep_rate), impls in _rpb_cases(rows).items():
        if batch != RPB_TARGET_BATCH or grid != (14, 14):
            continue
        num_tokens = next(iter(impls.values()))["num_tokens"]
        name = f"rpb_attention {model} fwd+bwd B={batch} n={num_tokens}"
        pss = impls.get("pss") or {}
        if num_tokens == RPB_TARGET_N:
            ratio = pss.get("ms_vs_sdpa_flash")
            out.append((f"{name}: time vs sdpa-flash <= 1.25x", ratio, _judge(ratio, lambda v: v <= 1.25)))
            for peer, key in bench_rpb_attention.SPEEDUP_PEERS.items():
                out.append((f"{name}: speed-up vs {peer} >= 3x", pss.get(key), _judge(pss.get(key), lambda v: v >= 3)))
            for peer in ("sdpa-bias", "flex"):
                ratio = _ratio(_ms(impls, peer), pss.get("ms"))
                out.append((f"{name}: faster than {peer} ({peer} ms / pss ms > 1)", ratio, _judge(ratio, lambda v: v > 1)))
            mem = pss.get("peak_mem_vs_sdpa_flash")
            out.append((f"{name}: peak memory vs sdpa-flash <= 1.10x", mem, _judge(mem, lambda v: v <= 1.10)))
        cost = bias_grad_cost(impls, forward.get((model, batch, grid, keep_rate), {}), "pss")
        out.append((f"{name}: bias gradient (pss - pss-frozen-table) / attention backward <= {BIAS_GRAD_TARGET:g}",
                    cost, _judge(cost, lambda v: v <= BIAS_GRAD_TARGET)))
    return out


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return numerator / denominator if numerator is not None and denominator else None


def bias_grad_cost(fwd_bwd: Dict[str, dict], fwd: Dict[str, dict], impl: str) -> Optional[float]:
    """(impl's fwd+bwd - the frozen table's fwd+bwd) / the frozen table's backward (its fwd+bwd - fwd):
    what the bias-table gradient adds to the attention backward."""
    ours, frozen, frozen_forward = _ms(fwd_bwd, impl), _ms(fwd_bwd, "pss-frozen-table"), _ms(fwd, "pss-frozen-table")
    if ours is None or frozen is None or frozen_forward is None or frozen <= frozen_forward:
        return None
    return (ours - frozen) / (frozen - frozen_forward)


def accumulator_summary(rows) -> List[dict]:
    """Per (model, batch, grid, keep rate): each bias-gradient accumulator's fwd+bwd time and its cost
    over the frozen table, the fastest one, and pss (auto) and pss-sdpa beside it: the evidence for
    triton_bias_grad.MEASURED_AUTO and op.GPU_DEFAULT_BACKEND."""
    summary = []
    forward = _rpb_cases(rows, "forward")
    for (model, batch, grid, keep_rate), impls in _rpb_cases(rows).items():
        accumulators = {impl[len("pss-dbias-"):]: _ms(impls, impl) for impl in bench_rpb_attention.DBIAS_IMPLS
                        if _ms(impls, impl) is not None}
        if not accumulators:
            continue
        fastest = min(accumulators, key=accumulators.get)
        summary.append(dict(
            model=model, batch=batch, grid=list(grid), keep_rate=keep_rate,
            num_tokens=next(iter(impls.values()))["num_tokens"], has_index=keep_rate < 1.0, ms=accumulators,
            bias_grad_cost={name: bias_grad_cost(impls, forward.get((model, batch, grid, keep_rate), {}),
                                                 f"pss-dbias-{name}") for name in accumulators},
            fastest=fastest, pss_ms=_ms(impls, "pss"), pss_frozen_table_ms=_ms(impls, "pss-frozen-table"),
            pss_sdpa_ms=_ms(impls, "pss-sdpa")))
    return summary


def suggested_auto_table(summary: List[dict]) -> Dict[bool, list]:
    """MEASURED_AUTO as these rows suggest it: per has_index, (largest n, fastest accumulator) in
    ascending n, from the ViT-B / B = 256 rows (the batch the accumulators were chosen for)."""
    table: Dict[bool, list] = {}
    for entry in sorted(summary, key=lambda e: e["num_tokens"]):
        if entry["model"] == "vit_base" and entry["batch"] == RPB_TARGET_BATCH:
            table.setdefault(entry["has_index"], []).append((entry["num_tokens"], entry["fastest"]))
    return table


def print_accumulators(summary: List[dict]) -> None:
    if not summary:
        return
    print("\n== rpb_attention bias-gradient accumulators (fwd+bwd ms; cost = extra over the frozen table / its "
          "backward) ==")
    for e in summary:
        cells = "  ".join(f"{name} {ms:.3f} ({_fmt(e['bias_grad_cost'][name], '.2f')})" for name, ms in e["ms"].items())
        print(f"{e['model']:<10} B={e['batch']:<4} n={e['num_tokens']:<4} {cells}  -> fastest {e['fastest']}; "
              f"pss {_fmt(e['pss_ms'], '.3f')}, pss-sdpa {_fmt(e['pss_sdpa_ms'], '.3f')}")
    print(f"suggested triton_bias_grad.MEASURED_AUTO: {suggested_auto_table(summary)}")


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [op for op in OPS if any(r["pass"] == "forward+backward" and r.get("ms") is not None
                                      for r in results.get(op, ()))]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, op in zip(axes[0], panels):
        rows = [r for r in results[op] if r["pass"] == "forward+backward" and r.get("ms") is not None]
        if op == "sample_patches":
            largest = max((r["B"], r["N"], r["C"]) for r in rows)
            rows = [r for r in rows if (r["B"], r["N"], r["C"]) == largest]
            xs_key, label = "keep_rate", f"sample_patches fwd+bwd, B,N,C = {largest}"
        else:
            first = rows[0]
            rows = [r for r in rows if (r["model"], r["batch"], r["grid"]) == (first["model"], first["batch"], first["grid"])]
            xs_key, label = "num_tokens", f"rpb_attention fwd+bwd, {first['model']} B={first['batch']} grid {first['grid']}"
        for impl in sorted({r["impl"] for r in rows}):
            pts = sorted((r[xs_key], r["ms"]) for r in rows if r["impl"] == impl)
            ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xlabel("keep rate" if xs_key == "keep_rate" else "kept tokens n")
        ax.set_ylabel("ms (lower is better)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10, color="black" if "CPU" not in title else "firebrick")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _split(values: Optional[List[str]]) -> Optional[List[str]]:
    return None if not values else [item.strip() for value in values for item in value.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=(*OPS, "all"), default="all", help="which op to benchmark (default: all)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="input dtype (default: bf16)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default: 10 GPU, 1 CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per case (default: 30 GPU, 3 CPU)")
    parser.add_argument("--impls", nargs="+", metavar="IMPL",
                        help=f"rpb_attention implementations, from {', '.join(bench_rpb_attention.IMPLS)} "
                             "(default: all)")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help=f"rpb_attention models, from {', '.join(bench_rpb_attention.MODELS)} (default: all)")
    parser.add_argument("--keep-rates", nargs="+", metavar="RHO", help="rpb_attention keep rates (default: all)")
    parser.add_argument("--targets-only", action="store_true",
                        help="only the target cases of each op (phases 1-3), not the rest of the grids")
    parser.add_argument("--flex-timeout", type=float, default=bench_rpb_attention.FLEX_TIMEOUT_S, metavar="SECONDS",
                        help="limit of one flex row, its compilation included (default %(default)g)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where JSON + PNG go (default: benchmarks/results on GPU, runs/ on CPU)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no new row after this many seconds; the rest are listed as skipped "
                             "(target cases run first). Default: no limit")
    parser.add_argument("--no-plot", action="store_true",
                        help="write no PNG (the GPU window's file count; keep_window.py draws it from the JSON)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error(f"argument --time-budget: must be > 0 seconds, got {args.time_budget}")
    if args.flex_timeout <= 0:
        parser.error(f"argument --flex-timeout: must be > 0 seconds, got {args.flex_timeout}")
    args.impls = _split(args.impls) or list(bench_rpb_attention.IMPLS)
    for impl in args.impls:
        if impl not in bench_rpb_attention.IMPLS:
            parser.error(f"argument --impls: unknown implementation {impl!r}; choose from "
                         f"{', '.join(bench_rpb_attention.IMPLS)}")
    args.models = _split(args.models)
    for model in args.models or ():
        if model not in bench_rpb_attention.MODELS:
            parser.error(f"argument --models: unknown model {model!r}; choose from {', '.join(bench_rpb_attention.MODELS)}")
    try:
        args.keep_rates = None if not args.keep_rates else [float(v) for v in _split(args.keep_rates)]
    except ValueError:
        parser.error(f"argument --keep-rates: numbers in (0, 1], got {args.keep_rates}")
    if args.keep_rates and not all(0 < rate <= 1 for rate in args.keep_rates):
        parser.error(f"argument --keep-rates: numbers in (0, 1], got {args.keep_rates}")
    return args


class Report:
    """The run's JSON document, written again after every row (to a temporary file, then renamed), so
    a run killed by its stage's time limit still leaves every row it finished."""

    def __init__(self, path: Path, header: dict):
        self.path, self.document = path, dict(header, complete=False, results={op: [] for op in OPS}, targets=[])

    def add(self, op: str, row: dict) -> None:
        self.document["results"][op].append(row)
        self.write()

    def write(self) -> None:
        scratch = self.path.with_suffix(".json.partial")
        scratch.write_text(json.dumps(self.document, indent=1) + "\n")
        os.replace(scratch, self.path)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    iters = args.iters if args.iters is not None else (30 if on_gpu else 3)
    dtype = DTYPES[args.dtype]
    env = environment_info(device)
    label = "GPU run" if on_gpu else "CPU smoke run (tiny shapes: not a performance figure)"
    print(f"pss_kernels op benchmark: {label}\n{env['device']} | torch {env['torch']} | triton {env['triton']} "
          f"| CUDA {env['cuda']}", flush=True)

    out_dir = args.out_dir or (HERE / "results" if on_gpu else Path.cwd() / "runs")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"ops_{file_slug(env['device'])}_{env['date'][:10]}_{args.op}"
    json_path = out_dir / f"{stem}.json"
    budget = TimeBudget(args.time_budget)
    report = Report(json_path, {"label": label, "environment": env, "dtype": args.dtype, "warmup": warmup,
                                "iters": iters, "time_budget_s": args.time_budget,
                                "command": " ".join(["ops.py", *(sys.argv[1:] if argv is None else argv)])})

    def progress(op):
        def on_row(row):
            report.add(op, row)
            timing = "-" if row.get("ms") is None else f"{row['ms']:.4f} ms"
            what = (f"{row['model']} B={row['batch']} n={row['num_tokens']}" if op == "rpb_attention"
                    else f"B={row['B']} N={row['N']} C={row['C']} rho={row['keep_rate']}")
            print(f"  [{budget.elapsed():5.0f} s] {op} {what} {row['impl']} {row['pass']}: {timing}"
                  f"{'  ' + row['error'][:120] if row.get('error') else ''}", file=sys.stderr, flush=True)
        return on_row

    rpb_configs = [c for c in bench_rpb_attention.default_configs(device)
                   if (not args.models or c["model"] in args.models)
                   and (not args.keep_rates or c["keep_rate"] in args.keep_rates)]
    if on_gpu:
        first = [c for c in rpb_configs if bench_rpb_attention.is_target_config(c)]
    else:
        first = rpb_configs  # the smoke shapes are all "targets"
    rest = [] if args.targets_only else [c for c in rpb_configs if c not in first]
    non_flex = [impl for impl in args.impls if impl != "flex"]
    with_flex = [impl for impl in args.impls if impl == "flex"]
    shapes, keep_rates = sampling_shapes(device)
    rpb_options = dict(warmup=warmup, iters=iters, budget=budget, on_row=progress("rpb_attention"),
                       flex_timeout=args.flex_timeout)
    sampling_options = dict(warmup=warmup, iters=iters, budget=budget, on_row=progress("sample_patches"))

    phases = []
    if args.op in ("rpb_attention", "all"):
        phases += [("rpb_attention", dict(configs=first, impls=non_flex)),
                   ("rpb_attention", dict(configs=first, impls=with_flex))]
    if args.op in ("sample_patches", "all"):
        phases.append(("sample_patches", dict(shapes=shapes[:1], keep_rates=keep_rates)))
    if args.op in ("rpb_attention", "all"):
        phases.append(("rpb_attention", dict(configs=rest, impls=non_flex)))
    if args.op in ("sample_patches", "all") and not args.targets_only:
        phases.append(("sample_patches", dict(shapes=shapes[1:], keep_rates=keep_rates)))
    for op, work in phases:
        if op == "rpb_attention" and work["configs"] and work["impls"]:
            print(f"running rpb_attention {', '.join(work['impls'])} on {len(work['configs'])} cases "
                  f"({budget.elapsed():.0f} s so far)", file=sys.stderr, flush=True)
            bench_rpb_attention.run(device, dtype, **work, **rpb_options)
        elif op == "sample_patches" and work["shapes"]:
            print(f"running sample_patches on {len(work['shapes'])} shapes ({budget.elapsed():.0f} s so far)",
                  file=sys.stderr, flush=True)
            bench_sample_patches.run(device, dtype, **work, **sampling_options)

    results = report.document["results"]
    bench_rpb_attention.add_ratios(results["rpb_attention"])
    bench_sample_patches.add_ratios(results["sample_patches"])
    print_rpb(results["rpb_attention"])
    summary = accumulator_summary(results["rpb_attention"])
    print_accumulators(summary)
    print_sampling(results["sample_patches"])
    targets = rpb_targets(results["rpb_attention"]) + sampling_targets(results["sample_patches"])
    skipped = sum(1 for rows in results.values() for r in rows if (r["error"] or "").startswith("skipped"))
    if skipped:
        print(f"\n{skipped} rows skipped ({'the time budget of %g s was spent' % args.time_budget if budget.spent() else 'see their errors'})",
              flush=True)
    if on_gpu and targets:
        print("\n== targets ==")
        for name, value, met in targets:
            print(f"{TARGET_STATUS[met]:<12}  {name}: {_fmt(value, '.3f')}")
    elif not on_gpu:
        print("\n(targets are judged on a GPU run only)")

    report.document.update(
        complete=True, elapsed_s=round(budget.elapsed(), 1), skipped_rows=skipped, accumulators=summary,
        suggested_measured_auto={str(k): v for k, v in suggested_auto_table(summary).items()},
        targets=[dict(name=n, value=v, met=m, status=TARGET_STATUS[m]) for n, v, m in targets] if on_gpu else [])
    report.write()
    if args.no_plot:
        print(f"\nwrote {json_path}")
    else:
        plot_json(json_path)
        print(f"\nwrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


def plot_json(json_path: Path) -> Path:
    """Draw the PNG of an ops JSON beside it (also how keep_window.py draws a window's plot)."""
    document = json.loads(json_path.read_text())
    env = document["environment"]
    path = json_path.with_suffix(".png")
    plot(document["results"], path, f"{document['label']}\n{env['device']} | torch {env['torch']} | {document['dtype']}")
    return path


if __name__ == "__main__":
    sys.exit(main())
