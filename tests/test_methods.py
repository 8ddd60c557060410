"""The method comparison harness (pss_kernels/train/compare.py, benchmarks/methods.py, pss-compare) in
its --quick mode: every requested method trains and is swept, the table / JSON / plots are written,
magnitude and random sampling of a PSS schedule are reported side by side."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pss_kernels.train import compare

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
    table = (tmp_path / "out" / "methods.md").read_text()
    assert all(f"| {name} |" in table for name in QUICK_METHODS) and "PSS cyclic: magnitude" in table
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
