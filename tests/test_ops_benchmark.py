"""benchmarks/ops.py (issues 2 and 3): the CLI end to end on CPU, the time budget (skipped cases
are listed, never dropped), target-first ordering of the GPU grids and the target verdicts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

import bench_rpb_attention  # noqa: E402
import bench_sample_patches  # noqa: E402
import ops  # noqa: E402
from _timing import TimeBudget, time_graph_replays  # noqa: E402


def run_ops(tmp_path, *flags):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "ops.py"), "--device", "cpu", "--warmup", "0",
                             "--iters", "1", "--out-dir", str(tmp_path), *flags],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (json_path,) = tmp_path.glob("ops_*.json")
    return result.stdout, json.loads(json_path.read_text())


def test_cli_on_cpu_writes_json_and_plot(tmp_path):
    stdout, report = run_ops(tmp_path)
    assert "CPU smoke run" in stdout and report["skipped_rows"] == 0
    sampling, attention = report["results"]["sample_patches"], report["results"]["rpb_attention"]
    assert {r["impl"] for r in sampling} >= {"pss-torch", "eager", "topk-gather"}
    assert all(r["ms"] > 0 and r["error"] is None for r in sampling)
    assert all(r["graph_ms"] is None for r in sampling)  # CUDA graphs exist on CUDA only
    assert {r["impl"] for r in attention} == set(bench_rpb_attention.IMPLS)
    for variant in ("pss-frozen-table", *bench_rpb_attention.DBIAS_IMPLS):  # torch backend: the variable is unused
        rows = [r for r in attention if r["impl"] == variant]
        assert rows and all(r["ms"] > 0 for r in rows), variant
    for peer in ("published", "eager-index"):
        rows = [r for r in attention if r["impl"] == peer]
        assert rows and all(r["ms"] > 0 and r["error"] is None for r in rows), peer
    key = {r["keep_rate"]: r for r in attention if r["impl"] == "pss" and r["pass"] == "forward+backward"}
    published = {r["keep_rate"]: r for r in attention if r["impl"] == "published" and r["pass"] == "forward+backward"}
    assert key[0.5]["speedup_vs_published"] == pytest.approx(published[0.5]["ms"] / key[0.5]["ms"])
    assert "vs publ" in stdout and "vs e-idx" in stdout
    assert report["targets"] == []  # the targets are for the GPU shapes
    assert len(list(tmp_path.glob("ops_*.png"))) == 1


def test_spent_time_budget_lists_every_case_as_skipped(tmp_path):
    stdout, report = run_ops(tmp_path, "--time-budget", "0.000001")
    rows = [r for rows in report["results"].values() for r in rows]
    assert rows and all(r["ms"] is None and r["error"].startswith("skipped: the run's time budget") for r in rows)
    assert report["skipped_rows"] == len(rows)
    assert f"{len(rows)} rows skipped" in stdout
    assert not list(tmp_path.glob("ops_*.png"))  # nothing measured, nothing plotted


def test_time_budget_rejects_non_positive_seconds(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "ops.py"), "--time-budget", "0"],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--time-budget" in result.stderr
    with pytest.raises(ValueError, match="time budget"):
        TimeBudget(-1)
    assert not TimeBudget(None).spent() and TimeBudget(1e-9).spent()


def test_gpu_grids_put_the_target_cases_first():
    shapes, keep_rates = ops.sampling_shapes(torch.device("cuda"))
    assert shapes[0] == ops.SAMPLING_TARGET_SHAPE and len(shapes) == len(set(shapes)) == 8
    assert keep_rates == (0.2, 0.5, 0.8)
    configs = bench_rpb_attention.default_configs("cuda")
    assert len(configs) == 40
    targets = [c for c in configs if bench_rpb_attention.is_target_config(c)]
    assert configs[:3] == targets and [c["keep_rate"] for c in targets] == [1.0, 0.6, 0.2]
    assert all((c["model"], c["batch"], tuple(c["grid"])) == ("vit_base", 256, (14, 14)) for c in targets)
    # then DeiT-S at the same keep rates, batch and grid
    assert [(c["model"], c["batch"], tuple(c["grid"]), c["keep_rate"]) for c in configs[3:6]] == [
        ("deit_small", 256, (14, 14), rate) for rate in (1.0, 0.6, 0.2)]


def sampling_row(**changes):
    row = dict(B=256, N=197, C=768, keep_rate=0.2, impl="pss-cuda", error=None, ms=0.05,
               speedup_vs_eager=6.0, speedup_vs_eager_graph=4.0, graph_fraction_of_peak=0.75, **{"pass": "forward"})
    row.update(changes)
    return row


def test_sampling_targets_judge_bandwidth_on_graph_time():
    verdicts = {name.split(": ", 1)[1]: met for name, _, met in ops.sampling_targets([sampling_row()])}
    assert verdicts == {"speed-up vs eager >= 5x (per call)": True, "speed-up vs eager >= 5x (CUDA graph)": False,
                        "fraction of peak bandwidth >= 0.70 (CUDA graph)": True}
    failed_capture = ops.sampling_targets([sampling_row(graph_fraction_of_peak=None, speedup_vs_eager_graph=None)])
    assert [met for _, _, met in failed_capture] == [True, None, None]  # not measured, not a miss
    skipped = ops.sampling_targets([sampling_row(ms=None, error="skipped: budget", speedup_vs_eager=None,
                                                 speedup_vs_eager_graph=None, graph_fraction_of_peak=None)])
    assert [met for _, _, met in skipped] == [None, None, None]  # NOT MEASURED, never a MISS


def test_graph_timing_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        time_graph_replays(lambda: None, warmup=0, iters=1, device=torch.device("cpu"))


def test_a_failed_graph_capture_reports_the_steps_own_error(monkeypatch):
    """torch.cuda.graph's exit ends a failed capture with an error of its own ("operation failed due to
    a previous error during capture"), raised in place of the step's: the step's is the one reported,
    and the caller's stream is restored. (The CUDA calls stand in for a GPU.)"""
    import contextlib
    from types import SimpleNamespace
    restored = []

    @contextlib.contextmanager
    def graph(_):
        try:
            yield
        finally:  # what capture_end does after an error inside the capture
            raise RuntimeError("operation failed due to a previous error during capture")

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "set_stream", restored.append)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    calls = []

    def step():
        calls.append(1)
        if len(calls) > 1:  # the warm-up runs; the captured call syncs
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="the step failed under CUDA graph capture: RuntimeError: CUDA error: "
                                           "operation not permitted"):
        time_graph_replays(step, warmup=1, iters=1, device=torch.device("cuda"))
    assert restored == [stream]


