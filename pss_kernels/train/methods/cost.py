"""The cost key: what an iteration's time and FLOPs depend on, as a value.

Without methods the key is the kept-token count (an int: the plain trainer keys its times by it).
With methods it is a `CostKey`: the tokens after the input sampler and after each token-pruning
selector, the attention level's R_A when it is on (the dense masked path), and the growth stage
before the last (the last is the full model). Each method hook contributes its own fields
(`MethodHook.cost_fields`); the trainer only assembles them.

`str(key)` is the form logs and checkpoints have always used ("65>46>33>23 a0.3 s1"), and
`CostKey.parse` reads it back, so timings saved before this class existed load unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ...ops.sample_patches import num_kept_tokens


@dataclass(frozen=True)
class CostKey:
    tokens: int                              # tokens (CLS included) after the input sampler
    selector_tokens: Tuple[int, ...] = ()    # tokens after each token-pruning selector
    attention_keep_rate: Optional[float] = None  # R_A of the attention level, None when off
    stage: Optional[int] = None              # 0-based growth stage, None at the full model

    def __str__(self) -> str:
        text = ">".join(str(t) for t in (self.tokens,) + tuple(self.selector_tokens))
        if self.attention_keep_rate is not None:
            text += f" a{self.attention_keep_rate:g}"
        if self.stage is not None:
            text += f" s{self.stage + 1}"
        return text

    @property
    def plain(self) -> bool:
        """True when only the token count matters (the trainer then keys by the int)."""
        return not self.selector_tokens and self.attention_keep_rate is None and self.stage is None

    @classmethod
    def parse(cls, text: str) -> "CostKey":
        """The key of its str() (checkpoints and logs); ValueError names the text."""
        parts = str(text).split()
        try:
            counts = [int(part) for part in parts[0].split(">")]
            attention = stage = None
            for part in parts[1:]:
                if part[0] == "a":
                    attention = float(part[1:])
                elif part[0] == "s":
                    stage = int(part[1:]) - 1
                else:
                    raise ValueError(part)
        except (ValueError, IndexError):
            raise ValueError(f"not a cost key: {text!r}") from None
        return cls(counts[0], tuple(counts[1:]), attention, stage)


Key = Union[int, CostKey]


def make_key(tokens: int, **fields) -> Key:
    """The iteration's key: the int token count when no method changes the cost, else a CostKey."""
    key = CostKey(int(tokens), **fields)
    return key.tokens if key.plain else key


def key_tokens(key: Key) -> int:
    """The input token count of a key (int or CostKey)."""
    return int(key) if isinstance(key, (int, np.integer)) else key.tokens


def key_from_state(key) -> Key:
    """A key as a checkpoint stores it (int, digit string or CostKey string) -> int or CostKey."""
    if isinstance(key, (int, np.integer)):
        return int(key)
    if isinstance(key, CostKey):
        return key
    text = str(key)
    return int(text) if text.isdigit() else CostKey.parse(text)


def step_key(num_tokens: int, keep_rate: float, hooks: Sequence, values: Optional[Dict[str, float]] = None) -> Key:
    """The key of an iteration at input rate `keep_rate` with the hooks' settings `values` (None:
    each hook's current settings)."""
    tokens = num_tokens if keep_rate == 1.0 else num_kept_tokens(num_tokens, keep_rate)
    fields: dict = {}
    for hook in hooks:
        fields.update(hook.cost_fields(tokens, hook.current_values() if values is None else values))
    return make_key(tokens, **fields)


def key_shares(schedule, hooks: Sequence, num_tokens: int,
               total_steps: int) -> Tuple[Dict[Key, dict], Dict[Key, dict]]:
    """({cost key: {"share", "keep_rates"}}, {cost key: the settings that give it}) over every step of
    the run: the joint schedule of the input keep rate and the hooks' settings (R_T, R_A, stage...)."""
    counts: Dict[Key, int] = {}
    rates: Dict[Key, List[float]] = {}
    settings: Dict[Key, dict] = {}
    for start in range(0, total_steps, 1 << 18):
        steps = np.arange(start, min(total_steps, start + (1 << 18)), dtype=np.int64)
        columns = {"keep_rate": schedule.keep_rates_at(steps)}
        for hook in hooks:
            columns.update(hook.values(steps))
        names = sorted(columns)
        table = np.stack([np.asarray(columns[n], dtype=np.float64) for n in names], axis=1)
        rows, row_counts = np.unique(table, axis=0, return_counts=True)
        for row, count in zip(rows, row_counts):
            values = dict(zip(names, row.tolist()))
            if "stage" in values:
                values["stage"] = int(values["stage"])
            key = step_key(num_tokens, values["keep_rate"], hooks, values)
            counts[key] = counts.get(key, 0) + int(count)
            rates.setdefault(key, []).append(values["keep_rate"])
            settings.setdefault(key, values)
    shares = {key: {"share": counts[key] / total_steps, "keep_rates": sorted(set(rates[key]))} for key in counts}
    return shares, settings
