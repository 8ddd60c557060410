"""`pss-compare` (or `python benchmarks/methods.py`): every token-reduction method of the seed papers
trained on the same data, model, epochs (or compute budget) and seed, side by side.

    pss-compare                                       # CPU: digits, ~15 min on 2 cores (see --jobs) + equal-time runs
    pss-compare --data-dir /imagenet                  # GPU: any ImageFolder with train/ and val/
    pss-compare --methods baseline,pss-cyclic-magnitude,pss-cyclic-random
    pss-compare --quick                               # CI smoke: a tiny model, a few steps
    pss-compare --no-equal-time                       # without the equal-time baseline runs

Each method is one `pss-train` run (flags in METHODS; the model, data and optimisation flags are
shared, `--train-args` appends more to every run) in its own process (its own peak memory), then
`pss-evaluate`'s dynamic-inference sweep over rho on its checkpoint. One progress line per run.
Reported per method, in one table (methods.md), methods.json and two plots:
- wall time of the training loop, mean input tokens per step, mean tokens per block (with
  token pruning), training FLOPs (forward + backward, PyTorch's counter, summed over the steps) and
  their ratio to the baseline's, peak memory, steps, top-1 at rho = 1 and at each sweep rate;
- methods_time.png: top-1 against wall time (the PSS paper's Fig. 1 left);
- methods_sweep.png: top-1 against the inference keep rate rho (Fig. 1 right).
Methods evaluate as they train: Tri-Level at its final R_T / R_A, Budgeted Training at its last
(full) stage; the sweep lowers the input rho on top.

The row a reader needs most is the baseline trained for the same wall time as a method: a method
that saves time is only worth it if it beats the baseline given that time, not the full-length one
(on digits PSS loses to it at 15 epochs; at 60 it beats even the full baseline: README). So after
the methods ran, the baseline runs again for each method faster than it, for
`equal_time_epochs(epochs, method_wall, baseline_wall)` epochs (same seed and shared flags; one run
per distinct epoch count), as rows `baseline-<E>ep` ("baseline @ equal time of <methods>", family
baseline-equal-time) in the table and the time plot, in `equal_time_baselines` of the JSON, and as
`equal_time_baseline` / `beats_equal_time_baseline` of each method's row. The baseline runs even
when --methods leaves it out (it is added, and the output says so); --no-equal-time skips all this;
--quick keeps it (one short run more: 231 s against 213 s for the default --quick on 2 cores). The
epoch count comes from the methods' times, measured side by side (--jobs); an equal-time run that
runs alone may report a lower wall time of its own.

One seed of a short run says little. `--seeds 0,1,2` runs the whole comparison once per seed (in
<out-dir>/seed<S>, <runs-dir>/seed<S>) and writes methods_seeds.md / .json / _sweep.png: per method the
mean ± sample std over the seeds of every figure, how many seeds beat their equal-time baseline, and
with `--paired-with METHOD` each method's top-1 minus METHOD's seed by seed (mean ± std, seeds won).
`--summarize A.json B.json ...` does the same from the JSONs of runs made elsewhere (one seed per
job). pss_kernels/seed_summary.py holds it.

Nothing is hidden: magnitude (L1) and random sampling of each PSS schedule sit in adjacent rows and
in `magnitude_vs_random` of the JSON, with the difference, so a dataset where the magnitude
ranking fails (e.g. digits, whose background is exactly zero) shows it.

Output (relative to the working directory, as pss-train's runs/pss): the per-run directories under
runs/methods/<method>; the table, JSON and plots in runs/methods on CPU and in benchmarks/results
(methods-<device>-<date>.*) on a GPU (--out-dir overrides).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from . import seed_summary

# The directory holding the pss_kernels package: subprocess runs import the same copy.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Method:
    label: str
    family: str
    flags: Callable[[argparse.Namespace], List[str]]


def _filter_flags(keep: float):
    def flags(args):
        # The paper filters every 30 of 300 epochs: every tenth of the run.
        return ["--example-keep", str(keep), "--filter-every", str(max(1, round(args.epochs * 30 / 300)))]
    return flags


def _budget_epochs(args) -> str:
    return str(max(1, round(args.epochs * args.budget)))


METHODS: Dict[str, Method] = {
    "baseline": Method("baseline (every token)", "baseline", lambda a: ["--schedule", "none"]),
    "pss-fixed-magnitude": Method("PSS Fixed(0.6), magnitude", "pss", lambda a: ["--schedule", "fixed:0.6",
                                                                                   "--scorer", "l1"]),
    "pss-fixed-random": Method("PSS Fixed(0.6), random", "pss", lambda a: ["--schedule", "fixed:0.6",
                                                                             "--scorer", "random"]),
    # Packed allocations at the same mean rho (models/packed.py): budget keeps the batch total, mass
    # the fewest patches holding a fraction rho of each image's L1 mass (its fraction solved for the same
    # total). Their default backends: the batched torch sampler, attention padded into one sdpa batch.
    "pss-fixed-budget": Method("PSS Fixed(0.6), budget allocation (packed)", "pss-allocation",
                               lambda a: ["--schedule", "fixed:0.6", "--scorer", "l1", "--allocation", "budget"]),
    "pss-fixed-mass": Method("PSS Fixed(0.6), mass allocation (packed)", "pss-allocation",
                             lambda a: ["--schedule", "fixed:0.6", "--scorer", "l1", "--allocation", "mass"]),
    "pss-linear-magnitude": Method("PSS Linear(0.2, 1.0), magnitude", "pss",
                                   lambda a: ["--schedule", "linear:0.2,1.0", "--scorer", "l1"]),
    "pss-linear-random": Method("PSS Linear(0.2, 1.0), random", "pss",
                                lambda a: ["--schedule", "linear:0.2,1.0", "--scorer", "random"]),
    "pss-cyclic-magnitude": Method("PSS Cyclic(0.2, 1.0), magnitude", "pss",
                                   lambda a: ["--schedule", "cyclic:0.2,1.0", "--scorer", "l1"]),
    "pss-cyclic-random": Method("PSS Cyclic(0.2, 1.0), random", "pss",
                                lambda a: ["--schedule", "cyclic:0.2,1.0", "--scorer", "random"]),
    "patchdropout": Method("PatchDropout, rho ~ U[0.5, 1]", "patchdropout", lambda a: ["--schedule", "patchdropout"]),
    "patchdropout-grid": Method("PatchDropout, rho in {0.5, 1}", "patchdropout",
                                lambda a: ["--schedule", "patchdropout:0.5,1.0,grid_step=0.5"]),
    "tri-level-token": Method("Tri-Level token, R_T 0.7", "tri-level", lambda a: ["--token-pruning", "0.7"]),
    "tri-level-attention": Method("Tri-Level attention, R_A 0.3", "tri-level", lambda a: ["--attention-keep", "0.3"]),
    "tri-level-example": Method("Tri-Level example, r_e 0.8", "tri-level", _filter_flags(0.8)),
    "tri-level-all": Method("Tri-Level/0.8, all three (R_A 0.3)", "tri-level",
                            lambda a: ["--token-pruning", "0.8", "--attention-keep", "0.3"] + _filter_flags(0.8)(a)),
    "budgeted": Method("Budgeted Training (heads, MLP, tokens)", "budgeted",
                       lambda a: ["--budget", str(a.budget)]),
    "budget-lr-cosine": Method("compressed epochs, cosine LR", "budgeted",
                               lambda a: ["--schedule", "none", "--epochs", _budget_epochs(a)]),
    "budget-lr-linear": Method("compressed epochs, Linear-LR", "budgeted",
                               lambda a: ["--schedule", "none", "--epochs", _budget_epochs(a), "--lr-schedule",
                                          "linear"]),
    "budget-lr-rex": Method("compressed epochs, REX LR", "budgeted",
                            lambda a: ["--schedule", "none", "--epochs", _budget_epochs(a), "--lr-schedule", "rex"]),
}
# The default comparison: baseline; PSS x magnitude / random; PatchDropout; Tri-Level's levels and all
# three; Budgeted Training. `--methods all` adds the {0.5, 1} PatchDropout, the LR baselines and the packed allocations.
DEFAULT_METHODS = ("baseline", "pss-fixed-magnitude", "pss-fixed-random", "pss-linear-magnitude",
                   "pss-linear-random", "pss-cyclic-magnitude", "pss-cyclic-random", "patchdropout",
                   "tri-level-token", "tri-level-attention", "tri-level-example", "tri-level-all", "budgeted")
SWEEP_RATES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)

# Shared settings. CPU: deit_tiny narrowed to 64 channels and 4 blocks on digits at 32 px with
# patch 4 (64 patches), 10 epochs: ~1 min per method on one core. GPU: DeiT-S
# at 224 px on an ImageFolder.
CPU_SETTINGS = dict(data="digits", model="deit_tiny", embed_dim=64, depth=4, num_heads=4, patch_size=4, img_size=32,
                    epochs=10, batch_size=64, lr=2e-3, warmup_epochs=1.0, drop_path=0.0, workers=0)
GPU_SETTINGS = dict(data="folder", model="deit_small", embed_dim=None, depth=None, num_heads=None, patch_size=16,
                    img_size=224, epochs=30, batch_size=128, lr=1e-3, warmup_epochs=3.0, drop_path=0.1, workers=8)
QUICK_SETTINGS = dict(data="digits", model="deit_tiny", embed_dim=16, depth=4, num_heads=2, patch_size=8, img_size=16,
                      epochs=3, batch_size=128, lr=2e-3, warmup_epochs=0.5, drop_path=0.0, workers=0)
QUICK_SWEEP = (1.0, 0.6, 0.2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pss-compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="methods:\n" + "\n".join(f"  {name:22s} {m.label}"
                                                                      for name, m in METHODS.items()))
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated names (see below), or 'all' (default: all but the {0.5, 1} PatchDropout "
                             "and the LR baselines)")
    parser.add_argument("--quick", action="store_true", help="CI smoke: a tiny model for 3 epochs, 3 sweep rates")
    parser.add_argument("--no-equal-time", dest="equal_time", action="store_false",
                        help="skip the baseline runs at each faster method's wall time (and running the baseline "
                             "when --methods leaves it out)")
    parser.add_argument("--data", choices=("digits", "synthetic", "folder"),
                        help="default: folder with --data-dir, else digits")
    parser.add_argument("--data-dir", help="ImageFolder root with train/ and val/ (implies --data folder)")
    for name in ("model", "embed_dim", "depth", "num_heads", "patch_size", "img_size", "epochs", "batch_size", "lr",
                 "warmup_epochs", "drop_path", "workers"):
        kind = {"model": str, "lr": float, "warmup_epochs": float, "drop_path": float}.get(name, int)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help="shared by every run (default: the "
                            "CPU / GPU / quick settings in this file)")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="Budgeted Training's budget, a fraction of the FLOPs of --epochs at full size")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="the same seed for every run (default 0)")
    seeds.add_argument("--seeds", help="comma-separated seeds: the whole comparison once per seed (each in "
                                       "<out-dir>/seed<S>, <runs-dir>/seed<S>), then methods_seeds.md / .json / "
                                       "_sweep.png: mean ± std over the seeds (pss_kernels/seed_summary.py)")
    seeds.add_argument("--summarize", nargs="+", metavar="JSON",
                       help="only summarise these methods JSONs of earlier runs, one per seed, as --seeds does")
    parser.add_argument("--paired-with", metavar="METHOD",
                        help="with --seeds / --summarize: every method's top-1 minus METHOD's, seed by seed "
                             "(e.g. pss-fixed-magnitude for the allocation policies)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--keep-rates", default=None, help="sweep rates (default: 1.0, 0.9, ..., 0.2)")
    parser.add_argument("--train-args", default="", help="more pss-train flags for every run (one string)")
    parser.add_argument("--out-dir", help="table, JSON and plots (default: runs/methods on CPU, benchmarks/results "
                                          "on a GPU)")
    parser.add_argument("--runs-dir", help="per-run directories (default: runs/methods)")
    parser.add_argument("--threads", type=int, help="torch threads per run (OMP_NUM_THREADS; default: cores / jobs)")
    parser.add_argument("--jobs", type=int,
                        help="runs at a time (default: on CPU one per core up to 2, each on one thread, so each "
                             "run's wall time is its own core's; on a GPU 1)")
    parser.add_argument("--in-process", action="store_true",
                        help="train and sweep in this process (tests; peak memory is then the process's)")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the shared settings: --quick, else GPU for a folder on CUDA, else CPU; flags given win."""
    import torch
    cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    if args.data is None:
        args.data = "folder" if args.data_dir else "digits"
    base = QUICK_SETTINGS if args.quick else (GPU_SETTINGS if cuda and args.data == "folder" else CPU_SETTINGS)
    for name, value in base.items():
        if name != "data" and getattr(args, name) is None:
            setattr(args, name, value)
    args.cuda = cuda
    if args.seed is None:  # None by default so that argparse sees any --seed beside --seeds
        args.seed = 0
    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"pss-compare: unknown methods {unknown}; known: {', '.join(METHODS)}")
    # The equal-time rows are measured against the full baseline: run it even when not asked for.
    args.equal_time = getattr(args, "equal_time", True)
    args.baseline_added = args.equal_time and "baseline" not in names and bool(names)
    args.method_names = ["baseline"] + names if args.baseline_added else names
    rates = QUICK_SWEEP if args.quick else SWEEP_RATES
    args.sweep_rates = [float(r) for r in args.keep_rates.split(",")] if args.keep_rates else list(rates)
    args.runs_dir = Path(args.runs_dir or Path("runs") / "methods")
    default_out = Path("benchmarks") / "results" if cuda else Path("runs") / "methods"
    args.out_dir = Path(args.out_dir or default_out)
    if args.jobs is None:
        args.jobs = 1 if cuda or args.in_process else max(1, min(2, os.cpu_count() or 1))
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    return args


