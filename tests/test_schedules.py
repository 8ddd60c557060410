"""Keep-rate schedules against hand-computed values (pss_kernels/schedules.py).

Hand computations use the documented rules: raw = a + (b - a) * pos(step), the high end pushed
half a quantum out, rounded to the nearest multiple of the quantum (ties up) and clamped.
"""
import json
import math

import numpy as np
import pytest

from pss_kernels.schedules import (Cosine, Cyclic, Fixed, Linear, PatchDropout, StagedSchedule,
                                   WarmupCosine, build_schedule, solve_budget)

PSS_LEVELS = {0.2, 0.4, 0.6, 0.8, 1.0}


def rates_of(schedule, steps):
    return [schedule.keep_rate_at(s) for s in steps]


# ---------------------------------------------------------------- PSS schedules: values


def test_linear_values_and_exact_shares():
    # raw = 0.2 + 0.9 * step / 900 = 0.2 + step / 1000
    s = Linear(0.2, 1.0, total_steps=900, steps_per_epoch=100)
    assert rates_of(s, [0, 99, 150, 450, 650, 750, 899]) == [0.2, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    # Level boundaries at raw 0.3, 0.5, 0.7, 0.9 (ties round up): steps 100, 300, 500, 700.
    assert rates_of(s, [100, 300, 500, 700]) == [0.4, 0.6, 0.8, 1.0]
    assert s.shares() == pytest.approx({0.2: 1 / 9, 0.4: 2 / 9, 0.6: 2 / 9, 0.8: 2 / 9, 1.0: 2 / 9})
    assert s.mean_keep_rate() == pytest.approx((0.2 * 100 + (0.4 + 0.6 + 0.8 + 1.0) * 200) / 900)


def test_linear_decreasing_pushes_the_start_up():
    # raw = 1.1 - step / 1000
    s = Linear(1.0, 0.2, total_steps=900, steps_per_epoch=100)
    assert rates_of(s, [0, 150, 250, 450, 899]) == [1.0, 1.0, 0.8, 0.6, 0.2]


def test_cyclic_values_one_triangle_per_epoch():
    # u = (step mod 90) / 90, pos = 1 - |2u - 1|, raw = 0.2 + 0.9 pos
    s = Cyclic(0.2, 1.0, total_steps=180, steps_per_epoch=90)
    steps = [0, 10, 20, 30, 40, 45, 50, 80, 89]
    expected = [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 0.4, 0.2]
    assert rates_of(s, steps) == expected
    assert rates_of(s, [90 + t for t in steps]) == expected



def test_cyclic_exact_per_step_values_and_symmetry():
    """Unquantised, every step of an epoch: rho(s) = low + (high - low) * (1 - |2 s / E - 1|), so
    rho(0) = low, rho(E / 2) = high and rho(s) = rho(E - s) (a phase of s / (E - 1) breaks both)."""
    epoch = 30
    s = Cyclic(0.2, 1.0, quantum=None, total_steps=2 * epoch, steps_per_epoch=epoch)
    rates = np.array(rates_of(s, range(2 * epoch)))
    phase = (np.arange(2 * epoch) % epoch) / epoch
    np.testing.assert_allclose(rates, 0.2 + 0.8 * (1 - np.abs(2 * phase - 1)), rtol=0, atol=1e-12)
    assert rates[0] == rates[epoch] == pytest.approx(0.2) and rates[epoch // 2] == pytest.approx(1.0)
    for step in range(1, epoch):
        assert rates[step] == pytest.approx(rates[epoch - step], abs=1e-12), step


def test_cyclic_paper_shares():
    # Paper: with Cyclic(0.2, 1.0) and step 0.2, each of 0.4 ... 1.0 gets ~22 % of iterations, 0.2 ~11 %.
    s = Cyclic(0.2, 1.0, total_steps=10 * 1800, steps_per_epoch=1800)
    shares = s.shares()
    assert set(shares) == PSS_LEVELS
    assert shares[0.2] == pytest.approx(1 / 9, abs=2e-3)
    for rho in (0.4, 0.6, 0.8, 1.0):
        assert shares[rho] == pytest.approx(2 / 9, abs=2e-3)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert s.mean_keep_rate() == pytest.approx((0.2 + 2 * (0.4 + 0.6 + 0.8 + 1.0)) / 9, abs=2e-3)


def test_cosine_values():
    # pos = (1 - cos(pi step / 1000)) / 2, raw = 0.2 + 0.9 pos
    s = Cosine(0.2, 1.0, total_steps=1000, steps_per_epoch=100)
    # step 250: raw 0.332 -> 0.4; 500: 0.65 -> 0.6; 600: 0.789 -> 0.8; 750: 0.968 -> 1.0
    assert rates_of(s, [0, 250, 500, 600, 750, 999]) == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]


def test_mean_keep_rate_matches_brute_force():
    s = Cosine(0.2, 1.0, total_steps=777, steps_per_epoch=70)
    brute = rates_of(s, range(777))
    assert s.mean_keep_rate() == pytest.approx(float(np.mean(brute)), rel=1e-12)
    values, counts = np.unique(brute, return_counts=True)
    assert s.shares() == pytest.approx(dict(zip(values.tolist(), (counts / 777).tolist())))


def test_fixed_and_steps_past_the_end():
    s = Fixed(0.6, total_steps=50, steps_per_epoch=10)
    assert rates_of(s, [0, 49]) == [0.6, 0.6] and s.shares() == {0.6: 1.0}
    lin = Linear(0.2, 1.0, total_steps=900, steps_per_epoch=100)
    assert lin.keep_rate_at(5000) == lin.keep_rate_at(899) == 1.0


# ---------------------------------------------------------------- quantisation and cool-down


def test_quantisation_levels():
    for s in (Linear(0.2, 1.0, total_steps=997, steps_per_epoch=31),
              Cyclic(0.1, 0.9, total_steps=997, steps_per_epoch=31),
              Cosine(0.3, 1.0, total_steps=997, steps_per_epoch=31)):
        assert set(s.shares()) <= PSS_LEVELS, s
    quarter = Linear(0.25, 1.0, quantum=0.25, total_steps=1000, steps_per_epoch=10)
    assert set(quarter.shares()) == {0.25, 0.5, 0.75, 1.0}
    # Cyclic(0.2, 0.8): the top level is clamped to the quantised high end.
    assert max(Cyclic(0.2, 0.8, total_steps=100, steps_per_epoch=100).shares()) == 0.8


def test_quantum_none_is_continuous():
    s = Linear(0.2, 1.0, quantum=None, total_steps=900, steps_per_epoch=100)
    assert s.keep_rate_at(450) == pytest.approx(0.6)
    assert s.keep_rate_at(100) == pytest.approx(0.2 + 0.8 / 9)


def test_fixed_quantisation_rounds_half_up():
    assert Fixed(0.5, total_steps=10, steps_per_epoch=10).keep_rate == 0.5  # Fixed is not quantised by default
    assert Fixed(0.5, quantum=0.2, total_steps=10, steps_per_epoch=10).keep_rate == 0.6
    assert Fixed(0.3, quantum=0.2, total_steps=10, steps_per_epoch=10).keep_rate == 0.4


def test_quantum_must_divide_one():
    with pytest.raises(ValueError, match="quantum"):
        Linear(0.2, 1.0, quantum=0.3, total_steps=10, steps_per_epoch=10)


def test_cooldown_epochs_run_at_full_rho():
    s = Linear(0.2, 1.0, cooldown_epochs=1, total_steps=1000, steps_per_epoch=100)
    # The ramp runs over the first 900 steps exactly as Linear(total_steps=900), then rho = 1.
    assert rates_of(s, [0, 150, 450, 899, 900, 999]) == [0.2, 0.4, 0.6, 1.0, 1.0, 1.0]
    assert s.shares() == pytest.approx({0.2: 0.1, 0.4: 0.2, 0.6: 0.2, 0.8: 0.2, 1.0: 0.3})
    cyc = Cyclic(0.2, 1.0, cooldown_epochs=2, total_steps=1000, steps_per_epoch=100)
    assert rates_of(cyc, [0, 799, 800, 850, 999]) == [0.2, 0.2, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="cooldown_epochs"):
        Cyclic(0.2, 1.0, cooldown_epochs=10, total_steps=1000, steps_per_epoch=100)


# ---------------------------------------------------------------- state, resume, checks


def test_step_and_keep_rate_property():
    s = Cyclic(0.2, 1.0, total_steps=180, steps_per_epoch=90)
    for _ in range(20):
        s.step()
    assert s.current_step == 20 and s.keep_rate == 0.6


@pytest.mark.parametrize("make", [
    lambda: Cyclic(0.2, 1.0, cooldown_epochs=1, total_steps=300, steps_per_epoch=40),
    lambda: PatchDropout(0.5, 1.0, 0.2, seed=7, total_steps=300, steps_per_epoch=40),
    lambda: StagedSchedule([0.5, 1.0], [120, 180], steps_per_epoch=40),
    lambda: WarmupCosine(0.6, hold_epochs=1, decay_epochs=3, quantum=0.2, total_steps=300, steps_per_epoch=40),
], ids=["cyclic", "patchdropout", "staged", "warmup_cosine"])
def test_state_dict_round_trip_and_resume_equivalence(make):
    uninterrupted = make()
    expected = []
    for _ in range(250):
        expected.append(uninterrupted.keep_rate)
        uninterrupted.step()

    first = make()
    resumed_rates = []
    for _ in range(100):
        resumed_rates.append(first.keep_rate)
        first.step()
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a JSON / torch checkpoint
    second = make()
    second.load_state_dict(state)
    assert second.current_step == 100 and second.state_dict() == first.state_dict()
    for _ in range(150):
        resumed_rates.append(second.keep_rate)
        second.step()
    assert resumed_rates == expected


def test_mismatched_state_dict_is_rejected():
    state = Cyclic(0.2, 1.0, total_steps=180, steps_per_epoch=90).state_dict()
    with pytest.raises(ValueError, match=r"Cyclic\(low=0.2.*Cyclic\(low=0.4"):
        Cyclic(0.4, 1.0, total_steps=180, steps_per_epoch=90).load_state_dict(state)
    with pytest.raises(ValueError, match="total_steps=180"):
        Cyclic(0.2, 1.0, total_steps=270, steps_per_epoch=90).load_state_dict(state)
    with pytest.raises(ValueError, match="Linear"):
        Linear(0.2, 1.0, total_steps=180, steps_per_epoch=90).load_state_dict(state)
    with pytest.raises(ValueError, match="keys"):
        Cyclic(0.2, 1.0, total_steps=180, steps_per_epoch=90).load_state_dict({"step": 3})
    with pytest.raises(ValueError, match="step"):
        Cyclic(0.2, 1.0, total_steps=180, steps_per_epoch=90).load_state_dict({**state, "step": -1})


def test_repr_names_the_config():
    assert repr(Cyclic(0.2, 1.0, total_steps=180, steps_per_epoch=90)) == (
        "Cyclic(low=0.2, high=1.0, quantum=0.2, cooldown_epochs=0, total_steps=180, steps_per_epoch=90)")


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="low must be <= high"):
        Cyclic(1.0, 0.2, total_steps=10, steps_per_epoch=10)
    with pytest.raises(ValueError, match="start"):
        Linear(0.0, 1.0, total_steps=10, steps_per_epoch=10)
    with pytest.raises(ValueError, match="total_steps"):
        Fixed(1.0, total_steps=0, steps_per_epoch=10)
    with pytest.raises(TypeError, match="rho"):
        Fixed("0.5", total_steps=10, steps_per_epoch=10)
    s = Fixed(1.0, total_steps=10, steps_per_epoch=10)
    with pytest.raises(ValueError, match="step"):
        s.keep_rate_at(-1)
    with pytest.raises(TypeError, match="step"):
        s.keep_rate_at(1.5)


