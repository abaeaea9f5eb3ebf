"""Alternating-round timing shared by the benchmarks.

This machine drifts by +-20 % between passes, so contenders run in alternating order
(A B, B A, ...) with models loaded once, and the verdict is the median of per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def alternate_rounds(contenders: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per round for each contender, the order flipping every round."""
    names = list(contenders)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            seconds[name].append(timed(contenders[name]))
    return seconds


def ratio_table(seconds: dict[str, list[float]], items: int, ours: str, baselines: list[str]) -> dict[str, float]:
    """Print a per-round table of items/s and ours/baseline ratios, then one closing line
    `ratio_vs_<baseline>_loop=<median>` per baseline; return the median ratios."""
    names = [ours, *baselines]
    header = ["round"] + [f"{name} items/s" for name in names] + [f"{ours}/{b}" for b in baselines]
    print(" | ".join(f"{cell:>20}" for cell in header))
    rounds = len(seconds[ours])
    ratios: dict[str, list[float]] = {b: [] for b in baselines}
    for r in range(rounds):
        rates = {name: items / seconds[name][r] for name in names}
        for b in baselines:
            ratios[b].append(rates[ours] / rates[b])
        cells = [str(r + 1)] + [f"{rates[n]:.2f}" for n in names] + [f"{ratios[b][-1]:.3f}" for b in baselines]
        print(" | ".join(f"{cell:>20}" for cell in cells))
    medians = {b: statistics.median(values) for b, values in ratios.items()}
    cells = ["median"] + [f"{items / statistics.median(seconds[n]):.2f}" for n in names] + [
        f"{medians[b]:.3f}" for b in baselines]
    print(" | ".join(f"{cell:>20}" for cell in cells))
    for baseline, ratio in medians.items():
        print(f"ratio_vs_{baseline}_loop={ratio:.3f}")
    return medians