def test_sampling_benchmark_records_a_failing_backend_instead_of_stopping(monkeypatch):
    def broken(x, keep_rate):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench_sample_patches, "_implementations",
                        lambda device: {"pss-broken": broken, "eager": bench_sample_patches.eager_sample_patches})
    rows = bench_sample_patches.run("cpu", torch.float32, [(2, 9, 4)], [0.5], warmup=0, iters=1)
    broken_rows = [r for r in rows if r["impl"] == "pss-broken"]
    assert len(rows) == 4 and len(broken_rows) == 2
    assert all(r["ms"] is None and "kernel exploded" in r["error"] and r["speedup_vs_eager"] is None
               for r in broken_rows)
    assert all(r["ms"] > 0 and r["speedup_vs_eager"] == 1.0 for r in rows if r["impl"] == "eager")


def test_rpb_benchmark_runs_each_dbias_row_under_its_accumulator_and_survives_failing_rows(monkeypatch):
    """pss-dbias-<name> runs pss with PSS_KERNELS_RPB_DBIAS=<name>; a row that raises (an accumulator
    the kernels do not know yet, a broken peer) is recorded with its error and the run goes on."""
    seen = []
    real = bench_rpb_attention._attention_fns

    def fns(device):
        impls = real(device)

        def pss(*args):
            choice = os.environ.get("PSS_KERNELS_RPB_DBIAS")
            seen.append(choice)
            if choice == "image-sum":
                raise ValueError("PSS_KERNELS_RPB_DBIAS must be one of ('auto', 'slices', 'position-grid')")
            return impls["pss"](*args)

        def broken(*args):
            raise RuntimeError("peer exploded")

        return {**impls, **{impl: pss for impl in bench_rpb_attention.DBIAS_IMPLS}, "published": broken}

    monkeypatch.setattr(bench_rpb_attention, "_attention_fns", fns)
    monkeypatch.delenv("PSS_KERNELS_RPB_DBIAS", raising=False)
    done = []
    rows = bench_rpb_attention.run("cpu", torch.float32, warmup=0, iters=1, on_row=done.append)
    assert done == rows  # every row handed over as it finished, in order
    assert "PSS_KERNELS_RPB_DBIAS" not in os.environ  # restored after every row, failing ones included
    assert set(seen) == {"slices", "position-grid", "csr", "image-sum"}
    by_impl = {}
    for row in rows:
        by_impl.setdefault(row["impl"], []).append(row)
    assert {r["keep_rate"] for r in by_impl["pss-dbias-image-sum"]} == {1.0}  # the shared row map only
    for impl in ("pss-dbias-slices", "pss-dbias-position-grid", "pss-dbias-csr"):
        assert {r["keep_rate"] for r in by_impl[impl]} == {1.0, 0.5}, impl
    assert all(r["ms"] is None and r["error"].startswith("ValueError: PSS_KERNELS_RPB_DBIAS")
               for r in by_impl["pss-dbias-image-sum"])
    assert all(r["ms"] is None and "peer exploded" in r["error"] for r in by_impl["published"])
    assert all(r["speedup_vs_published"] is None for r in rows)
    for impl in ("pss", "pss-frozen-table", "pss-sdpa", "pss-dbias-slices", "pss-dbias-position-grid",
                 "pss-dbias-csr", "eager-index", "sdpa-flash"):
        assert by_impl[impl] and all(r["ms"] > 0 and r["error"] is None for r in by_impl[impl]), impl
    assert all(r["speedup_vs_eager_index"] is not None for r in by_impl["pss"])


