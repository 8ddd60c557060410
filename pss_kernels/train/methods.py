"""The trainer's method hooks: Tri-Level E-ViT's token / attention levels (a warm-up of R_T and R_A),
Budgeted Training's growth stages, and the per-step cost key the timing and FLOP counts use.

A method is a configuration of the same model and trainer (DESIGN §8). The trainer keeps a list of
hooks and calls, for each one,

    hook.before_step(step)            before the forward of iteration `step` (set rates, grow)
    hook.end_epoch(epochs_done)       after the last step of an epoch (filtering)
    hook.state_dict() / load_state_dict(state)   in the checkpoint, under "methods"[hook.name]
    hook.apply_state(model)           what evaluation needs on a freshly built model

With no method flag the list is empty: nothing runs, nothing is stored. Every hook's effect is a
pure function of the step (R_T, R_A, the stage) or is stored (the filter's counts and subset), so
`--resume` continues bit for bit.

Token pruning (`--token-pruning`, `--attention-keep`): the model gets a TokenPruning plan at the
blocks given (default: the paper's 4, 7, 10 of 12, scaled to the depth as floor(k D / 4) + 1,
k = 1, 2, 3), placement after_attention (the released code's), and R_T, R_A warm up from 1.0 to
their targets by WarmupCosine (hold 10 / 300 of the run, cosine over 100 / 300: EViT's and the
released code's; `--pruning-warmup HOLD,DECAY` in epochs), quantised to the selector's 0.05 grid
so that the logged rates are those the selectors use. They stay at the step's value between
steps: evaluation runs the pruned model, as the paper reports it.

Growth (`--budget F`): stages from `growth_stages` (Table 6's for deit_tiny / small / base at
14 x 14 patches, else the same rule: heads round(H k / 3), MLP ratio r / 4, r / 2, r, tokens 50 /
75 / 100 % by centre crop; `--growth` picks which of heads, mlp, tokens grow, or lists the stages),
stage lengths from solve_budget with per-stage costs from count_flops of the real model (alpha 2,
K = 3). At the first step of stage k: grow(model, stage k, init) and reset_optimizer_moments; the
EMA grows alike. The stage index is in the checkpoint; resume runs set_stage (widths only).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..models.growth import (BUDGETED_STAGES, INITS, GrowthStage, grow, reset_optimizer_moments, set_stage,
                             stage_flops, stage_keep_rates)
from ..models.token_pruning import (DEFAULT_QUANTUM, PLACEMENTS, TRI_LEVEL_BLOCKS, TRI_LEVEL_PRESETS, TokenPruning,
                                    kept_count, quantise)
from ..ops.sample_patches import num_kept_tokens
from ..schedules import KeepRateSchedule, StagedSchedule, WarmupCosine, solve_budget
from ..schedules.budget import sample_seeds

CostKey = Union[int, str]
PAPER_DEPTH = 12
GROWTH_DIMS = ("heads", "mlp", "tokens")
BUDGET_ALPHA, BUDGET_STAGES = 2.0, 3
TOKEN_FRACTIONS = (0.5, 0.75, 1.0)  # the paper's Appendix A: "N in 50 %, 75 % and 100 %"


# ---- token pruning ---------------------------------------------------------------------------
def scaled_blocks(depth: int) -> Tuple[int, ...]:
    """The paper's selector blocks 4, 7, 10 of 12 at another depth: floor(k D / 4) + 1, k = 1..3
    (deduplicated; 12 -> 4, 7, 10; 6 -> 2, 4, 5; 4 -> 2, 3, 4)."""
    if depth == PAPER_DEPTH:
        return TRI_LEVEL_BLOCKS
    return tuple(sorted({min(depth, k * depth // 4 + 1) for k in (1, 2, 3)}))


def parse_token_pruning(spec: Optional[str]) -> Tuple[Optional[float], Optional[float], Optional[Tuple[int, ...]],
                                                       Optional[str]]:
    """(R_T, R_A, blocks, placement) of a --token-pruning value: a preset of TRI_LEVEL_PRESETS
    (tri-level/0.7, attention/0.3, ...) or R_T[,BLOCK,BLOCK,...] (1-based blocks). None: (None,) * 4.
    ValueError names the value."""
    if spec is None:
        return None, None, None, None
    text = spec.strip().lower()
    if text in TRI_LEVEL_PRESETS:
        preset = TRI_LEVEL_PRESETS[text]
        return preset.token_keep_rate, preset.attention_keep_rate, None, preset.placement
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        rate = float(parts[0])
        blocks = tuple(int(part) for part in parts[1:]) or None
    except (ValueError, IndexError):
        raise ValueError(f"--token-pruning must be a preset ({', '.join(TRI_LEVEL_PRESETS)}) or R_T[,BLOCK,...] "
                         f"(e.g. 0.7 or 0.7,4,7,10), got {spec!r}") from None
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"--token-pruning R_T must be in (0, 1], got {rate}")
    return rate, None, blocks, None


def pruning_targets(config) -> Optional[Tuple[float, float, Tuple[int, ...], str]]:
    """(R_T, R_A, blocks, placement) the run's selectors reach, or None without token pruning.
    --attention-keep sets (or overrides a preset's) R_A; blocks default to scaled_blocks(depth)."""
    token, attention, blocks, placement = parse_token_pruning(config.token_pruning)
    if token is None and config.attention_keep is None:
        return None
    token = 1.0 if token is None else token
    attention = config.attention_keep if config.attention_keep is not None else (attention or 1.0)
    placement = config.pruning_placement or placement or "after_attention"
    if placement not in PLACEMENTS:
        raise ValueError(f"--pruning-placement must be one of {PLACEMENTS}, got {placement!r}")
    return token, attention, blocks, placement


def build_token_pruning(config, depth: int) -> Optional[TokenPruning]:
    """The model's TokenPruning plan at R_T = R_A = 1 (where the warm-up starts), or None."""
    targets = pruning_targets(config)
    if targets is None:
        return None
    _, _, blocks, placement = targets
    return TokenPruning(blocks or scaled_blocks(depth), placement=placement, backend=config.sampler_backend)


def parse_warmup(text: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """--pruning-warmup HOLD,DECAY (epochs) -> (hold, decay); None -> (None, None): the defaults."""
    if text is None:
        return None, None
    try:
        hold, decay = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--pruning-warmup must be HOLD,DECAY in epochs (e.g. 10,100), got {text!r}") from None
    return hold, decay


class PruningHook:
    """Sets model.token_keep_rate / attention_keep_rate to their WarmupCosine values each step."""

    name = "pruning"

    def __init__(self, model, config, *, total_steps: int, steps_per_epoch: int):
        token, attention, _, _ = pruning_targets(config)
        hold, decay = parse_warmup(config.pruning_warmup)
        self.model, self.quantum = model, model.token_pruning.quantum or DEFAULT_QUANTUM
        options = dict(hold_epochs=hold, decay_epochs=decay, quantum=self.quantum, total_steps=total_steps,
                       steps_per_epoch=steps_per_epoch)
        self.token_schedule = WarmupCosine(token, **options)
        self.attention_schedule = WarmupCosine(attention, **options)
        self.targets = (token, attention)
        self.step_rates(0)

    def rates_at(self, step: int) -> Tuple[float, float]:
        return self.token_schedule.keep_rate_at(step), self.attention_schedule.keep_rate_at(step)

    def step_rates(self, step: int) -> None:
        self.model.token_keep_rate, self.model.attention_keep_rate = self.rates_at(step)

    def before_step(self, step: int) -> None:
        self.step_rates(step)

    def end_epoch(self, epochs_done: int) -> None:
        pass

    def state_dict(self) -> dict:
        """The rates the model ends with (evaluation rebuilds the model with them) and the schedules."""
        return {"token_keep_rate": self.model.token_keep_rate, "attention_keep_rate": self.model.attention_keep_rate,
                "token_schedule": self.token_schedule.state_dict(),
                "attention_schedule": self.attention_schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        # The schedules are functions of the step: loading checks they are the same ones.
        self.token_schedule.load_state_dict({**state["token_schedule"], "step": 0})
        self.attention_schedule.load_state_dict({**state["attention_schedule"], "step": 0})
        self.model.token_keep_rate, self.model.attention_keep_rate = (state["token_keep_rate"],
                                                                      state["attention_keep_rate"])

    def values(self, steps: np.ndarray) -> Dict[str, np.ndarray]:
        return {"token_keep_rate": _schedule_values(self.token_schedule, steps),
                "attention_keep_rate": _schedule_values(self.attention_schedule, steps)}

    def record(self) -> dict:
        return {"token_keep_rate": self.model.token_keep_rate, "attention_keep_rate": self.model.attention_keep_rate}


# ---- growth (Budgeted Training) ------------------------------------------------------------------
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


class GrowthHook:
    """Grows the model (and its EMA) at the first step of each stage; resets the new parts' moments."""

    name = "growth"

    def __init__(self, model, config, stages: Sequence[GrowthStage], schedule: StagedSchedule, optimizer,
                 ema=None):
        if config.growth_init not in INITS:
            raise ValueError(f"--growth-init must be one of {INITS}, got {config.growth_init!r}")
        self.model, self.stages, self.optimizer, self.ema = model, tuple(stages), optimizer, ema
        self.init, self.seed = config.growth_init, config.seed
        self.ends = np.cumsum(schedule.stage_steps)
        self.stage = 0
        self.moments_reset: List[int] = []  # optimizer state tensors touched at each growth (logged)
        self._set(self.stages[0])

    def _set(self, stage: GrowthStage) -> None:
        # Widths (and the centre scorer) only: the trainer sets the input keep rate each step and
        # leaves 1.0 between steps.
        for model in (self.model, None if self.ema is None else self.ema.module):
            if model is not None:
                set_stage(model, stage)
                model.keep_rate = 1.0

    def stage_at(self, step: int) -> int:
        return int(min(len(self.stages) - 1, np.searchsorted(self.ends, step, side="right")))

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

    def end_epoch(self, epochs_done: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"stage": self.stage, "stages": [[s.num_heads, s.mlp_ratio, s.num_patches] for s in self.stages],
                "init": self.init}

    def load_state_dict(self, state: dict) -> None:
        stages = [[s.num_heads, s.mlp_ratio, s.num_patches] for s in self.stages]
        if [list(s) for s in state["stages"]] != stages:
            raise ValueError(f"growth stages differ: checkpoint {state['stages']}, now {stages}")
        self.stage = int(state["stage"])
        self._set(self.stages[self.stage])

    def values(self, steps: np.ndarray) -> Dict[str, np.ndarray]:
        return {"stage": np.minimum(len(self.stages) - 1, np.searchsorted(self.ends, steps, side="right"))}

    def record(self) -> dict:
        return {"stage": self.stage}


def apply_method_state(model, methods: Optional[dict]) -> None:
    """Put a freshly built model in the state a checkpoint's "methods" entry says it trained into
    (R_T / R_A at the end, the growth stage): what evaluation needs."""
    methods = methods or {}
    if "pruning" in methods and model.token_pruning is not None:
        model.token_keep_rate = methods["pruning"]["token_keep_rate"]
        model.attention_keep_rate = methods["pruning"]["attention_keep_rate"]
    if "growth" in methods:
        heads, ratio, tokens = methods["growth"]["stages"][methods["growth"]["stage"]]
        set_stage(model, GrowthStage(int(heads), float(ratio), None if tokens is None else int(tokens)))
        model.keep_rate = 1.0  # evaluation picks its own rate


# ---- the cost key: what an iteration's time and FLOPs depend on -------------------------------
def _schedule_values(schedule: KeepRateSchedule, steps: np.ndarray) -> np.ndarray:
    return schedule._keep_rates(np.minimum(steps, schedule.total_steps - 1))


def selector_tokens(pruning: Optional[TokenPruning], tokens: int, token_keep_rate: float) -> Tuple[int, ...]:
    """Tokens (CLS included) after each selector when `tokens` enter the blocks at R_T."""
    if pruning is None or quantise(token_keep_rate, pruning.quantum) >= 1.0:
        return ()
    counts, patches = [], tokens - 1
    for _ in pruning.blocks:
        patches = kept_count(patches, token_keep_rate, pruning.quantum)
        counts.append(patches + 1)
    return tuple(counts)


def block_tokens(pruning: Optional[TokenPruning], depth: int, tokens: int, token_keep_rate: float) -> float:
    """Mean over the blocks of the tokens entering each block's attention."""
    after = selector_tokens(pruning, tokens, token_keep_rate)
    if not after:
        return float(tokens)
    shift = 0 if pruning.placement == "before_block" else 1  # after_attention: the next block sees fewer
    counts, current, selectors = [], tokens, dict(zip(pruning.blocks, after))
    for number in range(1, depth + 1):
        if shift == 0 and number in selectors:
            current = selectors[number]
        counts.append(current)
        if shift == 1 and number in selectors:
            current = selectors[number]
    return float(np.mean(counts))


def cost_key(num_tokens: int, keep_rate: float, pruning: Optional[TokenPruning] = None, token_keep_rate: float = 1.0,
             attention_keep_rate: float = 1.0, stage: Optional[int] = None, last_stage: Optional[int] = None) -> CostKey:
    """What an iteration's cost depends on: the kept tokens (an int, as the plain trainer keys its
    times) or, with methods, a string: the tokens after the input sampler and each selector
    ("65>46>33>23"), " a0.3" with the attention level at R_A < 1 (the dense masked path), " s1"
    for growth stage 1 of 3 (stages before the last; the last is the full model)."""
    tokens = num_tokens if keep_rate == 1.0 else num_kept_tokens(num_tokens, keep_rate)
    after = selector_tokens(pruning, tokens, token_keep_rate)
    text = ">".join(str(t) for t in (tokens,) + after)
    if pruning is not None and quantise(attention_keep_rate, pruning.quantum) < 1.0:
        text += f" a{quantise(attention_keep_rate, pruning.quantum):g}"
    if stage is not None and last_stage is not None and stage < last_stage:
        text += f" s{stage + 1}"
    return tokens if text == str(tokens) else text


def key_shares(schedule: KeepRateSchedule, hooks: Sequence, num_tokens: int, pruning: Optional[TokenPruning],
               total_steps: int, last_stage: Optional[int]) -> Tuple[Dict[CostKey, dict], Dict[CostKey, dict]]:
    """({cost key: {"share", "keep_rates"}}, {cost key: the rates that give it}) over every step of
    the run: the joint schedule of the input keep rate and the hooks' R_T / R_A / stage."""
    counts: Dict[CostKey, int] = {}
    rates: Dict[CostKey, List[float]] = {}
    settings: Dict[CostKey, dict] = {}
    for start in range(0, total_steps, 1 << 18):
        steps = np.arange(start, min(total_steps, start + (1 << 18)), dtype=np.int64)
        columns = {"keep_rate": _schedule_values(schedule, steps)}
        for hook in hooks:
            if hasattr(hook, "values"):
                columns.update(hook.values(steps))
        names = sorted(columns)
        table = np.stack([np.asarray(columns[n], dtype=np.float64) for n in names], axis=1)
        rows, row_counts = np.unique(table, axis=0, return_counts=True)
        for row, count in zip(rows, row_counts):
            values = dict(zip(names, row.tolist()))
            if "stage" in values:
                values["stage"] = int(values["stage"])
            key = cost_key(num_tokens, values["keep_rate"], pruning, values.get("token_keep_rate", 1.0),
                           values.get("attention_keep_rate", 1.0), values.get("stage"), last_stage)
            counts[key] = counts.get(key, 0) + int(count)
            rates.setdefault(key, []).append(values["keep_rate"])
            settings.setdefault(key, values)
    shares = {key: {"share": counts[key] / total_steps, "keep_rates": sorted(set(rates[key]))} for key in counts}
    return shares, settings


def is_int_key(key: CostKey) -> bool:
    return isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.isdigit())


def mean_of(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else float("nan")
