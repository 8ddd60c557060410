"""Tile sweep for the rpb_attention Triton kernels: which (BLOCK_M, BLOCK_N, num_warps) is fastest
for each kernel at each kept-token count n of a ViT.

    python benchmarks/tune_rpb_tiles.py                      # GPU: bf16, D = 64, ViT-B heads, B = 256
    python benchmarks/tune_rpb_tiles.py --tokens 197 577 --time-budget 300
    python benchmarks/tune_rpb_tiles.py --tokens 39 197 --head-dim 128 --dtype fp16

`tile_config` (pss_kernels/ops/rpb_attention/triton_common.py) reads its tiles from `_TILES`
(`_SHORT_TILES` for n <= 64); this script swaps one kernel's entry at a time, times the op (forward:
the forward call; dkdv, dq and dbias, the image-sum bias gradient at keep rate 1: one backward
call, the other kernels on their current tiles), and checks every
candidate's outputs against the current tiles' (a tile that changes the result is reported,
never chosen). Output: a table per kernel and n, the best tile per kernel, JSON in --out-dir.
Tiles above half the padded n are capped by `tile_config` (n = 39 runs 32-wide tiles at most),
so candidates that become identical at small n are timed once.

Without a GPU, or with TRITON_INTERPRET=1 set, it runs the Triton interpreter on a tiny shape,
which exercises the harness only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from _timing import TimeBudget, environment_info, file_slug, time_iterations
from pss_kernels import rpb_attention, sample_patches
from pss_kernels.ops.rpb_attention import triton_common
from pss_kernels.ops.rpb_attention.reference import bias_table_rows

KERNELS = ("forward", "dkdv", "dq", "dbias")
# (BLOCK_M, BLOCK_N, num_warps) candidates per kernel, the current entry always timed first: a small
# set, each compiled for sm_90 (Triton 3.6 and 3.9, JIT specialisation, bf16, D = 64, n = 39, 79, 118
# and 197, as tile_config caps and fits them, dkdv with auto's accumulator) without register spills
# and with warps that tile every dot exactly (the figures tests/codegen_report.py reads), so that one
# GPU call can time them all. (dkdv's (32, 64, 4) was dropped: 40 bytes of stack at n = 79 and 118.)
# tile_config caps a tile at half the padded n and fits the warps to it, so at small n several
# candidates become one and are timed once.
CANDIDATES = {
    "forward": [(128, 64, 8), (64, 64, 4), (128, 32, 8), (64, 32, 4), (32, 32, 4)],
    "dkdv": [(32, 64, 8), (32, 32, 4), (16, 64, 4), (32, 16, 2)],
    "dq": [(64, 32, 4), (64, 64, 4), (128, 32, 8), (32, 32, 4), (64, 16, 4)],
    "dbias": [(64, 64, 8), (64, 64, 4), (128, 64, 8), (128, 32, 8), (64, 32, 4)],
}
# The image-sum kernel (dbias) runs at keep rate 1 only (index=None, n = every token).
INDEX_NONE_ONLY = {"dbias"}


def make_inputs(batch: int, heads: int, head_dim: int, grid: Tuple[int, int], num_tokens: int,
                dtype: torch.dtype, device: torch.device, seed: int = 0):
    """q, k, v as views of one (B, n, 3, H, D) tensor (as a model makes them), a float32 table, the
    `index` of sample_patches (None when n is every token) and the output gradient."""
    generator = torch.Generator(device=device).manual_seed(seed)
    num_positions = 1 + grid[0] * grid[1]
    index = None
    if num_tokens < num_positions:
        tokens = torch.randn(batch, num_positions, 8, device=device, generator=generator)
        _, index = sample_patches(tokens, num_tokens / num_positions)
        assert index.shape[1] == num_tokens, (index.shape, num_tokens)
    qkv = torch.randn(batch, num_tokens, 3, heads, head_dim, device=device, generator=generator).to(dtype)
    q, k, v = (t.requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4))
    table = (0.1 * torch.randn(bias_table_rows(grid), heads, device=device, generator=generator)).requires_grad_()
    grad_out = torch.randn(q.shape, device=device, generator=generator).to(dtype)  # one for every candidate
    return q, k, v, table, index, grad_out


@contextmanager
def tile_override(kernel: str, tile: Tuple[int, int, int], head_dim: int, dtype: torch.dtype, num_tokens: int):
    """Make `tile` the kernel's entry in the table tile_config reads at n tokens, for the duration."""
    table, key = triton_common.tile_table(kernel, head_dim, dtype, num_tokens)
    saved = table[key]
    table[key] = tuple(tile)
    try:
        yield
    finally:
        table[key] = saved