# ---------------------------------------------------------------- PatchDropout


def test_patchdropout_is_reproducible_and_order_independent():
    a = PatchDropout(0.5, 1.0, 0.25, seed=3, total_steps=1000, steps_per_epoch=100)
    b = PatchDropout(0.5, 1.0, 0.25, seed=3, total_steps=1000, steps_per_epoch=100)
    other_seed = PatchDropout(0.5, 1.0, 0.25, seed=4, total_steps=1000, steps_per_epoch=100)
    first = rates_of(a, range(200))
    assert rates_of(b, reversed(range(200)))[::-1] == first
    assert rates_of(other_seed, range(200)) != first
    assert all(0.5 <= rate <= 1.0 for rate in first)


def test_patchdropout_draws_of_neighbouring_seeds_are_independent():
    """The generator is seeded with the pair (seed, step), not with one number made of both: seed 3
    shifted by one step is not seed 4, and (seed a, step b) is not (seed b, step a)."""
    def schedule(seed):
        return PatchDropout(0.5, 1.0, seed=seed, total_steps=1000, steps_per_epoch=100)

    three, four = rates_of(schedule(3), range(1, 201)), rates_of(schedule(4), range(200))
    assert not any(a == b for a, b in zip(three, four))  # continuous draws: never equal by chance
    for a, b in ((3, 4), (0, 7), (2, 9)):
        assert schedule(a).keep_rate_at(b) != schedule(b).keep_rate_at(a), (a, b)


