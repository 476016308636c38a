"""How loaded is the machine right now? A fixed 2-thread matmul workload, timed.

Other processes on a shared machine slow a step unevenly: torch's worker threads wait for each
other at every operation, so when the cores are oversubscribed the cost grows with the number of
operations, not with the arithmetic, and the unmerged design (more, smaller operations) suffers
most. Timing a small fixed workload around every round tells which rounds ran on a quiet machine.
"""

from __future__ import annotations

import statistics
import time

import torch


class MachineProbe:
    """``probe()`` → seconds of the workload (median of 3); ``fastest`` is the quietest seen so far."""

    def __init__(self, size: int = 384, matmuls: int = 8) -> None:
        generator = torch.Generator().manual_seed(0)
        self.matrix = torch.randn(size, size, generator=generator)
        self.matmuls = matmuls
        self.fastest = float("inf")

    def __call__(self) -> float:
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(self.matmuls):
                torch.mm(self.matrix, self.matrix)
            runs.append(time.perf_counter() - start)
        value = statistics.median(runs)
        self.fastest = min(self.fastest, value)
        return value

    def calibrate(self, tries: int = 20) -> float:
        """Run the probe a few times (quietest wins) before the first comparison."""
        for _ in range(tries):
            self()
        return self.fastest


def load_average() -> float:
    """1-minute load average (``/proc/loadavg``), or NaN where there is none."""
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            return float(handle.read().split()[0])
    except OSError:
        return float("nan")
