"""Tri-Level E-ViT's token and attention levels (Kong et al. 2023): the training side.

The model mechanics (selectors inside the network, the attention level's key mask) are in
`models/token_pruning.py`; here the run's plan is parsed once from the flags into a
`PruningSpec`, and a hook warms R_T and R_A up each step.

`--token-pruning` / `--attention-keep`: the model gets a TokenPruning plan at the blocks given
(default: the paper's 4, 7, 10 of 12, scaled to the depth as floor(k D / 4) + 1, k = 1, 2, 3),
placement after_attention (the released code's), and R_T, R_A warm up from 1.0 to their targets by
WarmupCosine (hold 10 / 300 of the run, cosine over 100 / 300: EViT's and the released code's;
`--pruning-warmup HOLD,DECAY` in epochs), quantised to the selector's 0.05 grid so that the logged
rates are those the selectors use. They stay at the step's value between steps: evaluation runs
the pruned model, as the paper reports it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, Optional, Tuple

import numpy as np

from ...models.token_pruning import (DEFAULT_QUANTUM, PLACEMENTS, TRI_LEVEL_BLOCKS, TRI_LEVEL_PRESETS, TokenPruning,
                                       quantise)
from ...schedules import WarmupCosine
from .base import Method, MethodHook, RunContext, register

PAPER_DEPTH = 12


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


def parse_warmup(text: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """--pruning-warmup HOLD,DECAY (epochs) -> (hold, decay); None -> (None, None): the defaults."""
    if text is None:
        return None, None
    try:
        hold, decay = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--pruning-warmup must be HOLD,DECAY in epochs (e.g. 10,100), got {text!r}") from None
    return hold, decay


@dataclass(frozen=True)
class PruningSpec:
    """The run's token / attention levels, parsed once from the flags."""
    token_keep_rate: float                   # R_T the warm-up reaches
    attention_keep_rate: float               # R_A the warm-up reaches
    blocks: Optional[Tuple[int, ...]]        # None: scaled_blocks(depth)
    placement: str
    warmup_hold: Optional[int]               # epochs; None: WarmupCosine's default
    warmup_decay: Optional[int]

    @classmethod
    def from_config(cls, config) -> Optional["PruningSpec"]:
        """None without --token-pruning and --attention-keep. --attention-keep sets (or overrides a
        preset's) R_A; the placement defaults to after_attention (the released code's). The flags are
        parsed once per distinct value (the registry asks for the spec several times)."""
        return _spec_of(config.token_pruning, config.attention_keep, config.pruning_placement, config.pruning_warmup)

    @classmethod
    def _parse(cls, token_pruning, attention_keep, pruning_placement, pruning_warmup) -> Optional["PruningSpec"]:
        config = SimpleNamespace(token_pruning=token_pruning, attention_keep=attention_keep,
                                 pruning_placement=pruning_placement, pruning_warmup=pruning_warmup)
        token, attention, blocks, placement = parse_token_pruning(config.token_pruning)
        if token is None and config.attention_keep is None:
            return None
        attention = config.attention_keep if config.attention_keep is not None else (attention or 1.0)
        placement = config.pruning_placement or placement or "after_attention"
        if placement not in PLACEMENTS:
            raise ValueError(f"--pruning-placement must be one of {PLACEMENTS}, got {placement!r}")
        hold, decay = parse_warmup(config.pruning_warmup)
        return cls(1.0 if token is None else token, attention, blocks, placement, hold, decay)

    def token_pruning(self, depth: int, backend: Optional[str] = None) -> TokenPruning:
        """The model's TokenPruning plan at R_T = R_A = 1 (where the warm-up starts)."""
        return TokenPruning(self.blocks or scaled_blocks(depth), placement=self.placement, backend=backend)


@functools.lru_cache(maxsize=64)
def _spec_of(token_pruning, attention_keep, pruning_placement, pruning_warmup) -> Optional[PruningSpec]:
    return PruningSpec._parse(token_pruning, attention_keep, pruning_placement, pruning_warmup)


def selector_tokens(pruning: Optional[TokenPruning], tokens: int, token_keep_rate: float) -> Tuple[int, ...]:
    """Tokens (CLS included) after each selector when `tokens` enter the blocks at R_T: the plan's
    own count (TokenPruning.kept_patches) at that rate."""
    if pruning is None or quantise(token_keep_rate, pruning.quantum) >= 1.0:
        return ()
    previous = pruning.token_keep_rate
    pruning.token_keep_rate = token_keep_rate
    try:
        patches = pruning.kept_patches(tokens - 1)
    finally:
        pruning.token_keep_rate = previous
    return tuple(count + 1 for count in patches)


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


