"""Several seeds of one `pss-compare` comparison summarised: per method the mean and spread of each
figure over the seeds, how many seeds beat the baseline trained for the same wall time, and, against
a reference method, the paired difference seed by seed (`pss-compare --seeds 0,1,2`, or
`pss-compare --summarize seed0/methods.json seed1/methods.json ...` for runs made elsewhere, e.g. one
seed per cluster job).

One seed of a short run says little: on digits fixed k and the mass policy swap places from one seed
to the next (README). A claim such as "adaptive allocation beats fixed k at the same token budget"
needs the paired differences (same seed: same data order and initialisation for both methods) and
the number of seeds that agree, which is what `paired` holds.

Spread is the sample standard deviation over the seeds (None for one seed). Reports must share every
setting but the seed and the output paths; a method missing from one report is an error, not a
smaller mean.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# Settings that may differ between the seeds' reports: the seed itself, where the files went (the
# data too: one seed per cluster job may read its own copy), how the runs were scheduled, and the
# command-line spellings whose resolved values are compared instead (methods -> method_names and
# baseline_added -> the methods run, keep_rates -> sweep_rates, device -> cuda).
PER_RUN_SETTINGS = frozenset({"seed", "seeds", "out_dir", "runs_dir", "data_dir", "jobs", "threads", "in_process",
                              "summarize", "paired_with", "methods", "baseline_added", "keep_rates", "device"})
# Environment fields that should match for the wall times to be comparable (a warning otherwise).
SHARED_ENVIRONMENT = ("device", "torch", "threads_per_run", "jobs")


class SummaryInputError(ValueError):
    """Bad --seeds / --summarize / --paired-with input: pss-compare reports it as a usage error."""


def mean_std(values: Sequence[float]) -> dict:
    """{'mean', 'std' (sample; None for one value), 'values'}."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std: values must not be empty")
    mean = sum(values) / len(values)
    std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None)
    return {"mean": mean, "std": std, "values": values}


def load_reports(paths: Sequence[Path]) -> List[dict]:
    """pss-compare JSONs, each checked to be one (a ValueError naming the file otherwise)."""
    reports = []
    for path in map(Path, paths):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SummaryInputError(f"--summarize: cannot read {path}: {err}") from err
        if not isinstance(report, dict) or "results" not in report or "seed" not in report.get("settings", {}):
            raise SummaryInputError(f"--summarize: {path} is not a pss-compare methods JSON (no settings.seed or "
                                    "results)")
        report["path"] = str(path)
        reports.append(report)
    return reports


def _check_comparable(reports: Sequence[dict]) -> List[str]:
    """Refuses reports that are not the same comparison under different seeds; returns warnings for
    what only makes their wall times incomparable (a different machine, torch, or job layout)."""
    if not reports:
        raise SummaryInputError("summarize: reports must hold at least one pss-compare report")
    seeds = [r["settings"]["seed"] for r in reports]
    if len(set(seeds)) != len(seeds):
        raise SummaryInputError(f"summarize: each report must be a different seed, got seeds {seeds}")
    first = reports[0]
    shared = {k: v for k, v in first["settings"].items() if k not in PER_RUN_SETTINGS}
    for report in reports[1:]:
        other = {k: v for k, v in report["settings"].items() if k not in PER_RUN_SETTINGS}
        differ = sorted(k for k in set(shared) | set(other) if shared.get(k) != other.get(k))
        if differ:
            where = report.get("path", f"seed {report['settings']['seed']}")
            raise SummaryInputError(f"summarize: {where} differs from seed {first['settings']['seed']} in settings "
                                    f"{differ}: only the seed may change between the summarised runs")
        names, first_names = [r["method"] for r in report["results"]], [r["method"] for r in first["results"]]
        if names != first_names:
            raise SummaryInputError(f"summarize: seed {report['settings']['seed']} ran methods {names}, seed "
                                    f"{first['settings']['seed']} ran {first_names}")
    warnings = []
    for key in SHARED_ENVIRONMENT:
        values = [(r.get("environment") or {}).get(key) for r in reports]
        if len(set(map(str, values))) > 1:
            warnings.append(f"environment {key} differs between the seeds ({', '.join(map(str, values))}): their "
                            "wall times are not comparable")
    return warnings


def _sweep(row: dict) -> Dict[float, float]:
    return {s["keep_rate"]: s["top1"] for s in row["sweep"]}


