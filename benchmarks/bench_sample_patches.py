"""Timing of `sample_patches` backends against the eager PyTorch peers (same run); no printing.

`run(...)` returns one row (dict) per (shape, keep_rate, implementation, pass):

    impl      "pss-<backend>" for each backend available on the device (triton only on CUDA:
              the interpreter is not a benchmark), "eager" (abs().sum -> argsort -> advanced
              indexing, the published path), "topk-gather" (abs().sum -> topk -> gather)
    pass      "forward" or "forward+backward" (the backward of x_kept with a given gradient)
    ms, q1_ms, q3_ms  median and quartiles over `iters` timed calls (benchmarks/_timing.py:
              CUDA events on GPU, perf_counter on CPU)
    bytes     minimum traffic: forward reads x and writes x_kept, B*(N + k)*C elements;
              forward+backward adds reading grad_kept and writing grad_x, twice that
    fraction_of_peak  (bytes / time) / peak bandwidth of the device (PEAK_BANDWIDTH_GBS by
              name, else a measured device-to-device copy)
    input_sets  how many copies of the inputs the timed calls rotate through (enough to span 3x the
              L2 cache on CUDA, so the figures are of device memory, not of the cache; 1 on CPU)
    graph_ms, graph_fraction_of_peak   the same from CUDA-graph replays (CUDA only): device time
              with no host work between kernels. A ~20 us kernel is shorter than one eager
              call's Python + dispatch overhead, so per-call timing measures the host; the
              bandwidth target is judged on the graph time. graph_error says why a capture failed.
    speedup_vs_eager, speedup_vs_eager_graph  eager's time / this row's, same shape and pass
    error     None, or why the case has no time (the backend failed, or the time budget was spent)
"""
import itertools
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from _timing import TimeBudget, device_name, time_graph_replays, time_iterations

from pss_kernels import available_backends, num_kept_tokens, sample_patches
from pss_kernels._backends import OP_BACKENDS
from pss_kernels.ops.sample_patches.peers import eager_sample_patches, topk_gather_sample_patches

# Peak DRAM bandwidth (GB/s) by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BANDWIDTH_GBS = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5, HBM3
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("L4", 300.0),
)


def peak_bandwidth_gbs(device: torch.device, warmup: int = 3, iters: int = 10) -> Tuple[float, str]:
    """(GB/s, source): the table entry for the device's name, else a measured 256 MiB copy."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gbs in PEAK_BANDWIDTH_GBS:
            if key in name:
                return gbs, f"table ({key})"
    src = torch.empty(64 * 2 ** 20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_iterations(lambda: dst.copy_(src), warmup=warmup, iters=iters, device=device).median_ms
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9, "measured copy"


def _implementations(device: torch.device) -> Dict[str, Callable]:
    impls = {}
    for backend, status in available_backends(device).items():
        if (backend in OP_BACKENDS["sample_patches"] and status.available
                and (backend != "triton" or device.type == "cuda")):
            impls[f"pss-{backend}"] = (lambda b: lambda x, rho: sample_patches(x, rho, backend=b))(backend)
    impls["eager"] = eager_sample_patches
    impls["topk-gather"] = topk_gather_sample_patches
    return impls


def run(device: Union[str, torch.device], dtype: Union[str, torch.dtype],
        shapes: Iterable[Sequence[int]], keep_rates: Iterable[float], warmup: int = 10,
        iters: int = 50, budget: Optional[TimeBudget] = None,
        on_row: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Rows for every (B, N, C) in `shapes`, keep rate, implementation and pass (see module doc),
    each handed to `on_row` as it is done (before the speed-up columns, which add_ratios fills).

    Cases are run in the order given; once `budget` is spent the remaining ones are returned as
    rows with ms None and an `error` saying they were skipped, so no case silently disappears.
    """
    on_row = on_row or (lambda row: None)
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    keep_rates = list(keep_rates)
    budget = budget or TimeBudget(None)
    peak, peak_source = peak_bandwidth_gbs(device)
    device_label = device_name(device)
    impls = _implementations(device)
    rows = []
    for batch, num_tokens, channels in shapes:
        inputs = None
        for keep_rate in keep_rates:
            num_kept = num_kept_tokens(num_tokens, keep_rate)
            forward_bytes = batch * (num_tokens + num_kept) * channels * dtype.itemsize
            for impl, fn in impls.items():
                for name in PASSES:
                    num_bytes = forward_bytes * (1 if name == "forward" else 2)
                    row = {"op": "sample_patches", "impl": impl, "pass": name, "device": device_label,
                           "dtype": str(dtype).replace("torch.", ""), "B": batch, "N": num_tokens, "C": channels,
                           "keep_rate": keep_rate, "k": num_kept, "bytes": num_bytes, "peak_gbs": peak,
                           "peak_source": peak_source, **_empty_timing()}
                    if budget.spent():
                        row["error"] = budget.skip_reason()
                    else:
                        if inputs is None:
                            inputs = _input_sets(batch, num_tokens, channels, dtype, device)
                        grads_kept = [torch.randn(batch, num_kept, channels, device=device, dtype=dtype)
                                      for _ in inputs]

                        def call(i, fn=fn, keep_rate=keep_rate, forward=name == "forward", grads_kept=grads_kept):
                            x, x_grad = inputs[i]
                            if forward:
                                return fn(x, keep_rate)
                            return torch.autograd.grad(fn(x_grad, keep_rate)[0], x_grad, grads_kept[i])

                        row.update(_measure(call, len(inputs), device, warmup, iters, num_bytes, peak))
                    rows.append(row)
                    on_row(row)
    add_ratios(rows)
    return rows


