"""benchmarks/iter_time.py: projection math, timing statistics, target verdicts, the CLI end to end
(tiny CPU configuration) and its errors for bad flags. No timing is asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the benchmark scripts import their helpers as top-level modules

from _iter_time_report import evaluate_targets, format_timing_table, pss_speedups  # noqa: E402
from pss_kernels.train.timing import mean_iteration_time, project_run, steps_per_epoch, time_at  # noqa: E402
from _timing import TimingStats, time_iterations, time_samples  # noqa: E402

from pss_kernels.schedules import build_schedule  # noqa: E402


# ----------------------------------------------------------------------------- projection math

def test_mean_iteration_time_weights_times_by_shares():
    assert mean_iteration_time({0.2: 0.5, 1.0: 0.5}, {0.2: 1.0, 1.0: 3.0}) == (2.0, [])
    mean, interpolated = mean_iteration_time({0.2: 0.25, 0.6: 0.25, 1.0: 0.5}, {0.2: 4.0, 0.6: 8.0, 1.0: 12.0})
    assert mean == pytest.approx(0.25 * 4 + 0.25 * 8 + 0.5 * 12) and interpolated == []


def test_unmeasured_keep_rate_is_interpolated_between_neighbours():
    assert time_at(0.6, {0.4: 2.0, 0.8: 4.0, 1.0: 10.0}) == (pytest.approx(3.0), True)
    assert time_at(0.6000000000000001, {0.6: 7.0}) == (7.0, False)  # a schedule's float noise still matches
    mean, interpolated = mean_iteration_time({0.5: 1.0}, {0.2: 1.0, 1.0: 5.0})
    assert mean == pytest.approx(1.0 + (0.5 - 0.2) / 0.8 * 4.0) and interpolated == [0.5]


def test_projection_rejects_keep_rates_outside_the_measured_range_and_bad_shares():
    with pytest.raises(ValueError, match="outside the measured keep rates"):
        mean_iteration_time({0.2: 1.0}, {0.4: 1.0, 1.0: 2.0})
    with pytest.raises(ValueError, match="shares must sum to 1"):
        mean_iteration_time({0.2: 0.5, 1.0: 0.4}, {0.2: 1.0, 1.0: 2.0})


def test_project_run_hours_and_ratio_by_hand():
    assert steps_per_epoch(1_281_167, 128) == 10_010  # 10009.1 -> the last partial batch counts
    assert steps_per_epoch(1_281_167, 256) == 5_005
    # 36 ms mean over 100,000 steps = 3,600 s = 1 h; 10,000 steps per epoch = 0.1 h; baseline 48 ms.
    row = project_run({0.2: 0.5, 1.0: 0.5}, {0.2: 24.0, 1.0: 48.0}, 48.0, steps_per_epoch=10_000,
                      total_steps=100_000)
    assert row["mean_iteration_ms"] == pytest.approx(36.0)
    assert row["run_hours"] == pytest.approx(1.0) and row["epoch_hours"] == pytest.approx(0.1)
    assert row["ratio_vs_baseline"] == pytest.approx(0.75)
    # A budget schedule running half the steps against the full-length baseline.
    half = project_run({1.0: 1.0}, {1.0: 48.0}, 48.0, steps_per_epoch=10_000, total_steps=50_000,
                       baseline_steps=100_000)
    assert half["ratio_vs_baseline"] == pytest.approx(0.5)
    assert project_run({1.0: 1.0}, {1.0: 1.0}, None, steps_per_epoch=1, total_steps=1)["ratio_vs_baseline"] is None


def test_projection_with_the_papers_cyclic_shares():
    # With t(rho) = rho the mean iteration time is the schedule's mean keep rate: 0.2/9 + 2/9 (0.4+0.6+0.8+1.0).
    schedule = build_schedule("cyclic:0.2,1.0", total_steps=90_000, steps_per_epoch=9_000)
    rates = [0.2, 0.4, 0.6, 0.8, 1.0]
    mean, interpolated = mean_iteration_time(schedule.shares(), {rho: rho for rho in rates})
    assert interpolated == []
    assert mean == pytest.approx((0.2 + 2 * (0.4 + 0.6 + 0.8 + 1.0)) / 9, abs=1e-4)
    assert mean == pytest.approx(schedule.mean_keep_rate(), abs=1e-9)


# ----------------------------------------------------------------------------- timing statistics

def test_timing_stats_quartiles():
    stats = TimingStats.from_samples([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (stats.q1_ms, stats.median_ms, stats.q3_ms, stats.iters) == (2.0, 3.0, 4.0, 5)
    with pytest.raises(ValueError, match="samples_ms"):
        TimingStats.from_samples([])


def test_time_iterations_runs_warmup_then_timed_iterations():
    calls = []
    stats = time_iterations(lambda: calls.append(1), warmup=3, iters=4, device=torch.device("cpu"))
    assert len(calls) == 7 and stats.iters == 4 and stats.q1_ms <= stats.median_ms <= stats.q3_ms
    with pytest.raises(ValueError, match="iters"):
        time_iterations(lambda: None, warmup=0, iters=0, device=torch.device("cpu"))
    calls.clear()
    samples = time_samples(lambda: calls.append(1), warmup=1, iters=3, device=torch.device("cpu"))
    assert len(calls) == 4 and len(samples) == 3 and all(sample >= 0 for sample in samples)


# ----------------------------------------------------------------------------- target verdicts

def _result(impl, keep_rate, median_ms):
    return {"model": "vit_base", "impl": impl, "keep_rate": keep_rate, "median_ms": median_ms}


def test_targets_pass_and_miss_from_hand_made_results():
    report = {
        "config": {"models": ["vit_base"], "img_size": 224, "keep_rates": [1.0, 0.6, 0.2]},
        "results": [_result("baseline", 1.0, 100.0), _result("pss", 1.0, 104.0), _result("pss", 0.6, 50.0),
                    _result("pss", 0.2, 26.0), _result("published", 1.0, 120.0), _result("published", 0.6, 80.0),
                    _result("published", 0.2, 78.0), _result("eager-index", 1.0, 120.0),
                    _result("eager-index", 0.6, 60.0), _result("eager-index", 0.2, 52.0)],
        "projection": {"models": {"vit_base": {"schedules": [
            {"spec": "cyclic:0.2,1.0", "impls": {"pss": {"ratio_vs_baseline": 0.70}}}]}}},
    }
    verdicts = {t["name"]: (t["measured"], t["status"]) for t in evaluate_targets(report)}
    assert verdicts == {
        "ViT-B/224 pss: t(rho=0.2) / t(rho=1)": (pytest.approx(0.25), "PASS"),
        "ViT-B/224 pss rho=1 / plain-ViT baseline": (pytest.approx(1.04), "PASS"),
        "ViT-B/224 speed-up of pss over published at rho=0.6": (pytest.approx(1.6), "PASS"),
        "ViT-B/224 speed-up of pss over published at rho=0.2": (pytest.approx(3.0), "PASS"),
        "ViT-B/224 speed-up of pss over eager-index at rho=0.6": (pytest.approx(1.2), "MISS"),
        "ViT-B/224 speed-up of pss over eager-index at rho=0.2": (pytest.approx(2.0), "PASS"),
        "ViT-B/224 projected Cyclic(0.2, 1.0) run / baseline run (pss)": (pytest.approx(0.70), "MISS"),
    }
    report["results"] = [r for r in report["results"] if r["impl"] != "eager-index"]
    statuses = {t["name"]: t["status"] for t in evaluate_targets(report) if "over" in t["name"]}
    assert [status for name, status in statuses.items() if "eager-index" in name] == ["NOT MEASURED (eager-index or pss "
                                                                                      "not measured)"] * 2
    assert [status for name, status in statuses.items() if "published" in name] == ["PASS", "PASS"]
    report["config"]["img_size"] = 384
    assert evaluate_targets(report) == []


def test_targets_are_judged_only_on_the_targets_run():
    """The targets are the Triton kernels' under bf16 autocast: pss on another backend, or float32, gives
    NOT MEASURED with the reason, never PASS / MISS; so does a Cyclic projection that interpolated a rate."""
    results = [_result("baseline", 1.0, 100.0), dict(_result("pss", 1.0, 104.0), backends={"rpb_attention": "sdpa"}),
               _result("pss", 0.2, 26.0)]
    report = {"config": {"models": ["vit_base"], "img_size": 224, "keep_rates": [1.0, 0.2], "amp": "bf16 autocast"},
              "results": results,
              "projection": {"models": {"vit_base": {"schedules": [
                  {"spec": "cyclic:0.2,1.0", "impls": {"pss": {"ratio_vs_baseline": 0.60,
                                                               "interpolated_keep_rates": []}}}]}}}}
    statuses = [t["status"] for t in evaluate_targets(report)]
    assert statuses and all(s.startswith("NOT MEASURED (pss ran rpb_attention on sdpa") for s in statuses
                            if "not measured" not in s)
    results[1]["backends"] = {"rpb_attention": "triton"}
    report["config"]["amp"] = "float32"
    assert all("float32, not bf16 autocast" in t["status"] or "not measured" in t["status"]
               for t in evaluate_targets(report))
    report["config"]["amp"] = "bf16 autocast"
    verdicts = {t["name"]: t["status"] for t in evaluate_targets(report)}
    assert verdicts["ViT-B/224 pss: t(rho=0.2) / t(rho=1)"] == "PASS"
    assert verdicts["ViT-B/224 projected Cyclic(0.2, 1.0) run / baseline run (pss)"] == "PASS"
    report["projection"]["models"]["vit_base"]["schedules"][0]["impls"]["pss"]["interpolated_keep_rates"] = [0.6]
    verdicts = {t["name"]: t["status"] for t in evaluate_targets(report)}
    assert verdicts["ViT-B/224 projected Cyclic(0.2, 1.0) run / baseline run (pss)"] == (
        "NOT MEASURED (pss at rho [0.6] interpolated, not measured)")


# ----------------------------------------------------------------------------- CLI

def run_cli(out_dir: Path, *flags: str):
    """Run `python benchmarks/iter_time.py FLAGS --out-dir OUT_DIR`; (stdout, stderr, the JSON document)."""
    command = [sys.executable, str(BENCHMARKS / "iter_time.py"), *flags, "--out-dir", str(out_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=out_dir, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    json_files, png_files = list(out_dir.glob("iter_time_*.json")), list(out_dir.glob("iter_time_*.png"))
    assert len(json_files) == 1 and len(png_files) == 1 and png_files[0].stat().st_size > 10_000
    report = json.loads(json_files[0].read_text())
    assert report["plot"] == png_files[0].name
    return done.stdout, done.stderr, report


def test_cli_smoke_run_writes_json_and_png(tmp_path):
    from pss_kernels.ops.rpb_attention.peers import flex_training_unavailable

    stdout, stderr, report = run_cli(
        tmp_path, "--smoke", "--device", "cpu", "--models", "deit_tiny", "--img-size", "32", "--batch-size", "2",
        "--warmup", "1", "--iters", "2", "--keep-rates", "1.0,0.5", "--impls", "pss", "published", "eager-index",
        "flex", "pss-budget", "--schedules", "fixed:0.6", "cyclic:0.2,1.0", "--epochs", "3", "--dataset-images", "1000")
    flex_reason = flex_training_unavailable(torch.device("cpu"))
    impls = ["pss", "published", "eager-index"] + ([] if flex_reason else ["flex"]) + ["pss-budget"]
    assert "CPU smoke run" in stdout and f"[{1 + 2 * len(impls)}/{1 + 2 * len(impls)}]" in stderr
    assert {"benchmark", "run_kind", "label", "environment", "config", "implementations", "unavailable", "results",
            "errors", "projection", "targets", "plot"} <= set(report)
    assert report["run_kind"] == "cpu-smoke" and "CPU smoke run" in report["label"]
    assert report["targets"] == [] and report["errors"] == []
    assert {"device", "torch", "triton", "cuda", "date"} <= set(report["environment"])
    assert report["config"]["batch_sizes"] == {"deit_tiny": 2} and report["config"]["keep_rates"] == [1.0, 0.5]
    assert report["config"]["impls"] == impls and report["config"]["rounds"] == 2  # at most one per iteration
    if flex_reason:  # FlexAttention has no CPU backward in this torch: said once, with the reason, no error rows
        assert report["unavailable"] == {"flex": flex_reason}
        assert stdout.count("Not measured: flex") == 1 and stdout.count(flex_reason) == 1
        assert stderr.count(flex_reason) == 1
    else:
        assert report["unavailable"] == {}

    cases = {(r["impl"], r["keep_rate"]): r for r in report["results"]}
    assert set(cases) == {("baseline", 1.0)} | {(impl, rate) for impl in impls for rate in (1.0, 0.5)}
    baseline = cases[("baseline", 1.0)]["median_ms"]
    for (impl, keep_rate), case in cases.items():
        assert case["error"] is None and case["iters"] == 2 and case["rounds"] == 2
        assert case["q1_ms"] <= case["median_ms"] <= case["q3_ms"]
        assert case["ratio_vs_baseline"] == pytest.approx(case["median_ms"] / baseline)
        assert case["ratio_vs_rho1"] == pytest.approx(case["median_ms"] / cases[(impl, 1.0)]["median_ms"])
        # grid 2x2 + CLS; max(2, round(0.5 * 5)); budget: the batch's round(0.5 * 2 * 5) = 5 over 2 images
        assert case["tokens"] == (5 if keep_rate == 1.0 else 2.5 if impl == "pss-budget" else 2)
    assert cases[("pss", 0.5)]["backends"] == {"sample_patches": "torch", "rpb_attention": "sdpa"}
    assert cases[("pss", 1.0)]["backends"] == {"sample_patches": None, "rpb_attention": "sdpa"}
    assert cases[("pss-budget", 0.5)]["backends"] == {"sample_patches_varlen": "torch", "rpb_attention_varlen": "sdpa"}
    assert cases[("pss-budget", 1.0)]["backends"] == cases[("pss", 1.0)]["backends"]  # rho = 1: the dense path
    speedups = pss_speedups(report, "deit_tiny")
    assert set(speedups) == set(impls) - {"pss"}
    assert speedups["published"][0.5] == pytest.approx(cases[("published", 0.5)]["median_ms"]
                                                       / cases[("pss", 0.5)]["median_ms"])
    assert "over published" in stdout and "over eager-index" in stdout and "over pss-budget" in stdout

    block = report["projection"]["models"]["deit_tiny"]
    assert report["projection"]["epochs"] == 3 and block["steps_per_epoch"] == 500 and block["total_steps"] == 1500
    fixed = block["schedules"][0]
    assert fixed["spec"] == "fixed:0.6" and fixed["shares"] == {"0.6": 1.0} and set(fixed["impls"]) == set(impls)
    pss = fixed["impls"]["pss"]
    expected_ms = (cases[("pss", 0.5)]["median_ms"] + 0.2 * (cases[("pss", 1.0)]["median_ms"]
                                                              - cases[("pss", 0.5)]["median_ms"]))
    assert pss["interpolated_keep_rates"] == [0.6] and pss["mean_iteration_ms"] == pytest.approx(expected_ms)
    assert pss["run_hours"] == pytest.approx(1500 * expected_ms / 3.6e6)
    assert pss["ratio_vs_baseline"] == pytest.approx(expected_ms / baseline)
    cyclic = block["schedules"][1]["impls"]["pss"]  # its rho = 0.2 share lies below the measured 0.5
    assert "outside the measured keep rates" in cyclic["error"]


class FakeTimer:
    """Stands in for _timing.time_samples: records which case each block belongs to (from the step's
    model), returns distinct fake samples, and can declare the time budget spent after some blocks."""

    def __init__(self, spend_after=None):
        self.blocks, self.spend_after = [], spend_after

    def __call__(self, step, *, warmup, iters, device):
        model = step.model
        impl = model.blocks[0].attn.impl if model.rpb else "baseline"
        self.blocks.append((impl, model.keep_rate, warmup, iters))
        return [float(10 * len(self.blocks) + i) for i in range(iters)]

    def spent(self, budget):
        return self.spend_after is not None and len(self.blocks) >= self.spend_after


def fake_run(monkeypatch, timer, *flags):
    import iter_time

    monkeypatch.setattr(iter_time, "time_samples", timer)
    monkeypatch.setattr(iter_time.TimeBudget, "spent", lambda budget: timer.spent(budget))
    monkeypatch.setattr(iter_time.TimeBudget, "left", lambda budget: 0.0 if timer.spent(budget) else float("inf"))
    args = iter_time.parse_args(["--device", "cpu", "--models", "deit_tiny", "--img-size", "32", "--batch-size",
                                 "1", "--keep-rates", "1.0,0.5", "--impls", "pss,eager-index", *flags])
    return iter_time.run(args)


def test_cases_are_interleaved_round_by_round(monkeypatch):
    timer = FakeTimer()
    report = fake_run(monkeypatch, timer, "--warmup", "2", "--iters", "7", "--rounds", "3")
    order = [("baseline", 1.0), ("pss", 1.0), ("pss", 0.5), ("eager-index", 1.0), ("eager-index", 0.5)]
    # Round 1 in timing order, each later round starting one case further on.
    assert [(impl, rate) for impl, rate, _, _ in timer.blocks] == order + order[1:] + order[:1] + order[2:] + order[:2]
    # Warm-up before each case's first block only; 7 iterations spread over 3 rounds as 3, 2, 2.
    assert [(warmup, iters) for _, _, warmup, iters in timer.blocks] == [(2, 3)] * 5 + [(0, 2)] * 10
    for position, result in enumerate(report["results"]):
        assert (result["impl"], result["keep_rate"]) == order[position]
        samples = [10 * (block + 1) + i for block, (impl, rate, _, iters) in enumerate(timer.blocks)
                   if (impl, rate) == order[position] for i in range(iters)]
        assert len(samples) == 7 and result["iters"] == 7 and result["rounds"] == 3 and result["error"] is None
        assert result["median_ms"] == pytest.approx(float(sorted(samples)[3]))


def test_target_cases_are_timed_first():
    """vit_base: the target cases (baseline, pss at rho = 1 and the lowest rho, the published-code peers at
    the lowest rho), then pss at its other rates (the Cyclic projection), the peers' other rates below 1,
    pss-budget, the rest."""
    import iter_time

    args = iter_time.parse_args(["--device", "cpu", "--models", "vit_base,deit_small", "--keep-rates", "1.0,0.6,0.2"])
    impls = [iter_time.BASELINE] + [iter_time.IMPLEMENTATIONS[name] for name in args.impls]
    order = [(case.impl.name, case.keep_rate) for case in iter_time.ordered_cases("vit_base", impls, args)]
    targets = [("baseline", 1.0), ("pss", 1.0), ("pss", 0.2), ("published", 0.2), ("eager-index", 0.2)]
    assert order[:5] == targets and order[5] == ("pss", 0.6)
    assert order[6:8] == [("published", 0.6), ("eager-index", 0.6)]
    rest = order[8:]
    if "pss-budget" in args.impls:
        assert rest[:3] == [("pss-budget", rate) for rate in (1.0, 0.6, 0.2)]
        rest = rest[3:]
    assert set(rest) == {("published", 1.0), ("eager-index", 1.0)} | {
        (impl, rate) for impl in args.impls if impl not in ("pss", "published", "eager-index", "pss-budget")
        for rate in (1.0, 0.6, 0.2)}
    other = [(case.impl.name, case.keep_rate) for case in iter_time.ordered_cases("deit_small", impls, args)]
    assert other[:4] == [("baseline", 1.0), ("pss", 1.0), ("pss", 0.6), ("pss", 0.2)]  # no targets: --impls order


def test_a_lost_cuda_context_stops_the_run_and_reports_what_was_measured(monkeypatch):
    """An error that leaves the CUDA context unusable ends the run there (every later case would fail, and
    emptying the cache would raise again): the cases timed before keep their figures, the rest are
    not measured with the reason, and the report is complete otherwise (ratios, projection)."""
    timer = FakeTimer()

    def failing(step, *, warmup, iters, device):
        if len(timer.blocks) == 2:
            timer.blocks.append(("lost", 0, 0, 0))
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return timer(step, warmup=warmup, iters=iters, device=device)

    failing.spent = timer.spent
    report = fake_run(monkeypatch, failing, "--iters", "3", "--rounds", "1")
    results = {(r["impl"], r["keep_rate"]): r for r in report["results"]}
    assert results["baseline", 1.0]["median_ms"] is not None and results["pss", 1.0]["median_ms"] is not None
    assert "illegal memory access" in results["pss", 0.5]["error"] and results["pss", 0.5]["median_ms"] is None
    for key in (("eager-index", 1.0), ("eager-index", 0.5)):
        assert results[key]["error"].startswith("not measured: the CUDA context was lost at pss rho=0.5")
    assert "the CUDA context was lost" in report["stopped"] and report["complete"] is False
    assert report["projection"]["models"]["deit_tiny"]["baseline"] is not None


def test_an_error_in_a_later_round_clears_the_earlier_statistics(monkeypatch):
    timer = FakeTimer()

    def failing_later(step, *, warmup, iters, device):
        if len(timer.blocks) == 6:  # round 2's second block (pss at rho 0.5: rounds rotate by one)
            timer.blocks.append(("failed", 0, 0, 0))
            raise RuntimeError("a peer that fails late")
        return timer(step, warmup=warmup, iters=iters, device=device)

    failing_later.spent = timer.spent
    report = fake_run(monkeypatch, failing_later, "--iters", "4", "--rounds", "2")
    failed = [r for r in report["results"] if r["error"]]
    assert len(failed) == 1 and failed[0]["error"] == "RuntimeError: a peer that fails late"
    assert all(failed[0][key] is None for key in ("median_ms", "q1_ms", "q3_ms", "iters", "images_per_s"))
    assert failed[0]["ratio_vs_rho1"] is None


def test_sigterm_ends_the_run_with_the_report_written(monkeypatch, tmp_path):
    """The GPU session's stage limit sends SIGTERM: the run stops at once and writes what it measured, with
    its targets' verdicts as they stand, instead of dying without a final file."""
    import os
    import signal
    timer = FakeTimer()

    def terminated(step, *, warmup, iters, device):
        if len(timer.blocks) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return timer(step, warmup=warmup, iters=iters, device=device)

    terminated.spent = timer.spent
    report = fake_run(monkeypatch, terminated, "--iters", "3", "--rounds", "1", "--out-dir", str(tmp_path))
    assert report["stopped"].startswith("stopped by SIGTERM")
    measured = [r for r in report["results"] if r["median_ms"] is not None]
    assert len(measured) == 3
    (path,) = tmp_path.glob("iter_time_*.json")
    written = json.loads(path.read_text())
    assert written["stopped"] == report["stopped"] and "projection" in written and "targets" in written
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler does not outlive the run


