"""The one run-time projection (pss_kernels/train/timing.py) as the trainer uses it: the projected-time summary: iteration times keyed by kept tokens, and the labelled
estimates for token counts (and the rho = 1 baseline) that a run never timed."""
import pytest

from pss_kernels.train.reporting import format_summary
from pss_kernels.train.timing import (EXTRAPOLATED, INTERPOLATED, MEASURED, PROBED, PROPORTIONAL, KeepRateTimes,
                                      estimate_time, interpolate, projected_time_summary)


def timed(num_tokens, rate_seconds, warmup=0):
    times = KeepRateTimes(num_tokens, warmup=warmup)
    for rate, seconds in rate_seconds:
        times.add(rate, seconds)
    return times


def test_times_are_keyed_by_kept_tokens_after_a_warmup_per_count():
    times = timed(197, [(0.5, 9.0), (0.5, 1.0), (0.499, 3.0), (1.0, 7.0), (1.0, 5.0)], warmup=1)
    # 0.5 and 0.499 both keep round(rho * 197) = 98 tokens: one key, one warm-up.
    assert times.count == {98: 2, 197: 1} and times.mean(98) == 2.0 and times.mean(197) == 5.0
    assert times.mean(39) is None


def test_checkpoints_with_per_rate_timing_still_load():
    times = KeepRateTimes(17)
    times.load_state_dict({"count": {0.2: 2, 0.19: 1, 1.0: 4}, "total": {0.2: 2.0, 0.19: 4.0, 1.0: 8.0}})
    assert times.count == {3: 2 + 1, 17: 4} and times.mean(3) == 2.0 and times.mean(17) == 2.0
    restored = KeepRateTimes(17)
    restored.load_state_dict(times.state_dict())
    assert (restored.count, restored.total) == (times.count, times.total)


def test_estimates_are_interpolated_extrapolated_or_proportional_and_say_so():
    measured = {40: 1.0, 80: 2.0, 120: 4.0}
    assert estimate_time(80, measured) == (2.0, MEASURED)
    assert estimate_time(100, measured) == (3.0, INTERPOLATED)
    seconds, source = estimate_time(200, measured)  # least squares: through the mean (80, 7/3), 1.5/40 per token
    assert source == EXTRAPOLATED and seconds == pytest.approx(7 / 3 + 1.5 / 40 * (200 - 80))
    assert estimate_time(200, {40: 2.0, 80: 1.0}) == (1.0, EXTRAPOLATED)  # never below the nearest count
    assert estimate_time(200, {50: 1.0}) == (4.0, PROPORTIONAL)
    assert estimate_time(200, {}) == (None, None)


def test_summary_of_a_fixed_rate_run_uses_the_probed_baseline():
    times = timed(197, [(0.5, 1.0)] * 4)
    summary = projected_time_summary(times, {0.5: 1.0}, total_steps=100, baseline_steps=100, probed_baseline_s=1.5)
    assert summary["projected_s"] == 100.0 and summary["baseline_s"] == 150.0
    assert summary["baseline_source"] == PROBED and summary["saving"] == pytest.approx(1 / 3)
    assert summary["estimated"] and summary["estimated_share"] == 0.0
    text = format_summary(summary)
    assert "k=98    rho=0.5" in text and f"({PROBED})" in text and "saving vs baseline: 33.3 % (estimated)" in text
    without_probe = projected_time_summary(times, {0.5: 1.0}, total_steps=100, baseline_steps=100)
    assert without_probe["baseline_source"] == PROPORTIONAL
    assert without_probe["baseline_s"] == pytest.approx(100 * 197 / 98)


def test_summary_of_a_continuous_schedule_groups_its_rates_by_tokens():
    shares = {0.2 + 0.8 * i / 999: 1 / 1000 for i in range(1000)}  # 1000 distinct rates
    times = timed(17, [(rate, 0.1 + 0.01 * KeepRateTimes(17).tokens(rate)) for rate in list(shares)[::50]])
    summary = projected_time_summary(times, shares, total_steps=1000, baseline_steps=1000)
    assert len(summary["per_tokens"]) == 15  # k = 3 ... 17 of N = 17 tokens
    assert sum(entry["share"] for entry in summary["per_tokens"].values()) == pytest.approx(1.0)
    assert summary["projected_s"] > 0 and summary["baseline_s"] == pytest.approx(1000 * 0.27)
    assert "n/a" not in format_summary(summary)


def test_iteration_flops_are_the_hand_counted_matmuls_once_per_token_count():
    import torch
    from pss_kernels.models import create_model
    from pss_kernels.ops.sample_patches import num_kept_tokens
    from pss_kernels.train.reporting import IterationFlops, peak_memory_mb
    batch, channels, depth, heads, classes, patch = 4, 32, 2, 2, 10, 8
    built = []

    def make():
        built.append(1)
        return create_model("deit_tiny", img_size=32, patch_size=patch, embed_dim=channels, depth=depth,
                            num_heads=heads, num_classes=classes, attn_impl="eager-index")

    flops = IterationFlops(make, (batch, 3, 32, 32))
    patches, head_dim = 16, channels // heads

    def by_hand(n):  # 2 FLOPs per multiply-add; backward = 2x forward (input and weight gradients)
        embed = 2 * batch * patches * channels * 3 * patch * patch  # the image needs no gradient: 1x backward
        linear = 2 * batch * n * 12 * channels * channels * depth + 2 * batch * channels * classes  # qkv+proj+mlp, head
        attention = 2 * 2 * batch * heads * n * n * head_dim * depth  # q k^T and attn v
        return 2 * embed + 3 * (linear + attention)

    state = torch.get_rng_state()
    for rho in (1.0, 0.5, 0.5, 1.0):
        tokens = 17 if rho == 1.0 else num_kept_tokens(17, rho)
        assert flops(tokens, rho) == by_hand(tokens)
    assert sorted(flops.by_tokens) == [8, 17] and len(built) == 1  # one meta model, one count per token count
    assert torch.equal(torch.get_rng_state(), state)
    peak, source = peak_memory_mb(torch.device("cpu"))
    assert source == "cpu peak rss" and peak > 10  # this process holds torch: far more than 10 MiB


def test_one_interpolation_serves_the_trainer_and_the_main_job():
    from pss_kernels.train.timing import time_at
    points = [(5, 1.0), (9, 3.0), (17, 7.0)]
    assert interpolate(7, points) == 2.0 and interpolate(13, points) == 5.0
    assert interpolate(5, points) is None and interpolate(18, points) is None  # only strictly between
    assert estimate_time(7, dict(points)) == (2.0, INTERPOLATED)
    assert time_at(0.5, {0.2: 1.0, 0.8: 3.0}) == (pytest.approx(2.0), True)