class PruningHook(MethodHook):
    """Sets the model's R_T / R_A to their WarmupCosine values before each step."""

    name = "pruning"
    summary_key = "token_pruning"

    def __init__(self, model, spec: PruningSpec):
        self.model, self.spec = model, spec
        self.pruning: TokenPruning = model.token_pruning
        self.quantum = self.pruning.quantum or DEFAULT_QUANTUM
        self.token_schedule = self.attention_schedule = None

    def attach(self, run: RunContext) -> None:
        options = dict(hold_epochs=self.spec.warmup_hold, decay_epochs=self.spec.warmup_decay, quantum=self.quantum,
                       total_steps=run.total_steps, steps_per_epoch=run.steps_per_epoch)
        self.token_schedule = WarmupCosine(self.spec.token_keep_rate, **options)
        self.attention_schedule = WarmupCosine(self.spec.attention_keep_rate, **options)
        self.before_step(0)

    def rates_at(self, step: int) -> Tuple[float, float]:
        return self.token_schedule.keep_rate_at(step), self.attention_schedule.keep_rate_at(step)

    def before_step(self, step: int) -> None:
        self.model.token_keep_rate, self.model.attention_keep_rate = self.rates_at(step)

    def current_values(self) -> Dict[str, float]:
        return {"token_keep_rate": self.model.token_keep_rate, "attention_keep_rate": self.model.attention_keep_rate}

    def values(self, steps: np.ndarray) -> Dict[str, np.ndarray]:
        return {"token_keep_rate": self.token_schedule.keep_rates_at(steps),
                "attention_keep_rate": self.attention_schedule.keep_rates_at(steps)}

    def apply_values(self, model, values: Dict[str, float]) -> None:
        if getattr(model, "token_pruning", None) is not None:
            model.token_keep_rate = values.get("token_keep_rate", 1.0)
            model.attention_keep_rate = values.get("attention_keep_rate", 1.0)

    def cost_fields(self, tokens: int, values: Dict[str, float]) -> dict:
        fields = {"selector_tokens": selector_tokens(self.pruning, tokens, values.get("token_keep_rate", 1.0))}
        quantised = quantise(values.get("attention_keep_rate", 1.0), self.pruning.quantum)
        if quantised < 1.0:
            fields["attention_keep_rate"] = quantised
        return fields

    def record(self, tokens: int) -> dict:
        return {"token_keep_rate": self.model.token_keep_rate, "attention_keep_rate": self.model.attention_keep_rate,
                "block_tokens": block_tokens(self.pruning, len(self.model.blocks), tokens,
                                             self.model.token_keep_rate)}

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

    def summary(self) -> dict:
        return {"blocks": list(self.pruning.blocks), "placement": self.pruning.placement,
                "token_keep_rate": self.model.token_keep_rate, "attention_keep_rate": self.model.attention_keep_rate}


def _apply_state(model, state: dict) -> None:
    if model.token_pruning is not None:
        model.token_keep_rate = state["token_keep_rate"]
        model.attention_keep_rate = state["attention_keep_rate"]


def check_packed_levels(config) -> None:
    """The attention level (R_A < 1) masks keys of a dense (B, n, n) attention: refused with packed tokens
    at start-up, not at the first step its warm-up lowers R_A (the token level runs packed)."""
    spec = PruningSpec.from_config(config)
    if spec is not None and spec.attention_keep_rate < 1.0 and config.allocation != "fixed":
        source = (f"--attention-keep {config.attention_keep}" if config.attention_keep is not None else
                  f"--token-pruning {config.token_pruning} (its R_A = {spec.attention_keep_rate:g})")
        raise ValueError(f"{source} with --allocation {config.allocation}: Tri-Level's attention level runs on "
                         f"dense tokens only; packed tokens take its token level (--token-pruning R_T) alone")


register(Method(
    name=PruningHook.name, summary_key=PruningHook.summary_key,
    flags="--token-pruning PRESET|R_T[,BLOCK,...] / --attention-keep R_A",
    description="Tri-Level E-ViT's token and attention levels (R_T / R_A warmed up by a cosine)",
    enabled=lambda config: PruningSpec.from_config(config) is not None,
    build_hook=lambda config, model, dist_info: PruningHook(model, PruningSpec.from_config(config)),
    apply_state=_apply_state,
    model_options=lambda config, depth: {"token_pruning": PruningSpec.from_config(config).token_pruning(
        depth, backend=config.sampler_backend)},
    check=check_packed_levels,
))