def test_sigterm_during_the_models_bookkeeping_keeps_its_last_saved_records(monkeypatch, tmp_path):
    """A SIGTERM after the last block, while run_model finishes its cases and frees the models, falls
    back on the records of its last partial save: the figures measured stay in the final file."""
    import os
    import signal
    import iter_time
    timer = FakeTimer()
    real_free_memory = iter_time.free_memory

    def free_memory(device):
        if len(timer.blocks) == 5:  # every case timed: the free after the loop
            os.kill(os.getpid(), signal.SIGTERM)
        real_free_memory(device)

    monkeypatch.setattr(iter_time, "free_memory", free_memory)
    report = fake_run(monkeypatch, timer, "--iters", "3", "--rounds", "1", "--out-dir", str(tmp_path))
    assert report["stopped"].startswith("stopped by SIGTERM") and report["complete"] is False
    assert sum(r["median_ms"] is not None for r in report["results"]) == 5
    (path,) = tmp_path.glob("iter_time_*.json")
    assert json.loads(path.read_text())["results"] == report["results"]


def test_a_second_sigterm_does_not_interrupt_saving_what_the_first_stopped(monkeypatch, tmp_path):
    """coreutils' timeout signals the process and then its group: a second SIGTERM can land while the
    first one's Stopped is being handled (here: in the models' clean-up). The handler is one-shot, so
    it is ignored and the cases are written as run_model marked them."""
    import os
    import signal
    import iter_time
    timer = FakeTimer()
    real_free_memory = iter_time.free_memory

    def terminated(step, *, warmup, iters, device):
        if len(timer.blocks) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return timer(step, warmup=warmup, iters=iters, device=device)

    def free_memory(device):  # the clean-up after the first Stopped: the group's SIGTERM arrives
        os.kill(os.getpid(), signal.SIGTERM)
        real_free_memory(device)

    terminated.spent = timer.spent
    monkeypatch.setattr(iter_time, "free_memory", free_memory)
    report = fake_run(monkeypatch, terminated, "--iters", "3", "--rounds", "1", "--out-dir", str(tmp_path))
    assert report["stopped"].startswith("stopped by SIGTERM")
    assert [r["median_ms"] is not None for r in report["results"]] == [True, True, False, False, False]
    assert all(r["error"].startswith("not measured: stopped by SIGTERM") for r in report["results"][2:])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_budget_spent_mid_run_keeps_the_rounds_each_case_got(monkeypatch):
    timer = FakeTimer(spend_after=7)
    report = fake_run(monkeypatch, timer, "--iters", "3", "--time-budget", "1000")
    # Round 2 starts at the second case: the budget ends it after that case and the third.
    assert [r["rounds"] for r in report["results"]] == [1, 2, 2, 1, 1] and report["errors"] == []
    assert report["complete"] is True  # every case measured, if not in every round
    timer = FakeTimer(spend_after=3)
    report = fake_run(monkeypatch, timer, "--iters", "3", "--time-budget", "1000")
    assert [r["rounds"] for r in report["results"]] == [1, 1, 1, None, None]
    assert report["complete"] is False  # cases the budget left out
    assert [r["impl"] for r in report["results"] if r["error"]] == ["eager-index", "eager-index"]
    assert all(r["error"].startswith("skipped: the run's time budget") for r in report["results"][3:])


