"""Training checkpoints: atomic writes, RNG capture, and loads that fail loudly.

A checkpoint is one torch.save'd dict (loadable with weights_only=True: tensors and plain
Python values only)::

    format       CHECKPOINT_FORMAT
    config       the run's TrainConfig as a dict (what evaluate rebuilds the model from)
    step         iterations completed
    model, ema   state dicts (ema None when EMA is off)
    optimizer, lr_scheduler, schedule   state dicts
    rng          per rank: python, numpy, torch and cuda RNG states
    timing       per-keep-rate iteration time totals (for the projected-time summary)
    init_from    the --init-from report of the run's start (None without it)

The device augmentation has no state of its own: it is seeded per step from (seed, step, rank).

Writes go to a temporary file in the target directory, are fsync'ed, then os.replace'd over
the target, so a crash mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import numpy as np
import torch

CHECKPOINT_FORMAT = "pss_kernels.train/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, is not ours, or does not match the run resuming it."""


def save_checkpoint(path: Union[str, Path], state: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """The checkpoint dict, on CPU; CheckpointError if it is missing, truncated or not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, garbage bytes, foreign pickle: all unreadable to us
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or unreadable "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{str(path)!r} is not a pss_kernels training checkpoint "
                              f"(format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    return state


def check_config_matches(saved: Mapping[str, Any], current: Mapping[str, Any], free_keys, path) -> None:
    """Raise CheckpointError listing every run-defining setting that differs from the checkpoint."""
    keys = sorted((set(saved) | set(current)) - set(free_keys))
    differences = [f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
                   for key in keys if saved.get(key) != current.get(key)]
    if differences:
        raise CheckpointError(f"checkpoint {str(path)!r} was written by a different run; resuming it "
                              f"bit for bit needs the same settings:\n  " + "\n  ".join(differences))


def load_state(module_or_optimizer, state: Mapping[str, Any], what: str, path) -> None:
    """load_state_dict with the mismatch reported as a CheckpointError naming the part."""
    try:
        module_or_optimizer.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r}: the {what} state does not fit this run: {err}") from err


def capture_rng_state() -> Dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": numpy_state[0], "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
                  "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                  "cached_gaussian": float(numpy_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
