"""What a run reports: a JSON-lines log, a stderr progress bar, and the projected-time summary."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, Mapping, Optional, TextIO


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


class KeepRateTimes:
    """Iteration time (data + compute) summed per keep rate, skipping each rate's first
    `warmup` iterations of a process (allocator, autotuning and compilation happen there)."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.count: Dict[float, int] = {}
        self.total: Dict[float, float] = {}
        self._seen_this_process: Dict[float, int] = {}

    def add(self, keep_rate: float, seconds: float) -> None:
        seen = self._seen_this_process.get(keep_rate, 0)
        self._seen_this_process[keep_rate] = seen + 1
        if seen < self.warmup:
            return
        self.count[keep_rate] = self.count.get(keep_rate, 0) + 1
        self.total[keep_rate] = self.total.get(keep_rate, 0.0) + seconds

    def mean(self, keep_rate: float) -> Optional[float]:
        count = self.count.get(keep_rate, 0)
        return self.total[keep_rate] / count if count else None

    def state_dict(self) -> dict:
        return {"count": dict(self.count), "total": dict(self.total)}

    def load_state_dict(self, state: Mapping) -> None:
        self.count, self.total = dict(state["count"]), dict(state["total"])


def projected_time_summary(times: KeepRateTimes, shares: Mapping[float, float], total_steps: int,
                           baseline_steps: int) -> dict:
    """Projected wall time of the whole schedule vs full training at rho = 1.

    projected = total_steps * sum_rho share(rho) * mean_time(rho);  baseline = baseline_steps * mean_time(1.0)
    (baseline_steps = epochs * steps_per_epoch; it differs from total_steps for a budget schedule).
    Either is None when a keep rate it needs was never timed (e.g. no rho = 1 step in a
    fixed:0.6 run: time a baseline run with --schedule none to compare).
    """
    per_rate = {f"{rate:g}": {"share": share, "mean_iter_s": times.mean(rate), "timed_iters": times.count.get(rate, 0)}
                for rate, share in shares.items()}
    missing = [rate for rate in shares if times.mean(rate) is None]
    projected = None if missing else total_steps * sum(share * times.mean(rate) for rate, share in shares.items())
    baseline_iter = times.mean(1.0)
    baseline = None if baseline_iter is None else baseline_steps * baseline_iter
    saving = None if projected is None or baseline is None else 1.0 - projected / baseline
    return {"total_steps": total_steps, "baseline_steps": baseline_steps, "per_keep_rate": per_rate,
            "projected_s": projected, "baseline_s": baseline, "saving": saving, "untimed_keep_rates": missing}


def format_summary(summary: Mapping) -> str:
    def hours(seconds):
        return "n/a" if seconds is None else f"{seconds / 3600:.3f} h ({seconds:.1f} s)"

    lines = [f"time per iteration by keep rate ({summary['total_steps']} steps):"]
    for rate, entry in summary["per_keep_rate"].items():
        mean = "untimed" if entry["mean_iter_s"] is None else f"{1e3 * entry['mean_iter_s']:.2f} ms"
        lines.append(f"  rho={rate:<5} share={100 * entry['share']:5.1f} %  {mean}")
    lines.append(f"projected: {hours(summary['projected_s'])}   "
                 f"baseline ({summary['baseline_steps']} steps at rho=1): {hours(summary['baseline_s'])}")
    if summary["saving"] is not None:
        lines.append(f"saving vs baseline: {100 * summary['saving']:.1f} %")
    return "\n".join(lines)