def shared_flags(args) -> List[str]:
    flags = ["--data", args.data, "--model", args.model, "--seed", str(args.seed), "--device", args.device,
             "--eval-every", "0", "--no-progress"]
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    for name in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "epochs", "batch_size", "lr",
                 "warmup_epochs", "drop_path", "workers"):
        value = getattr(args, name)
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags + shlex.split(args.train_args)


def train_argv(name: str, args, run_dir: Optional[Path] = None) -> List[str]:
    """pss-train's flags for method `name`: the shared ones, then the method's (which win)."""
    return shared_flags(args) + METHODS[name].flags(args) + ["--out-dir", str(run_dir or args.runs_dir / name)]


def equal_time_epochs(epochs: int, method_wall: float, baseline_wall: float) -> Optional[int]:
    """The baseline's epoch count for the wall time `method_wall` of a method, given the full
    baseline's `baseline_wall` for `epochs` epochs: max(1, round(epochs * method_wall / baseline_wall)),
    or None when the method is not faster (ratio >= 1: the full baseline already is its equal-time
    row). Time per epoch is taken as constant, which holds for the baseline (every epoch is the same
    work; warm-up only changes the learning rate). At least one epoch, since a run needs one."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"equal_time_epochs: epochs must be an int >= 1, got {epochs!r}")
    if not baseline_wall > 0:
        raise ValueError(f"equal_time_epochs: baseline_wall must be > 0 s, got {baseline_wall!r}")
    if not method_wall >= 0:
        raise ValueError(f"equal_time_epochs: method_wall must be >= 0 s, got {method_wall!r}")
    ratio = method_wall / baseline_wall
    if ratio >= 1.0:
        return None
    return max(1, round(epochs * ratio))


def _run(module: str, argv: List[str], args, log_path: Path) -> None:
    if args.in_process:
        import importlib
        import torch
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            entry = "pss_kernels.train.__main__" if module == "pss_kernels.train" else module
            status = importlib.import_module(entry).main(argv)
        finally:
            torch.set_num_threads(threads)
        if status:
            raise RuntimeError(f"{module} {' '.join(argv)} exited with {status}")
        return
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": path}
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, "-m", module, *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"{module} exited with {result.returncode}; the end of {log_path}:\n{tail}")


def collect(name: str, run_dir: Path) -> dict:
    """One method's row from its run directory: summary.json, log.jsonl, eval/sweep.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    train = [r for r in records if r["type"] == "train"]
    flops = [r.get("flops") for r in train]
    sweep = json.loads((run_dir / "eval" / "sweep.json").read_text())["results"]
    return {
        "method": name, "label": METHODS[name].label, "family": METHODS[name].family,
        "flags": [],  # filled by the caller
        "steps": len(train), "wall_s": summary["wall_s"],
        # A packed run's steps record what their images kept (packed_tokens), not round(rho N).
        "mean_tokens": sum(r.get("packed_tokens", r["tokens"]) for r in train) / len(train),
        "mean_block_tokens": sum(r.get("block_tokens", r["tokens"]) for r in train) / len(train),
        "train_flops": None if any(f is None for f in flops) else float(sum(flops)),
        "peak_mem_mb": summary["peak_mem_mb"], "peak_mem_source": summary["peak_mem_source"],
        "top1": summary["final_eval"]["top1"], "top5": summary["final_eval"]["top5"],
        "sweep": [{"keep_rate": s["keep_rate"], "tokens": s["tokens"], "top1": s["top1"],
                   "images_per_s": s["images_per_s"]} for s in sweep],
        "methods": summary.get("methods"), "schedule": summary["schedule"],
        "projected_saving": summary["timing"]["saving"],
    }


