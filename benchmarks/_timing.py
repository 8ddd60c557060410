"""Timing helpers shared by the benchmarks: median-of-many timing and the run's environment.

On CUDA every iteration is bracketed by a pair of CUDA events recorded on the current stream,
so the time is the device's wall time between the two points (launch gaps included, host
overhead that the GPU hides excluded); the events are read once after the loop, so timing
adds no synchronisation inside it. On CPU `time.perf_counter` brackets each call.

Import from a benchmark script run as `python benchmarks/<script>.py` (its folder is on
sys.path): `from _timing import time_iterations, environment_info`.
"""
from __future__ import annotations

import datetime
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class TimingStats:
    """Summary of per-iteration times in milliseconds: median and the quartiles around it."""
    median_ms: float
    q1_ms: float
    q3_ms: float
    iters: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "TimingStats":
        if len(samples_ms) == 0:
            raise ValueError("samples_ms must hold at least one time, got none")
        q1, median, q3 = np.percentile(np.asarray(samples_ms, dtype=np.float64), [25, 50, 75])
        return cls(median_ms=float(median), q1_ms=float(q1), q3_ms=float(q3), iters=len(samples_ms))

    def as_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(step: Callable[[], object], *, warmup: int, iters: int, device: torch.device) -> TimingStats:
    """Run `step()` `warmup` times untimed, then `iters` times timed one by one.

    Warm-up absorbs one-off costs (cuDNN/Triton autotuning, torch.compile, optimizer state
    allocation, the caching allocator growing to its working set).
    """
    return TimingStats.from_samples(time_samples(step, warmup=warmup, iters=iters, device=device))


def time_samples(step: Callable[[], object], *, warmup: int, iters: int, device: torch.device) -> List[float]:
    """`time_iterations` without the summary: the `iters` per-call times in milliseconds, in order
    (for callers that pool samples from several blocks, e.g. an interleaved run)."""
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    device = torch.device(device)
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends):
            start.record()
            step()
            end.record()
        synchronize(device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]
    samples_ms: List[float] = []
    for _ in range(iters):
        begin = time.perf_counter()
        step()
        samples_ms.append((time.perf_counter() - begin) * 1e3)
    return samples_ms


# Errors after which the CUDA context is unusable: every later call on it would fail (or crash the run).
CONTEXT_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
                  "illegal instruction", "cuda error: an illegal")


def context_lost(error: Optional[str]) -> bool:
    """Whether an error (its text) leaves the CUDA context unusable."""
    return bool(error) and any(marker in error.lower() for marker in CONTEXT_ERRORS)


def host_issue_ms(step: Callable[[], object], device: torch.device, calls: int = 2) -> Optional[float]:
    """Host milliseconds to issue one `step()` (no sync inside the loop); None off CUDA, where every call
    blocks. A row whose host time reaches its device time measured Python and dispatch, not the kernels."""
    if device.type != "cuda":
        return None
    synchronize(device)
    begin = time.perf_counter()
    for _ in range(calls):
        step()
    issued = (time.perf_counter() - begin) * 1e3 / calls
    synchronize(device)
    return issued


def time_graph_replays(step: Callable[[], object], *, warmup: int, iters: int,
                       device: torch.device) -> TimingStats:
    """Capture `step()` once into a CUDA graph and time `iters` replays of it with CUDA events.

    This is the device time of the step's kernels with no host work between them: what a
    bandwidth figure must be computed from when a kernel (~20 us) is shorter than the Python
    and dispatch overhead of one eager call, which otherwise decides the measured time. Raises
    (RuntimeError from the capture, ValueError off CUDA) when the step cannot be captured, e.g.
    it synchronises with the host; callers record the reason.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"CUDA graph timing needs a CUDA device, got {device}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(max(warmup, 1)):
            step()
    caller_stream = torch.cuda.current_stream(device)
    caller_stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    cause: list = []  # the step's own error: torch.cuda.graph's exit raises a generic one in its place
    try:
        with torch.cuda.graph(graph):
            try:
                step()
            except Exception as err:
                cause.append(err)
                raise
    except Exception as err:
        if cause:
            raise RuntimeError(f"the step failed under CUDA graph capture: {type(cause[0]).__name__}: "
                               f"{cause[0]}") from cause[0]
        raise RuntimeError(f"CUDA graph capture failed: {type(err).__name__}: {err}") from err
    finally:
        # torch.cuda.graph ends the capture before it restores the stream: after a failed capture the
        # capture stream could stay current and every later measurement would run on it.
        torch.cuda.set_stream(caller_stream)
    return time_iterations(graph.replay, warmup=max(warmup, 1), iters=iters, device=device)


def dynamo_recompile_limit(limit: int):
    """A torch._dynamo.config.patch context: at most `limit` recompiles of one function, and an error
    (where this torch has the switch) rather than a silent fall-back to eager once it is hit.

    The compiled peers (FlexAttention) compile with static shapes once per shape: a benchmark grid
    passes dynamo's default limit of 8, after which the peer would quietly run unfused and be
    misrepresented. `recompile_limit` was called `cache_size_limit` in older torch.
    """
    import torch._dynamo.config as dynamo_config
    settings = {"recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit": limit}
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        settings["fail_on_recompile_limit_hit"] = True
    return dynamo_config.patch(**settings)


def peak_memory_mb(step: Callable[[], object], device: torch.device) -> Optional[float]:
    """MiB that one `step()` allocates at its peak above what was allocated before it (CUDA only; None
    elsewhere)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


class TimeBudget:
    """A wall-clock budget for a whole benchmark run: `spent()` says when to stop starting cases.

    `seconds=None` never runs out. The device tool gives one command 10 minutes; a run that
    stops itself in time still writes its JSON, one killed at the limit writes nothing.
    """

    def __init__(self, seconds: float | None):
        if seconds is not None and seconds <= 0:
            raise ValueError(f"time budget must be > 0 seconds, got {seconds}")
        self.seconds = seconds
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def left(self) -> float:
        """Seconds left (infinity without a limit)."""
        return float("inf") if self.seconds is None else max(0.0, self.seconds - self.elapsed())

    def skip_reason(self) -> str:
        return f"skipped: the run's time budget of {self.seconds:g} s was spent"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def file_slug(text: str) -> str:
    """`text` reduced to characters safe in a file name ("NVIDIA H100 80GB HBM3" -> "NVIDIA-H100-80GB-HBM3")."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment_info(device: torch.device) -> dict:
    """Device, library versions and date: what a reader needs to compare two result files."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # not installed, or a broken install: record it, do not fail the benchmark
        triton_version = None
    import pss_kernels
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "pss_kernels": pss_kernels.__version__,
        "pss_kernels_backends": {name: {"available": status.available, "reason": status.reason}
                                 for name, status in pss_kernels.available_backends(device).items()},
        "git_commit": _git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
    return info


def profile_step(step: Callable[[], object], *, device: torch.device, warmup: int = 1, row_limit: int = 20) -> str:
    """torch.profiler table of one `step()` after `warmup` untimed ones: where an iteration's time goes,
    sorted by self time on the device (CUDA) or the host (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    for _ in range(warmup):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    events = prof.key_averages()
    if device.type != "cuda":
        return events.table(sort_by="self_cpu_time_total", row_limit=row_limit)
    try:  # the key was renamed from cuda to device in torch 2.4+; older names still work on some versions
        return events.table(sort_by="self_device_time_total", row_limit=row_limit)
    except (AttributeError, KeyError, ValueError):
        return events.table(sort_by="self_cuda_time_total", row_limit=row_limit)
