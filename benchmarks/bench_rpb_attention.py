"""Timing and peak memory of `rpb_attention` against its peers (issue 3); no printing.

The peers, timed in the same run: the eager PyTorch paths, SDPA with the per-image bias as a
dense attn_mask, FlexAttention, and SDPA FLASH without any bias (speed of light at that n).

`run(device, dtype, configs, warmup, iters)` returns one row (dict) per (config, impl, pass):

    model, heads, head_dim, batch, grid, keep_rate, num_tokens (n), num_positions (N)
    impl      "pss" (rpb_attention; backend "triton" on CUDA, "torch" elsewhere),
              "pss-frozen-table" (the same with a table that needs no gradient: the backward
              skips the bias-gradient accumulation, so pss - pss-frozen-table is its cost),
              "pss-dbias-slices", "pss-dbias-position-grid", "pss-dbias-image-sum" (keep rate 1
              only: pss with PSS_KERNELS_RPB_DBIAS=slices / position-grid / image-sum, the
              bias-gradient accumulator of the Triton backward at index=None: per-(image, head)
              table slices, the position grid, or images summed before one atomic; the torch
              backend ignores the variable; an accumulator the kernels do not know makes the
              row's error, and the run goes on),
              "published" (a: eager softmax attention with the bias built as the PSS authors'
              published code builds it: the full (N, N, H) bias copied per image, indexed twice),
              "eager-index" (a': the same numbers, the dense per-image bias looked up once
              through the indexed relative-position index),
              "sdpa-bias" (b: dense bias as attn_mask, SDPA EFFICIENT backend),
              "flex" (c: FlexAttention, score_mod gathering from a table that requires grad;
              compiled on CUDA), "sdpa-flash" (d: SDPA FLASH backend without any bias: the speed
              of light for attention at this n)
    backend   the pss backend, the SDPA backend, or flex's kernel_options BACKEND
    pass      "forward" (with autograd recording, as in training) or "forward+backward"
              (gradients of q, k, v and, where there is one, the bias table)
    ms, q1_ms, q3_ms   median and quartiles over `iters` timed calls (benchmarks/_timing.py)
    peak_mem_mb        peak memory allocated during one call above what was allocated before it
                       (torch.cuda.max_memory_allocated, reset per case; None on CPU)
    ms_vs_sdpa_flash, speedup_vs_published, speedup_vs_eager_index, peak_mem_vs_sdpa_flash
                       ratios to peers of the same config and pass (speed-up: the peer's time /
                       this row's; None where a peer failed)
    error     None, or "ExceptionType: message" when the impl cannot run here (rows are kept so
              a failure, e.g. of FlexAttention, is recorded rather than hidden), or why the case
              was skipped (the run's time budget was spent)

The inputs match a training step under autocast: q, k, v in `dtype`, a float32 bias table,
and for keep_rate < 1 the `index` that `sample_patches` returns for random tokens (score order).
Issue-3 targets, forward+backward at n = 197, B = 256, bf16: pss <= 1.25x sdpa-flash, >= 3x
faster than the eager peers (published and eager-index), faster than sdpa-bias and flex, peak
memory within 10 % of sdpa-flash.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

from _timing import TimeBudget, dynamo_recompile_limit, time_iterations
from pss_kernels import num_kept_tokens, rpb_attention, sample_patches
from pss_kernels.ops.rpb_attention.peers import (eager_index_rpb_attention, flex_rpb_attention, published_rpb_attention,
                                                 sdpa_bias_rpb_attention)
from pss_kernels.ops.rpb_attention.reference import bias_table_rows

MODELS = {"vit_base": (12, 64), "deit_small": (6, 64)}  # name -> (heads, head_dim)
KEEP_RATES = (0.2, 0.4, 0.6, 0.8, 1.0)  # N = 197: n = 39, 79, 118, 158, 197
# pss with each bias-gradient accumulator of the Triton backward (PSS_KERNELS_RPB_DBIAS); the choice
# exists at index=None only, so these rows run at keep rate 1.
DBIAS_ACCUMULATORS = ("slices", "position-grid", "image-sum")
DBIAS_IMPLS = tuple(f"pss-dbias-{name}" for name in DBIAS_ACCUMULATORS)
IMPLS = ("pss", "pss-frozen-table", *DBIAS_IMPLS, "published", "eager-index", "sdpa-bias", "flex", "sdpa-flash")
# Implementations measured under extra environment variables (read by the kernels' launchers),
# and the keep rates they apply to (not listed: all).
IMPL_ENVIRONMENT = {impl: {"PSS_KERNELS_RPB_DBIAS": name} for impl, name in zip(DBIAS_IMPLS, DBIAS_ACCUMULATORS)}
IMPL_KEEP_RATES = {impl: (1.0,) for impl in DBIAS_IMPLS}
# The eager peers the speed-up columns are taken against.
SPEEDUP_PEERS = {"published": "speedup_vs_published", "eager-index": "speedup_vs_eager_index"}
# FlexAttention is compiled with static shapes, once per (B, n, H): the grid has 40 of them
# (see _timing.dynamo_recompile_limit). Each new shape costs a compile (~10-30 s).
FLEX_RECOMPILE_LIMIT = 128
PASSES = ("forward", "forward+backward")
NUM_PREFIX_TOKENS = 1


def default_configs(device) -> List[dict]:
    """The issue's grid on CUDA (ViT-B and DeiT-S, B 128/256, 14x14 and 24x24 grids, five keep
    rates), the target cases (B = 256, 14x14, n = 197) first so that a run cut short by its time
    budget still judges the targets; on CPU one tiny shape at two keep rates, to exercise the harness."""
    if torch.device(device).type != "cuda":
        return [dict(model="tiny", heads=2, head_dim=16, batch=2, grid=(3, 3), keep_rate=rate) for rate in (0.5, 1.0)]
    configs = [dict(model=model, heads=heads, head_dim=head_dim, batch=batch, grid=grid, keep_rate=rate)
               for model, (heads, head_dim) in MODELS.items() for batch in (128, 256)
               for grid in ((14, 14), (24, 24)) for rate in KEEP_RATES]
    return sorted(configs, key=lambda c: not is_target_config(c))  # stable: the rest keep their order


def is_target_config(config: dict) -> bool:
    return config["batch"] == 256 and tuple(config["grid"]) == (14, 14) and config["keep_rate"] == 1.0


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(getattr(SDPBackend, name))


def _flex_kernel_options() -> Optional[dict]:
    """{"BACKEND": "TRITON"} where this torch's FlexAttention has the BACKEND option, else None
    (older torch: its default, which is the Triton kernel for these sequence lengths)."""
    try:
        from torch.nn.attention import flex_attention as flex_module
    except ImportError:
        return None
    options = getattr(getattr(flex_module, "FlexKernelOptions", None), "__annotations__", {})
    return {"BACKEND": "TRITON"} if "BACKEND" in options else None


def _pss_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "torch"


def _attention_fns(device: torch.device) -> Dict[str, Callable]:
    """impl -> fn(q, k, v, bias_table, index, grid_size) -> out; each runs under its own SDPA backend."""
    backend = _pss_backend(device)
    flex_options = _flex_kernel_options()

    def pss(q, k, v, table, index, grid_size):
        # check_index=False: the index comes straight from sample_patches (no host sync per call).
        return rpb_attention(q, k, v, table, index, grid_size=grid_size, backend=backend, check_index=False)

    def with_sdpa(name, fn):
        def call(*args):
            with _sdpa_backend(name):
                return fn(*args)
        return call

    def peer(fn):
        return lambda q, k, v, table, index, grid_size: fn(q, k, v, table, index, grid_size=grid_size)

    def pss_frozen_table(q, k, v, table, index, grid_size):
        return pss(q, k, v, table.detach(), index, grid_size)

    return {
        "pss": pss,
        "pss-frozen-table": pss_frozen_table,
        **{impl: pss for impl in DBIAS_IMPLS},  # under IMPL_ENVIRONMENT
        "published": peer(published_rpb_attention),
        "eager-index": peer(eager_index_rpb_attention),
        "sdpa-bias": with_sdpa("EFFICIENT_ATTENTION", peer(sdpa_bias_rpb_attention)),
        "flex": lambda q, k, v, table, index, grid_size: flex_rpb_attention(
            q, k, v, table, index, grid_size=grid_size, kernel_options=flex_options),
        "sdpa-flash": with_sdpa("FLASH_ATTENTION", lambda q, k, v, table, index, grid_size:
                                F.scaled_dot_product_attention(q, k, v)),
    }


def _inputs(config: dict, device: torch.device, dtype: torch.dtype, generator: torch.Generator):
    heads, head_dim, batch, grid = config["heads"], config["head_dim"], config["batch"], tuple(config["grid"])
    num_positions = NUM_PREFIX_TOKENS + grid[0] * grid[1]
    num_tokens = num_kept_tokens(num_positions, config["keep_rate"], NUM_PREFIX_TOKENS)
    index = None
    if num_tokens < num_positions:
        tokens = torch.randn(batch, num_positions, 8, device=device, generator=generator)
        _, index = sample_patches(tokens, config["keep_rate"], num_prefix_tokens=NUM_PREFIX_TOKENS)
    q, k, v = (torch.randn(batch, heads, num_tokens, head_dim, device=device, generator=generator).to(dtype)
               .requires_grad_() for _ in range(3))
    table = (0.1 * torch.randn(bias_table_rows(grid, NUM_PREFIX_TOKENS), heads, device=device,
                               generator=generator)).requires_grad_()
    return q, k, v, table, index, grid


def _step(fn: Callable, args: tuple, backward: bool) -> Callable[[], None]:
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grad_out = torch.randn_like(args[0])

    def forward():
        fn(*args)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        fn(*args).backward(grad_out)

    return forward_backward if backward else forward


def _peak_memory_mb(step: Callable[[], None], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _measure(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> dict:
    stats = time_iterations(step, warmup=warmup, iters=iters, device=device)
    return dict(ms=stats.median_ms, q1_ms=stats.q1_ms, q3_ms=stats.q3_ms,
                peak_mem_mb=_peak_memory_mb(step, device), error=None)


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return numerator / denominator if numerator is not None and denominator else None


def run(device, dtype: torch.dtype, configs: Optional[Iterable[dict]] = None, warmup: int = 5,
        iters: int = 20, impls: Iterable[str] = IMPLS, budget: Optional[TimeBudget] = None) -> List[dict]:
    """Time every impl on every config (see the module docstring for the rows). Once `budget` is
    spent, the remaining configs come back as rows with ms None and the reason in `error`."""
    device = torch.device(device)
    configs = default_configs(device) if configs is None else list(configs)
    budget = budget or TimeBudget(None)
    with dynamo_recompile_limit(FLEX_RECOMPILE_LIMIT):
        return _run(device, dtype, configs, warmup, iters, tuple(impls), budget)


def _run(device: torch.device, dtype: torch.dtype, configs: List[dict], warmup: int, iters: int,
         impls: tuple, budget: TimeBudget) -> List[dict]:
    fns = _attention_fns(device)
    backends = {"pss": _pss_backend(device), "pss-frozen-table": _pss_backend(device),
                **{impl: _pss_backend(device) for impl in DBIAS_IMPLS},
                "sdpa-bias": "EFFICIENT_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
                "flex": (_flex_kernel_options() or {}).get("BACKEND", "default")}
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for config in configs:
        if budget.spent():
            rows += _skipped_rows(config, impls, backends, dtype, budget.skip_reason())
            continue
        try:
            args = _inputs(config, device, dtype, generator)
        except Exception as err:  # e.g. out of memory for the inputs: every row of the config says so
            rows += _skipped_rows(config, impls, backends, dtype, f"making the inputs failed: {_error_text(err)}")
            _empty_cache(device)
            continue
        case = _case(config, dtype)
        by_impl = {}
        for impl in impls_for(config, impls):
            for pass_name in PASSES:
                row = dict(case, impl=impl, backend=backends.get(impl), **{"pass": pass_name})
                if budget.spent():  # checked per row: one config (7 impls x 2 passes) can take minutes
                    row.update(ms=None, q1_ms=None, q3_ms=None, peak_mem_mb=None, error=budget.skip_reason())
                    by_impl[impl, pass_name] = row
                    rows.append(row)
                    continue
                try:
                    with _environment(IMPL_ENVIRONMENT.get(impl, {})):
                        row.update(_measure(_step(fns[impl], args, pass_name != "forward"), device, warmup, iters))
                except Exception as err:  # recorded, not raised: one failing row must not end the run
                    row.update(ms=None, q1_ms=None, q3_ms=None, peak_mem_mb=None, error=_error_text(err))
                    _empty_cache(device)
                by_impl[impl, pass_name] = row
                rows.append(row)
        for (impl, pass_name), row in by_impl.items():
            flash = by_impl.get(("sdpa-flash", pass_name), {})
            row["ms_vs_sdpa_flash"] = _ratio(row["ms"], flash.get("ms"))
            for peer, key in SPEEDUP_PEERS.items():
                row[key] = _ratio(by_impl.get((peer, pass_name), {}).get("ms"), row["ms"])
            row["peak_mem_vs_sdpa_flash"] = _ratio(row["peak_mem_mb"], flash.get("peak_mem_mb"))
        del args
        _empty_cache(device)  # the next config's peak memory starts from a clean pool
    return rows


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:500]}"


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception:  # a sticky CUDA error: the next row records it as its own error
            pass


def impls_for(config: dict, impls: Iterable[str]) -> List[str]:
    return [impl for impl in impls if config["keep_rate"] in IMPL_KEEP_RATES.get(impl, (config["keep_rate"],))]


@contextmanager
def _environment(variables: Dict[str, str]):
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _case(config: dict, dtype: torch.dtype) -> dict:
    grid = tuple(config["grid"])
    num_positions = NUM_PREFIX_TOKENS + grid[0] * grid[1]
    return dict(model=config["model"], heads=config["heads"], head_dim=config["head_dim"], batch=config["batch"],
                grid=list(grid), keep_rate=config["keep_rate"],
                num_tokens=num_kept_tokens(num_positions, config["keep_rate"], NUM_PREFIX_TOKENS),
                num_positions=num_positions, dtype=str(dtype).replace("torch.", ""))


def _skipped_rows(config: dict, impls: tuple, backends: dict, dtype: torch.dtype, reason: str) -> List[dict]:
    return [dict(_case(config, dtype), impl=impl, backend=backends.get(impl), ms=None, q1_ms=None, q3_ms=None,
                 peak_mem_mb=None, error=reason, ms_vs_sdpa_flash=None, **{key: None for key in SPEEDUP_PEERS.values()},
                 peak_mem_vs_sdpa_flash=None, **{"pass": pass_name})
            for impl in impls_for(config, impls) for pass_name in PASSES]