def run_method(name: str, args, index: int, total: int, epochs: Optional[int] = None) -> dict:
    """Train and sweep method `name`; with `epochs`, for that many epochs instead of --epochs, in
    its own directory <name>-<epochs>ep and as the row of that name (the equal-time baselines)."""
    run_dir = args.runs_dir / (name if epochs is None else f"{name}-{epochs}ep")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("checkpoint.pt", "log.jsonl", "summary.json"):  # a rerun starts afresh
        (run_dir / stale).unlink(missing_ok=True)
    if epochs is not None:
        args = argparse.Namespace(**{**vars(args), "epochs": epochs})
    argv = train_argv(name, args, run_dir)
    start = time.perf_counter()
    _run("pss_kernels.train", argv, args, run_dir / "train.out")
    _run("pss_kernels.evaluate", ["--checkpoint", str(run_dir / "checkpoint.pt"), "--out-dir", str(run_dir / "eval"),
                                  "--num-pictures", "0", "--workers", "0", "--device", args.device,
                                  "--keep-rates", ",".join(str(r) for r in args.sweep_rates)],
         args, run_dir / "evaluate.out")
    row = collect(name, run_dir)
    row["flags"] = METHODS[name].flags(args)
    row["total_s"] = time.perf_counter() - start
    if epochs is not None:
        row["method"], row["epochs"] = run_dir.name, epochs
    tflop = "n/a" if row["train_flops"] is None else f"{row['train_flops'] / 1e9:,.0f} GFLOP"
    print(f"[{index}/{total}] {row['method']:22s} {row['wall_s']:7.1f} s  top-1 {row['top1']:5.1f} %  "
          f"tokens {row['mean_tokens']:5.1f} (blocks {row['mean_block_tokens']:5.1f})  {tflop}  "
          f"{row['steps']} steps", flush=True)
    return row


