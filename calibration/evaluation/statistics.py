"""The statistics every comparison of methods here uses: seeded bootstrap intervals, the exact sign
test, paired comparisons of two methods on the same examples, and the result rows of an evaluation
(per cell, per pair, speed, DySCO's selection of the evidence).

    >>> low, high = bootstrap_interval([1, 0, 1, 1], seed=0)
    >>> 0.25 <= low <= high <= 1.0
    True
    >>> paired_comparison([1, 1, 0, 1], [0, 1, 0, 0], seed=0)["wins"]
    2
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BASELINE",
    "BOOTSTRAP_RESAMPLES",
    "EVIDENCE_FIELDS",
    "OUTCOMES",
    "RIGHT_SCORE",
    "CellResult",
    "PairedResult",
    "SelectionResult",
    "SpeedResult",
    "bootstrap_interval",
    "paired_comparison",
    "seed_for",
    "selection_results",
    "sign_test",
    "summarize_selection",
]

BOOTSTRAP_RESAMPLES = 10_000
BASELINE = "vanilla"  # every method of an evaluation is compared with this one


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


# --------------------------------------------------------------------------- result rows


@dataclass
class CellResult:
    """One task × length × method: mean score and its 95% bootstrap interval."""

    task: str
    length: int
    method: str
    n: int
    mean: float
    low: float
    high: float


@dataclass
class PairedResult:
    """`method` minus the baseline on the same examples of one task × length."""

    task: str
    length: int
    method: str
    baseline: str
    n: int
    mean_difference: float
    low: float  # 95% paired-bootstrap interval of the mean difference
    high: float
    wins: int  # examples where `method` scored higher
    losses: int
    ties: int
    p_value: float  # exact two-sided sign test (ties dropped)
    test: str = "paired bootstrap 95% CI of the mean difference; exact two-sided sign test"


@dataclass
class SpeedResult:
    """Speed of one method at one context length, over every task's examples."""

    method: str
    length: int
    batches: int
    new_tokens: int
    seconds: float
    ttft_s: float  # mean over batches
    decode_tokens_per_s: float  # tokens after the first, over the time after the first token
    tokens_per_s: float  # all generated tokens over the whole time (prefill included)


# --------------------------------------------------------------------------- DySCO's selection of the evidence


# Per-step fields of `decoder.dysco.selection_diagnostics` that the evidence decides.
EVIDENCE_FIELDS = ("evidence_recall", "evidence_share", "evidence_importance")


def summarize_selection(steps: Sequence[dict[str, Any]], evidence_tokens: int) -> dict[str, Any]:
    """One example's DySCO selection diagnostics: the mean over its generated tokens of each field.

    `steps`: `Generation.diagnostics` of its row (one dict per kept token); `evidence_tokens`: how many
    prompt positions hold its evidence (0 when unknown). The evidence fields are None when the evidence
    is unknown (or no step was measured); `selected` and `mass` are None only without steps.
    """
    def mean(name: str) -> float | None:
        values = [float(s[name]) for s in steps if s.get(name) is not None]
        return sum(values) / len(values) if values and len(values) == len(steps) else None

    out: dict[str, Any] = {"steps": len(steps), "evidence_tokens": int(evidence_tokens),
                           "selected": mean("selected"), "mass": mean("mass")}
    for name in EVIDENCE_FIELDS:
        out[name] = mean(name) if evidence_tokens else None
    return out


# An example counts as "right" for the selection table's outcome split when its score is at least
# this (0/1 grades: correct; MRCR's similarity and pathtrans's partial credit: more right than wrong).
RIGHT_SCORE = 0.5

# The outcome groups of the selection table: every example, those DySCO got right / wrong (score >=
# RIGHT_SCORE or not), and those it won / lost against vanilla on the same example (where vanilla ran).
OUTCOMES = ("all", "right", "wrong", "win", "loss")


@dataclass
class SelectionResult:
    """DySCO's selection of the evidence in one task × length, over the examples of one outcome group.

    Each value is the mean over examples of the example's mean over its generated tokens (see
    `decoder.dysco.selection_diagnostics`); None when no example of the group was measured.
    """

    task: str
    length: int
    outcome: str  # one of OUTCOMES
    examples: int  # examples in the group
    n: int  # of them, those measured with their evidence located in the prompt
    evidence_recall: float | None  # share of the evidence positions DySCO up-weighted
    evidence_share: float | None  # share of the up-weighted importance lying on the evidence
    evidence_importance: float | None  # QR heads' importance mass on the evidence, selected or not
    selected: float | None  # up-weighted positions per step


def selection_results(
    task: str, length: int, selection: Sequence[Mapping[str, Any] | None], scores: Sequence[float],
    baseline: Sequence[float] | None = None,
) -> list[SelectionResult]:
    """One task × length's `SelectionResult`s: per example DySCO `selection` summaries (None: not
    measured) and scores, and the baseline's scores on the same examples (None: no win/loss split)."""
    groups = {
        "all": [True] * len(scores),
        "right": [s >= RIGHT_SCORE for s in scores],
        "wrong": [s < RIGHT_SCORE for s in scores],
    }
    if baseline is not None:
        groups["win"] = [s > b for s, b in zip(scores, baseline)]
        groups["loss"] = [s < b for s, b in zip(scores, baseline)]
    out = []
    for outcome, member in groups.items():
        chosen = [sel for sel, keep in zip(selection, member) if keep]
        measured = [sel for sel in chosen if sel and all(sel.get(f) is not None for f in EVIDENCE_FIELDS)]

        def mean(name: str) -> float | None:
            values = [sel[name] for sel in measured if sel.get(name) is not None]
            return float(np.mean(values)) if values else None

        out.append(SelectionResult(
            task=task, length=length, outcome=outcome, examples=len(chosen), n=len(measured),
            evidence_recall=mean("evidence_recall"), evidence_share=mean("evidence_share"),
            evidence_importance=mean("evidence_importance"), selected=mean("selected"),
        ))
    return out