def test_a_flex_row_that_times_out_ends_the_flex_rows_not_the_run(monkeypatch):
    """flex compiles per shape (tens of seconds): a row past --flex-timeout is recorded with the reason,
    the later flex rows are skipped (they would compile again), every other row still runs."""
    import time as clock
    real = bench_rpb_attention._attention_fns

    def fns(device):
        impls = real(device)

        def slow_flex(*args):
            clock.sleep(5)
            return impls["pss"](*args)

        return {**impls, "flex": slow_flex}

    monkeypatch.setattr(bench_rpb_attention, "_attention_fns", fns)
    rows = bench_rpb_attention.run("cpu", torch.float32, warmup=0, iters=1, impls=("pss", "flex", "sdpa-flash"),
                                   flex_timeout=0.5)
    flex = [r for r in rows if r["impl"] == "flex"]
    assert "RowTimeout: timed out after 0.5 s" in flex[0]["error"]
    assert all(r["error"].startswith("skipped: an earlier flex row failed") for r in flex[1:]) and len(flex) == 4
    assert all(r["ms"] > 0 for r in rows if r["impl"] != "flex")


def rpb_row(impl, ms, **changes):
    row = dict(model="vit_base", batch=256, grid=[14, 14], keep_rate=1.0, num_tokens=197, impl=impl, ms=ms,
               ms_vs_sdpa_flash=1.2, speedup_vs_published=None, speedup_vs_eager_index=None,
               peak_mem_vs_sdpa_flash=1.05, **{"pass": "forward+backward"})
    row.update(changes)
    return row


