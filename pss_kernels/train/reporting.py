"""What a run reports: a JSON-lines log, a stderr progress bar, the projected-time summary, FLOPs per
iteration and peak memory."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, TextIO, Tuple

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..ops.sample_patches import num_kept_tokens


class JsonLinesLog:
    """One JSON object per line, appended (a resumed run continues the same file) and flushed."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: Mapping) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ProgressBar:
    """A one-line bar redrawn in place on a terminal; every `interval` steps a plain line otherwise
    (log files stay readable). No tqdm needed."""

    WIDTH = 24

    def __init__(self, total_steps: int, interval: int = 10, stream: TextIO = sys.stderr, enabled: bool = True):
        self.total_steps, self.interval, self.stream, self.enabled = total_steps, max(1, interval), stream, enabled
        self.interactive = enabled and hasattr(stream, "isatty") and stream.isatty()
        self._last_draw = 0.0

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        filled = int(self.WIDTH * step / self.total_steps)
        line = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {step}/{self.total_steps} {text}"
        if self.interactive:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or step == self.total_steps:  # redraw at most 10x per second
                self.stream.write("\r" + line + "\033[K")
                self.stream.flush()
                self._last_draw = now
        elif step % self.interval == 0 or step == self.total_steps:
            self.stream.write(line + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A line that stays (evaluation results, notes), printed above the bar."""
        if not self.enabled:
            return
        self.stream.write(("\r\033[K" if self.interactive else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.interactive:
            self.stream.write("\n")
            self.stream.flush()


class IterationFlops:
    """FLOPs of one training iteration (forward + backward of this process's batch) per cost key (the
    kept-token count, or with methods the key of train/methods.cost_key: tokens after the input
    sampler and each selector, attention level, growth stage), from PyTorch's own counter
    (torch.utils.flop_counter.FlopCounterMode), counted once per key and cached.

    The count runs on a twin of the model on the meta device (no memory, no time, no RNG drawn,
    the real model untouched), built by `make_meta_model` with eager attention: the fused custom ops
    are opaque to the counter, the eager peer runs the same matmuls as aten ops. The twin is put in
    the iteration's state first: input keep rate, R_T and R_A of its token pruning, growth stage
    (models.growth.set_stage), so pruning and growth are counted as they run. The counter sees
    matmuls and convolutions (2 FLOPs per multiply-add), not softmax, norms or the optimizer.
    A model the meta device cannot run is reported as None (once per key) instead of stopping
    the training run.
    """

    def __init__(self, make_meta_model: Callable[[], torch.nn.Module], batch_shape: Tuple[int, ...]):
        self.make_meta_model, self.batch_shape = make_meta_model, tuple(batch_shape)
        self._model: Optional[torch.nn.Module] = None
        self.by_tokens: Dict[object, Optional[int]] = {}

    def __call__(self, key, keep_rate: float, *, token_keep_rate: float = 1.0, attention_keep_rate: float = 1.0,
                 stage=None) -> Optional[int]:
        """FLOPs of an iteration at cost key `key` (an int token count, or a method key), in the state
        given (stage: a models.growth.GrowthStage or None)."""
        if key not in self.by_tokens:
            try:
                self.by_tokens[key] = self._count(keep_rate, token_keep_rate, attention_keep_rate, stage)
            except (RuntimeError, NotImplementedError, TypeError) as err:
                print(f"pss-train: note: FLOPs at {key} tokens not counted ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''})", file=sys.stderr)
                self.by_tokens[key] = None
        return self.by_tokens[key]

    def _count(self, keep_rate: float, token_keep_rate: float, attention_keep_rate: float, stage) -> int:
        with torch.random.fork_rng(devices=[]):
            if self._model is None:
                with torch.device("meta"):
                    self._model = self.make_meta_model().train()
            model = self._model
            if getattr(model, "token_pruning", None) is not None:
                model.token_keep_rate, model.attention_keep_rate = token_keep_rate, attention_keep_rate
            if stage is not None:
                from ..models.growth import set_stage
                set_stage(model, stage)
            images = torch.empty(self.batch_shape, device="meta")
            with FlopCounterMode(display=False) as counter:
                model(images, keep_rate=keep_rate).float().sum().backward()
            model.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())


def peak_memory_mb(device: torch.device) -> Tuple[Optional[float], str]:
    """(peak MiB, what was measured): CUDA's max_memory_allocated on a GPU; on the CPU the process's
    peak resident set size (getrusage: cheap, includes everything the process ever held)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda max_memory_allocated"
    try:
        import resource
    except ImportError:  # not on Windows
        return None, "n/a"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10), "cpu peak rss"