def run_all(runs: Sequence[tuple], args) -> List[dict]:
    """run_method over (name, index, total, epochs) tuples, --jobs at a time; rows in the given order."""
    def one(name, index, total, epochs):
        # Method runs keep the 4-argument call: a stand-in run_method (tests) need not take epochs.
        if epochs is None:
            return run_method(name, args, index, total)
        return run_method(name, args, index, total, epochs=epochs)
    if args.jobs > 1 and not args.in_process and len(runs) > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(one, *run) for run in runs]
            return [future.result() for future in futures]
    return [one(*run) for run in runs]


def equal_time_plan(rows: Sequence[dict], epochs: int) -> Dict[int, List[str]]:
    """Epoch count -> the methods whose equal-time baseline it is, for every method faster than the
    full baseline (rows must hold it). Keyed by epoch count because that is the cache: methods whose
    times round to the same count share one run (same flags and seed: the same run)."""
    baseline = next((r for r in rows if r["method"] == "baseline"), None)
    if baseline is None:
        raise ValueError("equal_time_plan: rows hold no 'baseline' row; the equal-time rows are scaled from its "
                         "wall time")
    plan: Dict[int, List[str]] = {}
    for row in rows:
        if row["method"] != "baseline":
            count = equal_time_epochs(epochs, row["wall_s"], baseline["wall_s"])
            if count is not None:
                plan.setdefault(count, []).append(row["method"])
    return plan