BIAS_GRAD_TARGET = "bias gradient (pss - pss-frozen-table) / attention backward <= 0.1"


def test_rpb_targets_judge_pss_against_both_eager_peers():
    frozen_forward = rpb_row("pss-frozen-table", 0.35)
    frozen_forward["pass"] = "forward"
    rows = [rpb_row("pss", 1.0, speedup_vs_published=4.0, speedup_vs_eager_index=2.5), rpb_row("sdpa-bias", 2.0),
            rpb_row("flex", 0.5), rpb_row("pss-frozen-table", 0.95), frozen_forward]
    verdicts = {name.split(": ", 1)[1]: (value, met) for name, value, met in ops.rpb_targets(rows)}
    assert {name: met for name, (_, met) in verdicts.items()} == {
        "time vs sdpa-flash <= 1.25x": True, "speed-up vs published >= 3x": True, "speed-up vs eager-index >= 3x": False,
        "faster than sdpa-bias (sdpa-bias ms / pss ms > 1)": True, "faster than flex (flex ms / pss ms > 1)": False,
        "peak memory vs sdpa-flash <= 1.10x": True, BIAS_GRAD_TARGET: True}
    # (1.0 - 0.95) / (0.95 - 0.35): the bias gradient against the frozen table's backward
    assert verdicts[BIAS_GRAD_TARGET][0] == pytest.approx(0.05 / 0.60)


def test_rpb_targets_say_not_measured_never_miss_for_missing_rows():
    """A run cut short: no sdpa-flash, flex or frozen-table rows, and pss skipped at rho = 0.6. Every
    target without its figures is NOT MEASURED (None), never a MISS."""
    rows = [rpb_row("pss", 1.0, ms_vs_sdpa_flash=None, peak_mem_vs_sdpa_flash=None),
            rpb_row("pss", None, keep_rate=0.6, num_tokens=118, error="skipped: the run's time budget of 1 s was spent")]
    targets = ops.rpb_targets(rows)
    assert targets and all(met is None and value is None for name, value, met in targets
                           if "speed-up" not in name or "published" in name or "eager-index" in name)
    assert [name for name, _, _ in targets if "n=118" in name] == [
        f"rpb_attention vit_base fwd+bwd B=256 n=118: {BIAS_GRAD_TARGET}"]
    assert all(ops.TARGET_STATUS[met] == "NOT MEASURED" for _, _, met in targets)


@pytest.mark.interpreter
def test_tile_sweep_harness_in_the_interpreter(tmp_path):
    """benchmarks/tune_rpb_tiles.py on a tiny shape: every distinct tile timed, outputs compared with
    the current tile's (exit status 0: none differs), the best tile per kernel recorded."""
    env = {**ENV, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "tune_rpb_tiles.py"), "--out-dir", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (path,) = tmp_path.glob("rpb_tiles_*.json")
    report = json.loads(path.read_text())
    for kernel in ("forward", "dkdv", "dq"):
        rows = [r for r in report["rows"] if r["kernel"] == kernel]
        timed = [r for r in rows if r["ms"] is not None]
        assert rows[0]["current"] and rows[0]["ms"] > 0
        assert len({tuple(r["effective_tile"]) for r in timed}) == len(timed)  # each distinct tile once
        assert all(r["max_rel_error"] < 1e-5 for r in timed)  # float32 in the interpreter
        assert report["best"][kernel]["10"] in [r["tile"] for r in timed]