def add_ratios(rows: List[dict]) -> None:
    """speedup_vs_eager (per call) and speedup_vs_eager_graph: eager's time / the row's, same case and pass."""
    def case(row):
        return row["B"], row["N"], row["C"], row["keep_rate"], row["dtype"], row["pass"]

    eager = {case(row): row for row in rows if row["impl"] == "eager"}
    for row in rows:
        for key, source in (("speedup_vs_eager", "ms"), ("speedup_vs_eager_graph", "graph_ms")):
            theirs, ours = eager.get(case(row), {}).get(source), row[source]
            row[key] = theirs / ours if theirs and ours else None


PASSES = ("forward", "forward+backward")


def _empty_timing() -> dict:
    return {"input_sets": None, "ms": None, "q1_ms": None, "q3_ms": None, "bandwidth_gbs": None,
            "fraction_of_peak": None,
            "graph_ms": None, "graph_bandwidth_gbs": None, "graph_fraction_of_peak": None, "graph_error": None,
            "error": None}


# Every timed call reads a different input set, and the sets together span several times the L2
# cache, so that a repeated call measures device memory rather than the cache (H100/H200: 50 MB L2;
# x at B=256, N=197, C=768 bf16 is 77 MB, at B=64, N=197, C=384 only 9.7 MB).
L2_MULTIPLE, MAX_INPUT_SETS = 3, 16


def _input_sets(batch: int, num_tokens: int, channels: int, dtype: torch.dtype,
                device: torch.device) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """[(x, x that requires grad)] * R, R = 1 on CPU, else enough sets to cover L2_MULTIPLE x L2."""
    count = 1
    if device.type == "cuda":
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
        x_bytes = batch * num_tokens * channels * dtype.itemsize
        count = max(1, min(MAX_INPUT_SETS, -(-L2_MULTIPLE * l2_bytes // x_bytes)))
    sets = []
    for _ in range(count):
        x = torch.randn(batch, num_tokens, channels, device=device, dtype=dtype)
        sets.append((x, x.detach().clone().requires_grad_()))
    return sets


def _measure(call: Callable[[int], object], num_sets: int, device: torch.device, warmup: int, iters: int,
             num_bytes: int, peak: float) -> dict:
    """Per-call timing (what an eager caller sees; call i % num_sets reads input set i) and, on CUDA,
    CUDA-graph timing (device time alone, the basis of the bandwidth target): one graph calls every
    set once, and its replay time is divided by num_sets. A failure is recorded in the row, not raised."""
    result = _empty_timing()
    result["input_sets"] = num_sets
    turn = itertools.count()
    try:
        stats = time_iterations(lambda: call(next(turn) % num_sets), warmup=warmup, iters=iters, device=device)
    except Exception as err:  # one failing backend must not end the run
        result["error"] = f"{type(err).__name__}: {str(err)[:500]}"
        return result
    gbs = num_bytes / (stats.median_ms * 1e-3) / 1e9
    result.update(ms=stats.median_ms, q1_ms=stats.q1_ms, q3_ms=stats.q3_ms, bandwidth_gbs=gbs,
                  fraction_of_peak=gbs / peak)
    if device.type == "cuda":
        try:
            graph = time_graph_replays(lambda: [call(i) for i in range(num_sets)], warmup=warmup, iters=iters,
                                       device=device)
            graph_ms = graph.median_ms / num_sets
            graph_gbs = num_bytes / (graph_ms * 1e-3) / 1e9
            result.update(graph_ms=graph_ms, graph_bandwidth_gbs=graph_gbs,
                          graph_fraction_of_peak=graph_gbs / peak)
        except Exception as err:
            result["graph_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return result