class KeepRateTimes:
    """Iteration time (data + compute) summed per kept-token count k, skipping each count's first
    `warmup` iterations of a process (allocator, autotuning and compilation happen there).

    The cost of an iteration depends on k, not on rho itself: a continuous schedule
    (warmup_cosine, quantum=none) has thousands of distinct rates but at most N distinct k, so
    keying by k measures it. rho = 1 (no sampling) is the key N; a rho < 1 that keeps all N tokens
    shares that key.
    """

    def __init__(self, num_tokens: int, warmup: int = 2):
        self.num_tokens, self.warmup = num_tokens, warmup
        self.count: Dict[int, int] = {}
        self.total: Dict[int, float] = {}
        self._seen_this_process: Dict[int, int] = {}

    def tokens(self, keep_rate: float) -> int:
        """The key of `keep_rate`: tokens kept (prefix included) out of num_tokens."""
        return self.num_tokens if keep_rate == 1.0 else num_kept_tokens(self.num_tokens, keep_rate)

    def add(self, keep_rate: float, seconds: float) -> None:
        self.add_key(self.tokens(keep_rate), seconds)

    def add_key(self, key, seconds: float) -> None:
        """An iteration of `seconds` at cost key `key`: a token count, or with token pruning / growth
        a train/methods.cost_key string (the tokens after the input sampler and each selector, ...)."""
        seen = self._seen_this_process.get(key, 0)
        self._seen_this_process[key] = seen + 1
        if seen < self.warmup:
            return
        self.count[key] = self.count.get(key, 0) + 1
        self.total[key] = self.total.get(key, 0.0) + seconds

    def mean(self, tokens: int) -> Optional[float]:
        count = self.count.get(tokens, 0)
        return self.total[tokens] / count if count else None

    def state_dict(self) -> dict:
        return {"by": "tokens", "num_tokens": self.num_tokens, "count": dict(self.count), "total": dict(self.total)}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("by") == "tokens":
            self.count, self.total = dict(state["count"]), dict(state["total"])
            return
        # Checkpoints before the token keying summed per keep rate: merge the rates of one k.
        self.count, self.total = {}, {}
        for rate, count in state["count"].items():
            key = self.tokens(float(rate))
            self.count[key] = self.count.get(key, 0) + count
            self.total[key] = self.total.get(key, 0.0) + state["total"][rate]


# How an iteration time in the summary was obtained (the "source" fields).
MEASURED = "measured"
INTERPOLATED = "estimated: interpolated between the measured token counts"
EXTRAPOLATED = "estimated: least-squares line through the measured token counts"
PROPORTIONAL = "estimated: proportional to the kept tokens (no fixed cost assumed: overstates the baseline)"
SAME_FLOPS = "estimated: the measured time of the cost keys with the same FLOPs per iteration"
PROBED = ("estimated: the measured time at the run's rate plus the difference of forward + backward at "
          "rho = 1 and at that rate, timed on one batch after training")


def _line(points) -> Tuple[float, float]:
    """(intercept, slope) of the least-squares line through (k, t) points (at least two distinct k)."""
    ks = np.array([k for k, _ in points], dtype=np.float64)
    ts = np.array([t for _, t in points], dtype=np.float64)
    slope, intercept = np.polyfit(ks, ts, 1)
    return float(intercept), float(slope)


