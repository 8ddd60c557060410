"""Keep-rate schedules: the patch keep rate rho that each training iteration uses.

A schedule maps a step (0-based iteration index) to rho in (0, 1]. It is stepped once per
iteration like an LR scheduler::

    schedule = build_schedule("cyclic:0.2,1.0", total_steps=epochs * len(loader),
                              steps_per_epoch=len(loader))
    for images, labels in loader:
        loss = criterion(model(images, keep_rate=schedule.keep_rate), labels)
        ...
        schedule.step()

`keep_rate_at(step)` is a pure function of the step (PatchDropout's random draw is seeded
by (seed, step)), so a resumed run and every DDP rank get the same rho without talking to
each other; `state_dict()` holds the step and the constructor config, and
`load_state_dict` refuses the state of a different schedule. Steps at or past
`total_steps` hold the rate of the last step.

Schedules
---------
PSS (McDanel & Huynh 2022), each with a shape ``pos(step) in [0, 1]`` mapped linearly from
the first rate a to the second rate b::

    Fixed(rho)          pos = 0
    Linear(start, end)  pos = step / S                        (S = steps before cool-down)
    Cyclic(low, high)   pos = 1 - |2u - 1|, u = (step mod steps_per_epoch) / steps_per_epoch
                        (one triangle low -> high -> low per epoch)
    Cosine(low, high)   pos = (1 - cos(pi * step / S)) / 2

Quantisation (default quantum q = 0.2, so rho in {0.2, 0.4, 0.6, 0.8, 1.0}) follows the
published code: the higher end is pushed half a quantum past its value (their drop ratio
runs 0.8 -> -0.1, i.e. keep 0.2 -> 1.1), the raw rate is rounded to the nearest multiple of
q (ties up) and clamped to the quantised [min(a, b), max(a, b)]. Every level then gets one
quantum of the raw range except the low end, which gets half, hence the paper's shares for
Cyclic(0.2, 1.0): 2/9 = 22 % of iterations at each of 0.4 ... 1.0 and 1/9 = 11 % at 0.2.
`cooldown_epochs` appends that many epochs at rho = 1 (the schedule above runs in the
first S = total_steps - cooldown_epochs * steps_per_epoch steps).

PatchDropout (Liu et al. 2022) as a regulariser: each step keeps everything with
probability p_full, else draws rho uniformly from the grid low, low + grid_step, ..., high
(paper: uniform keep rate in [0.5, 1]).

WarmupCosine (EViT, Liang et al. 2022; Tri-Level E-ViT, Kong et al. 2023): rho = 1 for the
hold steps H, then ``rho = target + (1 - target) * (1 + cos(pi * (step - H) / D)) / 2`` over the decay steps D,
then target. EViT holds 10 and decays over 100 of 300 epochs; without hold/decay epochs
given those fractions of total_steps are used.

StagedSchedule / solve_budget (Budgeted Training for Vision Transformer, Xia et al. 2023):
K stages at keep rates s_1 < ... < s_K with lengths ``T_k = c * exp(alpha * s_k)``, c chosen so that
``sum_k T_k * cost(s_k) = budget * total_steps * cost(1)``.
"""
from __future__ import annotations

import json
import math
import re
from functools import partial
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._checks import check_int

__all__ = [
    "KeepRateSchedule",
    "Fixed",
    "Linear",
    "Cyclic",
    "Cosine",
    "PatchDropout",
    "WarmupCosine",
    "StagedSchedule",
    "solve_budget",
    "build_schedule",
]

# shares() / mean_keep_rate() enumerate the steps in slices of this many (8 MiB of float64).
_STEPS_PER_SLICE = 1 << 20


