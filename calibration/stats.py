"""The statistics every comparison of methods here uses: seeded bootstrap intervals, the exact sign
test, and paired comparisons of two methods on the same examples.

    >>> low, high = bootstrap_interval([1, 0, 1, 1], seed=0)
    >>> paired_comparison(dysco_scores, vanilla_scores, seed=0)["p_value"]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["BOOTSTRAP_RESAMPLES", "bootstrap_interval", "paired_comparison", "seed_for", "sign_test"]

BOOTSTRAP_RESAMPLES = 10_000


def seed_for(seed: int, *parts: Any) -> np.random.SeedSequence:
    """A seed stream per (seed, parts): stable across runs and processes (no Python hash())."""
    digest = hashlib.sha256(json.dumps([seed, *parts], default=str).encode()).digest()
    return np.random.SeedSequence(int.from_bytes(digest[:8], "little"))


def bootstrap_interval(
    scores: Sequence[float], seed: int | np.random.SeedSequence, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `scores` (seeded; one score gives a point)."""
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        raise ValueError("cannot bootstrap an empty list of scores")
    if x.size == 1 or np.all(x == x[0]):
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def sign_test(differences: Sequence[float]) -> float:
    """Exact two-sided sign-test p-value of paired differences (zeros dropped; 1.0 when all tie)."""
    from scipy.stats import binomtest

    d = np.asarray(differences, dtype=np.float64)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    if wins + losses == 0:
        return 1.0
    return float(binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue)


def paired_comparison(
    method_scores: Sequence[float], baseline_scores: Sequence[float], seed: int | np.random.SeedSequence,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, float | int]:
    """Mean difference, its paired-bootstrap interval, wins/losses/ties and the sign-test p-value."""
    a = np.asarray(method_scores, dtype=np.float64)
    b = np.asarray(baseline_scores, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired scores must be two non-empty lists of the same length, got {a.size} and {b.size}")
    d = a - b
    low, high = bootstrap_interval(d, seed, resamples)  # resampling the pairs keeps them paired
    return {
        "n": int(d.size),
        "mean_difference": float(d.mean()),
        "low": low,
        "high": high,
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
        "ties": int((d == 0).sum()),
        "p_value": sign_test(d),
    }