def test_patchdropout_grid_ends_at_high_and_holds_clean_values():
    """(1.0 - 0.4) / 0.2 = 2.9999999999999996: the grid still has 4 values, up to high; 0.7 + 0.1 is
    0.7999999999999999 in floating point, and the grid holds 0.8 itself."""
    s = PatchDropout(0.4, 1.0, grid_step=0.2, total_steps=4000, steps_per_epoch=100)
    assert s.shares() == pytest.approx({0.4: 0.25, 0.6: 0.25, 0.8: 0.25, 1.0: 0.25})
    assert set(rates_of(s, range(400))) == {0.4, 0.6, 0.8, 1.0}
    s = PatchDropout(0.7, 1.0, grid_step=0.1, total_steps=4000, steps_per_epoch=100)
    assert list(s.shares()) == [0.7, 0.8, 0.9, 1.0]
    assert set(rates_of(s, range(400))) == {0.7, 0.8, 0.9, 1.0}
    assert s.mean_keep_rate() == pytest.approx(0.85)


def test_patchdropout_with_low_equal_to_high_is_fixed():
    s = PatchDropout(0.6, 0.6, total_steps=50, steps_per_epoch=10)
    assert set(rates_of(s, range(50))) == {0.6}
    assert s.shares() == {0.6: 1.0} and s.mean_keep_rate() == pytest.approx(0.6)
    assert PatchDropout(0.6, 0.6, 0.5, total_steps=50, steps_per_epoch=10).shares() == pytest.approx({0.6: 0.5, 1.0: 0.5})
    with pytest.raises(ValueError, match="low must be <= high"):
        PatchDropout(0.61, 0.6, total_steps=50, steps_per_epoch=10)
    with pytest.raises(ValueError, match="grid_step must be > 0"):
        PatchDropout(0.5, 1.0, grid_step=0.0, total_steps=50, steps_per_epoch=10)


