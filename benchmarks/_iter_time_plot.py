"""PNG plot of an iter_time run (reads the run's JSON document).

One row per model:
  left    iteration time (ms, median; bars = interquartile range) vs keep rate rho, one line per
          implementation, the plain-ViT baseline as a dashed horizontal line;
  middle  speed-up of pss over each peer (peer time / pss time) vs rho, 1 as a dashed line;
  right   projected whole-run training time (hours) per schedule, one bar per implementation,
          the baseline run as a dashed horizontal line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from _iter_time_report import pss_speedups


def plot_report(report: dict, path: Path) -> Optional[str]:
    """Write the plot to `path`; returns None, or why no plot was written (matplotlib missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError as err:
        return f"matplotlib is not installed ({err}); pip install matplotlib (or '.[bench]') for the plot"

    config, results = report["config"], report["results"]
    models = config["models"]
    fig, axes = plt.subplots(len(models), 3, figsize=(19, 4.5 * len(models)), squeeze=False)
    env = report["environment"]
    fig.suptitle(f"{report['label']}: training iteration time vs keep rate\n{env['device']} | torch {env['torch']}"
                 f" | triton {env['triton']} | CUDA {env['cuda']} | {config['amp']} | {env['date'][:10]}",
                 fontsize=11, color="firebrick" if report["run_kind"] != "gpu" else "black")
    # One colour per implementation in both panels.
    colors = {impl: f"C{i}" for i, impl in enumerate(config["impls"])}
    for row, model in enumerate(models):
        _plot_iteration_times(axes[row][0], model, config, results, colors)
        _plot_speedups(axes[row][1], model, report, colors)
        _plot_projection(axes[row][2], model, report["projection"], config["impls"], colors)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _plot_iteration_times(ax, model: str, config: dict, results: list, colors: dict) -> None:
    for impl in config["impls"]:
        points = sorted((r["keep_rate"], r["median_ms"], r["q1_ms"], r["q3_ms"]) for r in results
                        if r["model"] == model and r["impl"] == impl and r["median_ms"] is not None)
        if not points:
            ax.plot([], [], marker="x", linestyle="none", color=colors[impl], label=f"{impl} (failed)")
            continue
        rhos, medians, q1s, q3s = zip(*points)
        errors = [[m - q1 for m, q1 in zip(medians, q1s)], [q3 - m for m, q3 in zip(medians, q3s)]]
        ax.errorbar(rhos, medians, yerr=errors, marker="o", capsize=3, color=colors[impl], label=impl)
    baseline = next((r for r in results if r["model"] == model and r["impl"] == "baseline"
                     and r["median_ms"] is not None), None)
    if baseline is not None:
        ax.axhline(baseline["median_ms"], color="black", linestyle="--",
                   label=f"baseline: plain ViT, no RPB, rho=1 ({baseline['median_ms']:.1f} ms)")
    ax.set_xlabel("keep rate rho")
    ax.set_ylabel("iteration time (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{model} @ {config['img_size']}px, batch {config['batch_sizes'][model]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_speedups(ax, model: str, report: dict, colors: dict) -> None:
    for peer, row in pss_speedups(report, model).items():
        points = sorted((rho, speedup) for rho, speedup in row.items() if speedup is not None)
        if points:
            ax.plot(*zip(*points), marker="o", color=colors[peer], label=f"over {peer}")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="as fast as pss")
    ax.set_xlabel("keep rate rho")
    ax.set_ylabel("peer time / pss time (higher: pss faster)")
    ax.set_title(f"{model}: speed-up of pss over each peer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_projection(ax, model: str, projection: dict, impls: list, colors: dict) -> None:
    block = projection["models"].get(model)
    schedules = (block or {}).get("schedules", [])
    width = 0.8 / max(len(impls), 1)
    for position, impl in enumerate(impls):
        # An implementation not projected under a schedule (not measured) gets no bar, not a zero-hour one.
        # A projection that needed keep rates the run did not time (interpolated) is drawn hatched.
        bars = [(i + (position - (len(impls) - 1) / 2) * width, s["impls"].get(impl, {}))
                for i, s in enumerate(schedules)]
        bars = [(offset, row["run_hours"], bool(row.get("interpolated_keep_rates")))
                for offset, row in bars if row.get("run_hours") is not None]
        for kind, hatch, suffix in ((False, None, ""), (True, "//", " (interpolated)")):
            drawn = [(offset, hours) for offset, hours, interpolated in bars if interpolated == kind]
            if drawn:
                ax.bar(*zip(*drawn), width=width, color=colors[impl], hatch=hatch, edgecolor="white" if hatch else None,
                       label=impl + suffix)
    if block and block["baseline"]:
        ax.axhline(block["baseline"]["run_hours"], color="black", linestyle="--",
                   label=f"baseline run ({block['baseline']['run_hours']:.1f} h)")
    ax.set_xticks(range(len(schedules)))
    ax.set_xticklabels([s["spec"] for s in schedules])
    ax.set_ylabel("projected run time (hours, one GPU)")
    epochs = projection["epochs"]
    ax.set_title(f"{model}: {epochs} epoch{'' if epochs == 1 else 's'} of {projection['dataset']}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
