"""bench.stats: interleaving, medians and paired ratios (no ComfyUI, no torch)."""

import itertools

import pytest

from bench import stats


def test_median_of_odd_and_even_counts():
    """The middle value, or the mean of the middle two."""
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([4.0, 1.0, 2.0, 3.0]) == 2.5


def test_median_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        stats.median([])


def test_rotated_orders_put_every_variant_in_every_position():
    """Over len(names) rounds each variant runs first, second, ... exactly once."""
    orders = stats.rotated_orders(["a", "b", "c"], 3)
    assert orders == [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b")]
    for position in range(3):
        assert sorted(order[position] for order in orders) == ["a", "b", "c"]


def test_run_interleaved_alternates_variants_and_skips_warmup():
    """Warm-up calls run but are not timed; timed calls alternate between the variants."""
    calls = []
    ticks = itertools.count()
    samples = stats.run_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        rounds=2, warmup=1, clock=lambda: float(next(ticks)),
    )
    assert calls == ["a", "b", "a", "b", "b", "a"]
    assert samples == {"a": [1.0, 1.0], "b": [1.0, 1.0]}


def test_run_interleaved_reports_each_round():
    seen = []
    stats.run_interleaved({"x": lambda: None}, rounds=3, warmup=0, on_round=lambda r, t: seen.append((r, sorted(t))))
    assert seen == [(0, ["x"]), (1, ["x"]), (2, ["x"])]


def test_run_interleaved_needs_a_timed_round():
    with pytest.raises(ValueError):
        stats.run_interleaved({"x": lambda: None}, rounds=0)


def test_ratio_is_the_median_of_per_round_ratios():
    """A slow round that hits both variants cancels out, unlike a ratio of medians."""
    samples = {"patched": [1.0, 2.2, 10.0], "plain": [1.0, 2.0, 10.0]}
    assert stats.paired_ratios(samples["patched"], samples["plain"]) == pytest.approx([1.0, 1.1, 1.0])
    assert stats.ratio(samples, "patched", "plain") == pytest.approx(1.0)


def test_paired_ratios_need_paired_samples():
    with pytest.raises(ValueError):
        stats.paired_ratios([1.0], [1.0, 2.0])


def test_summarize_gives_median_min_max_and_count():
    assert stats.summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def test_linear_fit_recovers_a_line():
    intercept, slope, r2 = stats.linear_fit([0, 1, 2, 4], [1.0, 3.0, 5.0, 9.0])
    assert (intercept, slope, r2) == pytest.approx((1.0, 2.0, 1.0))


def test_linear_fit_of_scattered_points_has_low_r2():
    _, _, r2 = stats.linear_fit([0, 1, 2, 3], [0.0, 5.0, 0.0, 5.0])
    assert r2 < 0.5


def test_fastest_ratio_compares_the_fastest_runs():
    """The cross-check: each variant's fastest run, whichever round it came from."""
    samples = {"patched": [1.05, 9.0, 1.2], "unmerged": [1.0, 4.0, 1.1]}
    assert stats.fastest_ratio(samples, "patched", "unmerged") == pytest.approx(1.05)


def test_cpu_share_per_round_is_the_lowest_of_its_calls():
    """CPU seconds / (wall seconds · threads): 1.0 when the process had its cores, less when it did not."""
    wall = itertools.count()
    cpu = iter([0.0, 2.0, 2.0, 3.0, 10.0, 12.0, 12.0, 14.0])  # per call: 2 s, 1 s, 2 s, 2 s of CPU in 1 s wall
    shares = []
    stats.run_interleaved({"a": lambda: None, "b": lambda: None}, rounds=2, warmup=0,
                          clock=lambda: float(next(wall)), cpu_clock=lambda: next(cpu), threads=2, shares=shares)
    assert shares == [0.5, 1.0]


def test_quiet_rounds_keep_their_cores():
    assert stats.quiet_rounds([0.97, 0.6, 0.95, 0.9]) == [0, 2]
    assert stats.quiet_rounds([0.5, 0.6]) == []


def test_rounds_are_added_until_most_are_quiet():
    """Two loaded rounds (CPU share 0.5), then quiet ones: runs on until 2 quiet rounds, at most 6."""
    wall = itertools.count()
    cpu_per_call = iter([1.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # with 2 threads and 1 s calls: 0.5, 0.5, 1, 1, ...
    total = [0.0]

    def cpu() -> float:
        return total[0]

    def call() -> None:
        total[0] += next(cpu_per_call)

    shares = []
    samples = stats.run_interleaved({"x": call}, rounds=2, warmup=0, clock=lambda: float(next(wall)),
                                    cpu_clock=cpu, threads=2, shares=shares, min_quiet=2, max_rounds=6)
    assert shares == [0.5, 0.5, 1.0, 1.0]
    assert len(samples["x"]) == 4


def test_ratio_over_selected_rounds():
    samples = {"a": [1.0, 9.0, 2.2], "b": [1.0, 3.0, 2.0]}
    assert stats.ratio(samples, "a", "b", [0, 2]) == pytest.approx(1.05)
    assert stats.ratio(samples, "a", "b", []) == pytest.approx(1.1)  # none selected: all rounds
    assert stats.median_of([3.0, 1.0, 2.0], [0, 1]) == 2.0


def test_fastest_ratio_over_selected_rounds():
    samples = {"a": [1.0, 9.0, 2.0], "b": [4.0, 3.0, 2.0]}
    assert stats.fastest_ratio(samples, "a", "b", [1, 2]) == pytest.approx(1.0)
    assert stats.fastest_ratio(samples, "a", "b", []) == pytest.approx(0.5)  # none selected: all rounds


def test_op_counter_sees_operations_and_host_reads():
    import torch

    from bench.step import OpCounter

    x = torch.ones(3)
    for inference in (False, True):  # .item() dispatches as _local_scalar_dense, or as aten.item in inference mode
        with torch.inference_mode(inference), OpCounter() as counter:
            value = (x * 2).sum().item() + float(x[0])
        assert value == 7.0 and counter.host_reads == 2 and counter.ops == 5, inference  # mul, sum, read, select, read
