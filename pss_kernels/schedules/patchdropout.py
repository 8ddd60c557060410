"""PatchDropout (Liu et al. 2022) used as a regulariser: a random keep rate every step."""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np

from .._checks import check_int
from .base import KeepRateSchedule, _check_rate, _check_real

# shares() of the continuous draw: the uniform distribution as this many equal bins (their
# midpoints); what a projection from per-rho timings needs, not a statement about the draws.
CONTINUOUS_SHARE_BINS = 50


class PatchDropout(KeepRateSchedule):
    """Random rho per step: 1 with probability p_full, else uniform in [low, high] — continuous, as
    the paper's Table 7 draws it ("at each iteration we uniformly sample a keep rate between 0.5
    and 1"), or uniform over the grid low, low + grid_step, ..., high when `grid_step` is given
    (grid_step=0.5 on [0.5, 1] is Table 7's {0.5, 1} variant). Evaluate at every token (rho = 1).

    The draw at a step uses numpy's Generator seeded with (seed, step), so it does not depend on
    which steps were drawn before (resume and DDP ranks agree). A continuous draw gives nearly
    every step its own kept-token count k = round(rho * N): fine eagerly, but each new k is a new
    shape for torch.compile and for the kernels' autotuning; use a grid there. shares() is the
    expected fraction per rate: exact on a grid, CONTINUOUS_SHARE_BINS equal bins when continuous.
    """

    def __init__(self, low: float = 0.5, high: float = 1.0, p_full: float = 0.0, *,
                 grid_step: Optional[float] = None, seed: int = 0, total_steps: int, steps_per_epoch: int) -> None:
        super().__init__(total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        self.low, self.high = _check_rate("low", low), _check_rate("high", high)
        if self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low}, high={self.high}")
        self.p_full = _check_real("p_full", p_full, minimum=0.0, maximum=1.0)
        self.grid_step = (None if grid_step is None else
                          _check_real("grid_step", grid_step, minimum=0.0, exclusive_minimum=True))
        check_int("seed", seed, minimum=0)
        self.seed = seed
        self.grid = None
        if self.grid_step is not None:
            count = int(math.floor((self.high - self.low) / self.grid_step + 1e-9)) + 1
            self.grid = np.round(self.low + self.grid_step * np.arange(count), 10)

    def _draw(self, step: int) -> float:
        rng = np.random.default_rng([self.seed, step])
        if rng.random() < self.p_full:
            return 1.0
        if self.grid is None:
            return float(self.low + (self.high - self.low) * rng.random())
        return float(self.grid[rng.integers(len(self.grid))])

    def _keep_rates(self, steps: np.ndarray) -> np.ndarray:
        return np.array([self._draw(int(s)) for s in steps], dtype=np.float64)

    def _rates_and_weights(self):
        if self.grid is not None:
            return [float(r) for r in self.grid], [1.0 / len(self.grid)] * len(self.grid)
        if self.low == self.high:
            return [self.low], [1.0]
        width = (self.high - self.low) / CONTINUOUS_SHARE_BINS
        rates = [round(self.low + (i + 0.5) * width, 10) for i in range(CONTINUOUS_SHARE_BINS)]
        return rates, [1.0 / CONTINUOUS_SHARE_BINS] * CONTINUOUS_SHARE_BINS

    def shares(self) -> Dict[float, float]:
        shares: Dict[float, float] = {}
        for rate, weight in zip(*self._rates_and_weights()):
            shares[rate] = shares.get(rate, 0.0) + (1.0 - self.p_full) * weight
        shares[1.0] = shares.get(1.0, 0.0) + self.p_full
        return {rate: shares[rate] for rate in sorted(shares) if shares[rate] > 0.0}

    def mean_keep_rate(self) -> float:
        """Exact: (1 - p_full) * the mean of the draw + p_full."""
        rates, weights = self._rates_and_weights()
        drawn = (self.low + self.high) / 2 if self.grid is None else math.fsum(r * w for r, w in zip(rates, weights))
        return (1.0 - self.p_full) * drawn + self.p_full

    def _config(self) -> dict:
        return {"low": self.low, "high": self.high, "p_full": self.p_full, "grid_step": self.grid_step,
                "seed": self.seed}