def test_patchdropout_draws_continuously_by_default():
    """The paper's regulariser: rho uniform in [0.5, 1] (continuous), 1 with probability p_full."""
    s = PatchDropout(0.5, 1.0, 0.25, total_steps=20000, steps_per_epoch=100)
    rates = np.array(rates_of(s, range(20000)))
    drawn = rates[rates < 1.0]
    assert len(np.unique(drawn)) == len(drawn)  # no grid: (almost surely) every draw distinct
    assert abs((rates == 1.0).mean() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 20000)
    # Uniform on [0.5, 1]: the deciles of the drawn rates, within 5 standard errors.
    for q in np.arange(0.1, 1.0, 0.1):
        assert abs((drawn < 0.5 + 0.5 * q).mean() - q) < 5 * math.sqrt(q * (1 - q) / len(drawn))
    assert s.mean_keep_rate() == pytest.approx(0.75 * 0.75 + 0.25)
    shares = s.shares()  # 50 equal bins for the projections, p_full at 1
    assert len(shares) == 51 and shares[1.0] == pytest.approx(0.25) and sum(shares.values()) == pytest.approx(1.0)
    assert math.fsum(r * w for r, w in shares.items()) == pytest.approx(s.mean_keep_rate())


def test_patchdropout_grid_distribution():
    # P(1.0) = p_full + (1 - p_full) / 6 = 0.375; every other grid value (1 - p_full) / 6 = 0.125.
    s = PatchDropout(0.5, 1.0, 0.25, grid_step=0.1, total_steps=20000, steps_per_epoch=100)
    expected = {0.5: 0.125, 0.6: 0.125, 0.7: 0.125, 0.8: 0.125, 0.9: 0.125, 1.0: 0.375}
    assert s.shares() == pytest.approx(expected)
    assert s.mean_keep_rate() == pytest.approx(0.75 * 0.75 + 0.25)
    values, counts = np.unique(rates_of(s, range(20000)), return_counts=True)
    empirical = dict(zip(values.tolist(), (counts / 20000).tolist()))
    assert empirical.keys() == expected.keys()
    for rho, share in expected.items():  # 5 standard deviations of a binomial share
        assert abs(empirical[rho] - share) < 5 * math.sqrt(share * (1 - share) / 20000), rho


