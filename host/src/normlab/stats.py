"""Intervals and paired tests for accuracies (numpy and scipy; no torch).

Three questions a reviewer asks of a number, and how normlab answers them:

- *How precise is one accuracy?* A 95% **Wilson score interval** over the test
  examples (:func:`wilson`), for every accuracy measured on examples
  (``clean/acc``, ``pgd/acc``, ``corruptions/fog/3/acc``, ...). An average of
  accuracies over the same examples (``style/acc``, ``corruptions/acc``) is the
  mean of a per-example score (the fraction of domains in which the example is
  classified correctly), and gets the 95% **normal interval of a mean over
  examples** (:func:`mean_interval`: mean +- 1.96 standard errors, clipped to
  [0, 1]; the test splits have hundreds of examples or more).
- *Is A better than B on the same images?* **McNemar's exact test**
  (:func:`mcnemar`): the discordant pairs are binomial(b + c, 1/2) under the null.
  For averages, the **paired t-test** over examples of the per-example score
  differences (:func:`paired_examples`); an average whose scores are all 0 or 1
  (one part) is an accuracy: Wilson and McNemar.
- *How much does it move with the seed?* The mean over seeds with a 95%
  **Student t interval** (:func:`seed_interval`), and for two seed groups with
  the same seeds a paired t-test over seeds (:func:`paired_seeds`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Z95", "ALPHA", "wilson", "right_or_wrong", "mean_interval", "mcnemar", "paired_examples",
           "seed_interval", "paired_seeds", "pack", "unpack", "examples_id"]

ALPHA = 0.05
Z95 = 1.959963984540054  # scipy.stats.norm.ppf(0.975)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (Wilson, 1927)."""
    if n <= 0:
        raise ValueError("an interval needs at least one example")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at k = 0 (k = n) the bound is exactly 0 (1); computed, it can miss by a rounding error
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def right_or_wrong(scores: np.ndarray) -> bool:
    """Whether per-example scores are all 0 or 1: an accuracy (Wilson, McNemar), also when it is an average
    of one part or of parts that agree on every example."""
    return bool(np.isin(np.asarray(scores), (0.0, 1.0)).all())


def mean_interval(scores: np.ndarray, z: float = Z95) -> tuple[float, float]:
    """The 95% normal interval of the mean of per-example ``scores`` (standard error with ddof 1), in [0, 1];
    [0, 1] itself for one example (no spread to estimate)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size < 2:
        return 0.0, 1.0
    mean = float(scores.mean())
    half = z * float(scores.std(ddof=1)) / math.sqrt(scores.size)
    return max(0.0, mean - half), min(1.0, mean + half)


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """McNemar's exact test of two per-example correctness vectors over the same examples.

    ``only_a`` examples are right in A and wrong in B, ``only_b`` the reverse; under the null each
    discordant example is a fair coin, so the two-sided p-value is ``min(1, 2 P[X <= min])`` with
    X ~ binomial(only_a + only_b, 1/2) (1 when there are no discordant examples).
    """
    from scipy.stats import binom

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length: {a.size} and {b.size}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    m = only_a + only_b
    p = 1.0 if m == 0 else min(1.0, 2.0 * float(binom.cdf(min(only_a, only_b), m, 0.5)))
    return {"diff": (only_a - only_b) / a.size, "p": p, "only_a": only_a, "only_b": only_b}


def paired_examples(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired t-test over examples of per-example scores (averages of accuracies over the same examples):
    the mean difference a - b and the two-sided p-value (1 when the scores are equal everywhere; NaN for one
    example: no test)."""
    from scipy.stats import ttest_rel

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length: {a.size} and {b.size}")
    d = a - b
    if not d.any():
        return {"diff": 0.0, "p": 1.0}
    if d.size < 2:
        return {"diff": float(d.mean()), "p": float("nan")}
    if not d.std():
        return {"diff": float(d.mean()), "p": 0.0}
    return {"diff": float(d.mean()), "p": float(ttest_rel(a, b).pvalue)}


def seed_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean over seeds and its 95% Student t interval (the mean twice for one seed)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if v.size < 2:
        return mean, mean, mean
    half = float(t.ppf(1 - ALPHA / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def paired_seeds(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two seed groups with the same seeds: the mean difference, its t interval and the paired t-test's p."""
    from scipy.stats import ttest_rel

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mean, lo, hi = seed_interval(d)
    if d.size < 2:
        p = float("nan")  # one seed: no test
    elif not d.std():
        p = 1.0 if not d.any() else 0.0  # every seed moved by the same amount
    else:
        p = float(ttest_rel(a, b).pvalue)
    return {"diff": mean, "ci_low": lo, "ci_high": hi, "p": p}


def pack(correct: np.ndarray) -> np.ndarray:
    """Per-example correctness as bits (uint8, 8 examples a byte)."""
    return np.packbits(np.asarray(correct, dtype=bool))


def unpack(bits: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(np.asarray(bits, dtype=np.uint8), count=n).astype(bool)


def examples_id(labels: np.ndarray) -> str:
    """What identifies the evaluated examples for pairing: their count and a hash of their labels in order."""
    labels = np.ascontiguousarray(np.asarray(labels, dtype=np.int64))
    return f"{labels.size}:{hashlib.sha256(labels.tobytes()).hexdigest()[:16]}"
