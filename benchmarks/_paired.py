"""The summary every paired benchmark prints: the median of per-pair ratios, and how they spread."""

from __future__ import annotations

import statistics
import time


def paired_ratio(num: list[float], den: list[float], t_start: float) -> tuple[float, str]:
    """(median of num[i] / den[i], a line with the quartiles, the ratio of medians and of totals, and
    the wall time since ``t_start``)."""
    ratios = [n / d for n, d in zip(num, den)]
    ratio = statistics.median(ratios)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratio] * 3
    line = (f"{len(ratios)} pairs; ratio quartiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}; ratio of medians "
            f"{statistics.median(num) / statistics.median(den):.3f}; ratio of totals {sum(num) / sum(den):.3f}; "
            f"wall {time.perf_counter() - t_start:.0f} s")
    return ratio, line