def estimate_time(tokens, measured: Mapping, unit: str = "token counts") -> Tuple[Optional[float], Optional[str]]:
    """(iteration time at `tokens`, its source) from the measured {tokens: mean time}.

    Measured: itself. Inside the measured range: linear interpolation between the two nearest
    counts. Outside: the least-squares line through all of them, never below (above) the time of
    the nearest measured count for more (fewer) tokens. One measured count: proportional to the
    tokens. None measured: (None, None). `unit` names the axis in the sources: the method runs
    interpolate in FLOPs per iteration instead of tokens (estimate_time(flops, {flops: time})).
    """
    def labelled(source):
        return source if unit == "token counts" else source.replace("token counts", unit).replace(
            "the kept tokens", unit)

    if tokens in measured:
        return measured[tokens], MEASURED
    points = sorted(measured.items())
    if not points:
        return None, None
    if len(points) == 1:
        (k0, t0), = points
        return t0 * tokens / k0, labelled(PROPORTIONAL)
    for (lo_k, lo_t), (hi_k, hi_t) in zip(points, points[1:]):
        if lo_k < tokens < hi_k:
            return lo_t + (tokens - lo_k) / (hi_k - lo_k) * (hi_t - lo_t), labelled(INTERPOLATED)
    intercept, slope = _line(points)
    estimate = intercept + slope * tokens
    if tokens > points[-1][0]:
        return max(estimate, points[-1][1]), labelled(EXTRAPOLATED)
    return max(0.0, min(estimate, points[0][1])), labelled(EXTRAPOLATED)


def projected_time_summary(times: KeepRateTimes, shares: Mapping[float, float], total_steps: int,
                           baseline_steps: int, probed_baseline_s: Optional[float] = None,
                           key_shares: Optional[Mapping] = None, key_flops: Optional[Mapping] = None) -> dict:
    """Projected wall time of the whole schedule vs full training at rho = 1.

    projected = total_steps * sum_k share(k) * t(k);  baseline = baseline_steps * t(N)
    with share(k) the schedule's share of iterations keeping k tokens (its rates grouped by k) and
    t(k) the measured mean iteration time, or an estimate labelled in the `source` fields where k
    was never timed (see `estimate_time`; `probed_baseline_s`, an iteration time at rho = 1 from
    the trainer's probe, takes precedence for t(N) over a proportional estimate).
    baseline_steps = epochs * steps_per_epoch differs from total_steps for a budget schedule.
    With token pruning or growth the trainer passes `key_shares` {cost key: {"share", "keep_rates"}}
    (train/methods.key_shares: the joint schedule of the input rate, R_T, R_A and the stage) and
    `key_flops` {cost key: FLOPs per iteration}; untimed keys are then estimated from the measured
    ones by their FLOPs. Every figure is None only when no iteration was timed at all.
    """
    groups: Dict[object, dict] = {}
    if key_shares is not None:
        groups = {key: {"share": entry["share"], "keep_rates": list(entry["keep_rates"])}
                  for key, entry in key_shares.items()}
    else:
        for rate, share in shares.items():
            group = groups.setdefault(times.tokens(rate), {"share": 0.0, "keep_rates": []})
            group["share"] += share
            group["keep_rates"].append(rate)
    measured = {k: times.mean(k) for k in times.count if times.mean(k) is not None}
    full = times.num_tokens
    by_flops = key_shares is not None and key_flops is not None and all(
        key_flops.get(k) is not None for k in set(groups) | set(measured))

    def time_of(tokens):
        if tokens in measured:
            return measured[tokens], MEASURED
        if tokens == full and probed_baseline_s is not None and len(measured) < 2:
            return probed_baseline_s, PROBED
        if by_flops:
            by_count: Dict[int, list] = {}
            for key, seconds in measured.items():
                by_count.setdefault(key_flops[key], []).append(seconds)
            seconds, source = estimate_time(key_flops[tokens], {f: float(np.mean(t)) for f, t in by_count.items()},
                                            unit="FLOPs per iteration")
            return seconds, (SAME_FLOPS if source == MEASURED else source)
        if not isinstance(tokens, int) or not all(isinstance(k, int) for k in measured):
            return None, None
        return estimate_time(tokens, measured)

    def order(key):
        return (int(str(key).split(">")[0].split()[0]), str(key))

    per_tokens, projected, estimated_share = {}, 0.0, 0.0
    for tokens in sorted(groups, key=order, reverse=True):
        group = groups[tokens]
        seconds, source = time_of(tokens)
        rates = group["keep_rates"]
        per_tokens[str(tokens)] = {"share": group["share"], "keep_rates": [min(rates), max(rates)],
                                   "num_keep_rates": len(rates), "mean_iter_s": seconds, "source": source,
                                   "timed_iters": times.count.get(tokens, 0)}
        if seconds is None:
            projected = None
        elif projected is not None:
            projected += group["share"] * seconds
        if source != MEASURED:
            estimated_share += group["share"]
    projected = None if projected is None else total_steps * projected
    if by_flops and full not in key_flops:
        baseline_iter, baseline_source = (measured[full], MEASURED) if full in measured else (None, None)
    else:
        baseline_iter, baseline_source = time_of(full)
    baseline = None if baseline_iter is None else baseline_steps * baseline_iter
    saving = None if projected is None or baseline is None else 1.0 - projected / baseline
    return {"total_steps": total_steps, "baseline_steps": baseline_steps, "num_tokens": full,
            "per_tokens": per_tokens, "projected_s": projected, "estimated_share": estimated_share,
            "baseline_s": baseline, "baseline_source": baseline_source, "saving": saving,
            "estimated": estimated_share > 0 or baseline_source != MEASURED}