def test_patchdropout_grid():
    s = PatchDropout(0.2, 1.0, grid_step=0.2, total_steps=10, steps_per_epoch=10)
    assert s.shares() == pytest.approx({0.2: 0.2, 0.4: 0.2, 0.6: 0.2, 0.8: 0.2, 1.0: 0.2})


def test_patchdropout_table7_variant_keeps_half_or_all():
    """Table 7's {0.5, 1}: build_schedule("patchdropout:0.5,1.0,grid_step=0.5")."""
    s = build_schedule("patchdropout:0.5,1.0,grid_step=0.5", total_steps=2000, steps_per_epoch=100)
    assert set(rates_of(s, range(2000))) == {0.5, 1.0}
    assert s.shares() == pytest.approx({0.5: 0.5, 1.0: 0.5})


# ---------------------------------------------------------------- warm-up then cosine


def test_warmup_cosine_values():
    s = WarmupCosine(0.7, hold_epochs=1, decay_epochs=2, total_steps=500, steps_per_epoch=100)
    # rho = 0.7 + 0.3 (1 + cos(pi (step - 100) / 200)) / 2 for steps 100 ... 300
    assert rates_of(s, [0, 99, 100, 200, 300, 499]) == pytest.approx([1.0, 1.0, 1.0, 0.85, 0.7, 0.7])
    assert s.keep_rate_at(150) == pytest.approx(0.7 + 0.3 * (1 + math.sqrt(0.5)) / 2)


def test_warmup_cosine_quantised_and_defaults():
    s = WarmupCosine(0.6, hold_epochs=1, decay_epochs=2, quantum=0.2, total_steps=500, steps_per_epoch=100)
    # raw 0.941 -> 1.0, 0.8 -> 0.8, 0.659 -> 0.6
    assert rates_of(s, [150, 200, 250, 300]) == [1.0, 0.8, 0.6, 0.6]
    # EViT's 10 + 100 of 300 epochs as fractions: hold 100 of 3000 steps, decay over 1000.
    d = WarmupCosine(0.7, total_steps=3000, steps_per_epoch=10)
    assert rates_of(d, [99, 600, 1100]) == pytest.approx([1.0, 0.85, 0.7])
    with pytest.raises(ValueError, match="never be reached"):
        WarmupCosine(0.7, hold_epochs=2, decay_epochs=4, total_steps=500, steps_per_epoch=100)


# ---------------------------------------------------------------- budget solver

COST = {0.5: 0.45, 0.75: 0.7, 1.0: 1.0}


