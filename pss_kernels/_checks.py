"""Argument checks shared by every op and backend: one place, one wording.

Each check raises TypeError (wrong kind of thing) or ValueError (right kind, wrong value)
and names the argument and the offending value, so a bad call says what to fix.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, ndim: Optional[int] = None,
                 dtypes: Optional[Iterable[torch.dtype]] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise TypeError(f"{name} must have dtype in {tuple(dtypes)}, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")


def check_int(name: str, value, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_grid_size(grid_size) -> tuple:
    """(Gh, Gw) of a patch grid: a pair of positive ints (tuple or list)."""
    if (not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2
            or any(isinstance(g, bool) or not isinstance(g, int) for g in grid_size)):
        raise TypeError(f"grid_size must be a pair of ints (Gh, Gw), got {grid_size!r}")
    if min(grid_size) < 1:
        raise ValueError(f"grid_size must be positive, got {tuple(grid_size)}")
    return tuple(grid_size)


def check_rate(name: str, value) -> float:
    """`value` as a float in (0, 1]; the errors name the argument `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {value!r}")
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def check_keep_rate(keep_rate) -> float:
    return check_rate("keep_rate", keep_rate)