def attach_equal_time(rows: Sequence[dict], plan: Dict[int, List[str]], runs: Dict[int, dict]) -> List[dict]:
    """Give each method row its equal-time baseline (`equal_time_baseline`: epochs, wall_s, top1 and
    the run's name; `beats_equal_time_baseline`: strictly higher top-1, since a tie buys nothing for
    the method's extra machinery) and label the runs; None for rows without one (the baseline, methods
    not faster than it). `runs` maps each epoch count of `plan` to its row; a count equal to --epochs
    maps to the full baseline, which is then not run twice. Returns the extra runs' rows, longest first."""
    for row in rows:
        row["equal_time_baseline"], row["beats_equal_time_baseline"] = None, None
    by_name = {row["method"]: row for row in rows}
    extra = []
    for count in sorted(plan, reverse=True):
        run = runs[count]
        if run["method"] != "baseline":
            run.update(label=f"baseline @ equal time of {', '.join(plan[count])} ({count} epochs)",
                       family="baseline-equal-time", equal_time_of=list(plan[count]))
            extra.append(run)
        for name in plan[count]:
            by_name[name]["equal_time_baseline"] = {"epochs": count, "wall_s": run["wall_s"], "top1": run["top1"],
                                                    "run": run["method"]}
            by_name[name]["beats_equal_time_baseline"] = by_name[name]["top1"] > run["top1"]
    return extra


