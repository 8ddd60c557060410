"""Budgeted Training for Vision Transformer (Xia et al. 2023): the training side.

The model mechanics (active heads, MLP units and centre-cropped tokens; growing with copied
weights; the FLOP counts per stage) are in `models/growth.py`. Here: the stages of `--growth`, the
stage lengths solved for `--budget F` (a fraction of the full run's FLOPs), and a hook that grows
the model (and its EMA) at the first step of each stage and resets the new parts' optimizer moments.

Stages: `growth_stages` (Table 6's for deit_tiny / small / base at 14 x 14 patches, else the same
rule: heads round(H k / 3), MLP ratio r / 4, r / 2, r, tokens 50 / 75 / 100 % by centre crop;
`--growth` picks which of heads, mlp, tokens grow, or lists the stages). Stage lengths from
solve_budget with per-stage costs from count_flops of the real model (alpha 2, K = 3). The stage
index is in the checkpoint; a resumed run sets the stage's widths (the weights come from the
checkpoint).

Budgeted Training has one spelling on the command line, `--budget F`. The schedules library's
`budget:F` (solve_budget with a cost proportional to rho and no growth) is a keep-rate schedule,
not this method: `--schedule budget:F` is refused with a message that says so.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ...models.growth import (BUDGETED_STAGES, INITS, GrowthStage, grow, reset_optimizer_moments, set_stage,
                              stage_flops, stage_keep_rates)
from ...schedules import StagedSchedule, solve_budget
from ...schedules.budget import sample_seeds
from .base import Method, MethodHook, RunContext, register

GROWTH_DIMS = ("heads", "mlp", "tokens")
BUDGET_ALPHA, BUDGET_STAGES = 2.0, 3
TOKEN_FRACTIONS = (0.5, 0.75, 1.0)  # the paper's Appendix A: "N in 50 %, 75 % and 100 %"


def _model_widths(model) -> Tuple[int, float, int]:
    block = model.blocks[0]
    return block.attn.num_heads, block.mlp.fc1.out_features / model.embed_dim, model.patch_embed.num_patches


def derived_stages(num_heads: int, mlp_ratio: float, num_patches: int) -> Tuple[GrowthStage, ...]:
    """Three stages by the paper's rule: heads round(H k / 3) (at least 1), MLP ratio r/4, r/2, r,
    tokens round(f P) for f = 50 / 75 / 100 %."""
    return tuple(GrowthStage(max(1, round(num_heads * k / 3)), mlp_ratio * k_ratio,
                             max(1, round(num_patches * fraction)))
                 for k, k_ratio, fraction in zip((1, 2, 3), (0.25, 0.5, 1.0), TOKEN_FRACTIONS))


def _parse_stage(text: str, full: Tuple[int, float, int]) -> GrowthStage:
    heads, ratio, tokens = (part.strip() for part in text.split(":"))
    return GrowthStage(int(heads), float(ratio), full[2] if tokens in ("all", "") else int(tokens))


def growth_stages(growth: str, model_name: str, model) -> Tuple[GrowthStage, ...]:
    """The stages of --growth: `heads,mlp,tokens` (any of them: those dimensions grow, the others are
    full from the start) on the model's preset (BUDGETED_STAGES, the paper's Table 6, when the model
    has its widths and 14 x 14 patches) or `derived_stages`; or explicit stages
    `H:R:N/H:R:N/...` (heads, MLP ratio, patch tokens or `all`). The last stage must be the full
    model."""
    full = _model_widths(model)
    text = growth.strip().lower()
    if ":" in text:
        try:
            stages = tuple(_parse_stage(part, full) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--growth stages must be HEADS:MLP_RATIO:TOKENS/... (e.g. 2:1:100/4:2:144/6:4:196), "
                             f"got {growth!r}") from None
    else:
        dims = [part.strip() for part in text.split(",") if part.strip()]
        unknown = sorted(set(dims) - set(GROWTH_DIMS))
        if not dims or unknown:
            raise ValueError(f"--growth must name some of {', '.join(GROWTH_DIMS)} (comma-separated) or list the "
                             f"stages as H:R:N/H:R:N/..., got {growth!r}")
        preset = BUDGETED_STAGES.get(model_name)
        if preset is None or (preset[-1].num_heads, preset[-1].mlp_ratio, preset[-1].num_patches) != full:
            preset = derived_stages(*full)
        stages = tuple(GrowthStage(s.num_heads if "heads" in dims else full[0],
                                   s.mlp_ratio if "mlp" in dims else full[1],
                                   s.num_patches if "tokens" in dims else None) for s in preset)
    last = stages[-1]
    if (last.num_heads, last.mlp_ratio, last.num_patches or full[2]) != full:
        raise ValueError(f"--growth: the last stage must be the full model ({full[0]}:{full[1]:g}:{full[2]}), "
                         f"got {last.num_heads}:{last.mlp_ratio:g}:{last.num_patches}")
    return stages


def budget_seeds(text: str, stages: Sequence[GrowthStage], keep_rates: Sequence[float], seed: int):
    """The s_k of T_k = c exp(alpha s_k): `rates` (default: the stage keep rates where tokens grow,
    else 50 / 75 / 100 %, evenly between 1/2 and 1 for another K), `sample` (the paper's sorted U(0, 1)
    draws, from --seed) or explicit S1,S2,...."""
    text = text.strip().lower()
    if text == "rates":
        if len(set(keep_rates)) == len(keep_rates):
            return tuple(keep_rates)
        return tuple(np.linspace(0.5, 1.0, len(stages)).tolist())
    if text == "sample":
        return sample_seeds(len(stages), np.random.default_rng(seed))
    try:
        seeds = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--budget-seeds must be rates, sample or S1,S2,..., got {text!r}") from None
    if len(seeds) != len(stages):
        raise ValueError(f"--budget-seeds gives {len(seeds)} seeds for {len(stages)} stages")
    return seeds


def solve_growth_budget(config, model, stages: Sequence[GrowthStage], *, total_steps: int,
                        steps_per_epoch: int) -> Tuple[StagedSchedule, Tuple[int, ...]]:
    """(the input keep-rate schedule with the stage lengths, FLOPs per image per stage): solve_budget
    over the stages with per-stage costs from count_flops of the real model (forward, as the paper's
    GFLOPs), alpha = 2. Stages are labelled k / K for the solver (their keep rates may repeat when
    tokens do not grow); cost(1.0) is the full model's."""
    flops = stage_flops(model, stages)
    rates = stage_keep_rates(model, stages)
    labels = tuple((k + 1) / len(stages) for k in range(len(stages)))
    seeds = budget_seeds(config.budget_seeds, stages, rates, config.seed)
    solved = solve_budget(config.budget, dict(zip(labels, flops)), labels, BUDGET_ALPHA, total_steps=total_steps,
                          steps_per_epoch=steps_per_epoch, seeds=seeds)
    return StagedSchedule(rates, solved.stage_steps, steps_per_epoch=steps_per_epoch), flops