def test_round_sizes_spread_the_iterations():
    import iter_time

    assert iter_time.round_sizes(50, 5) == [10] * 5 and iter_time.round_sizes(7, 3) == [3, 2, 2]
    assert iter_time.round_sizes(8, 8) == [1] * 8 and sum(iter_time.round_sizes(11, 4)) == 11


def test_timing_table_reads_files_written_before_rounds_existed():
    report = {"config": {"models": ["vit_base"], "img_size": 224, "batch_sizes": {"vit_base": 128}, "amp": "bf16",
                         "iters": 50, "warmup": 10, "keep_rates": [1.0], "impls": ["pss"]},
              "results": []}
    assert "median of 50 iterations after 10 warm-up" in format_timing_table(report)
    report["config"]["rounds"] = 5
    assert "median of 50 iterations in 5 interleaved rounds after 10 warm-up" in format_timing_table(report)


def test_cpu_default_is_deit_tiny_at_224_interleaved_outside_benchmarks_results():
    import iter_time

    args = iter_time.parse_args(["--device", "cpu"])
    assert not args.smoke and args.models == ["deit_tiny"] and args.img_size == 224 and args.amp == "none"
    assert args.batch_sizes == {"deit_tiny": 16} and args.rounds == args.iters == 8 and args.warmup == 1
    assert args.adamw == "foreach" and not args.compile
    assert iter_time.parse_args(["--device", "cpu", "--adamw", "fused", "--compile"]).adamw == "fused"
    assert args.out_dir == Path("runs") / "iter_time" and args.out_dir.resolve() != iter_time.RESULTS_DIR
    assert iter_time.run_kind(args) == "cpu" and iter_time.run_label(args).startswith("CPU run")
    smoke = iter_time.parse_args(["--device", "cpu", "--smoke"])
    assert smoke.img_size == 64 and smoke.batch_sizes == {"deit_tiny": iter_time.SMOKE_BATCH_SIZE}
    assert iter_time.run_kind(smoke) == "cpu-smoke" and smoke.out_dir == args.out_dir
    assert iter_time.parse_args(["--device", "cpu", "--iters", "3"]).rounds == 3
    explicit = iter_time.parse_args(["--device", "cpu", "--models", "vit_base,deit_small", "--batch-size", "4"])
    assert explicit.models == ["vit_base", "deit_small"] and explicit.batch_sizes == {"vit_base": 4, "deit_small": 4}


