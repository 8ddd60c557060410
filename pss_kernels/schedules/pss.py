"""The Patch Sampling Schedules of PSS (McDanel & Huynh 2022): Fixed, Linear, Cyclic, Cosine,
with the published code's quantisation (pss_kernels.schedules' docstring gives the rules)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .._checks import check_int
from .base import KeepRateSchedule, _check_quantum, _check_rate, _quantise

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
