"""The schedule base class and the argument checks and quantisation the schedules share."""
from __future__ import annotations

import json
import math
from typing import Dict, Mapping, Optional

import numpy as np

from .._checks import check_int

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

    def keep_rates_at(self, steps) -> np.ndarray:
        """rho at each of `steps` (an int array, vectorised); steps at or past total_steps hold the last
        step's rate."""
        steps = np.asarray(steps, dtype=np.int64)
        if steps.size and steps.min() < 0:
            raise ValueError(f"steps must be >= 0, got {int(steps.min())}")
        return self._keep_rates(np.minimum(steps, self.total_steps - 1))

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