MAX_SUMMARY_ROWS = 12


def format_summary(summary: Mapping) -> str:
    def hours(seconds):
        return "n/a (nothing timed)" if seconds is None else f"{seconds / 3600:.3f} h ({seconds:.1f} s)"

    rows = summary["per_tokens"]
    lines = [f"time per iteration by kept tokens (of {summary['num_tokens']}; {summary['total_steps']} steps):"]
    if len(rows) <= MAX_SUMMARY_ROWS:
        for tokens, entry in rows.items():
            low, high = entry["keep_rates"]
            rates = f"rho={low:g}" if low == high else f"rho={low:g}..{high:g}"
            mean = "n/a" if entry["mean_iter_s"] is None else f"{1e3 * entry['mean_iter_s']:.2f} ms"
            note = "" if entry["source"] in (MEASURED, None) else f"  ({entry['source']})"
            lines.append(f"  k={tokens:<5} {rates:<16} share={100 * entry['share']:5.1f} %  {mean}{note}")
    else:
        timed = sum(entry["source"] == MEASURED for entry in rows.values())
        lines.append(f"  {len(rows)} token counts, {timed} timed; the rest estimated from them (see summary.json)")
    estimated = summary["estimated_share"]
    lines.append(f"projected: {hours(summary['projected_s'])}"
                 + (f" ({100 * estimated:.0f} % of the steps at estimated times)" if estimated > 0 else ""))
    source = summary["baseline_source"]
    lines.append(f"baseline ({summary['baseline_steps']} steps at rho=1): {hours(summary['baseline_s'])}"
                 + ("" if source in (MEASURED, None) else f" ({source})"))
    if summary["saving"] is not None:
        estimate_note = " (estimated)" if summary["estimated"] else ""
        lines.append(f"saving vs baseline: {100 * summary['saving']:.1f} %{estimate_note}")
    return "\n".join(lines)