def equal_time_lines(rows: Sequence[dict]) -> List[str]:
    """One verdict per method with an equal-time baseline: does it beat the baseline given its time?"""
    lines = []
    for row in rows:
        other = row.get("equal_time_baseline")
        if other:
            verdict = "beats" if row["beats_equal_time_baseline"] else "loses to"
            lines.append(f"{row['method']}: {row['top1']:.1f} % in {row['wall_s']:.1f} s {verdict} the baseline at "
                         f"equal time ({other['epochs']} epochs, {other['wall_s']:.1f} s): {other['top1']:.1f} % "
                         f"({row['top1'] - other['top1']:+.1f})")
    return lines


def magnitude_vs_random(rows: Sequence[dict]) -> List[dict]:
    by_name = {row["method"]: row for row in rows}
    pairs = []
    for schedule in ("fixed", "linear", "cyclic"):
        magnitude, random = by_name.get(f"pss-{schedule}-magnitude"), by_name.get(f"pss-{schedule}-random")
        if magnitude and random:
            pairs.append({"schedule": schedule, "magnitude_top1": magnitude["top1"], "random_top1": random["top1"],
                          "random_minus_magnitude": random["top1"] - magnitude["top1"]})
    return pairs


def table(rows: Sequence[dict], sweep_rates: Sequence[float], equal_time_rows: Sequence[dict] = ()) -> str:
    """The Markdown table; the equal-time baseline runs sit right after the full baseline (or first),
    and each method's top-1 minus its equal-time baseline's is a column."""
    baseline = next((r for r in rows if r["method"] == "baseline"), None)
    at = rows.index(baseline) + 1 if baseline is not None else 0
    shown = [r for r in sweep_rates if r < 1.0][:4]
    head = ("| method | wall s | tokens / step | tokens / block | train GFLOP | vs baseline | peak MiB | top-1 "
            "@ rho 1 | vs equal-time baseline | " + " | ".join(f"@ {r:g}" for r in shown) + " |")
    lines = [head, "|" + "---|" * (9 + len(shown))]
    for row in list(rows[:at]) + list(equal_time_rows) + list(rows[at:]):
        flops = "n/a" if row["train_flops"] is None else f"{row['train_flops'] / 1e9:,.0f}"
        ratio = ("" if baseline is None or not row["train_flops"] or not baseline["train_flops"]
                 else f"{row['train_flops'] / baseline['train_flops']:.2f}x")
        sweep = {s["keep_rate"]: s["top1"] for s in row["sweep"]}
        memory = "n/a" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f}"
        name = row["label"] if row["family"] == "baseline-equal-time" else row["method"]
        other = row.get("equal_time_baseline")
        versus = f"{row['top1'] - other['top1']:+.1f} ({other['epochs']} ep)" if other else ""
        lines.append(f"| {name} | {row['wall_s']:.1f} | {row['mean_tokens']:.1f} | "
                     f"{row['mean_block_tokens']:.1f} | {flops} | {ratio} | {memory} | {row['top1']:.1f} | {versus} | "
                     + " | ".join(f"{sweep[r]:.1f}" if r in sweep else "" for r in shown) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], out_time: Path, out_sweep: Path, title: str,
         equal_time_rows: Sequence[dict] = ()) -> None:
    """The time plot holds the equal-time baselines too (hollow stars on a dashed line through the
    full baseline: the baseline's accuracy for each time, which a method must lie above)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"baseline": "*", "baseline-equal-time": "*", "pss": "o", "pss-allocation": "P", "patchdropout": "s",
               "tri-level": "^", "budgeted": "D"}
    unknown = sorted({row["family"] for row in rows} - set(markers))
    if unknown:
        raise ValueError(f"pss-compare: no plot marker for the method families {unknown}")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    curve = sorted([r for r in rows if r["method"] == "baseline"] + list(equal_time_rows), key=lambda r: r["wall_s"])
    if len(curve) > 1:
        ax.plot([r["wall_s"] for r in curve], [r["top1"] for r in curve], "--", color="grey", lw=1,
                label="baseline at fewer epochs (equal time)")
        ax.legend(fontsize=7)
    for row in list(rows) + list(equal_time_rows):
        hollow = row["method"].endswith("-random") or row["family"] == "baseline-equal-time"
        ax.scatter(row["wall_s"], row["top1"], marker=markers[row["family"]], s=70,
                   facecolors="none" if hollow else None, edgecolors="C0" if hollow else None)
        ax.annotate(row["method"], (row["wall_s"], row["top1"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.set(xlabel="training wall time (s)", ylabel="top-1 at rho = 1 (%)",
           title=f"accuracy against training time ({title})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_time, dpi=120)
    plt.close(fig)

    # One colour per method, shared by the magnitude (solid) and random (dashed) runs of a PSS schedule.
    colours, palette = {}, list(plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2])
    for row in rows:
        colours.setdefault(row["method"].rsplit("-", 1)[0] if row["family"] == "pss" else row["method"],
                           palette[len(colours) % len(palette)])
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in rows:
        sweep = sorted(row["sweep"], key=lambda s: s["keep_rate"])
        style = "--" if row["method"].endswith("-random") else "-"
        colour = colours[row["method"].rsplit("-", 1)[0] if row["family"] == "pss" else row["method"]]
        ax.plot([s["keep_rate"] for s in sweep], [s["top1"] for s in sweep], style,
                marker=markers[row["family"]], ms=4, label=row["method"], color=colour)
    ax.set(xlabel="inference keep rate rho", ylabel="top-1 (%)", title=f"dynamic inference ({title})")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_sweep, dpi=120)
    plt.close(fig)


def environment(args) -> dict:
    import torch
    device = torch.cuda.get_device_name(0) if args.cuda else (platform.processor() or "cpu")
    return {"device": device, "cpu_count": os.cpu_count(), "threads_per_run": args.threads, "jobs": args.jobs,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


def equal_time_runs(rows: List[dict], args) -> List[dict]:
    """Run the baseline once per distinct equal-time epoch count (after all methods, whose wall
    times set the counts), attach the results to the method rows and return the new rows."""
    if not any(row["method"] == "baseline" for row in rows):
        raise ValueError("pss-compare: the equal-time rows need the baseline in --methods (or --no-equal-time)")
    plan = equal_time_plan(rows, args.epochs)
    baseline = next(row for row in rows if row["method"] == "baseline")
    counts = [count for count in sorted(plan, reverse=True) if count != args.epochs]
    if not plan and len(rows) > 1:
        print("pss-compare: no method trained faster than the baseline: no equal-time rows", flush=True)
    elif plan:
        print("pss-compare: the baseline at equal time: " + "; ".join(
            f"{count} epochs for {', '.join(plan[count])}" + (" (the full baseline)" if count == args.epochs else "")
            for count in sorted(plan, reverse=True)), flush=True)
    first, total = len(rows) + 1, len(rows) + len(counts)
    runs = run_all([("baseline", first + i, total, count) for i, count in enumerate(counts)], args)
    return attach_equal_time(rows, plan, {args.epochs: baseline, **dict(zip(counts, runs))})


def _stem(prefix: str, args, env: dict) -> str:
    """GPU results are committed under benchmarks/results: one file per device and date."""
    return prefix if args.quick or not args.cuda else f"{prefix}-{env['device'].replace(' ', '_')}-{env['date']}"


def run(args: argparse.Namespace) -> dict:
    args = resolve(args)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    names = args.method_names
    print(f"pss-compare: {len(names)} methods on {args.data} ({args.model}, {args.epochs} epochs, batch "
          f"{args.batch_size}, seed {args.seed}); runs in {args.runs_dir}", flush=True)
    if args.baseline_added:
        print("pss-compare: baseline added to --methods: the equal-time rows are scaled from its wall time "
              "(--no-equal-time skips both)", flush=True)
    start = time.perf_counter()
    rows = run_all([(name, i + 1, len(names), None) for i, name in enumerate(names)], args)
    extra: List[dict] = []
    if args.equal_time:
        extra = equal_time_runs(rows, args)
    else:
        for row in rows:
            row["equal_time_baseline"], row["beats_equal_time_baseline"] = None, None
    env = environment(args)
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "environment": env, "total_s": time.perf_counter() - start, "results": rows,
              "equal_time_baselines": extra, "magnitude_vs_random": magnitude_vs_random(rows)}
    stem = _stem("methods", args, env)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = table(rows, args.sweep_rates, extra)
    pairs = "\n".join(equal_time_lines(rows) + [
        f"PSS {p['schedule']}: magnitude {p['magnitude_top1']:.1f} %, random {p['random_top1']:.1f} % "
        f"(random - magnitude {p['random_minus_magnitude']:+.1f})" for p in report["magnitude_vs_random"]])
    header = (f"{args.model} on {args.data}, {args.epochs} epochs, seed {args.seed}, {env['device']}, "
              f"{args.threads} thread(s) per run, {args.jobs} at a time; total {report['total_s'] / 60:.1f} min")
    (args.out_dir / f"{stem}.md").write_text(f"{header}\n\n{text}\n\n{pairs}\n")
    plot(rows, args.out_dir / f"{stem}_time.png", args.out_dir / f"{stem}_sweep.png", f"{args.model}, {args.data}",
         extra)
    print(text)
    if pairs:
        print(pairs)
    print(f"pss-compare: {header}\nwrote {args.out_dir / stem}.json, .md, _time.png, _sweep.png", flush=True)
    return report


def parse_seeds(text: str) -> List[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise seed_summary.SummaryInputError(f"--seeds: expected comma-separated integers, got {text!r}") from err
    if not seeds or len(set(seeds)) != len(seeds):
        raise seed_summary.SummaryInputError(f"--seeds: expected distinct comma-separated integers, got {text!r}")
    return seeds


def _write_summary(summary: dict, out_dir: Path, stem: str) -> None:
    print(seed_summary.write(summary, out_dir, stem))
    print(f"pss-compare: wrote {out_dir / stem}.json, .md, _sweep.png", flush=True)


def run_seeds(args: argparse.Namespace) -> dict:
    """The comparison once per seed of --seeds, then their summary (seed_summary.py)."""
    seeds = parse_seeds(args.seeds)
    base = resolve(argparse.Namespace(**vars(args)))
    if args.paired_with is not None and args.paired_with not in base.method_names:
        raise seed_summary.SummaryInputError(f"--paired-with: {args.paired_with!r} is not one of the compared methods "
                                             f"{base.method_names}")
    reports = []
    for i, seed in enumerate(seeds):
        print(f"pss-compare: seed {seed} ({i + 1} of {len(seeds)})", flush=True)
        one = {**vars(args), "seed": seed, "out_dir": str(base.out_dir / f"seed{seed}"),
               "runs_dir": str(base.runs_dir / f"seed{seed}")}
        reports.append(run(argparse.Namespace(**one)))
    summary = seed_summary.summarize(reports, args.paired_with)
    stem = _stem("methods_seeds", base, reports[0]["environment"])
    _write_summary(summary, base.out_dir, stem)
    return summary


# What --summarize does not read: it summarises finished runs, whose settings are in their JSONs.
SUMMARIZE_OPTIONS = frozenset({"summarize", "paired_with", "out_dir"})


def summarize_files(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    ignored = sorted("--" + name.replace("_", "-") for name, value in vars(args).items()
                     if name not in SUMMARIZE_OPTIONS and value != parser.get_default(name))
    if ignored:
        raise seed_summary.SummaryInputError(f"--summarize reads finished runs, so {', '.join(ignored)} would be "
                                             "ignored: leave them out")
    reports = seed_summary.load_reports(args.summarize)
    summary = seed_summary.summarize(reports, args.paired_with)
    # Where and under which name --seeds would have written it: benchmarks/results for GPU runs.
    settings = reports[0]["settings"]
    run_args = argparse.Namespace(quick=settings.get("quick", False), cuda=settings.get("cuda", False))
    out_dir = Path(args.out_dir or (Path("benchmarks") / "results" if run_args.cuda else Path("runs") / "methods"))
    stem = _stem("methods_seeds", run_args, reports[0].get("environment") or {})
    _write_summary(summary, out_dir, stem)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.summarize:
            summarize_files(args, parser)
        elif args.seeds is not None:
            run_seeds(args)
        elif args.paired_with is not None:
            parser.error("--paired-with needs --seeds or --summarize (several seeds to pair)")
        else:
            run(args)
    except seed_summary.SummaryInputError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
