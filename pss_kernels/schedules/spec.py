"""`build_schedule`: a schedule from a command-line spec such as ``cyclic:0.2,1.0``."""
from __future__ import annotations

import re
from functools import partial

from .base import KeepRateSchedule
from .budget import solve_budget
from .patchdropout import PatchDropout
from .pss import Cosine, Cyclic, Fixed, Linear
from .warmup_cosine import WarmupCosine

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
        patchdropout[:LOW,HIGH[,P_FULL]]  PatchDropout (0.5, 1.0, 0.0),   options grid_step, seed
                                          continuous; grid_step=0.5: {0.5, 1}
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
