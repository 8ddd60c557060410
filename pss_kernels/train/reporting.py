"""What a run reports: a JSON-lines log, a stderr progress bar, the projected-time summary, FLOPs per
iteration and peak memory."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, TextIO, Tuple

import torch

from .timing import MEASURED



class JsonLinesLog:
    """One JSON object per line, appended (a resumed run continues the same file) and flushed."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: Mapping) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ProgressBar:
    """A one-line bar redrawn in place on a terminal; every `interval` steps a plain line otherwise
    (log files stay readable). No tqdm needed."""

    WIDTH = 24

    def __init__(self, total_steps: int, interval: int = 10, stream: TextIO = sys.stderr, enabled: bool = True):
        self.total_steps, self.interval, self.stream, self.enabled = total_steps, max(1, interval), stream, enabled
        self.interactive = enabled and hasattr(stream, "isatty") and stream.isatty()
        self._last_draw = 0.0

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        filled = int(self.WIDTH * step / self.total_steps)
        line = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {step}/{self.total_steps} {text}"
        if self.interactive:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or step == self.total_steps:  # redraw at most 10x per second
                self.stream.write("\r" + line + "\033[K")
                self.stream.flush()
                self._last_draw = now
        elif step % self.interval == 0 or step == self.total_steps:
            self.stream.write(line + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A line that stays (evaluation results, notes), printed above the bar."""
        if not self.enabled:
            return
        self.stream.write(("\r\033[K" if self.interactive else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.interactive:
            self.stream.write("\n")
            self.stream.flush()


class IterationFlops:
    """FLOPs of one training iteration (forward + backward of this process's batch) per cost key (the
    kept-token count, or with methods a train/methods/cost.CostKey), from the package's one counter
    (models/flops.count_flops: PyTorch's FlopCounterMode), counted once per key and cached.

    The count runs on a twin of the model built on the meta device (no memory, no time, no RNG drawn,
    the real model untouched) by `make_meta_model`, with eager attention: the fused custom ops are
    opaque to the counter, the eager peer runs the same matmuls as aten ops. `prepare(twin)` puts the
    twin in the iteration's state first (the method hooks' apply_values: R_T and R_A, growth stage),
    so pruning and growth are counted as they run. The counter sees matmuls and convolutions
    (2 FLOPs per multiply-add), not softmax, norms or the optimizer. A model the meta device cannot
    run is reported as None (once per key) instead of stopping the training run.
    """

    def __init__(self, make_meta_model: Callable[[], torch.nn.Module], batch_shape: Tuple[int, ...]):
        self.make_meta_model, self.batch_shape = make_meta_model, tuple(batch_shape)
        self._model: Optional[torch.nn.Module] = None
        self.by_tokens: Dict[object, Optional[int]] = {}

    def __call__(self, key, keep_rate: float, *,
                 prepare: Optional[Callable[[torch.nn.Module], None]] = None) -> Optional[int]:
        """FLOPs of an iteration at cost key `key` and input rate `keep_rate`, the twin put in the
        iteration's state by `prepare`."""
        if key not in self.by_tokens:
            try:
                self.by_tokens[key] = self._count(keep_rate, prepare)
            except (RuntimeError, NotImplementedError, TypeError) as err:
                print(f"pss-train: note: FLOPs at {key} tokens not counted ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''})", file=sys.stderr)
                self.by_tokens[key] = None
        return self.by_tokens[key]

    def _count(self, keep_rate: float, prepare) -> int:
        from ..models.flops import count_flops
        with torch.random.fork_rng(devices=[]):
            if self._model is None:
                with torch.device("meta"):
                    self._model = self.make_meta_model()
        if prepare is not None:
            prepare(self._model)
        return count_flops(self._model, batch_size=self.batch_shape[0], keep_rate=keep_rate, backward=True)


def peak_memory_mb(device: torch.device) -> Tuple[Optional[float], str]:
    """(peak MiB, what was measured): CUDA's max_memory_allocated on a GPU; on the CPU the process's
    peak resident set size (getrusage: cheap, includes everything the process ever held)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda max_memory_allocated"
    try:
        import resource
    except ImportError:  # not on Windows
        return None, "n/a"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10), "cpu peak rss"


MAX_SUMMARY_ROWS = 12


def format_summary(summary: Mapping) -> str:
    def hours(seconds):
        return "n/a (nothing timed)" if seconds is None else f"{seconds / 3600:.3f} h ({seconds:.1f} s)"

    rows = summary["per_tokens"]
    lines = [f"time per iteration by kept tokens (of {summary['num_tokens']}; {summary['total_steps']} steps):"]
    if len(rows) <= MAX_SUMMARY_ROWS:
        for tokens, entry in rows.items():
            low, high = entry["keep_rates"]
            rates = f"rho={low:g}" if low == high else f"rho={low:g}..{high:g}"
            mean = "n/a" if entry["mean_iter_s"] is None else f"{1e3 * entry['mean_iter_s']:.2f} ms"
            note = "" if entry["source"] in (MEASURED, None) else f"  ({entry['source']})"
            lines.append(f"  k={tokens:<5} {rates:<16} share={100 * entry['share']:5.1f} %  {mean}{note}")
    else:
        timed = sum(entry["source"] == MEASURED for entry in rows.values())
        lines.append(f"  {len(rows)} token counts, {timed} timed; the rest estimated from them (see summary.json)")
    estimated = summary["estimated_share"]
    lines.append(f"projected: {hours(summary['projected_s'])}"
                 + (f" ({100 * estimated:.0f} % of the steps at estimated times)" if estimated > 0 else ""))
    source = summary["baseline_source"]
    lines.append(f"baseline ({summary['baseline_steps']} steps at rho=1): {hours(summary['baseline_s'])}"
                 + ("" if source in (MEASURED, None) else f" ({source})"))
    if summary["saving"] is not None:
        estimate_note = " (estimated)" if summary["estimated"] else ""
        lines.append(f"saving vs baseline: {100 * summary['saving']:.1f} %{estimate_note}")
    return "\n".join(lines)