def test_spent_time_budget_reports_every_case_as_skipped():
    import iter_time

    args = iter_time.parse_args(["--device", "cpu", "--img-size", "32", "--keep-rates", "1.0,0.5",
                                 "--impls", "pss,eager-index", "--time-budget", "0.000001"])
    report = iter_time.run(args)
    assert len(report["results"]) == 5 and len(report["errors"]) == 5  # baseline + 2 impls x 2 rates
    assert all(r["median_ms"] is None and r["error"].startswith("skipped: the run's time budget")
               for r in report["results"])
    assert report["config"]["time_budget_s"] == 0.000001
    assert "not projected" in iter_time.format_projection_table(report)
    with pytest.raises(SystemExit):
        iter_time.parse_args(["--device", "cpu", "--time-budget", "0"])


@pytest.mark.parametrize("flags, env, expected", [
    ([], None, {"sample_patches": None, "rpb_attention": None}),  # CPU: the package's choice (torch)
    (["--backend", "torch"], None, {"sample_patches": "torch", "rpb_attention": "torch"}),
    (["--backend", "torch", "--sampler-backend", "default"], None, {"sample_patches": None, "rpb_attention": "torch"}),
    (["--attn-backend", "triton"], None, {"sample_patches": None, "rpb_attention": "triton"}),
    (["--backend", "triton"], "torch", {"sample_patches": "triton", "rpb_attention": "triton"}),  # a flag wins
])
def test_requested_backends_follow_the_flags(flags, env, expected, monkeypatch):
    import iter_time

    monkeypatch.delenv("PSS_KERNELS_BACKEND", raising=False)
    if env:
        monkeypatch.setenv("PSS_KERNELS_BACKEND", env)
    assert iter_time.requested_backends(iter_time.parse_args(["--device", "cpu", *flags])) == expected


