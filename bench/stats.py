"""Timing on a noisy machine: interleaved rounds, quiet rounds, medians of paired ratios.

Every round runs each variant once, in an order rotated by one place per round, so slow phases of
the machine (other tenants, thermal state, page-cache churn) fall on every variant alike. The CPU
share of every call (process CPU time over wall time and threads) marks the rounds that ran on a
quiet machine; the headline ratio is the median over those rounds of the per-round ratio (all rounds when none was
quiet), which cancels slow drift that a ratio of medians keeps. Load from other processes does not
slow every variant alike (with oversubscribed cores each extra operation pays a thread
synchronisation), so ratios from loaded rounds are biased, not just noisy. The ratio of the
fastest runs is kept as a cross-check; it is fragile when one variant never got a quiet run.
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
    cpu_clock: Clock | None = None,
    threads: int = 1,
    shares: list[float] | None = None,
    min_quiet: int = 0,
    max_rounds: int | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant over ``rounds`` interleaved rounds (after ``warmup`` untimed ones).

    ``on_round(r, {name: seconds})`` is called after each timed round (progress output). With a
    ``cpu_clock`` (process CPU seconds, all threads), the lowest *CPU share* of the round's calls,
    CPU seconds / (wall seconds · ``threads``), is appended to ``shares``: close to 1 when the
    process had its cores to itself, lower when other processes took them. Then, while fewer than
    ``min_quiet`` rounds were quiet (:func:`quiet_rounds`), more rounds run, up to ``max_rounds``.
    """
    if rounds < 1:
        raise ValueError(f"need at least one timed round, got {rounds}")
    names = list(variants)
    for order in rotated_orders(names, warmup):
        for name in order:
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    shares = [] if shares is None else shares
    limit = max(rounds, max_rounds or rounds)
    for index, order in enumerate(rotated_orders(names, limit)):
        if index >= rounds and (cpu_clock is None or len(quiet_rounds(shares)) >= min_quiet):
            break
        this_round, lowest_share = {}, float("inf")
        for name in order:
            start, cpu_start = clock(), cpu_clock() if cpu_clock else 0.0
            variants[name]()
            this_round[name] = clock() - start
            samples[name].append(this_round[name])
            if cpu_clock is not None and this_round[name] > 0:
                lowest_share = min(lowest_share, (cpu_clock() - cpu_start) / (this_round[name] * threads))
        if cpu_clock is not None:
            shares.append(lowest_share)
        if on_round is not None:
            on_round(index, this_round)
    return samples


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios ``numerator[i] / denominator[i]`` of two interleaved variants."""
    if len(numerator) != len(denominator):
        raise ValueError(f"unpaired samples: {len(numerator)} vs {len(denominator)}")
    return [a / b for a, b in zip(numerator, denominator)]


def ratio(
    samples: Mapping[str, Sequence[float]], numerator: str, denominator: str, rounds: Sequence[int] | None = None
) -> float:
    """Median of the per-round ratios of two variants measured by :func:`run_interleaved` (the
    headline estimate), over the given ``rounds`` only (e.g. :func:`quiet_rounds`) or all of them."""
    ratios = paired_ratios(samples[numerator], samples[denominator])
    return median([ratios[i] for i in rounds] if rounds else ratios)


def median_of(values: Sequence[float], rounds: Sequence[int] | None = None) -> float:
    """Median of one variant's samples over the given rounds (all when none are given)."""
    return median([values[i] for i in rounds] if rounds else values)


def fastest_ratio(
    samples: Mapping[str, Sequence[float]], numerator: str, denominator: str, rounds: Sequence[int] | None = None
) -> float:
    """Ratio of the two variants' fastest runs (a cross-check, see the module docstring), over the
    given ``rounds`` only (e.g. :func:`quiet_rounds`) or all of them."""
    pick = range(len(samples[numerator])) if not rounds else rounds
    return min(samples[numerator][i] for i in pick) / min(samples[denominator][i] for i in pick)


QUIET_CPU_SHARE = 0.93  # quiet calls measure 0.96-0.99 here; contended 512 px steps 0.88-0.90, one busy process 0.6


def quiet_rounds(shares: Sequence[float], threshold: float = QUIET_CPU_SHARE) -> list[int]:
    """Rounds in which every call kept at least ``threshold`` of its cores (see :func:`run_interleaved`)."""
    return [i for i, share in enumerate(shares) if share >= threshold]


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
