"""Timing on a noisy machine: interleaved rounds, fastest runs, medians, paired ratios.

Every round runs each variant once, in an order rotated by one place per round, so slow phases of
the machine (other tenants, thermal state, page-cache churn) fall on every variant alike.

Two estimates of a ratio are kept. The headline one compares each variant's *fastest* run: load
from other processes only ever adds time, and it does not add it evenly (a variant that moves more
memory suffers more from a neighbour's memory traffic), so on a shared machine the minima are the
best estimate of what the code costs (the argument of Python's ``timeit``). The median over rounds
of the per-round ratio is reported beside it; the two agree on a quiet machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

Clock = Callable[[], float]


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (mean of the middle two for an even count)."""
    if not values:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(values))


def rotated_orders(names: Sequence[str], rounds: int) -> list[tuple[str, ...]]:
    """Round ``r`` runs ``names`` rotated left by ``r``: each variant takes each position in turn."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    names = tuple(names)
    if not names:
        return [() for _ in range(rounds)]
    return [names[r % len(names):] + names[:r % len(names)] for r in range(rounds)]


def run_interleaved(
    variants: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    clock: Clock = time.perf_counter,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
    probe: Callable[[], float] | None = None,
    probes: list[float] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant over ``rounds`` interleaved rounds (after ``warmup`` untimed ones).

    ``on_round(r, {name: seconds})`` is called after each timed round (progress output). With a
    ``probe`` (seconds of a fixed small workload), the slower of its runs before and after each
    round is appended to ``probes``: how loaded the machine was during that round.
    """
    if rounds < 1:
        raise ValueError(f"need at least one timed round, got {rounds}")
    for order in rotated_orders(list(variants), warmup):
        for name in order:
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for index, order in enumerate(rotated_orders(list(variants), rounds)):
        before = probe() if probe is not None else 0.0
        this_round = {}
        for name in order:
            start = clock()
            variants[name]()
            this_round[name] = clock() - start
            samples[name].append(this_round[name])
        if probe is not None and probes is not None:
            probes.append(max(before, probe()))
        if on_round is not None:
            on_round(index, this_round)
    return samples


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios ``numerator[i] / denominator[i]`` of two interleaved variants."""
    if len(numerator) != len(denominator):
        raise ValueError(f"unpaired samples: {len(numerator)} vs {len(denominator)}")
    return [a / b for a, b in zip(numerator, denominator)]


def ratio(samples: Mapping[str, Sequence[float]], numerator: str, denominator: str) -> float:
    """Median of the per-round ratios of two variants measured by :func:`run_interleaved`."""
    return median(paired_ratios(samples[numerator], samples[denominator]))


def fastest_ratio(
    samples: Mapping[str, Sequence[float]], numerator: str, denominator: str, rounds: Sequence[int] | None = None
) -> float:
    """Ratio of the two variants' fastest runs (the headline estimate, see the module docstring),
    over the given ``rounds`` only (e.g. :func:`quiet_rounds`) or all of them."""
    pick = range(len(samples[numerator])) if not rounds else rounds
    return min(samples[numerator][i] for i in pick) / min(samples[denominator][i] for i in pick)


def quiet_rounds(probes: Sequence[float], reference: float, tolerance: float = 1.3) -> list[int]:
    """Rounds whose load probe stayed within ``tolerance`` of ``reference`` (the probe's fastest run)."""
    return [i for i, value in enumerate(probes) if value <= tolerance * reference]


def summarize(values: Sequence[float]) -> dict[str, float]:
    """median/min/max/n of one variant's samples (for the JSON)."""
    return {"median": median(values), "min": float(min(values)), "max": float(max(values)), "n": len(values)}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``y ≈ intercept + slope·x``; returns (intercept, slope, r²) (r² = 1 for a flat exact fit)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("need at least two (x, y) pairs of equal length")
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all x are equal")
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    intercept = mean_y - slope * mean_x
    total = sum((y - mean_y) ** 2 for y in ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    return intercept, slope, 1.0 if total == 0 else 1.0 - residual / total
