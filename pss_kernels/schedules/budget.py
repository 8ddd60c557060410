"""Budgeted Training for Vision Transformer (Xia et al. 2023): staged keep rates whose stage
lengths fit a compute budget."""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .._checks import check_int
from .base import KeepRateSchedule, _check_rate, _check_real

class StagedSchedule(KeepRateSchedule):
    """Piecewise constant: `stage_steps[k]` iterations at `keep_rates[k]`, in order.
    total_steps is sum(stage_steps) (passing another value is an error)."""

    def __init__(self, keep_rates: Sequence[float], stage_steps: Sequence[int], *,
                 total_steps: Optional[int] = None, steps_per_epoch: int) -> None:
        if len(keep_rates) == 0 or len(keep_rates) != len(stage_steps):
            raise ValueError(f"keep_rates and stage_steps must be non-empty and of equal length, got "
                             f"{list(keep_rates)!r} and {list(stage_steps)!r}")
        self.keep_rates = tuple(_check_rate(f"keep_rates[{k}]", r) for k, r in enumerate(keep_rates))
        for k, n in enumerate(stage_steps):
            check_int(f"stage_steps[{k}]", n, minimum=1)
        self.stage_steps = tuple(stage_steps)
        if total_steps is not None and total_steps != sum(self.stage_steps):
            raise ValueError(f"total_steps={total_steps} differs from sum(stage_steps)={sum(self.stage_steps)}")
        super().__init__(total_steps=sum(self.stage_steps), steps_per_epoch=steps_per_epoch)
        self._stage_ends = np.cumsum(self.stage_steps)

    @property
    def stages(self) -> Tuple[Tuple[float, int], ...]:
        """((keep_rate, steps), ...) in training order."""
        return tuple(zip(self.keep_rates, self.stage_steps))

    def _keep_rates(self, steps: np.ndarray) -> np.ndarray:
        return np.asarray(self.keep_rates)[np.searchsorted(self._stage_ends, steps, side="right")]

    def shares(self) -> Dict[float, float]:
        shares: Dict[float, float] = {}
        for rate, steps in self.stages:
            shares[rate] = shares.get(rate, 0.0) + steps / self.total_steps
        return {rate: shares[rate] for rate in sorted(shares)}

    def mean_keep_rate(self) -> float:
        return math.fsum(rate * steps for rate, steps in self.stages) / self.total_steps

    def _config(self) -> dict:
        return {"keep_rates": list(self.keep_rates), "stage_steps": list(self.stage_steps)}


CostModel = Union[Mapping[float, float], Callable[[float], float]]


def _cost_of(cost: CostModel, rate: float) -> float:
    if callable(cost):
        value = cost(rate)
    else:
        matches = [v for k, v in cost.items() if abs(float(k) - rate) < 1e-9]
        if not matches:
            raise ValueError(f"cost has no entry for keep rate {rate}; keys: {sorted(cost)}")
        value = matches[0]
    return _check_real(f"cost({rate})", value, minimum=0.0, exclusive_minimum=True)


ROUNDINGS = ("nearest", "floor")