def test_keep_window_files_a_window_under_its_device_and_date(tmp_path):
    """benchmarks/keep_window.py: a window's files go to results/<device>_<date>/, a second window of
    the same day to <...>-2, partial files stay behind; without JSON the log's date names it."""
    import keep_window
    window = tmp_path / "out"
    window.mkdir()
    (window / "ops_x.json").write_text(json.dumps({"environment": {"device": "NVIDIA H200",
                                                                   "date": "2026-12-05T10:00:00+00:00"}}))
    (window / "session.log").write_text("== gpu_session.sh\n")
    (window / "ops_x.json.partial").write_text("{")
    results = tmp_path / "results"
    first, second = keep_window.keep(window, results), keep_window.keep(window, results)
    assert first.name == "NVIDIA-H200_2026-12-05" and second.name == "NVIDIA-H200_2026-12-05-2"
    assert sorted(p.name for p in first.iterdir()) == ["ops_x.json", "session.log"]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "session.log").write_text("== 2026-12-06T01:02:03Z on host\n")
    assert keep_window.keep(bare, results).name == "unknown-device_2026-12-06"


def test_keep_window_draws_the_plots_a_window_left_out(tmp_path):
    """ops.py --no-plot (the GPU window's file count) leaves the PNG out; keep_window.py draws it from the
    JSON, and a varlen JSON's too."""
    import keep_window
    import varlen
    window = tmp_path / "out"
    window.mkdir()
    run_ops(window, "--op", "rpb_attention", "--keep-rates", "0.5", "--impls", "pss,published", "--no-plot")
    assert not list(window.glob("*.png"))
    assert varlen.main(["--device", "cpu", "--keep-rates", "0.5", "--impls", "dense,packed-fixed", "--warmup", "0",
                        "--iters", "1", "--out-dir", str(window)]) == 0
    kept = keep_window.keep(window, tmp_path / "results")
    plots = sorted(p.name for p in kept.glob("*.png"))
    assert len(plots) == 2 and plots[0].startswith("ops_") and plots[1].startswith("varlen_")
    assert all((kept / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in plots)


def test_varlen_benchmark_smoke_run(tmp_path, capsys):
    """benchmarks/varlen.py on CPU: every impl has its two passes (a peer that cannot run here carries its
    reason), the policies keep different counts per image, the ratios are against the dense row of their
    keep rate (the sampler rows against the dense sampler), and the packing target is NOT MEASURED off a GPU; a spent budget skips, never drops."""
    import varlen
    assert varlen.main(["--device", "cpu", "--keep-rates", "0.5", "--warmup", "0", "--iters", "1",
                        "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("varlen_*.json")
    report = json.loads(path.read_text())
    rows = report["rows"]
    assert sorted((r["impl"], r["pass"]) for r in rows) == sorted((i, p) for i in varlen.IMPLS for p in varlen.PASSES)
    for r in rows:
        assert (r["ms"] is None) == (r["error"] is not None), r
    for impl in ("dense", "packed-fixed", "packed-budget", "packed-mass", "packed-sdpa"):
        assert all(r["ms"] > 0 for r in rows if r["impl"] == impl), impl
    fixed = next(r for r in rows if r["impl"] == "packed-fixed")["counts"]
    budget = next(r for r in rows if r["impl"] == "packed-budget")["counts"]
    mass = next(r for r in rows if r["impl"] == "packed-mass")["counts"]
    assert fixed["min"] == fixed["max"] and budget["min"] < budget["max"] and mass["min"] < mass["max"]
    assert budget["tokens"] == fixed["tokens"]  # the policies at fixed k's total: the same token budget
    assert abs(mass["tokens"] - budget["tokens"]) <= 4  # as nearly as each of the 4 images' steps allow
    assert {r["backend"] for r in rows if r["impl"] in ("dense", "packed-fixed")} == {"torch"}
    assert report["warmup"] == 0 and report["iters"] == 1
    for impl in ("sample-dense", "sample-packed", "sample-packed-torch"):  # the sampler rows always run
        assert all(r["ms"] > 0 for r in rows if r["impl"] == impl), impl
    anchor = {(r["impl"], r["pass"]): r["ms"] for r in rows}
    for r in rows:  # attention rows against the dense kernel, sampler rows against the dense sampler
        if r["ms"] is not None:
            dense = anchor["sample-dense" if r["impl"].startswith("sample-") else "dense", r["pass"]]
            assert r["ms_vs_dense"] == pytest.approx(r["ms"] / dense)
    assert [v["status"] for v in report["packing_target"]] == ["NOT MEASURED"]
    assert "NOT MEASURED" in capsys.readouterr().out
    varlen.main(["--device", "cpu", "--keep-rates", "0.5", "--time-budget", "0.000001", "--out-dir", str(tmp_path)])
    report = json.loads(path.read_text())
    assert len(report["rows"]) == 2 * len(varlen.IMPLS)
    assert all(r["ms"] is None and r["error"].startswith("skipped") for r in report["rows"])


def test_varlen_benchmark_keeps_a_forward_when_the_backward_fails_and_stops_on_a_lost_context(tmp_path, monkeypatch):
    """One pass failing does not take the other's figure; an error that leaves the CUDA context unusable
    marks every later row not measured (they would all fail, slowly, or crash the run); the file is
    written whole after every row, the target's verdict with it."""
    import varlen
    real_call = varlen._call

    def failing_backward(impl, case, backend):
        run, leaves, label = real_call(impl, case, backend)
        if impl == "packed-budget":
            class NoBackward(torch.autograd.Function):
                @staticmethod
                def forward(ctx, out):
                    return out.clone()

                @staticmethod
                def backward(ctx, grad):
                    raise NotImplementedError("no backward here")

            return (lambda: NoBackward.apply(run())), leaves, label
        if impl == "packed-mass":
            def lost():
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return lost, leaves, label
        return run, leaves, label

    monkeypatch.setattr(varlen, "_call", failing_backward)
    # Exit status 1: the rows after the loss were not measured (the GPU session records the stage failed).
    assert varlen.main(["--device", "cpu", "--keep-rates", "0.5", "--warmup", "0", "--iters", "1",
                        "--out-dir", str(tmp_path)]) == 1
    (path,) = tmp_path.glob("varlen_*.json")
    report = json.loads(path.read_text())
    rows = {(r["impl"], r["pass"]): r for r in report["rows"]}
    assert rows["packed-budget", "forward"]["ms"] > 0
    assert rows["packed-budget", "forward+backward"]["ms"] is None
    assert rows["packed-budget", "forward+backward"]["error"] == "NotImplementedError: no backward here"
    assert "illegal memory access" in rows["packed-mass", "forward"]["error"]
    later = [r for r in report["rows"] if r["impl"] in ("fa-varlen", "packed-sdpa", "sample-dense", "flex-packed")]
    assert later and all(r["error"].startswith("not measured: the CUDA context was lost") for r in later)
    assert rows["dense", "forward+backward"]["ms"] > 0  # measured before the loss
    assert not list(tmp_path.glob("*.partial"))


def test_varlen_flex_row_stops_where_the_run_budget_ends(monkeypatch):
    """--flex-timeout limits each phase of a FlexAttention row (building, warm-up, samples, per pass);
    re-armed in full for every phase it would let a row started with little budget left run past the
    stage's limit. With the run's budget given, every phase ends where the budget does."""
    import time as clock
    import varlen
    real_call = varlen._call

    def slow(impl, case, backend):
        run, leaves, label = real_call("packed-budget", case, backend)

        def step():
            clock.sleep(0.4)
            return run()
        return step, leaves, label

    monkeypatch.setattr(varlen, "_call", slow)
    case = varlen.Case(varlen.CPU_SHAPE, 0.5, torch.float32, torch.device("cpu"))
    # Once outside the alarm: a first call imports torch._dynamo, and an alarm inside that import would
    # leave it half loaded for the later tests of this process.
    real_call("packed-budget", case, "torch")[0]()
    started = clock.perf_counter()
    rows = varlen.measure(["flex-packed"], case, "torch", 1, 3, shape=varlen.CPU_SHAPE, time_limit=30.0,
                          budget=TimeBudget(1.0))
    # About the budget's 1 s: not the 2 passes x (1 warm-up + 3 samples + 5 host-time calls) x 0.4 s of no
    # limit, nor 2 x 1.4 s of a limit of 1 s re-armed for each phase (the second pass says which it was).
    assert clock.perf_counter() - started < 4.0
    errors = [r["error"] or "" for r in rows]
    assert errors[0].startswith("RowTimeout: timed out after") and rows[0]["ms"] is None
    assert errors[1].startswith("RowTimeout: stopped: the run's time budget of 1 s ran out") and rows[1]["ms"] is None


def _target_rows(dense_ms, packed_ms, dense_graph=None, packed_graph=None, error=None, host_ms=None):
    rows = [dict(impl="dense", keep_rate=0.6, **{"pass": "forward+backward"}, ms=dense_ms, graph_ms=dense_graph,
                 host_ms=host_ms, error=None),
            dict(impl="packed-fixed", keep_rate=0.6, **{"pass": "forward+backward"}, ms=packed_ms,
                 graph_ms=packed_graph, host_ms=host_ms, error=error)]
    import varlen
    varlen.add_ratios(rows)
    return rows


def test_varlen_packing_target_is_judged_only_on_the_targets_run():
    """PASS / MISS only for the fused Triton kernels on a GPU in bf16: on the eager ratio where neither
    row is host-bound (the caches hit, as in a model), else on the CUDA-graph ratio; host-bound with no
    graph, or anything else, NOT MEASURED with its reason."""
    import varlen
    gpu = dict(on_gpu=True, backend="triton", dtype=torch.bfloat16)
    (verdict,) = varlen.packing_target(_target_rows(1.0, 1.04), [0.6], **gpu)
    assert verdict["status"] == "PASS" and verdict["basis"] == "eager calls" and verdict["ratio"] == pytest.approx(1.04)
    (verdict,) = varlen.packing_target(_target_rows(1.0, 1.04, 0.5, 0.6, host_ms=0.1), [0.6], **gpu)
    assert verdict["status"] == "PASS" and verdict["basis"] == "eager calls"  # not host-bound: eager decides
    (verdict,) = varlen.packing_target(_target_rows(1.0, 1.04, 0.5, 0.6, host_ms=0.9), [0.6], **gpu)
    assert verdict["status"] == "MISS" and verdict["basis"].startswith("cuda graph replays")
    assert verdict["ratio"] == pytest.approx(1.2) and verdict["eager_ratio"] == pytest.approx(1.04)
    (verdict,) = varlen.packing_target(_target_rows(1.0, 1.04, host_ms=0.9), [0.6], **gpu)
    assert verdict["status"] == "NOT MEASURED" and "host-bound" in verdict["reason"]
    for options, reason in ((dict(gpu, backend="torch"), "the torch backend ran"),
                            (dict(gpu, dtype=torch.float32), "float32, not bf16"),
                            (dict(gpu, on_gpu=False), "off a GPU")):
        (verdict,) = varlen.packing_target(_target_rows(1.0, 1.0), [0.6], **options)
        assert verdict["status"] == "NOT MEASURED" and reason in verdict["reason"] and verdict["ratio"] is None
    (verdict,) = varlen.packing_target(_target_rows(1.0, None, error="OutOfMemoryError: x"), [0.6], **gpu)
    assert verdict["status"] == "NOT MEASURED" and "OutOfMemoryError" in verdict["reason"]
    (verdict,) = varlen.packing_target(_target_rows(1.0, 1.0)[:1], [0.6], **gpu)
    assert verdict["status"] == "NOT MEASURED" and "--impls" in verdict["reason"]
