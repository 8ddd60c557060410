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
probability p_full, else draws rho uniformly from [low, high] (paper: [0.5, 1], continuous), or
from the grid low, low + grid_step, ..., high (grid_step=0.5: the paper's {0.5, 1} variant).

Modules: pss.py (PSS), patchdropout.py, warmup_cosine.py (WarmupCosine), budget.py (StagedSchedule,
solve_budget), spec.py (build_schedule), base.py (KeepRateSchedule and shared checks).

WarmupCosine (EViT, Liang et al. 2022; Tri-Level E-ViT, Kong et al. 2023): rho = 1 for the
hold steps H, then ``rho = target + (1 - target) * (1 + cos(pi * (step - H) / D)) / 2`` over the decay steps D,
then target. EViT holds 10 and decays over 100 of 300 epochs; without hold/decay epochs
given those fractions of total_steps are used.

StagedSchedule / solve_budget (Budgeted Training for Vision Transformer, Xia et al. 2023):
K stages at keep rates s_1 < ... < s_K with lengths ``T_k = c * exp(alpha * s_k)``, c chosen so that
``sum_k T_k * cost(s_k) = budget * total_steps * cost(1)``; `sample_seeds` draws the paper's s_k,
`implied_seeds` recovers those of a published schedule.

In pss-train (train/methods/token_pruning.py): `--token-pruning` / `--attention-keep` warm R_T and R_A up with
WarmupCosine (quantum 0.05, the selectors' grid); `--budget` runs a StagedSchedule from
solve_budget over the growth stages (costs: count_flops of the model at each stage), whose keep
rates are the stages' centre-cropped tokens.
"""
from .base import KeepRateSchedule
from .budget import StagedSchedule, implied_seeds, sample_seeds, solve_budget
from .patchdropout import PatchDropout
from .pss import Cosine, Cyclic, Fixed, Linear
from .spec import build_schedule
from .warmup_cosine import WarmupCosine

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
    "sample_seeds",
    "implied_seeds",
    "build_schedule",
]
