"""The training side of the seed papers' methods, one module each, behind one hook protocol.

- token_pruning.py   Tri-Level E-ViT's token and attention levels (models/token_pruning.py)
- growth.py          Budgeted Training's growth stages (models/growth.py)
- example_filter.py  Tri-Level E-ViT's example level
- cost.py            the cost key an iteration's time and FLOPs depend on
- base.py            the MethodHook protocol and the registry the trainer reads

Adding a method: its model mechanics in `models/<method>.py`, a MethodHook subclass and one
`register(Method(...))` in `train/methods/<method>.py`, and its import below.
"""
from .base import (REGISTRY, Method, MethodHook, RunContext, apply_method_states, build_hooks, check_config,
                   enabled_methods, model_options, register)
from . import token_pruning, growth, example_filter  # noqa: E402,F401  (registration, in hook order)
from .cost import CostKey, key_from_state, key_shares, key_tokens, step_key
from .example_filter import ClsAttentionCapture, ExampleFilter, ExampleFilterHook
from .growth import GrowthHook, derived_stages, growth_stages, solve_growth_budget
from .token_pruning import PruningHook, PruningSpec, block_tokens, parse_token_pruning, scaled_blocks, selector_tokens

__all__ = ["REGISTRY", "ClsAttentionCapture", "CostKey", "ExampleFilter", "ExampleFilterHook", "GrowthHook", "Method",
           "MethodHook", "PruningHook", "PruningSpec", "RunContext", "apply_method_states", "block_tokens",
           "build_hooks", "check_config", "derived_stages", "enabled_methods", "growth_stages", "key_from_state",
           "key_shares", "key_tokens", "model_options", "parse_token_pruning", "register",
           "scaled_blocks", "selector_tokens", "solve_growth_budget", "step_key"]
