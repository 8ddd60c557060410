"""Timing of `sample_patches` backends against the eager PyTorch peers (DESIGN §5); no printing.

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
    speedup_vs_eager  eager's ms / this row's ms, same shape and pass
"""
from typing import Callable, Dict, Iterable, List, Sequence, Tuple, Union

import torch
from _timing import device_name, time_iterations

from pss_kernels import available_backends, num_kept_tokens, sample_patches
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
        if status.available and (backend != "triton" or device.type == "cuda"):
            impls[f"pss-{backend}"] = (lambda b: lambda x, rho: sample_patches(x, rho, backend=b))(backend)
    impls["eager"] = eager_sample_patches
    impls["topk-gather"] = topk_gather_sample_patches
    return impls


def run(device: Union[str, torch.device], dtype: Union[str, torch.dtype],
        shapes: Iterable[Sequence[int]], keep_rates: Iterable[float], warmup: int = 10,
        iters: int = 50) -> List[dict]:
    """Rows for every (B, N, C) in `shapes`, keep rate, implementation and pass (see module doc)."""
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    keep_rates = list(keep_rates)
    peak, peak_source = peak_bandwidth_gbs(device)
    device_label = device_name(device)
    impls = _implementations(device)
    rows = []
    for batch, num_tokens, channels in shapes:
        x = torch.randn(batch, num_tokens, channels, device=device, dtype=dtype)
        x_grad = x.detach().clone().requires_grad_()
        for keep_rate in keep_rates:
            num_kept = num_kept_tokens(num_tokens, keep_rate)
            grad_kept = torch.randn(batch, num_kept, channels, device=device, dtype=dtype)
            forward_bytes = batch * (num_tokens + num_kept) * channels * x.element_size()
            eager_ms = {}
            for impl, fn in impls.items():
                passes = {
                    "forward": lambda: fn(x, keep_rate),
                    "forward+backward": lambda: torch.autograd.grad(fn(x_grad, keep_rate)[0], x_grad, grad_kept),
                }
                for name, call in passes.items():
                    stats = time_iterations(call, warmup=warmup, iters=iters, device=device)
                    ms = stats.median_ms
                    if impl == "eager":
                        eager_ms[name] = ms
                    num_bytes = forward_bytes * (1 if name == "forward" else 2)
                    rows.append({
                        "op": "sample_patches", "impl": impl, "pass": name, "device": device_label,
                        "dtype": str(dtype).replace("torch.", ""), "B": batch, "N": num_tokens, "C": channels,
                        "keep_rate": keep_rate, "k": num_kept, "ms": ms, "q1_ms": stats.q1_ms,
                        "q3_ms": stats.q3_ms, "bytes": num_bytes,
                        "bandwidth_gbs": num_bytes / (ms * 1e-3) / 1e9, "peak_gbs": peak,
                        "peak_source": peak_source,
                        "fraction_of_peak": num_bytes / (ms * 1e-3) / 1e9 / peak,
                    })
            for row in rows[-2 * len(impls):]:
                row["speedup_vs_eager"] = eager_ms[row["pass"]] / row["ms"]
    return rows