def summarize(reports: Sequence[dict], paired_with: Optional[str] = None) -> dict:
    """The summary of pss-compare reports of different seeds (see the module docstring). `paired_with`:
    a method of the reports; each other method's top-1 minus its, seed by seed, at rho = 1 and at each
    sweep rate, with the seeds where the method is strictly higher (`wins`)."""
    warnings = _check_comparable(reports)
    seeds = [r["settings"]["seed"] for r in reports]
    names = [row["method"] for row in reports[0]["results"]]
    if paired_with is not None and paired_with not in names:
        raise SummaryInputError(f"--paired-with: {paired_with!r} is not one of the compared methods {names}")
    rows_by_seed = [{row["method"]: row for row in r["results"]} for r in reports]
    rates = reports[0]["settings"]["sweep_rates"]
    methods = []
    for name in names:
        rows = [by_name[name] for by_name in rows_by_seed]
        sweeps = [_sweep(row) for row in rows]
        # The equal-time baseline of each seed; a method not faster than the full baseline has none,
        # and the full baseline is its equal-time row (compare.equal_time_epochs).
        timed = [row["top1"] - (row.get("equal_time_baseline") or by_name["baseline"])["top1"]
                 for row, by_name, report in zip(rows, rows_by_seed, reports)
                 if name != "baseline" and "baseline" in by_name and report["settings"].get("equal_time", True)]
        methods.append({
            "method": name, "label": rows[0]["label"], "family": rows[0]["family"],
            "wall_s": mean_std([row["wall_s"] for row in rows]),
            "mean_tokens": mean_std([row["mean_tokens"] for row in rows]),
            "top1": mean_std([row["top1"] for row in rows]),
            "sweep": [{"keep_rate": rate, **mean_std([s[rate] for s in sweeps])} for rate in rates
                      if all(rate in s for s in sweeps)],
            # In how many seeds the method beat the baseline given its wall time (strictly higher top-1).
            "equal_time": ({"seeds": len(timed), "beats": sum(d > 0 for d in timed), "top1_minus": mean_std(timed)}
                           if timed else None),
        })
    paired = []
    if paired_with is not None:
        reference = [by_name[paired_with] for by_name in rows_by_seed]
        for name in names:
            if name == paired_with:
                continue
            rows = [by_name[name] for by_name in rows_by_seed]
            at = {1.0: [row["top1"] - ref["top1"] for row, ref in zip(rows, reference)]}
            for rate in rates:
                if rate != 1.0 and all(rate in _sweep(r) for r in rows + reference):
                    at[rate] = [_sweep(row)[rate] - _sweep(ref)[rate] for row, ref in zip(rows, reference)]
            paired.append({"method": name, "versus": paired_with, "top1_minus": [
                {"keep_rate": rate, "wins": sum(d > 0 for d in diffs), **mean_std(diffs)}
                for rate, diffs in at.items()]})
    settings = {k: v for k, v in reports[0]["settings"].items() if k not in PER_RUN_SETTINGS}
    return {"seeds": seeds, "settings": settings, "environment": reports[0].get("environment"),
            "reports": [r.get("path") for r in reports], "warnings": warnings, "methods": methods,
            "paired_with": paired_with, "paired": paired}


def _pm(stat: dict) -> str:
    return f"{stat['mean']:.1f}" + ("" if stat["std"] is None else f" ± {stat['std']:.1f}")


def table(summary: dict) -> str:
    """Markdown: mean ± std per method, then the paired differences against --paired-with."""
    shown = [s["keep_rate"] for s in summary["methods"][0]["sweep"] if s["keep_rate"] < 1.0][:4]
    n = len(summary["seeds"])
    lines = [f"| method | wall s | tokens / step | top-1 @ rho 1 | beats equal-time baseline | "
             + " | ".join(f"@ {r:g}" for r in shown) + " |", "|" + "---|" * (5 + len(shown))]
    for m in summary["methods"]:
        sweep = {s["keep_rate"]: s for s in m["sweep"]}
        timed = m["equal_time"]
        verdict = f"{timed['beats']} of {timed['seeds']} ({timed['top1_minus']['mean']:+.1f})" if timed else ""
        lines.append(f"| {m['method']} | {_pm(m['wall_s'])} | {m['mean_tokens']['mean']:.1f} | {_pm(m['top1'])} | "
                     f"{verdict} | " + " | ".join(_pm(sweep[r]) if r in sweep else "" for r in shown) + " |")
    if summary["paired"]:
        reference = summary["paired_with"]
        lines += ["", f"Paired with {reference} (top-1 minus {reference}'s, same seed; wins: seeds strictly higher, "
                      f"of {n}):", ""]
        rates = [1.0] + shown  # the JSON holds every sweep rate
        lines += ["| method | " + " | ".join(f"@ {r:g}" for r in rates) + " |", "|" + "---|" * (1 + len(rates))]
        for p in summary["paired"]:
            at = {d["keep_rate"]: d for d in p["top1_minus"]}
            lines.append(f"| {p['method']} | " + " | ".join(
                "" if r not in at else f"{at[r]['mean']:+.1f}" + ("" if at[r]["std"] is None else
                                                                  f" ± {at[r]['std']:.1f}") + f" ({at[r]['wins']}/{n})"
                for r in rates) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> None:
    """top-1 against the inference keep rate, the mean over the seeds with a ± std band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, m in enumerate(summary["methods"]):
        sweep = sorted(m["sweep"], key=lambda s: s["keep_rate"])
        rates = [s["keep_rate"] for s in sweep]
        mean = [s["mean"] for s in sweep]
        colour = plt.get_cmap("tab10")(i % 10)
        ax.plot(rates, mean, marker="o", ms=3, color=colour, label=m["method"])
        if all(s["std"] is not None for s in sweep):
            ax.fill_between(rates, [s["mean"] - s["std"] for s in sweep], [s["mean"] + s["std"] for s in sweep],
                            color=colour, alpha=0.15, lw=0)
    ax.set(xlabel="inference keep rate rho", ylabel="top-1 (%)",
           title=f"dynamic inference, mean ± std over seeds {', '.join(map(str, summary['seeds']))} ({title})")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(summary: dict, out_dir: Path, stem: str) -> str:
    """<stem>.json, <stem>.md and <stem>_sweep.png in out_dir; returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    s = summary["settings"]
    header = (f"{s.get('model')} on {s.get('data')}, {s.get('epochs')} epochs, seeds "
              f"{', '.join(map(str, summary['seeds']))}; mean ± sample std over the seeds")
    notes = "".join(f"\nWarning: {w}" for w in summary["warnings"])
    text = f"{header}{notes}\n\n{table(summary)}\n"
    (out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(text)
    plot(summary, out_dir / f"{stem}_sweep.png", f"{s.get('model')}, {s.get('data')}")
    return text