def _check_real(name: str, value, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
                exclusive_minimum: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive_minimum else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _check_rate(name: str, value) -> float:
    return _check_real(name, value, minimum=0.0, maximum=1.0, exclusive_minimum=True)


def _check_step(name: str, step) -> int:
    if isinstance(step, np.integer):
        step = int(step)
    check_int(name, step, minimum=0)
    return step


def _check_quantum(quantum) -> Optional[float]:
    if quantum is None:
        return None
    quantum = _check_rate("quantum", quantum)
    # Levels are multiples of the quantum; 1.0 (no sampling) must be one of them.
    if abs(1.0 / quantum - round(1.0 / quantum)) > 1e-6:
        raise ValueError(f"quantum must divide 1.0 (e.g. 0.1, 0.2, 0.25), got {quantum}")
    return quantum


def _quantise(rates: np.ndarray, quantum: float) -> np.ndarray:
    """Nearest multiple of `quantum`, ties up, clamped to [quantum, 1]; clean decimals (0.6, not
    0.6000000000000001) so the rates are usable as dict keys."""
    # Rounding the quotient first keeps 0.30000000000000004 / 0.2 a tie rather than 1.5000000000000002.
    levels = np.floor(np.round(np.asarray(rates, dtype=np.float64) / quantum, 9) + 0.5)
    return np.round(np.clip(levels * quantum, quantum, 1.0), 10)


def _jsonable(config: dict) -> dict:
    """The config as it reads back from JSON or a checkpoint (tuples become lists)."""
    return json.loads(json.dumps(config))


class KeepRateSchedule:
    """Base class: rho as a pure function of the step, plus the LR-scheduler style counter.

    Subclasses implement `_keep_rates(steps)` (vectorised over an int64 array of steps in
    [0, total_steps)) and `_config()` (their constructor arguments, JSON-able).
    """

    def __init__(self, *, total_steps: int, steps_per_epoch: int) -> None:
        check_int("total_steps", total_steps, minimum=1)
        check_int("steps_per_epoch", steps_per_epoch, minimum=1)
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.current_step = 0

    def _config(self) -> dict:
        raise NotImplementedError

    def _keep_rates(self, steps: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def config(self) -> dict:
        """Constructor arguments, total_steps and steps_per_epoch included (JSON types)."""
        return _jsonable({**self._config(), "total_steps": self.total_steps,
                          "steps_per_epoch": self.steps_per_epoch})

    def keep_rate_at(self, step: int) -> float:
        """rho at `step` (0-based); steps at or past total_steps hold the last step's rate."""
        step = min(_check_step("step", step), self.total_steps - 1)
        return float(self._keep_rates(np.array([step], dtype=np.int64))[0])

    @property
    def keep_rate(self) -> float:
        """rho for the current step (the iteration about to run)."""
        return self.keep_rate_at(self.current_step)

    def step(self) -> None:
        """Advance to the next iteration; call once after each optimizer step."""
        self.current_step += 1

    def state_dict(self) -> dict:
        return {"schedule": type(self).__name__, "config": self.config(), "step": self.current_step}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore the step; the state must come from the same schedule with the same config."""
        keys = ("schedule", "config", "step")
        if (not isinstance(state_dict, Mapping) or any(k not in state_dict for k in keys)
                or not isinstance(state_dict["config"], Mapping)):
            raise ValueError(f"state_dict must be a mapping with keys {keys} (from state_dict()), "
                             f"got {state_dict!r}")
        saved_name, saved_config = state_dict["schedule"], state_dict["config"]
        if saved_name != type(self).__name__ or _jsonable(dict(saved_config)) != self.config():
            saved = f"{saved_name}({', '.join(f'{k}={v!r}' for k, v in dict(saved_config).items())})"
            raise ValueError(f"state_dict is for {saved} but this schedule is {self!r}; "
                             f"resume with the schedule the state was saved from")
        self.current_step = _check_step("state_dict['step']", state_dict["step"])

    def _slices(self):
        for start in range(0, self.total_steps, _STEPS_PER_SLICE):
            yield np.arange(start, min(start + _STEPS_PER_SLICE, self.total_steps), dtype=np.int64)

    def shares(self) -> Dict[float, float]:
        """{rho: fraction of the total_steps iterations run at rho}, ascending in rho; exact
        (every step is evaluated, ~0.05 s per million steps)."""
        counts: Dict[float, int] = {}
        for steps in self._slices():
            rates, n = np.unique(self._keep_rates(steps), return_counts=True)
            for rate, count in zip(rates.tolist(), n.tolist()):
                counts[rate] = counts.get(rate, 0) + count
        return {rate: counts[rate] / self.total_steps for rate in sorted(counts)}

    def mean_keep_rate(self) -> float:
        """Mean rho over the total_steps iterations."""
        return math.fsum(float(self._keep_rates(s).sum()) for s in self._slices()) / self.total_steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"


class _PatchSamplingSchedule(KeepRateSchedule):
    """Fixed / Linear / Cyclic / Cosine: rho = a + (b - a) * pos(step), quantised (module
    docstring), then `cooldown_epochs` epochs at rho = 1."""

    def __init__(self, a: float, b: float, *, quantum: Optional[float], cooldown_epochs: int,
                 total_steps: int, steps_per_epoch: int) -> None:
        super().__init__(total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        self.quantum = _check_quantum(quantum)
        check_int("cooldown_epochs", cooldown_epochs, minimum=0)
        self.cooldown_epochs = cooldown_epochs
        cooldown_steps = cooldown_epochs * steps_per_epoch
        if cooldown_steps >= total_steps:
            raise ValueError(f"cooldown_epochs={cooldown_epochs} ({cooldown_steps} steps) leaves no step "
                             f"for the schedule in total_steps={total_steps}")
        self.schedule_steps = total_steps - cooldown_steps
        low, high = min(a, b), max(a, b)
        if self.quantum is None:
            self._a, self._b, self._low, self._high = a, b, low, high
        else:
            # The published code pushes the high end half a quantum out so that, after rounding
            # to the nearest level, the top level gets a full quantum of time like the middle ones.
            half = self.quantum / 2
            self._a, self._b = a + (half if a > b else 0.0), b + (half if b > a else 0.0)
            self._low, self._high = (float(v) for v in _quantise(np.array([low, high]), self.quantum))

    def _position(self, steps: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _keep_rates(self, steps: np.ndarray) -> np.ndarray:
        rates = self._a + (self._b - self._a) * self._position(steps)
        if self.quantum is not None:
            rates = _quantise(rates, self.quantum)
        rates = np.clip(rates, self._low, self._high)
        return np.where(steps >= self.schedule_steps, 1.0, rates)

    def _pss_config(self) -> dict:
        return {"quantum": self.quantum, "cooldown_epochs": self.cooldown_epochs}


class Fixed(_PatchSamplingSchedule):
    """The same rho every iteration (rho = 1 is the baseline). Not quantised by default: a
    constant has no irregular sizes to avoid, and Fixed(0.5) should mean 0.5."""

    def __init__(self, rho: float, *, quantum: Optional[float] = None, cooldown_epochs: int = 0,
                 total_steps: int, steps_per_epoch: int) -> None:
        self.rho = _check_rate("rho", rho)
        super().__init__(self.rho, self.rho, quantum=quantum, cooldown_epochs=cooldown_epochs,
                         total_steps=total_steps, steps_per_epoch=steps_per_epoch)

    def _position(self, steps: np.ndarray) -> np.ndarray:
        return np.zeros(steps.shape, dtype=np.float64)

    def _config(self) -> dict:
        return {"rho": self.rho, **self._pss_config()}


class Linear(_PatchSamplingSchedule):
    """rho moves linearly from `start` to `end` over training; with the quantum this is the
    paper's step function (Linear(0.2, 1.0): 1/9 of steps at 0.2, then 2/9 at each level)."""

    def __init__(self, start: float, end: float, *, quantum: Optional[float] = 0.2, cooldown_epochs: int = 0,
                 total_steps: int, steps_per_epoch: int) -> None:
        self.start, self.end = _check_rate("start", start), _check_rate("end", end)
        super().__init__(self.start, self.end, quantum=quantum, cooldown_epochs=cooldown_epochs,
                         total_steps=total_steps, steps_per_epoch=steps_per_epoch)

    def _position(self, steps: np.ndarray) -> np.ndarray:
        return steps / self.schedule_steps

    def _config(self) -> dict:
        return {"start": self.start, "end": self.end, **self._pss_config()}


class _LowToHighSchedule(_PatchSamplingSchedule):
    """Cyclic / Cosine: pos(step) = 0 at `low`, 1 at `high`."""

    def __init__(self, low: float, high: float, *, quantum: Optional[float] = 0.2, cooldown_epochs: int = 0,
                 total_steps: int, steps_per_epoch: int) -> None:
        self.low, self.high = _check_rate("low", low), _check_rate("high", high)
        if self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low}, high={self.high}")
        super().__init__(self.low, self.high, quantum=quantum, cooldown_epochs=cooldown_epochs,
                         total_steps=total_steps, steps_per_epoch=steps_per_epoch)

    def _config(self) -> dict:
        return {"low": self.low, "high": self.high, **self._pss_config()}


class Cyclic(_LowToHighSchedule):
    """One triangle per epoch: rho goes low -> high at mid-epoch -> low (the paper's best PSS).
    Cyclic(low, high, *, quantum=0.2, cooldown_epochs=0, total_steps, steps_per_epoch)."""

    def _position(self, steps: np.ndarray) -> np.ndarray:
        phase = (steps % self.steps_per_epoch) / self.steps_per_epoch
        return 1.0 - np.abs(2.0 * phase - 1.0)


class Cosine(_LowToHighSchedule):
    """rho rises from `low` to `high` along a half cosine over training.
    Cosine(low, high, *, quantum=0.2, cooldown_epochs=0, total_steps, steps_per_epoch)."""

    def _position(self, steps: np.ndarray) -> np.ndarray:
        return (1.0 - np.cos(np.pi * steps / self.schedule_steps)) / 2.0


class PatchDropout(KeepRateSchedule):
    """Random rho per step: 1 with probability p_full, else uniform over the grid
    low, low + grid_step, ..., high. Defaults are the PatchDropout paper's regulariser (uniform
    keep rate in [0.5, 1]). The draw at a step uses numpy's Generator seeded with (seed, step),
    so it does not depend on which steps were drawn before. shares() is the expected fraction."""

    def __init__(self, low: float = 0.5, high: float = 1.0, p_full: float = 0.0, *, grid_step: float = 0.1,
                 seed: int = 0, total_steps: int, steps_per_epoch: int) -> None:
        super().__init__(total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        self.low, self.high = _check_rate("low", low), _check_rate("high", high)
        if self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low}, high={self.high}")
        self.p_full = _check_real("p_full", p_full, minimum=0.0, maximum=1.0)
        self.grid_step = _check_real("grid_step", grid_step, minimum=0.0, exclusive_minimum=True)
        check_int("seed", seed, minimum=0)
        self.seed = seed
        count = int(math.floor((self.high - self.low) / self.grid_step + 1e-9)) + 1
        self.grid = np.round(self.low + self.grid_step * np.arange(count), 10)

    def _draw(self, step: int) -> float:
        rng = np.random.default_rng([self.seed, step])
        if rng.random() < self.p_full:
            return 1.0
        return float(self.grid[rng.integers(len(self.grid))])

    def _keep_rates(self, steps: np.ndarray) -> np.ndarray:
        return np.array([self._draw(int(s)) for s in steps], dtype=np.float64)

    def shares(self) -> Dict[float, float]:
        shares = {float(rate): (1.0 - self.p_full) / len(self.grid) for rate in self.grid}
        shares[1.0] = shares.get(1.0, 0.0) + self.p_full
        return {rate: shares[rate] for rate in sorted(shares) if shares[rate] > 0.0}

    def mean_keep_rate(self) -> float:
        return math.fsum(rate * share for rate, share in self.shares().items())

    def _config(self) -> dict:
        return {"low": self.low, "high": self.high, "p_full": self.p_full, "grid_step": self.grid_step,
                "seed": self.seed}


class WarmupCosine(KeepRateSchedule):
    """EViT / Tri-Level token keep-rate warm-up: rho = 1 for `hold_epochs`, then a cosine from 1
    down to `target` over `decay_epochs`, then `target`. None = EViT's 10 and 100 of 300 epochs
    as fractions of total_steps. Optional quantisation (nearest multiple, clamped to
    [quantised target, 1])."""

    def __init__(self, target: float, *, hold_epochs: Optional[int] = None, decay_epochs: Optional[int] = None,
                 quantum: Optional[float] = None, total_steps: int, steps_per_epoch: int) -> None:
        super().__init__(total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        self.target = _check_rate("target", target)
        self.quantum = _check_quantum(quantum)
        for name, value in (("hold_epochs", hold_epochs), ("decay_epochs", decay_epochs)):
            if value is not None:
                check_int(name, value, minimum=0 if name == "hold_epochs" else 1)
        self.hold_epochs, self.decay_epochs = hold_epochs, decay_epochs
        self.hold_steps = (round(total_steps * 10 / 300) if hold_epochs is None
                           else hold_epochs * steps_per_epoch)
        self.decay_steps = (max(1, round(total_steps * 100 / 300)) if decay_epochs is None
                            else decay_epochs * steps_per_epoch)
        if self.hold_steps + self.decay_steps > total_steps:
            raise ValueError(f"hold ({self.hold_steps} steps) + decay ({self.decay_steps} steps) exceeds "
                             f"total_steps={total_steps}: the target {self.target} would never be reached")
        self._floor = self.target if self.quantum is None else float(_quantise(self.target, self.quantum))

    def _keep_rates(self, steps: np.ndarray) -> np.ndarray:
        progress = np.clip((steps - self.hold_steps) / self.decay_steps, 0.0, 1.0)
        rates = self.target + (1.0 - self.target) * (1.0 + np.cos(np.pi * progress)) / 2.0
        if self.quantum is not None:
            rates = _quantise(rates, self.quantum)
        return np.clip(rates, self._floor, 1.0)

    def _config(self) -> dict:
        return {"target": self.target, "hold_epochs": self.hold_epochs, "decay_epochs": self.decay_epochs,
                "quantum": self.quantum}


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


def solve_budget(budget: float, cost: CostModel, keep_rates: Sequence[float] = (0.5, 0.75, 1.0),
                 alpha: float = 2.0, *, total_steps: int, steps_per_epoch: int,
                 max_steps: Optional[int] = None, whole_epochs: bool = False) -> StagedSchedule:
    """Budgeted Training's stage lengths for a compute budget, as a StagedSchedule.

    budget:      fraction of full training, in (0, 1]; full training = total_steps at rho = 1.
    cost:        relative cost of one iteration at a keep rate (measured iteration time or
                 FLOPs): a mapping {rho: cost} with every stage rate and 1.0, or a callable.
    keep_rates:  stage keep rates s_1 < ... < s_K (paper: 50 %, 75 %, 100 % of tokens).
    alpha:       growth of the stage lengths (paper: 2.0; 0 gives equal stages).

    Stage k runs ``T_k = c * exp(alpha * s_k)`` steps with
    ``c = budget * total_steps * cost(1) / sum_k exp(alpha * s_k) * cost(s_k)``, rounded to
    whole steps (whole epochs with `whole_epochs`), so the spent compute matches the budget
    within half a step (epoch) per stage. The result runs sum_k T_k steps, which is not
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

    weights = np.exp(alpha * np.asarray(rates))
    stage_costs = np.array([_cost_of(cost, r) for r in rates])
    scale = budget * total_steps * _cost_of(cost, 1.0) / float(np.sum(weights * stage_costs))
    lengths = scale * weights
    unit, unit_name = (steps_per_epoch, "epoch") if whole_epochs else (1, "step")
    stage_steps = [int(round(length / unit)) * unit for length in lengths]
    for rate, length, steps in zip(rates, lengths, stage_steps):
        if steps == 0:
            raise ValueError(f"budget={budget} is infeasible: the stage at keep rate {rate} would run "
                             f"{length:.2f} steps, less than one {unit_name}; raise the budget or "
                             f"total_steps, lower alpha, or use fewer stages")
    if max_steps is not None and sum(stage_steps) > max_steps:
        raise ValueError(f"budget={budget} is infeasible within max_steps={max_steps}: the stages "
                         f"{stage_steps} need {sum(stage_steps)} steps; lower the budget or raise max_steps")
    return StagedSchedule(rates, stage_steps, steps_per_epoch=steps_per_epoch)


def _token_linear_cost(rate: float) -> float:
    """Iteration cost proportional to the kept tokens (the linear layers' FLOPs)."""
    return rate


# name -> (factory, positional argument names, how many are required, key=value options, usage)
_PSS_OPTIONS = ("quantum", "cooldown_epochs")
_SPECS = {
    "none": (partial(Fixed, 1.0), (), 0, (), "none | baseline"),
    "baseline": (partial(Fixed, 1.0), (), 0, (), None),
    "fixed": (Fixed, ("rho",), 1, _PSS_OPTIONS, "fixed:RHO"),
    "linear": (Linear, ("start", "end"), 2, _PSS_OPTIONS, "linear:START,END"),
    "cyclic": (Cyclic, ("low", "high"), 2, _PSS_OPTIONS, "cyclic:LOW,HIGH"),
    "cosine": (Cosine, ("low", "high"), 2, _PSS_OPTIONS, "cosine:LOW,HIGH"),
    "patchdropout": (PatchDropout, ("low", "high", "p_full"), 0, ("grid_step", "seed"),
                     "patchdropout[:LOW,HIGH[,P_FULL]]"),
    "warmup_cosine": (WarmupCosine, ("target",), 1, ("hold_epochs", "decay_epochs", "quantum"),
                      "warmup_cosine:TARGET"),
    "budget": (partial(solve_budget, cost=_token_linear_cost), ("budget",), 1,
               ("alpha", "keep_rates", "max_steps", "whole_epochs"), "budget:FRACTION"),
}


def _spec_usage() -> str:
    return "\n".join((f"  {usage:34s}" + (f"options: {', '.join(options)}" if options else "")).rstrip()
                     for _, _, _, options, usage in _SPECS.values() if usage)


def _parse_value(text: str):
    lowered = text.lower()
    if lowered == "none":
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if "/" in text:
        return tuple(_parse_value(part) for part in text.split("/"))
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    return float(text)


def build_schedule(spec: str, *, total_steps: int, steps_per_epoch: int) -> KeepRateSchedule:
    """A schedule from a command-line spec ``NAME[:ARG,ARG,...,KEY=VALUE,...]``.

    Specs (positional arguments in order, then any listed option as key=value)::

        none | baseline                   Fixed(1.0): every token, every step
        fixed:RHO                         Fixed(RHO)                      options quantum, cooldown_epochs
        linear:START,END                  Linear(START, END), quantum 0.2 options quantum, cooldown_epochs
        cyclic:LOW,HIGH                   Cyclic(LOW, HIGH), quantum 0.2  options quantum, cooldown_epochs
        cosine:LOW,HIGH                   Cosine(LOW, HIGH), quantum 0.2  options quantum, cooldown_epochs
        patchdropout[:LOW,HIGH[,P_FULL]]  PatchDropout (0.5, 1.0, 0.0)    options grid_step, seed
        warmup_cosine:TARGET              WarmupCosine(TARGET)            options hold_epochs, decay_epochs, quantum
        budget:FRACTION                   solve_budget(FRACTION) with cost proportional to rho,
                                          stages 0.5/0.75/1.0, alpha 2.0  options alpha, keep_rates, max_steps,
                                                                          whole_epochs
                                          (runs schedule.total_steps steps, not total_steps)

    Values: numbers, ``none``, ``true``/``false``, and lists as ``a/b/c``. Examples:
    ``cyclic:0.2,1.0,cooldown_epochs=5``, ``linear:0.2,1.0,quantum=none``,
    ``patchdropout:0.5,1.0,0.25,seed=3``, ``budget:0.5,alpha=1,keep_rates=0.4/0.7/1.0``.
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str, got {spec!r}")
    name, _, arg_text = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in _SPECS:
        raise ValueError(f"unknown schedule spec {spec!r}; valid specs:\n{_spec_usage()}")
    factory, positional, required, options, _ = _SPECS[name]
    kwargs = {}
    try:
        parts = [part.strip() for part in arg_text.split(",")] if arg_text.strip() else []
        for index, part in enumerate(parts):
            key, has_key, value = part.partition("=")
            if not has_key:
                # Positionals come first, so the index names the argument.
                if any("=" in earlier for earlier in parts[:index]) or index >= len(positional):
                    raise ValueError(f"unexpected positional argument {part!r}")
                kwargs[positional[index]] = _parse_value(part)
            elif key.strip() in positional + options:
                if key.strip() in kwargs:
                    raise ValueError(f"{key.strip()} given twice")
                kwargs[key.strip()] = _parse_value(value.strip())
            else:
                raise ValueError(f"unknown option {key.strip()!r}")
        missing = [p for p in positional[:required] if p not in kwargs]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
    except ValueError as error:
        raise ValueError(f"bad schedule spec {spec!r}: {error}; valid specs:\n{_spec_usage()}") from None
    return factory(**kwargs, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
