"""Training-time projection: measured iteration time per keep rate x a schedule's keep-rate shares.

A schedule spends a fraction s(rho) of its T iterations at keep rate rho (its `shares()`), so
with t(rho) the measured time of one iteration at rho

    mean iteration time  = sum_rho s(rho) * t(rho)
    run time             = T * mean iteration time,   T = epochs * steps_per_epoch
    epoch time (average) = steps_per_epoch * mean iteration time
    ratio vs baseline    = run time / (T_baseline * t_baseline)   (T_baseline = T unless a budget
                                                                  schedule fixes its own length)

(data loading, evaluation and communication between GPUs are not included). A share at a
rho that was not measured is linearly interpolated between the two nearest measured keep
rates and reported as such; outside the measured range there is no projection.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Tuple

IMAGENET_1K_TRAIN_IMAGES = 1_281_167

# Keep rates are compared after rounding: 0.6000000000000001 from a schedule is 0.6 measured.
_KEY_DIGITS = 6


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
    for (lo_rho, lo_t), (hi_rho, hi_t) in zip(measured, measured[1:]):
        if lo_rho < rho < hi_rho:
            weight = (rho - lo_rho) / (hi_rho - lo_rho)
            return lo_t + weight * (hi_t - lo_t), True
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