def _stage_list(stages: Sequence[GrowthStage]) -> List[list]:
    return [[s.num_heads, s.mlp_ratio, s.num_patches] for s in stages]


class GrowthHook(MethodHook):
    """Sets the input keep-rate schedule (the stage lengths), grows the model (and its EMA) at the
    first step of each stage and resets the new parts' optimizer moments."""

    name = "growth"
    summary_key = "growth"

    def __init__(self, model, config):
        if config.growth_init not in INITS:
            raise ValueError(f"--growth-init must be one of {INITS}, got {config.growth_init!r}")
        self.model, self.config = model, config
        self.init, self.seed = config.growth_init, config.seed
        self.stages = growth_stages(config.growth, config.model, model)
        self.stage_flops: Tuple[int, ...] = ()
        self.optimizer = self.ema = None
        self.ends = np.zeros(0, dtype=np.int64)
        self.stage = 0
        self.moments_reset: List[int] = []  # optimizer state tensors touched at each growth (logged)

    def keep_rate_schedule(self, run: RunContext):
        if run.config.schedule not in ("none", "baseline"):
            raise ValueError(f"--budget sets the input keep rate of each growth stage; it does not combine "
                             f"with --schedule {run.config.schedule} (use --schedule none, or leave it out)")
        schedule, self.stage_flops = solve_growth_budget(
            run.config, self.model, self.stages, total_steps=run.config.epochs * run.steps_per_epoch,
            steps_per_epoch=run.steps_per_epoch)
        self.ends = np.cumsum(schedule.stage_steps)
        return schedule

    def attach(self, run: RunContext) -> None:
        self.optimizer, self.ema = run.optimizer, run.ema
        self._set(self.stages[0])

    @property
    def last_stage(self) -> int:
        return len(self.stages) - 1

    def _models(self):
        return [m for m in (self.model, None if self.ema is None else self.ema.module) if m is not None]

    def _set(self, stage: GrowthStage) -> None:
        # Widths and the centre scorer: the stage's tokens are the schedule's input keep rate, which
        # the trainer passes to each forward.
        for model in self._models():
            set_stage(model, stage)

    def stage_at(self, step: int) -> int:
        return int(min(self.last_stage, np.searchsorted(self.ends, step, side="right")))

    def before_step(self, step: int) -> None:
        target = self.stage_at(step)
        while self.stage < target:
            self.stage += 1
            stage = self.stages[self.stage]
            # init="random" draws from a generator of (seed, stage): the same parts after a resume.
            slices = grow(self.model, stage, init=self.init,
                          generator=torch.Generator().manual_seed(self.seed * 1000 + self.stage))
            self.moments_reset.append(reset_optimizer_moments(self.optimizer, slices))
            if self.ema is not None:
                grow(self.ema.module, stage, init=self.init,
                     generator=torch.Generator().manual_seed(self.seed * 1000 + self.stage))

    def values(self, steps: np.ndarray) -> Dict[str, np.ndarray]:
        return {"stage": np.minimum(self.last_stage, np.searchsorted(self.ends, steps, side="right"))}

    def current_values(self) -> Dict[str, float]:
        return {"stage": self.stage}

    def apply_values(self, model, values: Dict[str, float]) -> None:
        if values.get("stage") is not None:
            set_stage(model, self.stages[int(values["stage"])])

    def full_values(self) -> Dict[str, float]:
        return {"stage": self.last_stage}

    def cost_fields(self, tokens: int, values: Dict[str, float]) -> dict:
        stage = values.get("stage")
        return {"stage": int(stage)} if stage is not None and int(stage) < self.last_stage else {}

    def record(self, tokens: int) -> dict:
        return {"stage": self.stage}

    def state_dict(self) -> dict:
        return {"stage": self.stage, "stages": _stage_list(self.stages), "init": self.init}

    def load_state_dict(self, state: dict) -> None:
        stages = _stage_list(self.stages)
        if [list(s) for s in state["stages"]] != stages:
            raise ValueError(f"growth stages differ: checkpoint {state['stages']}, now {stages}")
        self.stage = int(state["stage"])
        self._set(self.stages[self.stage])

    def summary(self) -> dict:
        return {"stage": self.stage, "init": self.init, "stages": _stage_list(self.stages),
                "stage_steps": [int(s) for s in np.diff(np.concatenate([[0], self.ends]))],
                "stage_flops_per_image": list(self.stage_flops), "moments_reset": list(self.moments_reset),
                "budget": self.config.budget}


