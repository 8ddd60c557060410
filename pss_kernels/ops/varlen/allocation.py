"""Who decides each image's kept-token count k_b (prefix tokens included, as sample_patches' k).

The schedule still sets the mean keep rate rho; a policy spreads the batch's tokens over its images:

- fixed:  k_b = k = num_kept_tokens(N, rho) for every image: today's PSS as a packed special case.
- budget: one top-K over the patch scores of the whole batch, with a per-image minimum and maximum:
          the batch total T = B * prefix + K, K = round(rho * B * N) - B * prefix (at least B * the
          minimum), is the same for every batch at a given rho (static_total), so shapes stay static
          (sample_patches_varlen(total=T) reads no count back; CUDA graphs and torch.compile see one
          T); only the offsets change. An image whose patches score high across the board keeps more.
- mass:   each image keeps the fewest patches that hold a fraction f of its score mass (scores >= 0:
          L1, L2, attention): a plain background needs few, a cluttered scene many. At a keep rate
          (keep_counts, mass_keep_counts_at_rate) f is one number for the batch, solved for exactly
          (on the device, from the sorted breakpoints of every image's count) so that the batch keeps
          round(rho * B * N) tokens as nearly as its images' steps allow: the schedule's rho stays
          the mean rate, T varies by a few tokens. mass_keep_counts takes f itself.

Each is a pure function of its arguments (ties: the lower image, then the lower position, as
sample_patches orders equal scores), returning (B,) int64 counts on the scores' device.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._checks import check_choice, check_int, check_keep_rate, check_rate, check_tensor
from ..sample_patches.reference import num_kept_tokens

ALLOCATIONS = ("fixed", "budget", "mass")


def fixed_keep_counts(batch: int, num_tokens: int, keep_rate: float, num_prefix_tokens: int = 1,
                      device=None) -> torch.Tensor:
    """(B,) all num_kept_tokens(num_tokens, keep_rate, num_prefix_tokens)."""
    check_int("batch", batch, minimum=1)
    check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
    check_int("num_tokens", num_tokens, minimum=num_prefix_tokens + 1)
    k = num_kept_tokens(num_tokens, check_keep_rate(keep_rate), num_prefix_tokens)
    return torch.full((batch,), k, dtype=torch.int64, device=device)


def _check_scores(scores: torch.Tensor) -> None:
    check_tensor("scores", scores, ndim=2, dtypes=None)
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a float tensor (B, P), got {scores.dtype}")
    if scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(f"scores must have B, P >= 1, got shape {tuple(scores.shape)}")


def budget_total(batch: int, num_tokens: int, keep_rate: float, num_prefix_tokens: int = 1,
                 min_patches: int = 1) -> int:
    """The budget policy's batch total T: round(keep_rate * B * N), and at least every image's prefix and
    min_patches patches (as fixed k keeps at least one patch at any rate)."""
    check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
    total = round(check_keep_rate(keep_rate) * batch * num_tokens)
    return max(total, batch * (num_prefix_tokens + min_patches))


def budget_keep_counts(scores: torch.Tensor, keep_rate: float, num_prefix_tokens: int = 1, *,
                       min_patches: int = 1, max_patches: Optional[int] = None) -> torch.Tensor:
    """(B,) counts with sum budget_total(...) (round(keep_rate * B * N), N = prefix + P) spread by one
    top-K over the batch's patch scores (B, P), each image keeping between min_patches and max_patches
    (default P) patches. ValueError names the argument when the total exceeds B * max_patches.
    The scores are not read on the host (no sync): a NaN ranks above every number, as the samplers rank
    it, and equal scores go to the lower image (all-zero scores fill the first images first)."""
    _check_scores(scores)
    batch, patches = scores.shape
    max_patches = patches if max_patches is None else max_patches
    check_int("min_patches", min_patches, minimum=1, maximum=patches)
    check_int("max_patches", max_patches, minimum=min_patches, maximum=patches)
    total_patches = budget_total(batch, num_prefix_tokens + patches, keep_rate, num_prefix_tokens,
                                 min_patches) - batch * num_prefix_tokens
    if total_patches > batch * max_patches:
        raise ValueError(f"keep_rate={keep_rate} gives {total_patches} patches for {batch} images, more than "
                         f"B * max_patches = {batch * max_patches}")
    # Each image's patches by rank (descending score, ties to the lower position); ranks below the
    # minimum are kept anyway, ranks at or above the maximum never.
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).values
    rank = torch.arange(patches, device=scores.device).expand(batch, patches)
    open_slot = ((rank >= min_patches) & (rank < max_patches)).flatten()
    remaining = total_patches - batch * min_patches
    counts = torch.full((batch,), min_patches, dtype=torch.int64, device=scores.device)
    if remaining > 0:
        # One top-K over the open slots: descending score (stable: ties to the lower image, then the
        # lower rank), then open slots before closed ones (stable again), so a closed slot is never
        # chosen whatever the scores (-inf, NaN included). Within an image a slot's score never exceeds
        # the one ranked before it, so the chosen slots of each image are a prefix of its open ranks.
        order = torch.sort(ranked.flatten(), descending=True, stable=True).indices
        order = order[torch.sort((~open_slot[order]).to(torch.uint8), stable=True).indices][:remaining]
        # scatter_add, not bincount: bincount's length is data-dependent (a host sync on a GPU).
        counts.scatter_add_(0, order // patches, torch.ones_like(order))
    return counts + num_prefix_tokens


def _cumulative_mass(scores: torch.Tensor) -> torch.Tensor:
    """(B, P) float64: each image's scores, largest first, summed cumulatively (one host sync: the
    ValueError on a negative or NaN score)."""
    values = scores.double()
    if bool(((values < 0) | torch.isnan(values)).any()):
        raise ValueError("scores must be >= 0 and not NaN for the mass allocation (L1, L2 or attention scores)")
    return torch.sort(values, dim=1, descending=True).values.cumsum(1)


def mass_keep_counts(scores: torch.Tensor, fraction: float, num_prefix_tokens: int = 1, *,
                     min_patches: int = 1) -> torch.Tensor:
    """(B,) counts: per image the fewest patches (at least min_patches) whose scores, largest first,
    sum to `fraction` of the image's total score mass. Scores must be >= 0 (L1, L2, attention); an
    image with no mass keeps min_patches."""
    _check_scores(scores)
    check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
    fraction = check_rate("fraction", fraction)
    check_int("min_patches", min_patches, minimum=1, maximum=scores.shape[1])
    cumulative = _cumulative_mass(scores)
    # The first rank whose cumulative mass reaches the target (a tiny tolerance: fraction 1 must not
    # miss the total by rounding).
    reached = cumulative >= fraction * cumulative[:, -1:] * (1 - 1e-12)
    needed = reached.to(torch.int64).argmax(1) + 1
    return needed.clamp(min=min_patches) + num_prefix_tokens


def mass_keep_counts_at_rate(scores: torch.Tensor, keep_rate: float, num_prefix_tokens: int = 1, *,
                              min_patches: int = 1) -> torch.Tensor:
    """(B,) mass counts at the one fraction f whose batch total is nearest to round(keep_rate * B * N),
    the smaller f on a tie: the mass policy at the schedule's mean rate.

    Solved exactly, on the device, with no search: as f grows, image b's count steps up by one each
    time f passes a breakpoint, the cumulative fraction of mass its top j + 1 patches hold (j < P - 1),
    and a step moves the batch total only once the count is past min_patches. So the total at f is
    B * (prefix + min_patches) plus the number of counting breakpoints below f: the batch's sorted
    breakpoints give every reachable total at once (equal breakpoints step together), and each image
    keeps one patch more than the breakpoints it passed (f just above the last one passed)."""
    _check_scores(scores)
    check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
    batch, patches = scores.shape
    check_int("min_patches", min_patches, minimum=1, maximum=patches)
    budget = round(check_keep_rate(keep_rate) * batch * (num_prefix_tokens + patches))
    cumulative = _cumulative_mass(scores)
    mass = cumulative[:, -1:]
    fractions = cumulative[:, :-1] / mass  # (B, P - 1): breakpoint j of each image
    rank = torch.arange(patches - 1, device=scores.device)
    # Breakpoints f <= 1 never passes: an image with no mass, a fraction of 1 (the trailing zero scores).
    passable = (mass > 0) & (fractions < 1)
    # Those below min_patches never move the total either.
    counting = (rank >= min_patches - 1) & passable
    breakpoints = torch.where(counting, fractions, torch.full_like(fractions, float("inf"))).flatten().sort().values
    # Passing the k smallest breakpoints (k = 0 .. M) is reachable unless it splits equal ones or
    # passes an infinite one: last[k] < next[k], last[k] finite.
    zero, infinity = breakpoints.new_zeros(1), breakpoints.new_full((1,), float("inf"))
    last, following = torch.cat((zero, breakpoints)), torch.cat((breakpoints, infinity))
    reachable = (last < following) & torch.isfinite(last)
    passed = torch.arange(last.numel(), device=scores.device)
    wanted = budget - batch * (num_prefix_tokens + min_patches)
    # Nearest to wanted, the smaller on a tie (argmin keeps the first of equal costs).
    cost = torch.where(reachable, (passed - wanted).abs() * 2 + (passed > wanted).to(passed.dtype),
                       torch.full_like(passed, torch.iinfo(torch.int64).max))
    best = torch.argmin(cost)
    # The counts straight from the breakpoints passed (those <= last[best]), not recomputed at a fraction
    # between two of them: breakpoints closer than the recount's tolerance would be counted otherwise.
    # (What mass_keep_counts gives at any f in (last[best], following[best]), but for its tolerance.)
    passed_per_image = ((fractions <= last[best]) & passable).sum(1)
    return (1 + passed_per_image).clamp(min=min_patches) + num_prefix_tokens


def keep_counts(policy: str, scores: torch.Tensor, keep_rate: float, num_prefix_tokens: int = 1, *,
                fraction: Optional[float] = None, min_patches: int = 1,
                max_patches: Optional[int] = None) -> torch.Tensor:
    """The counts of `policy` (ALLOCATIONS) for a batch's patch scores (B, P) at mean rate keep_rate
    (fraction: the mass policy's own fraction of each image's mass; default: the fraction that keeps
    the batch at keep_rate, mass_keep_counts_at_rate). An option the policy does not read is refused,
    not ignored: fraction is the mass policy's, max_patches the budget's, min_patches theirs both
    (keep_rate is checked even where a given fraction replaces it)."""
    _check_scores(scores)
    check_choice("policy", policy, ALLOCATIONS)
    check_keep_rate(keep_rate)
    for name, given, readers in (("fraction", fraction is not None, ("mass",)),
                                 ("max_patches", max_patches is not None, ("budget",)),
                                 ("min_patches", min_patches != 1, ("budget", "mass"))):
        if given and policy not in readers:
            raise ValueError(f"{name} is read by the {' and '.join(readers)} policy only, got policy={policy!r}")
    if policy == "fixed":
        return fixed_keep_counts(scores.shape[0], num_prefix_tokens + scores.shape[1], keep_rate, num_prefix_tokens,
                                 device=scores.device)
    if policy == "budget":
        return budget_keep_counts(scores, keep_rate, num_prefix_tokens, min_patches=min_patches,
                                  max_patches=max_patches)
    if fraction is None:  # mass
        return mass_keep_counts_at_rate(scores, keep_rate, num_prefix_tokens, min_patches=min_patches)
    return mass_keep_counts(scores, fraction, num_prefix_tokens, min_patches=min_patches)


def static_total(policy: str, batch: int, num_tokens: int, keep_rate: float, num_prefix_tokens: int = 1, *,
                 min_patches: int = 1):
    """The batch total T of `policy` known without reading the scores (an int), or None where it
    depends on them (mass). fixed: B * num_kept_tokens; budget: budget_total (round(keep_rate * B * N),
    at least B * (num_prefix_tokens + min_patches)). Given to sample_patches_varlen(total=), it spares
    the host sync of reading the counts."""
    check_choice("policy", policy, ALLOCATIONS)
    check_int("batch", batch, minimum=1)
    check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
    check_int("num_tokens", num_tokens, minimum=num_prefix_tokens + 1)
    check_int("min_patches", min_patches, minimum=1, maximum=num_tokens - num_prefix_tokens)
    check_keep_rate(keep_rate)
    if policy == "fixed":
        return batch * num_kept_tokens(num_tokens, keep_rate, num_prefix_tokens)
    if policy == "budget":
        return budget_total(batch, num_tokens, keep_rate, num_prefix_tokens, min_patches)
    return None
