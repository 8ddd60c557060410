"""What a training method is to the trainer: a hook with a fixed set of calls, and a registry entry.

A method of the seed papers (Tri-Level E-ViT's token, attention and example levels, Budgeted
Training's growth) is a configuration of the same model and the same loop. Its model mechanics
live in `pss_kernels/models/<method>.py`; its training side in `train/methods/<method>.py`, as a
`MethodHook` subclass and one `register(Method(...))` call. The trainer never names a method: it
builds the hooks of the methods the config enables (registry order) and calls, on each,

    set-up (in this order)
      wrap_dataset(dataset) / sampled_examples(n) / wrap_sampler(sampler)   what an epoch iterates
      keep_rate_schedule(run)   a method that sets the input keep rate itself (at most one)
      attach(run)               optimizer, EMA, schedule and run length are known now
    every step
      before_step(step)         before the forward of iteration `step` (set rates, grow)
      observe(batch, logits, labels)   after the step: what the method counts per example
      record(tokens)            fields for the step's log record
      cost_fields(tokens, values)      its part of the step's cost key (train/methods/cost.py)
    every epoch
      end_epoch(epochs_done)    a log event (with a "message" for the console) or None
    the run
      values(steps)             the method's settings as pure functions of the step (for the
                                projection of the whole run's time and FLOPs)
      current_values()          the settings now; apply_values(model, values) puts a (FLOP-
                                counting) twin of the model into them
      state_dict / load_state_dict     in the checkpoint under "methods"[name]
      summary()                 what it did, for summary.json under "methods"[summary_key]
    evaluation (pss-evaluate, no hook)
      Method.apply_state(model, state) puts a freshly built model in the state the run ended in.

Every hook's effect is a pure function of the step or is in its state, so `--resume` continues bit
for bit. With no method flag no hook exists: nothing runs, nothing is stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np


@dataclass
class RunContext:
    """What the hooks may read about the run once it is set up (passed to keep_rate_schedule, attach)."""
    config: Any
    model: Any
    steps_per_epoch: int
    total_steps: Optional[int] = None
    schedule: Any = None
    optimizer: Any = None
    ema: Any = None
    dist_info: Any = None


class MethodHook:
    """The no-op hook: a method overrides what it uses (see the module docstring)."""

    name = "method"           # the key of its state in the checkpoint's "methods"
    summary_key = "method"    # the key of its summary in summary.json's "methods"

    # ---- set-up ---------------------------------------------------------------------------
    def wrap_dataset(self, dataset):
        return dataset

    def sampled_examples(self, num_examples: int) -> int:
        return num_examples

    def wrap_sampler(self, sampler):
        return sampler

    def keep_rate_schedule(self, run: RunContext):
        return None

    def attach(self, run: RunContext) -> None:
        pass

    # ---- the loop ---------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        pass

    def observe(self, batch, logits, labels) -> None:
        pass

    def record(self, tokens: int) -> dict:
        return {}

    def cost_fields(self, tokens: int, values: Dict[str, float]) -> dict:
        return {}

    def end_epoch(self, epochs_done: int) -> Optional[dict]:
        return None

    # ---- the run ------------------------------------------------------------------------------
    def values(self, steps: np.ndarray) -> Dict[str, np.ndarray]:
        return {}

    def current_values(self) -> Dict[str, float]:
        return {}

    def apply_values(self, model, values: Dict[str, float]) -> None:
        pass

    def full_values(self) -> Dict[str, float]:
        """The settings of the full-size run the time summary compares with (e.g. the last stage)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def summary(self) -> Optional[dict]:
        return None


@dataclass(frozen=True)
class Method:
    """A registry entry: how the command line switches a method on, and how to build its parts."""
    name: str                                    # MethodHook.name: its checkpoint key
    summary_key: str                             # its key in summary.json's "methods"
    flags: str                                   # the pss-train flags, for the help epilog
    description: str
    enabled: Callable[[Any], bool]               # config -> is the method on
    build_hook: Callable[[Any, Any, Any], MethodHook]   # (config, model, dist_info) -> hook
    apply_state: Callable[[Any, dict], None]     # (fresh model, its checkpoint state) for evaluation
    model_options: Callable[[Any, int], dict] = field(default=lambda config, depth: {})  # create_model kwargs
    check: Callable[[Any], None] = field(default=lambda config: None)  # refuses a config, enabled or not


REGISTRY: Dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def check_config(config) -> None:
    """Every registered method's refusals of `config` (ValueError naming the flag)."""
    for method in REGISTRY.values():
        method.check(config)


def enabled_methods(config) -> List[Method]:
    """The methods `config` switches on, in registry order (the order their hooks run)."""
    return [method for method in REGISTRY.values() if method.enabled(config)]


def model_options(config, depth: int) -> dict:
    """The create_model keyword arguments of the enabled methods (e.g. token_pruning=...)."""
    options: dict = {}
    for method in enabled_methods(config):
        options.update(method.model_options(config, depth))
    return options


def build_hooks(config, model, dist_info) -> List[MethodHook]:
    return [method.build_hook(config, model, dist_info) for method in enabled_methods(config)]


def apply_method_states(model, states: Optional[dict]) -> None:
    """Put a freshly built model in the state a checkpoint's "methods" entry says the run ended in
    (what evaluation needs); entries of methods this version does not know are refused."""
    states = states or {}
    unknown = sorted(set(states) - set(REGISTRY))
    if unknown:
        raise ValueError(f"the checkpoint holds state of methods this version does not know: {unknown}")
    for name, state in states.items():
        REGISTRY[name].apply_state(model, state)