def solve_budget(budget: float, cost: CostModel, keep_rates: Sequence[float] = (0.5, 0.75, 1.0),
                 alpha: float = 2.0, *, total_steps: int, steps_per_epoch: int,
                 max_steps: Optional[int] = None, whole_epochs: bool = False,
                 seeds: Optional[Sequence[float]] = None, rounding: str = "nearest") -> StagedSchedule:
    """Budgeted Training's stage lengths for a compute budget, as a StagedSchedule.

    budget:      fraction of full training, in (0, 1]; full training = total_steps at rho = 1.
    cost:        relative cost of one iteration at a keep rate (measured iteration time or
                 FLOPs): a mapping {rho: cost} with every stage rate and 1.0, or a callable. For
                 growth stages (models/growth.py) the mapping is {stage keep rate: stage_flops}.
    keep_rates:  stage keep rates r_1 < ... < r_K (paper: 50 %, 75 %, 100 % of tokens).
    alpha:       growth of the stage lengths (paper: 2.0; 0 gives equal stages).
    seeds:       the s_k of the exponent, default the keep rates (s_k = r_k). The paper draws them:
                 "K random seeds are first sampled from a uniform distribution in (0, 1)"
                 (`sample_seeds`); `implied_seeds` recovers the seeds of a published schedule.
    rounding:    "nearest" (default: the spent compute within half a step per stage of the budget)
                 or "floor" (never over budget: the paper's constraint sum_k C_k T_k <= B).

    Stage k runs ``T_k = c * exp(alpha * s_k)`` steps with
    ``c = budget * total_steps * cost(1) / sum_k exp(alpha * s_k) * cost(r_k)``, rounded to
    whole steps (whole epochs with `whole_epochs`). The result runs sum_k T_k steps, which is not
    total_steps in general; train for `schedule.total_steps`. `max_steps` caps that length
    (the paper's "restricted epochs" setting).

    Raises ValueError when the budget is infeasible: a stage would round to no step (epoch),
    or the stages need more than max_steps.
    """
    budget = _check_real("budget", budget, minimum=0.0, maximum=1.0, exclusive_minimum=True)
    alpha = _check_real("alpha", alpha)
    check_int("total_steps", total_steps, minimum=1)
    check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    rates = [_check_rate(f"keep_rates[{k}]", r) for k, r in enumerate(keep_rates)]
    if not rates or any(a >= b for a, b in zip(rates, rates[1:])):
        raise ValueError(f"keep_rates must be non-empty and strictly ascending, got {list(keep_rates)!r}")
    if max_steps is not None:
        check_int("max_steps", max_steps, minimum=1)
    if seeds is None:
        seeds = rates
    elif len(seeds) != len(rates):
        raise ValueError(f"seeds must give one s_k per stage ({len(rates)}), got {list(seeds)!r}")
    seeds = [_check_real(f"seeds[{k}]", s) for k, s in enumerate(seeds)]
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")

    weights = np.exp(alpha * np.asarray(seeds))
    stage_costs = np.array([_cost_of(cost, r) for r in rates])
    scale = budget * total_steps * _cost_of(cost, 1.0) / float(np.sum(weights * stage_costs))
    lengths = scale * weights
    unit, unit_name = (steps_per_epoch, "epoch") if whole_epochs else (1, "step")
    to_units = (lambda x: math.floor(x + 1e-9)) if rounding == "floor" else round
    stage_steps = [int(to_units(length / unit)) * unit for length in lengths]
    for rate, length, steps in zip(rates, lengths, stage_steps):
        if steps == 0:
            raise ValueError(f"budget={budget} is infeasible: the stage at keep rate {rate} would run "
                             f"{length:.2f} steps, less than one {unit_name}; raise the budget or "
                             f"total_steps, lower alpha, or use fewer stages")
    if max_steps is not None and sum(stage_steps) > max_steps:
        raise ValueError(f"budget={budget} is infeasible within max_steps={max_steps}: the stages "
                         f"{stage_steps} need {sum(stage_steps)} steps; lower the budget or raise max_steps")
    return StagedSchedule(rates, stage_steps, steps_per_epoch=steps_per_epoch)


def sample_seeds(num_stages: int, generator: Optional[np.random.Generator] = None) -> Tuple[float, ...]:
    """The paper's s_k: `num_stages` draws from U(0, 1), ascending (so that alpha > 0 gives the later
    stages the longer runs, as its Sec. 4.3 and Table 4 read). `generator`: a numpy Generator
    (None: a fresh unseeded one)."""
    check_int("num_stages", num_stages, minimum=1)
    generator = np.random.default_rng() if generator is None else generator
    return tuple(float(s) for s in np.sort(generator.uniform(0.0, 1.0, num_stages)))


def implied_seeds(stage_lengths: Sequence[float], alpha: float) -> Tuple[float, ...]:
    """The seeds s_k (with s_1 = 0; a common shift only rescales c, which the budget fixes) for which
    T_k = c * exp(alpha * s_k) has the ratios of `stage_lengths`: s_k = ln(T_k / T_1) / alpha.
    With these, solve_budget reproduces a published schedule (e.g. the paper's Table 1)."""
    alpha = _check_real("alpha", alpha)
    if alpha == 0.0:
        raise ValueError("alpha must be non-zero: at alpha = 0 every seed gives equal stages")
    lengths = [_check_real(f"stage_lengths[{k}]", t, minimum=0.0, exclusive_minimum=True)
               for k, t in enumerate(stage_lengths)]
    return tuple(math.log(t / lengths[0]) / alpha for t in lengths)
