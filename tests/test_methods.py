"""The method comparison harness (pss_kernels/compare.py, benchmarks/methods.py, pss-compare) in
its --quick mode: every requested method trains and is swept, the table / JSON / plots are written,
magnitude and random sampling of a PSS schedule are reported side by side."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pss_kernels import compare, seed_summary

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")

QUICK_METHODS = ["baseline", "pss-cyclic-magnitude", "pss-cyclic-random", "tri-level-all", "budgeted"]


def test_quick_mode_writes_the_table_json_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["--quick", "--in-process", "--threads", "1", "--methods", ",".join(QUICK_METHODS),
            "--out-dir", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")]
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "methods.json").read_text())
    rows = {row["method"]: row for row in report["results"]}
    assert list(rows) == QUICK_METHODS
    for name, row in rows.items():
        assert f"] {name} " in printed  # a progress line per run
        assert row["steps"] > 0 and row["wall_s"] > 0 and row["train_flops"] > 0 and row["mean_tokens"] > 0
        assert [s["keep_rate"] for s in row["sweep"]] == list(compare.QUICK_SWEEP)
        assert row["sweep"][0]["top1"] == row["top1"]  # rho = 1 of the sweep is the trainer's evaluation
    # What each method changes shows in the figures: fewer tokens, fewer steps, less compute.
    base = rows["baseline"]
    assert rows["pss-cyclic-random"]["mean_tokens"] < base["mean_tokens"]
    assert rows["tri-level-all"]["steps"] < base["steps"]  # the example subset
    assert rows["budgeted"]["train_flops"] < 0.6 * base["train_flops"]
    assert report["magnitude_vs_random"] == [{
        "schedule": "cyclic", "magnitude_top1": rows["pss-cyclic-magnitude"]["top1"],
        "random_top1": rows["pss-cyclic-random"]["top1"],
        "random_minus_magnitude": rows["pss-cyclic-random"]["top1"] - rows["pss-cyclic-magnitude"]["top1"]}]
    # The equal-time baselines: which counts run depends on the measured times, so checked against the rule.
    plan = compare.equal_time_plan(report["results"], compare.QUICK_SETTINGS["epochs"])
    extra = {row["epochs"]: row for row in report["equal_time_baselines"]}
    assert set(extra) == set(plan) - {compare.QUICK_SETTINGS["epochs"]}  # one run per count, none at full length
    for epochs, names in plan.items():
        for name in names:
            other = rows[name]["equal_time_baseline"]
            assert other["epochs"] == epochs and rows[name]["beats_equal_time_baseline"] == (rows[name]["top1"]
                                                                                            > other["top1"])
    for epochs, row in extra.items():
        assert row["steps"] * compare.QUICK_SETTINGS["epochs"] == epochs * base["steps"]
        assert (tmp_path / "runs" / f"baseline-{epochs}ep" / "summary.json").exists()
    table = (tmp_path / "out" / "methods.md").read_text()
    assert all(f"| {name} |" in table for name in QUICK_METHODS) and "PSS cyclic: magnitude" in table
    assert all(f"| {row['label']} |" in table for row in extra.values())
    for plot in ("methods_time.png", "methods_sweep.png"):
        assert (tmp_path / "out" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_flags_and_the_script():
    args = compare.resolve(compare.build_parser().parse_args(["--methods", "all", "--epochs", "20"]))
    assert args.method_names == list(compare.METHODS) and args.data == "digits" and args.patch_size == 4
    assert compare.train_argv("tri-level-example", args)[-6:-2] == ["--example-keep", "0.8", "--filter-every", "2"]
    assert "--budget" in compare.train_argv("budgeted", args)
    assert compare.METHODS["budget-lr-rex"].flags(args) == ["--schedule", "none", "--epochs", "10", "--lr-schedule",
                                                            "rex"]
    with pytest.raises(SystemExit, match="unknown methods"):
        compare.resolve(compare.build_parser().parse_args(["--methods", "baseline,nope"]))
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "methods.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "pss-compare" in result.stdout and "tri-level-all" in result.stdout


def test_equal_time_epochs_scales_the_baseline_by_the_time_ratio():
    # The README's 15-epoch digits figures: PSS at 71 % of the baseline's time -> the baseline at 11 epochs.
    assert compare.equal_time_epochs(15, 71.0, 100.0) == 11
    assert compare.equal_time_epochs(10, 34.2, 59.8) == 6  # round(5.72)
    assert compare.equal_time_epochs(10, 57.0, 59.8) == 10  # round(9.53): the full baseline is the row
    assert compare.equal_time_epochs(10, 59.8, 59.8) is None  # ratio >= 1: no row
    assert compare.equal_time_epochs(10, 70.0, 59.8) is None
    assert compare.equal_time_epochs(10, 0.1, 100.0) == 1  # a run needs one epoch
    assert compare.equal_time_epochs(10, 0.0, 100.0) == 1
    with pytest.raises(ValueError, match="epochs must be"):
        compare.equal_time_epochs(0, 1.0, 2.0)
    with pytest.raises(ValueError, match="baseline_wall"):
        compare.equal_time_epochs(10, 1.0, 0.0)
    with pytest.raises(ValueError, match="method_wall"):
        compare.equal_time_epochs(10, -1.0, 2.0)
    with pytest.raises(ValueError, match="no 'baseline' row"):
        compare.equal_time_plan([{"method": "pss-fixed-random", "wall_s": 1.0}], 10)


# Fake runs (no training): wall time and top-1 per method; the baseline at E epochs takes 10 s per epoch.
FAKE = {"baseline": (100.0, 80.0), "pss-fixed-random": (60.0, 70.0), "pss-cyclic-random": (64.0, 75.0),
        "tri-level-token": (96.0, 85.0), "tri-level-attention": (120.0, 90.0)}
FAKE_BASELINE_TOP1 = {6: 72.0}


def _fake_runs(monkeypatch):
    calls = []

    def fake_run_method(name, args, index, total, epochs=None):
        calls.append((name, epochs))
        wall, top1 = (10.0 * epochs, FAKE_BASELINE_TOP1[epochs]) if epochs else FAKE[name]
        return {"method": name if epochs is None else f"{name}-{epochs}ep", "label": compare.METHODS[name].label,
                "family": compare.METHODS[name].family, "wall_s": wall, "top1": top1, "mean_tokens": 65.0,
                "mean_block_tokens": 65.0, "train_flops": 1e9 * wall, "peak_mem_mb": None,
                "sweep": [{"keep_rate": 1.0, "top1": top1}], **({"epochs": epochs} if epochs else {})}

    monkeypatch.setattr(compare, "run_method", fake_run_method)
    return calls


def _compare(tmp_path, methods, *extra):
    argv = ["--epochs", "10", "--jobs", "1", "--methods", methods, "--out-dir", str(tmp_path / "out"),
            "--runs-dir", str(tmp_path / "runs"), *extra]
    assert compare.main(argv) == 0
    report = json.loads((tmp_path / "out" / "methods.json").read_text())
    return report, (tmp_path / "out" / "methods.md").read_text()


def test_equal_time_baselines_cached_by_epoch_count_in_json_and_table(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    calls = _fake_runs(monkeypatch)
    report, table = _compare(tmp_path, ",".join(FAKE))
    # pss-fixed-random (0.60) and pss-cyclic-random (0.64) both round to 6 epochs: one run; tri-level-token
    # (0.96 -> 10 epochs) is the full baseline itself; tri-level-attention is slower: no row.
    assert calls == [(name, None) for name in FAKE] + [("baseline", 6)]
    rows = {row["method"]: row for row in report["results"]}
    six = {"epochs": 6, "wall_s": 60.0, "top1": 72.0, "run": "baseline-6ep"}
    assert rows["pss-fixed-random"]["equal_time_baseline"] == six
    assert rows["pss-fixed-random"]["beats_equal_time_baseline"] is False  # 70 < 72
    assert rows["pss-cyclic-random"]["equal_time_baseline"] == six
    assert rows["pss-cyclic-random"]["beats_equal_time_baseline"] is True  # 75 > 72
    assert rows["tri-level-token"]["equal_time_baseline"] == {"epochs": 10, "wall_s": 100.0, "top1": 80.0,
                                                              "run": "baseline"}
    assert rows["tri-level-token"]["beats_equal_time_baseline"] is True
    for name in ("baseline", "tri-level-attention"):
        assert rows[name]["equal_time_baseline"] is None and rows[name]["beats_equal_time_baseline"] is None
    [extra] = report["equal_time_baselines"]
    assert extra["method"] == "baseline-6ep" and extra["family"] == "baseline-equal-time" and extra["epochs"] == 6
    assert extra["label"] == "baseline @ equal time of pss-fixed-random, pss-cyclic-random (6 epochs)"
    assert extra["equal_time_of"] == ["pss-fixed-random", "pss-cyclic-random"]
    # The table: the equal-time row right after the full baseline, each method's difference to its row.
    lines = table.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| baseline |"))
    assert lines[at + 1].startswith(f"| {extra['label']} | 60.0 |")
    assert "| 70.0 | -2.0 (6 ep) |" in next(line for line in lines if line.startswith("| pss-fixed-random |"))
    assert "| 75.0 | +3.0 (6 ep) |" in next(line for line in lines if line.startswith("| pss-cyclic-random |"))
    assert "| 85.0 | +5.0 (10 ep) |" in next(line for line in lines if line.startswith("| tri-level-token |"))
    assert "| 90.0 |  |" in next(line for line in lines if line.startswith("| tri-level-attention |"))
    assert ("pss-fixed-random: 70.0 % in 60.0 s loses to the baseline at equal time (6 epochs, 60.0 s): 72.0 % "
            "(-2.0)") in table
    assert "pss-cyclic-random: 75.0 % in 64.0 s beats the baseline at equal time" in table
    assert "the baseline at equal time: 10 epochs for tri-level-token (the full baseline); 6 epochs for " \
           "pss-fixed-random, pss-cyclic-random" in capsys.readouterr().out
    assert (tmp_path / "out" / "methods_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_equal_time_adds_the_baseline_and_no_equal_time_skips_it(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    calls = _fake_runs(monkeypatch)
    report, table = _compare(tmp_path / "a", "pss-fixed-random")
    assert calls == [("baseline", None), ("pss-fixed-random", None), ("baseline", 6)]
    assert report["settings"]["baseline_added"] is True
    assert "baseline added to --methods" in capsys.readouterr().out
    assert [row["method"] for row in report["results"]] == ["baseline", "pss-fixed-random"]
    assert report["results"][1]["equal_time_baseline"]["epochs"] == 6

    calls.clear()
    report, table = _compare(tmp_path / "b", "pss-fixed-random,pss-cyclic-random", "--no-equal-time")
    assert calls == [("pss-fixed-random", None), ("pss-cyclic-random", None)]  # no baseline, no reruns
    assert report["settings"]["equal_time"] is False and report["settings"]["baseline_added"] is False
    assert report["equal_time_baselines"] == []
    assert all(row["equal_time_baseline"] is None and row["beats_equal_time_baseline"] is None
               for row in report["results"])
    assert "equal time" not in table and "baseline added" not in capsys.readouterr().out

    calls.clear()
    report, table = _compare(tmp_path / "c", ",".join(FAKE), "--no-equal-time")
    assert calls == [(name, None) for name in FAKE] and report["equal_time_baselines"] == []


def test_every_method_family_has_a_plot_marker(tmp_path):
    """A method added to METHODS must be plottable: the plot keys its marker by family."""
    pytest.importorskip("matplotlib")
    rows = [{"method": name, "label": m.label, "family": m.family, "wall_s": 1.0 + i, "top1": 50.0,
             "sweep": [{"keep_rate": 1.0, "tokens": 17, "top1": 50.0}], "equal_time_baseline": None,
             "beats_equal_time_baseline": None}
            for i, (name, m) in enumerate(compare.METHODS.items())]
    compare.plot(rows, tmp_path / "time.png", tmp_path / "sweep.png", "title")
    assert (tmp_path / "time.png").stat().st_size > 0


# Several seeds (pss_kernels/seed_summary.py): top-1 per (method, seed) and the sweep at 0.6 below it.
SEED_TOP1 = {"baseline": {0: 80.0, 1: 84.0, 2: 82.0}, "pss-fixed-random": {0: 70.0, 1: 76.0, 2: 73.0},
             "pss-cyclic-random": {0: 72.0, 1: 74.0, 2: 76.0}}


def _fake_seed_runs(monkeypatch):
    calls = []

    def fake_run_method(name, args, index, total, epochs=None):
        calls.append((name, args.seed, epochs, str(args.runs_dir)))
        top1 = SEED_TOP1[name][args.seed] if epochs is None else 71.0 + args.seed  # the baseline at 6 epochs
        # In seed 2 the cyclic run is slower than the baseline: no equal-time run, the full baseline is its row.
        slow = name == "pss-cyclic-random" and args.seed == 2
        wall = ({"baseline": 100.0, "pss-fixed-random": 60.0, "pss-cyclic-random": 110.0 if slow else 62.0}[name]
                if epochs is None else 10.0 * epochs)
        return {"method": name if epochs is None else f"{name}-{epochs}ep", "label": compare.METHODS[name].label,
                "family": compare.METHODS[name].family, "wall_s": wall, "top1": top1, "mean_tokens": 39.0,
                "mean_block_tokens": 39.0, "train_flops": 1e9, "peak_mem_mb": None,
                "sweep": [{"keep_rate": 1.0, "top1": top1}, {"keep_rate": 0.6, "top1": top1 - 10.0 * args.seed}],
                **({"epochs": epochs} if epochs else {})}

    monkeypatch.setattr(compare, "run_method", fake_run_method)
    return calls


def test_seeds_run_the_comparison_per_seed_and_summarize_mean_std_and_paired_differences(tmp_path, monkeypatch,
                                                                                         capsys):
    pytest.importorskip("matplotlib")
    calls = _fake_seed_runs(monkeypatch)
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--epochs", "10", "--jobs", "1", "--methods", "baseline,pss-fixed-random,pss-cyclic-random",
            "--keep-rates", "1.0,0.6", "--seeds", "0,1,2", "--paired-with", "pss-fixed-random",
            "--out-dir", str(out), "--runs-dir", str(runs)]
    assert compare.main(argv) == 0
    # Each seed is a whole comparison of its own, in its own directories, with the seed passed to every run.
    for seed in (0, 1, 2):
        assert [c[:3] for c in calls if c[1] == seed] == [("baseline", seed, None), ("pss-fixed-random", seed, None),
                                                          ("pss-cyclic-random", seed, None), ("baseline", seed, 6)]
        assert {c[3] for c in calls if c[1] == seed} == {str(runs / f"seed{seed}")}
        assert json.loads((out / f"seed{seed}" / "methods.json").read_text())["settings"]["seed"] == seed
    summary = json.loads((out / "methods_seeds.json").read_text())
    assert summary["seeds"] == [0, 1, 2] and summary["paired_with"] == "pss-fixed-random"
    methods = {m["method"]: m for m in summary["methods"]}
    fixed = methods["pss-fixed-random"]
    assert fixed["top1"]["values"] == [70.0, 76.0, 73.0] and fixed["top1"]["mean"] == pytest.approx(73.0)
    assert fixed["top1"]["std"] == pytest.approx(3.0)  # the sample std of 70, 76, 73
    assert [s["mean"] for s in fixed["sweep"]] == pytest.approx([73.0, 63.0])  # 70, 66, 53 at rho 0.6
    # Against the equal-time baseline (71, 72, 73 at 6 epochs): fixed 70 / 76 / 73 beats it in one seed (a tie
    # is no win).
    assert fixed["equal_time"]["seeds"] == 3 and fixed["equal_time"]["beats"] == 1
    assert fixed["equal_time"]["top1_minus"]["values"] == [-1.0, 4.0, 0.0]
    assert methods["baseline"]["equal_time"] is None
    # cyclic 72 / 74 against 71 / 72 at 6 epochs, and in seed 2 (not faster) 76 against the full baseline's 82.
    assert methods["pss-cyclic-random"]["equal_time"]["top1_minus"]["values"] == [1.0, 2.0, -6.0]
    assert methods["pss-cyclic-random"]["equal_time"]["beats"] == 2
    paired = {p["method"]: {d["keep_rate"]: d for d in p["top1_minus"]} for p in summary["paired"]}
    assert set(paired) == {"baseline", "pss-cyclic-random"}
    cyclic = paired["pss-cyclic-random"][1.0]
    assert cyclic["values"] == [2.0, -2.0, 3.0] and cyclic["wins"] == 2 and cyclic["mean"] == pytest.approx(1.0)
    assert paired["baseline"][0.6]["values"] == [10.0, 8.0, 9.0] and paired["baseline"][0.6]["wins"] == 3
    table = (out / "methods_seeds.md").read_text()
    assert "| pss-fixed-random | 60.0 ± 0.0 | 39.0 | 73.0 ± 3.0 | 1 of 3 (+1.0) | 63.0 ± 8.9 |" in table
    assert "| pss-cyclic-random | +1.0 ± 2.6 (2/3) | " in table
    assert "| 74.0 ± 2.0 | 2 of 3 (-1.0) |" in table and "Warning" not in table
    assert (out / "methods_seeds_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "seed 2 (3 of 3)" in capsys.readouterr().out

    # --summarize reads the same per-seed files back into the same summary.
    again = tmp_path / "again"
    assert compare.main(["--summarize", *(str(out / f"seed{s}" / "methods.json") for s in (0, 1, 2)),
                         "--paired-with", "pss-fixed-random", "--out-dir", str(again)]) == 0
    reread = json.loads((again / "methods_seeds.json").read_text())
    assert reread["methods"] == summary["methods"] and reread["paired"] == summary["paired"]


def test_seed_summary_refuses_what_it_cannot_pair(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    _fake_seed_runs(monkeypatch)
    for seed in (0, 1):
        compare.main(["--epochs", "10", "--jobs", "1", "--methods", "baseline,pss-fixed-random", "--seed", str(seed),
                      "--keep-rates", "1.0,0.6", "--out-dir", str(tmp_path / f"s{seed}"), "--runs-dir",
                      str(tmp_path / "runs")])
    paths = [tmp_path / f"s{seed}" / "methods.json" for seed in (0, 1)]
    reports = seed_summary.load_reports(paths)
    with pytest.raises(seed_summary.SummaryInputError, match="different seed"):
        seed_summary.summarize([reports[0], reports[0]])
    with pytest.raises(seed_summary.SummaryInputError, match=r"differs from seed 0 in settings \['epochs'\]"):
        seed_summary.summarize([reports[0], {**reports[1], "settings": {**reports[1]["settings"], "epochs": 9}}])
    # What may differ: paths (one data copy per cluster job) and spellings of the same resolved settings.
    respelled = {**reports[1]["settings"], "data_dir": "/scratch/job1/data", "keep_rates": None, "device": "cpu",
                 "methods": "pss-fixed-random", "baseline_added": True}
    assert seed_summary.summarize([reports[0], {**reports[1], "settings": respelled}])["warnings"] == []
    # Another machine: summarised, with a warning that the wall times do not compare.
    elsewhere = {**reports[1], "environment": {**reports[1]["environment"], "device": "NVIDIA A100"}}
    [warning] = seed_summary.summarize([reports[0], elsewhere])["warnings"]
    assert "environment device differs" in warning and "NVIDIA A100" in warning
    with pytest.raises(seed_summary.SummaryInputError, match="ran methods"):
        seed_summary.summarize([reports[0], {**reports[1], "results": reports[1]["results"][:1]}])
    with pytest.raises(seed_summary.SummaryInputError, match="--paired-with: 'nope'"):
        seed_summary.summarize(reports, paired_with="nope")
    (tmp_path / "bad.json").write_text("{}")
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(SystemExit) as exit_info:
            compare.main(["--summarize", str(paths[0]), str(bad), "--out-dir", str(tmp_path / "x")])
        assert exit_info.value.code == 2 and str(bad) in capsys.readouterr().err
    # One seed: a mean without a spread, shown without "±".
    one = seed_summary.summarize(reports[:1])
    assert one["methods"][0]["top1"]["std"] is None and "| 80.0 |" in seed_summary.table(one)
    for argv, message in ((["--paired-with", "baseline"], "needs --seeds or --summarize"),
                          (["--seeds", "0,0"], "--seeds: expected distinct"),
                          (["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
                          (["--seeds", "0,1", "--seed", "3"], "not allowed with argument"),
                          (["--seed", "0", "--seeds", "1,2"], "not allowed with argument"),
                          (["--summarize", str(paths[0]), "--epochs", "5"], "so --epochs, --runs-dir would be ignored"),
                          (["--seeds", "0,1", "--methods", "baseline", "--paired-with", "budgeted"],
                           "--paired-with: 'budgeted' is not one of the compared methods")):
        with pytest.raises(SystemExit) as exit_info:
            compare.main(argv + ["--out-dir", str(tmp_path / "y"), "--runs-dir", str(tmp_path / "runs")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
