"""The one run-time projection: a schedule's shares of iterations times the measured iteration time.

A run spends a share s(k) of its T iterations at each cost k (kept tokens, a keep rate, or a
method's cost key), so with t(k) the measured mean time of one iteration at k

    projected run time = T * sum_k s(k) * t(k),      baseline = T_baseline * t(full)

(data loading is in the trainer's times, not in the benchmark's; evaluation and communication
between GPUs in neither). Where k was not measured, t(k) is interpolated linearly between the two
nearest measured points (`interpolate`, shared by both users) and labelled as an estimate.

- The trainer (`KeepRateTimes`, `projected_time_summary`): its own measured times per kept-token
  count or cost key, with a least-squares line outside the measured range (labelled) and FLOP-based
  estimates for method keys.
- benchmarks/iter_time.py (`project_run`): times per keep rate rho from its timing grid, with no
  projection outside the measured range.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..ops.sample_patches import num_kept_tokens


def interpolate(x: float, points: Sequence[Tuple[float, float]]) -> Optional[float]:
    """Linear interpolation of sorted (x, t) `points` at x strictly between two of them; None outside."""
    for (lo_x, lo_t), (hi_x, hi_t) in zip(points, points[1:]):
        if lo_x < x < hi_x:
            return lo_t + (x - lo_x) / (hi_x - lo_x) * (hi_t - lo_t)
    return None


# ---- the trainer's measured times ----------------------------------------------------------------
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
        a train/methods/cost.CostKey (the tokens after the input sampler and each selector, ...)."""
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
        # Method keys (CostKey) as their strings: a checkpoint holds plain types (weights_only loads).
        def plain(table):
            return {key if isinstance(key, int) else str(key): value for key, value in table.items()}
        return {"by": "tokens", "num_tokens": self.num_tokens, "count": plain(self.count), "total": plain(self.total)}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("by") == "tokens":
            from .methods.cost import key_from_state
            self.count = {key_from_state(key): value for key, value in state["count"].items()}
            self.total = {key_from_state(key): value for key, value in state["total"].items()}
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
    between = interpolate(tokens, points)
    if between is not None:
        return between, labelled(INTERPOLATED)
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
    (train/methods/cost.key_shares: the joint schedule of the input rate, R_T, R_A and the stage) and
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


# ---- the main job's projection per keep rate (benchmarks/iter_time.py) ---------------------------
# Keep rates are compared after rounding: 0.6000000000000001 from a schedule is 0.6 measured.
_KEY_DIGITS = 6

IMAGENET_1K_TRAIN_IMAGES = 1_281_167


def steps_per_epoch(dataset_images: int, batch_size: int) -> int:
    """Iterations per epoch on one GPU at `batch_size` images per iteration (the last, partial batch counts)."""
    if dataset_images < 1 or batch_size < 1:
        raise ValueError(f"need dataset_images >= 1 and batch_size >= 1, got {dataset_images}, {batch_size}")
    return math.ceil(dataset_images / batch_size)


def time_at(keep_rate: float, times: Mapping[float, float]) -> Tuple[float, bool]:
    """(iteration time at `keep_rate`, whether it was interpolated) from measured `times` {rho: time}."""
    measured = sorted((round(rho, _KEY_DIGITS), t) for rho, t in times.items())
    rho = round(keep_rate, _KEY_DIGITS)
    for measured_rho, t in measured:
        if measured_rho == rho:
            return t, False
    between = interpolate(rho, measured)
    if between is not None:
        return between, True
    raise ValueError(f"keep rate {keep_rate} is outside the measured keep rates {[r for r, _ in measured]}")


def mean_iteration_time(shares: Mapping[float, float], times: Mapping[float, float]) -> Tuple[float, List[float]]:
    """(sum_rho shares[rho] * t(rho), the keep rates whose time was interpolated).

    >>> mean_iteration_time({0.2: 0.5, 1.0: 0.5}, {0.2: 1.0, 1.0: 3.0})
    (2.0, [])
    """
    total_share = sum(shares.values())
    if not math.isclose(total_share, 1.0, rel_tol=1e-6):
        raise ValueError(f"shares must sum to 1, got {total_share} from {dict(shares)}")
    mean, interpolated = 0.0, []
    for rho, share in sorted(shares.items()):
        if share == 0:
            continue
        t, was_interpolated = time_at(rho, times)
        mean += share * t
        if was_interpolated:
            interpolated.append(rho)
    return mean, interpolated


def project_run(shares: Mapping[float, float], times_ms: Mapping[float, float], baseline_ms: float | None, *,
                steps_per_epoch: int, total_steps: int, baseline_steps: int | None = None) -> Dict[str, object]:
    """Projected average epoch and whole-run time (hours) of one implementation under one schedule
    of `total_steps` iterations, and its ratio to the baseline run of `baseline_steps` iterations
    (default: the same number; a budgeted schedule runs fewer) at `baseline_ms` each (None without one)."""
    mean_ms, interpolated = mean_iteration_time(shares, times_ms)
    hours_per_ms = 1.0 / 3.6e6
    baseline_steps = total_steps if baseline_steps is None else baseline_steps
    return {
        "mean_iteration_ms": mean_ms,
        "epoch_hours": steps_per_epoch * mean_ms * hours_per_ms,
        "run_hours": total_steps * mean_ms * hours_per_ms,
        "ratio_vs_baseline": total_steps * mean_ms / (baseline_steps * baseline_ms) if baseline_ms else None,
        "interpolated_keep_rates": interpolated,
    }