def _apply_state(model, state: dict) -> None:
    heads, ratio, tokens = state["stages"][state["stage"]]
    set_stage(model, GrowthStage(int(heads), float(ratio), None if tokens is None else int(tokens)))


def check_budget_flags(config) -> None:
    """--schedule budget:F is the schedules library's rho-proportional budget, not Budgeted Training;
    and the growth stages (fewer heads, a narrower MLP) run on dense tokens only."""
    if str(config.schedule).strip().lower().startswith("budget"):
        raise ValueError(f"--schedule {config.schedule}: Budgeted Training is --budget F (growth stages, costs "
                         f"from the model's FLOPs); the budget:F keep-rate schedule (cost proportional to rho, "
                         f"no growth) is pss_kernels.schedules.build_schedule's, not a pss-train method")
    if config.budget is not None and config.allocation != "fixed":
        raise ValueError(f"--budget {config.budget} with --allocation {config.allocation}: Budgeted Training's "
                         f"growth stages run on dense tokens only (packed tokens run every head); use "
                         f"--allocation fixed, or drop --budget")


register(Method(
    name=GrowthHook.name, summary_key=GrowthHook.summary_key,
    flags="--budget F [--growth heads,mlp,tokens --growth-init copy]",
    description="Budgeted Training (the model grows in stages under a FLOP budget)",
    enabled=lambda config: config.budget is not None,
    build_hook=lambda config, model, dist_info: GrowthHook(model, config),
    apply_state=_apply_state,
    check=check_budget_flags,
))