def test_budget_solver_hand_computed():
    # T_k = c e^{2 s_k}, c = 0.5 * 10000 * 1.0 / sum_k e^{2 s_k} cost(s_k) = 425.55
    s = solve_budget(0.5, COST, (0.5, 0.75, 1.0), 2.0, total_steps=10000, steps_per_epoch=100)
    assert isinstance(s, StagedSchedule)
    assert s.stages == ((0.5, 1157), (0.75, 1907), (1.0, 3144))
    assert s.total_steps == 6208
    assert rates_of(s, [0, 1156, 1157, 3063, 3064, 6207]) == [0.5, 0.5, 0.75, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("budget,alpha", [(0.25, 2.0), (0.5, 1.0), (0.75, 5.0), (1.0, 0.0)])
def test_budget_met_and_proportions_follow_exp(budget, alpha):
    rates = (0.5, 0.75, 1.0)
    s = solve_budget(budget, COST, rates, alpha, total_steps=30000, steps_per_epoch=100)
    spent = sum(steps * COST[rate] for rate, steps in s.stages)
    assert abs(spent - budget * 30000 * COST[1.0]) <= 0.5 * sum(COST.values())  # half a step per stage
    lengths = [steps for _, steps in s.stages]
    for k in range(1, 3):
        assert lengths[k] / lengths[0] == pytest.approx(math.exp(alpha * (rates[k] - rates[0])), rel=2e-3)
    assert s.mean_keep_rate() == pytest.approx(sum(r * n for r, n in s.stages) / s.total_steps)


def test_budget_whole_epochs_and_callable_cost():
    s = solve_budget(0.5, lambda rho: rho, total_steps=10000, steps_per_epoch=100, whole_epochs=True)
    assert all(steps % 100 == 0 for _, steps in s.stages)
    spent = sum(steps * rate for rate, steps in s.stages)
    assert abs(spent - 5000) <= 0.5 * 100 * (0.5 + 0.75 + 1.0)


def test_budget_infeasible_and_bad_input():
    with pytest.raises(ValueError, match="infeasible.*less than one step"):
        solve_budget(1e-4, COST, total_steps=1000, steps_per_epoch=10)
    with pytest.raises(ValueError, match="infeasible within max_steps=10000"):
        solve_budget(0.9, COST, total_steps=10000, steps_per_epoch=100, max_steps=10000)
    with pytest.raises(ValueError, match="no entry for keep rate 0.75"):
        solve_budget(0.5, {0.5: 0.5, 1.0: 1.0}, total_steps=1000, steps_per_epoch=10)
    with pytest.raises(ValueError, match="ascending"):
        solve_budget(0.5, COST, (1.0, 0.5), total_steps=1000, steps_per_epoch=10)
    with pytest.raises(ValueError, match="budget"):
        solve_budget(1.5, COST, total_steps=1000, steps_per_epoch=10)


def test_staged_schedule_direct():
    s = StagedSchedule([0.5, 1.0], [3, 2], steps_per_epoch=1)
    assert rates_of(s, range(5)) == [0.5, 0.5, 0.5, 1.0, 1.0]
    assert s.shares() == pytest.approx({0.5: 0.6, 1.0: 0.4})
    with pytest.raises(ValueError, match="sum"):
        StagedSchedule([0.5, 1.0], [3, 2], total_steps=6, steps_per_epoch=1)


# ---------------------------------------------------------------- build_schedule


@pytest.mark.parametrize("spec,expected", [
    ("none", Fixed(1.0, total_steps=900, steps_per_epoch=90)),
    ("baseline", Fixed(1.0, total_steps=900, steps_per_epoch=90)),
    ("fixed:0.6", Fixed(0.6, total_steps=900, steps_per_epoch=90)),
    ("linear:0.2,1.0", Linear(0.2, 1.0, total_steps=900, steps_per_epoch=90)),
    ("linear:0.2,1.0,quantum=none", Linear(0.2, 1.0, quantum=None, total_steps=900, steps_per_epoch=90)),
    ("Cyclic: 0.2, 1.0, cooldown_epochs=2, quantum=0.25",
     Cyclic(0.2, 1.0, cooldown_epochs=2, quantum=0.25, total_steps=900, steps_per_epoch=90)),
    ("cosine:low=0.4,high=1.0", Cosine(0.4, 1.0, total_steps=900, steps_per_epoch=90)),
    ("patchdropout", PatchDropout(total_steps=900, steps_per_epoch=90)),
    ("patchdropout:0.4,0.9,0.25,seed=3", PatchDropout(0.4, 0.9, 0.25, seed=3, total_steps=900, steps_per_epoch=90)),
    ("warmup_cosine:0.7", WarmupCosine(0.7, total_steps=900, steps_per_epoch=90)),
    ("warmup_cosine:0.7,hold_epochs=1,decay_epochs=3",
     WarmupCosine(0.7, hold_epochs=1, decay_epochs=3, total_steps=900, steps_per_epoch=90)),
    ("budget:0.5,alpha=1,keep_rates=0.4/0.7/1.0",
     solve_budget(0.5, lambda rho: rho, (0.4, 0.7, 1.0), 1.0, total_steps=900, steps_per_epoch=90)),
])
def test_build_schedule_parses_specs(spec, expected):
    built = build_schedule(spec, total_steps=900, steps_per_epoch=90)
    assert type(built) is type(expected) and built.config() == expected.config()


@pytest.mark.parametrize("spec,message", [
    ("cyclc:0.2,1.0", "unknown schedule spec"),
    ("cyclic:0.2", "missing high"),
    ("cyclic:0.2,1.0,0.5", "unexpected positional"),
    ("cyclic:high=1.0,0.2", "unexpected positional"),
    ("cyclic:0.2,1.0,seed=3", "unknown option 'seed'"),
    ("fixed:abc", "bad schedule spec"),
])
def test_build_schedule_errors_list_valid_specs(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        build_schedule(spec, total_steps=900, steps_per_epoch=90)
    for usage in ("none | baseline", "fixed:RHO", "linear:START,END", "cyclic:LOW,HIGH", "cosine:LOW,HIGH",
                  "patchdropout[:LOW,HIGH[,P_FULL]]", "warmup_cosine:TARGET", "budget:FRACTION"):
        assert usage in str(error.value)
    with pytest.raises(TypeError, match="spec"):
        build_schedule(0.5, total_steps=900, steps_per_epoch=90)