@pytest.mark.cuda
def test_gpu_defaults_ask_for_the_kernels(monkeypatch):
    import iter_time

    monkeypatch.delenv("PSS_KERNELS_BACKEND", raising=False)
    requested = iter_time.requested_backends(iter_time.parse_args(["--device", "cuda"]))
    assert requested["rpb_attention"] == "triton" and requested["sample_patches"] in ("cuda", "triton")


@pytest.mark.cuda
def test_cli_gpu_smoke_run_uses_the_kernels(tmp_path):
    _, _, report = run_cli(tmp_path, "--smoke", "--device", "cuda", "--warmup", "2", "--iters", "3",
                           "--impls", "pss", "published", "eager-index", "sdpa-bias", "--epochs", "1")
    assert report["run_kind"] == "cuda-smoke" and report["errors"] == []
    sampled = [r for r in report["results"] if r["impl"] == "pss" and r["keep_rate"] < 1.0]
    assert sampled and all(r["backends"]["sample_patches"] in ("triton", "cuda") and
                           r["backends"]["rpb_attention"] == "triton" for r in sampled)


@pytest.mark.parametrize("flags, message", [
    (["--keep-rates", "1.5"], "--keep-rates"),
    (["--keep-rates", "0"], "--keep-rates"),
    (["--keep-rates", "half"], "--keep-rates"),
    (["--impls", "pss", "nope"], "--impls: unknown implementation 'nope'"),
    (["--models", "resnet50"], "--models: unknown model 'resnet50'"),
    (["--img-size", "30"], "--img-size"),
    (["--iters", "0"], "--iters"),
    (["--rounds", "0"], "--rounds"),
    (["--iters", "2", "--rounds", "3"], "--rounds: at most --iters (2)"),
    (["--batch-size", "0"], "--batch-size"),
    (["--schedules", "sawtooth:0.2"], "--schedules"),
    (["--backend", "opencl"], "--backend"),
    (["--device", "tpu"], "--device"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_flags_exit_with_a_message_naming_the_flag(flags, message, capsys):
    import iter_time

    with pytest.raises(SystemExit) as exit_info:
        iter_time.parse_args(["--device", "cpu", *flags] if "--device" not in flags else flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_device_without_a_gpu_is_a_flag_error(capsys):
    import iter_time

    with pytest.raises(SystemExit):
        iter_time.parse_args(["--device", "cuda"])
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    import iter_time

    with pytest.raises(SystemExit) as exit_info:
        iter_time.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = {option for action in iter_time.build_parser()._actions for option in action.option_strings
             if action.help}
    assert {"--models", "--keep-rates", "--impls", "--batch-size", "--img-size", "--warmup", "--iters", "--epochs",
            "--out-dir", "--backend", "--device", "--smoke", "--schedules"} <= flags
    undocumented = [a.option_strings for a in iter_time.build_parser()._actions if a.option_strings and not a.help]
    assert undocumented == [] and all(flag in text for flag in flags)
