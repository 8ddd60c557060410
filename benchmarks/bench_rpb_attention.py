"""Timing and peak memory of `rpb_attention` against its peers; no printing.

The peers, timed in the same run: the eager PyTorch paths, SDPA with the per-image bias as a
dense attn_mask, FlexAttention, and SDPA FLASH without any bias (speed of light at that n).

`run(device, dtype, configs, warmup, iters, impls, budget, on_row)` returns one row (dict) per
(config, impl, pass), in that order (impls in the order given), and hands each to `on_row` as it is
done (so a caller can save partial results); `add_ratios(rows)` then fills the ratio columns:

    model, heads, head_dim, batch, grid, keep_rate, num_tokens (n), num_positions (N)
    impl      "pss" (rpb_attention; backend "triton" on CUDA, "torch" elsewhere),
              "pss-frozen-table" (the same with a table that needs no gradient: the backward
              skips the bias-gradient accumulation, so pss - pss-frozen-table is its cost),
              "pss-dbias-slices", "pss-dbias-position-grid", "pss-dbias-csr" (every keep rate),
              "pss-dbias-image-sum" (keep rate 1 only): pss with PSS_KERNELS_RPB_DBIAS set to that
              bias-gradient accumulator of the Triton backward (triton_bias_grad.py; the torch backend
              ignores the variable; an accumulator the kernels do not know makes the row's error),
              "pss-sdpa" (rpb_attention(backend="sdpa"): the construction from PyTorch's own kernels
              that backend=None runs until a kernel is validated: the bias gathered in the activation
              dtype into SDPA's memory-efficient kernel, one sort-based table scatter),
              "published" (a: eager softmax attention with the bias built as the PSS authors'
              published code builds it: the full (N, N, H) bias copied per image, indexed twice),
              "eager-index" (a': the same numbers, the dense per-image bias looked up once
              through the indexed relative-position index),
              "sdpa-bias" (b: dense float32-gathered bias as attn_mask, SDPA EFFICIENT backend),
              "flex" (c: FlexAttention, score_mod gathering from a table that requires grad;
              compiled on CUDA, each row under `flex_timeout` seconds, compilation included),
              "sdpa-flash" (d: SDPA FLASH backend without any bias: the speed of light for
              attention at this n)
    backend   the pss backend, the SDPA backend, or flex's kernel_options BACKEND
    pass      "forward" (with autograd recording, as in training) or "forward+backward"
              (gradients of q, k, v and, where there is one, the bias table)
    ms, q1_ms, q3_ms   median and quartiles over `iters` timed calls (benchmarks/_timing.py)
    peak_mem_mb        peak memory allocated during one call above what was allocated before it
                       (torch.cuda.max_memory_allocated, reset per case; None on CPU)
    ms_vs_sdpa_flash, speedup_vs_published, speedup_vs_eager_index, peak_mem_vs_sdpa_flash
                       ratios to peers of the same config and pass (speed-up: the peer's time /
                       this row's; None where a peer failed or was not run)
    error     None, or "ExceptionType: message" when the impl cannot run here (rows are kept so
              a failure, e.g. of FlexAttention, is recorded rather than hidden), or why the case
              was skipped (the run's time budget was spent, a flex row timed out before)

The inputs match a training step under autocast: q, k, v in `dtype`, a float32 bias table,
and for keep_rate < 1 the `index` that `sample_patches` returns for random tokens (score order).
Targets (benchmarks/ops.py), forward+backward at ViT-B shapes, B = 256, bf16: at n = 197 pss <=
1.25x sdpa-flash, >= 3x faster than the eager peers, faster than sdpa-bias and flex, peak memory
within 10 % of sdpa-flash; at every keep rate the bias gradient (pss - pss-frozen-table) <= 10 % of
the attention backward.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

from _timing import TimeBudget, dynamo_recompile_limit, peak_memory_mb, time_iterations
from pss_kernels import num_kept_tokens, rpb_attention, sample_patches
from pss_kernels.ops.rpb_attention.peers import (eager_index_rpb_attention, flex_rpb_attention, published_rpb_attention,
                                                 sdpa_bias_rpb_attention)
from pss_kernels.ops.rpb_attention.reference import bias_table_rows

MODELS = {"vit_base": (12, 64), "deit_small": (6, 64)}  # name -> (heads, head_dim)
KEEP_RATES = (1.0, 0.6, 0.2, 0.8, 0.4)  # N = 197: n = 197, 118, 39, 158, 79 (the target keep rates first)
TARGET_KEEP_RATES = (1.0, 0.6, 0.2)
# pss with each bias-gradient accumulator of the Triton backward (PSS_KERNELS_RPB_DBIAS); image-sum
# needs the shared row map of index=None, so its rows run at keep rate 1 only.
DBIAS_ACCUMULATORS = ("position-grid", "csr", "slices", "image-sum")
DBIAS_IMPLS = tuple(f"pss-dbias-{name}" for name in DBIAS_ACCUMULATORS)
# In timing order: the main comparison first, so that a run cut short still has it.
IMPLS = ("pss", "sdpa-flash", "pss-frozen-table", "pss-sdpa", "sdpa-bias", "published", "eager-index", *DBIAS_IMPLS,
         "flex")
# Implementations measured under extra environment variables (read by the kernels' launchers),
# and the keep rates they apply to (not listed: all).
IMPL_ENVIRONMENT = {impl: {"PSS_KERNELS_RPB_DBIAS": name} for impl, name in zip(DBIAS_IMPLS, DBIAS_ACCUMULATORS)}
IMPL_KEEP_RATES = {"pss-dbias-image-sum": (1.0,)}
FLEX_TIMEOUT_S = 150.0  # one flex row, its torch.compile included (30-90 s for a new shape)
# The eager peers the speed-up columns are taken against.
SPEEDUP_PEERS = {"published": "speedup_vs_published", "eager-index": "speedup_vs_eager_index"}
# FlexAttention is compiled with static shapes, once per (B, n, H): the grid has 40 of them
# (see _timing.dynamo_recompile_limit). Each new shape costs a compile (~10-30 s).
FLEX_RECOMPILE_LIMIT = 128
PASSES = ("forward", "forward+backward")
NUM_PREFIX_TOKENS = 1


def default_configs(device) -> List[dict]:
    """The grid on CUDA (ViT-B and DeiT-S, B 256/128, 14x14 and 24x24 grids, five keep rates), the
    target cases (ViT-B, B = 256, 14x14 at keep rates 1, 0.6, 0.2) first, then DeiT-S at those, so that
    a run cut short by its time budget still judges the targets; on CPU one tiny shape at two keep
    rates, to exercise the harness."""
    if torch.device(device).type != "cuda":
        return [dict(model="tiny", heads=2, head_dim=16, batch=2, grid=(3, 3), keep_rate=rate) for rate in (1.0, 0.5)]
    configs = [dict(model=model, heads=heads, head_dim=head_dim, batch=batch, grid=grid, keep_rate=rate)
               for model, (heads, head_dim) in MODELS.items() for batch in (256, 128)
               for grid in ((14, 14), (24, 24)) for rate in KEEP_RATES]
    return sorted(configs, key=lambda c: (not is_target_config(c), not is_target_config(dict(c, model="vit_base"))))


def is_target_config(config: dict) -> bool:
    """ViT-B at B = 256 on the 14 x 14 grid at keep rates 1, 0.6 and 0.2: the cases the targets judge."""
    return (config["model"] == "vit_base" and config["batch"] == 256 and tuple(config["grid"]) == (14, 14)
            and config["keep_rate"] in TARGET_KEEP_RATES)


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
        if device.type != "cuda":  # the anchors are CUDA kernels; on CPU SDPA picks its own
            return fn

        def call(*args):
            with _sdpa_backend(name):
                return fn(*args)
        return call

    def peer(fn):
        return lambda q, k, v, table, index, grid_size: fn(q, k, v, table, index, grid_size=grid_size)

    def pss_frozen_table(q, k, v, table, index, grid_size):
        return pss(q, k, v, table.detach(), index, grid_size)

    def pss_sdpa(q, k, v, table, index, grid_size):
        return rpb_attention(q, k, v, table, index, grid_size=grid_size, backend="sdpa", check_index=False)

    return {
        "pss": pss,
        "pss-frozen-table": pss_frozen_table,
        "pss-sdpa": pss_sdpa,
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


def _measure(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> dict:
    stats = time_iterations(step, warmup=warmup, iters=iters, device=device)
    return dict(ms=stats.median_ms, q1_ms=stats.q1_ms, q3_ms=stats.q3_ms,
                peak_mem_mb=peak_memory_mb(step, device), error=None)


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return numerator / denominator if numerator is not None and denominator else None


def run(device, dtype: torch.dtype, configs: Optional[Iterable[dict]] = None, warmup: int = 5,
        iters: int = 20, impls: Iterable[str] = IMPLS, budget: Optional[TimeBudget] = None,
        on_row: Optional[Callable[[dict], None]] = None, flex_timeout: float = FLEX_TIMEOUT_S) -> List[dict]:
    """Time every impl on every config (see the module docstring for the rows), each row handed to
    `on_row` once done. Once `budget` is spent, the remaining rows come back with ms None and the
    reason in `error`. The ratio columns are filled here over these rows (add_ratios); a caller that
    joins rows of several runs calls add_ratios on the whole."""
    device = torch.device(device)
    configs = default_configs(device) if configs is None else list(configs)
    budget = budget or TimeBudget(None)
    with dynamo_recompile_limit(FLEX_RECOMPILE_LIMIT):
        rows = _run(device, dtype, configs, warmup, iters, tuple(impls), budget, on_row or (lambda row: None),
                    flex_timeout)
    add_ratios(rows)
    return rows


class RowTimeout(Exception):
    """A row ran past its own time limit (flex_timeout)."""


@contextmanager
def _time_limit(seconds: Optional[float]):
    """Raise RowTimeout in this (main) thread after `seconds` (SIGALRM; no limit where there is none)."""
    import signal
    import threading
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise RowTimeout(f"timed out after {seconds:g} s (compilation included)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _run(device: torch.device, dtype: torch.dtype, configs: List[dict], warmup: int, iters: int,
         impls: tuple, budget: TimeBudget, on_row: Callable[[dict], None], flex_timeout: float) -> List[dict]:
    fns = _attention_fns(device)
    backends = {"pss": _pss_backend(device), "pss-frozen-table": _pss_backend(device), "pss-sdpa": "sdpa",
                **{impl: _pss_backend(device) for impl in DBIAS_IMPLS},
                "sdpa-bias": "EFFICIENT_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
                "flex": (_flex_kernel_options() or {}).get("BACKEND", "default")}
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    flex_failed = None  # a flex row that timed out: the later ones would compile again, and time out again

    def finish(row):
        rows.append(row)
        on_row(row)

    for config in configs:
        if budget.spent():
            for row in _skipped_rows(config, impls, backends, dtype, budget.skip_reason()):
                finish(row)
            continue
        try:
            args = _inputs(config, device, dtype, generator)
        except Exception as err:  # e.g. out of memory for the inputs: every row of the config says so
            for row in _skipped_rows(config, impls, backends, dtype, f"making the inputs failed: {_error_text(err)}"):
                finish(row)
            _empty_cache(device)
            continue
        case = _case(config, dtype)
        for impl in impls_for(config, impls):
            for pass_name in PASSES:
                row = dict(case, impl=impl, backend=backends.get(impl), **{"pass": pass_name})
                skip = budget.skip_reason() if budget.spent() else (
                    f"skipped: an earlier flex row failed ({flex_failed})" if impl == "flex" and flex_failed else None)
                if skip:  # checked per row: one config (a dozen impls x 2 passes) can take minutes
                    row.update(ms=None, q1_ms=None, q3_ms=None, peak_mem_mb=None, error=skip)
                    finish(row)
                    continue
                limit = min(flex_timeout, max(1.0, budget.left())) if impl == "flex" else None
                try:
                    with _environment(IMPL_ENVIRONMENT.get(impl, {})), _time_limit(limit):
                        row.update(_measure(_step(fns[impl], args, pass_name != "forward"), device, warmup, iters))
                except Exception as err:  # recorded, not raised: one failing row must not end the run
                    row.update(ms=None, q1_ms=None, q3_ms=None, peak_mem_mb=None, error=_error_text(err))
                    if impl == "flex" and _caused_by(err, RowTimeout):  # torch.compile may wrap it
                        flex_failed = row["error"]
                    _empty_cache(device)
                finish(row)
        del args
        _empty_cache(device)  # the next config's peak memory starts from a clean pool
    return rows


def _caused_by(err: BaseException, kind: type) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


RATIO_KEYS = ("ms_vs_sdpa_flash", *SPEEDUP_PEERS.values(), "peak_mem_vs_sdpa_flash")


def add_ratios(rows: List[dict]) -> None:
    """Fill each row's ratio columns from the rows of the same config and pass (in place)."""
    def case_key(row):
        return (row["model"], row["batch"], tuple(row["grid"]), row["keep_rate"], row["dtype"], row["pass"])

    by_case: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault(case_key(row), {})[row["impl"]] = row
    for row in rows:
        peers = by_case[case_key(row)]
        flash = peers.get("sdpa-flash", {})
        row["ms_vs_sdpa_flash"] = _ratio(row["ms"], flash.get("ms"))
        for peer, key in SPEEDUP_PEERS.items():
            row[key] = _ratio(peers.get(peer, {}).get("ms"), row["ms"])
        row["peak_mem_vs_sdpa_flash"] = _ratio(row["peak_mem_mb"], flash.get("peak_mem_mb"))


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
                 peak_mem_mb=None, error=reason, **{"pass": pass_name})
            for impl in impls_for(config, impls) for pass_name in PASSES]