def candidates(kernel: str, head_dim: int, dtype: torch.dtype, num_tokens: int) -> List[Tuple[int, int, int]]:
    table, key = triton_common.tile_table(kernel, head_dim, dtype, num_tokens)
    return [table[key]] + [tile for tile in CANDIDATES[kernel] if tile != table[key]]


def effective_tile(kernel: str, tile, num_tokens: int, head_dim: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """The tile the launcher really uses for `tile` at n tokens (tile_config caps it for small n)."""
    with tile_override(kernel, tile, head_dim, dtype, num_tokens):
        config = triton_common.tile_config(kernel, num_tokens, head_dim, dtype)
    return config.block_m, config.block_n, config.num_warps


def run_candidate(kernel: str, tile: Tuple[int, int, int], inputs, grid, warmup: int, iters: int,
                  device: torch.device) -> Tuple[float, List[torch.Tensor]]:
    """(median ms, outputs) with `tile` as the kernel's tiles."""
    q, k, v, table, index, grad_out = inputs
    with tile_override(kernel, tile, q.shape[-1], q.dtype, q.shape[2]):
        def forward():
            return rpb_attention(q, k, v, table, index, grid_size=grid, backend="triton", check_index=False)

        out = forward()
        grads = torch.autograd.grad(out, (q, k, v, table), grad_out, retain_graph=True)
        if kernel == "forward":
            with torch.no_grad():
                stats = time_iterations(forward, warmup=warmup, iters=iters, device=device)
        else:
            stats = time_iterations(lambda: torch.autograd.grad(out, (q, k, v, table), grad_out, retain_graph=True),
                                    warmup=warmup, iters=iters, device=device)
        return stats.median_ms, [out.detach(), *grads]


def max_relative_error(got: List[torch.Tensor], want: List[torch.Tensor]) -> float:
    return max(((g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12)).item() for g, w in zip(got, want))


def sweep(kernels, token_counts, *, batch, heads, head_dim, grid, dtype, device, warmup, iters,
          budget: TimeBudget, on_row=None) -> List[dict]:
    """One row per (n, kernel, candidate), each handed to `on_row` once done."""
    on_row = on_row or (lambda row: None)
    rows = []
    for num_tokens in token_counts:
        inputs = make_inputs(batch, heads, head_dim, grid, num_tokens, dtype, device)
        for kernel in kernels:
            if kernel in INDEX_NONE_ONLY and inputs[4] is not None:
                continue
            reference = None
            seen = set()
            for position, tile in enumerate(candidates(kernel, head_dim, dtype, num_tokens)):
                effective = effective_tile(kernel, tile, num_tokens, head_dim, dtype)
                row = dict(kernel=kernel, num_tokens=num_tokens, tile=list(tile), effective_tile=list(effective),
                           current=position == 0, ms=None, max_rel_error=None, error=None)
                if effective in seen:
                    row["error"] = "same effective tile as an earlier candidate at this n"
                elif budget.spent():
                    row["error"] = budget.skip_reason()
                else:
                    seen.add(effective)
                    try:
                        row["ms"], outputs = run_candidate(kernel, tile, inputs, grid, warmup, iters, device)
                        if reference is None:
                            reference = outputs
                        row["max_rel_error"] = max_relative_error(outputs, reference)
                    except Exception as err:  # e.g. out of shared memory: recorded, the sweep goes on
                        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                rows.append(row)
                on_row(row)
                print(f"  {kernel:<8} n={num_tokens:<4} tile={tile} -> "
                      f"{'-' if row['ms'] is None else format(row['ms'], '.4f')} ms {row['error'] or ''}",
                      file=sys.stderr, flush=True)
    return rows


def best_tiles(rows: List[dict], tolerance: float) -> Dict[str, Dict[int, Optional[dict]]]:
    """Per kernel and n, the fastest candidate whose outputs match the current tile's within `tolerance`."""
    best: Dict[str, Dict[int, Optional[dict]]] = {}
    for row in rows:
        per_n = best.setdefault(row["kernel"], {})
        per_n.setdefault(row["num_tokens"], None)
        if row["ms"] is None or row["max_rel_error"] is None or row["max_rel_error"] > tolerance:
            continue
        current = per_n[row["num_tokens"]]
        if current is None or row["ms"] < current["ms"]:
            per_n[row["num_tokens"]] = row
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--tokens", nargs="+", type=int, default=None,
                        help="kept-token counts n (default: 39 79 118 158 197 on 14x14, 577 on 24x24)")
    parser.add_argument("--batch", type=int, default=None, help="default 256 on GPU, 2 on CPU")
    parser.add_argument("--heads", type=int, default=None, help="default 12 (ViT-B) on GPU, 2 on CPU")
    parser.add_argument("--head-dim", type=int, default=None, help="default 64 on GPU, 16 on CPU")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="operand dtype (default bf16 on GPU; fp32 on CPU, where the interpreter cannot multiply bf16)")
    parser.add_argument("--warmup", type=int, default=None, help="default 5 GPU, 0 CPU")
    parser.add_argument("--iters", type=int, default=None, help="default 30 GPU, 1 CPU")
    parser.add_argument("--tolerance", type=float, default=2e-2,
                        help="largest relative error vs the current tile for a candidate to count (bf16)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no new candidate after this many seconds (the rest are listed as skipped)")
    parser.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results (GPU), runs/ (CPU)")
    args = parser.parse_args(argv)
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error(f"argument --time-budget: must be > 0 seconds, got {args.time_budget}")

    # TRITON_INTERPRET=1 means the harness check on CPU tensors, also on a machine with a GPU.
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    device = torch.device("cuda" if on_gpu else "cpu")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if on_gpu:
        dtype, head_dim = dtypes[args.dtype or "bf16"], args.head_dim or 64
        batch, heads = args.batch or 256, args.heads or 12
        token_counts = args.tokens or [39, 79, 118, 158, 197, 577]
        warmup, iters = args.warmup if args.warmup is not None else 5, args.iters or 30
    else:  # the interpreter: float32 (it cannot multiply bf16), a tiny grid
        dtype, head_dim = dtypes[args.dtype or "fp32"], args.head_dim or 16
        batch, heads = args.batch or 2, args.heads or 2
        token_counts = args.tokens or [10]
        warmup, iters = args.warmup or 0, args.iters or 1
    env = environment_info(device)
    label = "GPU run" if on_gpu else "CPU interpreter run (harness check, not a performance figure)"
    print(f"rpb_attention tile sweep: {label}\n{env['device']} | torch {env['torch']} | triton {env['triton']}",
          flush=True)
    budget = TimeBudget(args.time_budget)
    out_dir = args.out_dir or (Path(__file__).resolve().parent / "results" if on_gpu else Path("runs"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"rpb_tiles_{file_slug(env['device'])}_{env['date'][:10]}.json"
    document = {"label": label, "complete": False, "environment": env, "batch": batch, "heads": heads,
                "head_dim": head_dim, "dtype": str(dtype), "warmup": warmup, "iters": iters,
                "time_budget_s": args.time_budget, "rows": [], "best": {}}

    def write(document):  # after every row: a sweep cut by its time limit keeps what it measured
        scratch = path.with_suffix(".json.partial")
        scratch.write_text(json.dumps(document, indent=1) + "\n")
        os.replace(scratch, path)

    def on_row(row):
        document["rows"].append(row)
        write(document)

    rows = []
    for num_tokens in token_counts:
        grid = (24, 24) if num_tokens > 197 else (14, 14)
        if not on_gpu:
            grid = (3, 3)
        if num_tokens > 1 + grid[0] * grid[1] or num_tokens < 2:
            parser.error(f"argument --tokens: n={num_tokens} does not fit grid {grid}")
        rows += sweep(args.kernels, [num_tokens], batch=batch, heads=heads, head_dim=head_dim, grid=grid,
                      dtype=dtype, device=device, warmup=warmup, iters=iters, budget=budget, on_row=on_row)

    best = best_tiles(rows, args.tolerance)
    print(f"\n== best tiles (B={batch}, H={heads}, D={head_dim}, {str(dtype).replace('torch.', '')}; "
          f"current = the first candidate) ==")
    print(f"{'kernel':<8} {'n':>5} {'current ms':>11} {'best tile':>15} {'best ms':>9} {'gain':>6}")
    for kernel, per_n in best.items():
        for num_tokens, row in per_n.items():
            current = next((r for r in rows if r["kernel"] == kernel and r["num_tokens"] == num_tokens
                            and r["current"]), None)
            if row is None or current is None or current["ms"] is None:
                print(f"{kernel:<8} {num_tokens:>5}  no valid measurement")
                continue
            print(f"{kernel:<8} {num_tokens:>5} {current['ms']:>11.4f} {str(tuple(row['tile'])):>15} "
                  f"{row['ms']:>9.4f} {current['ms'] / row['ms']:>5.2f}x")
    bad = [r for r in rows if r["max_rel_error"] is not None and r["max_rel_error"] > args.tolerance]
    for r in bad:
        print(f"WRONG RESULT: {r['kernel']} n={r['num_tokens']} tile={tuple(r['tile'])}: "
              f"relative error {r['max_rel_error']:.2e} vs the current tile")

    document.update(complete=True, rows=rows,
                    best={k: {str(n): r and r["tile"] for n, r in v.items()} for k, v in best.items()})
    write(document)
    print(f"\nwrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
