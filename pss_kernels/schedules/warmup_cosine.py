"""The token keep-rate warm-up of EViT (Liang et al. 2022) and Tri-Level E-ViT (Kong et al. 2023)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .._checks import check_int
from .base import KeepRateSchedule, _check_quantum, _check_rate, _quantise

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
