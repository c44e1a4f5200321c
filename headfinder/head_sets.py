"""Head sets: the top-k heads of a score matrix, and how stable that choice is across probe sets.

    heads = top_k_heads(result.qr, k=16)          # [(layer, head), ...], best first
    report = stability_report(scores_seed0, scores_seed1, k=16)
    report["top_k_shared"], report["spearman"]
"""

from __future__ import annotations

from typing import Sequence

import torch


def top_k_heads(scores: torch.Tensor, k: int = 16) -> list[tuple[int, int]]:
    """The `k` highest-scoring (layer, head) pairs of a [layers, heads] matrix, best first (ties: lower index first)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be a [layers, heads] matrix, got shape {tuple(scores.shape)}")
    n_layers, n_heads = scores.shape
    if not isinstance(k, int) or not 1 <= k <= n_layers * n_heads:
        raise ValueError(
            f"top-k must be between 1 and the model's {n_layers * n_heads} heads ({n_layers} layers × {n_heads}), got {k}"
        )
    flat = scores.reshape(-1).double()
    # A stable sort on the negated scores keeps equal scores in index order: the same set every run.
    order = torch.sort(-flat, stable=True).indices[:k]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def validate_head_set(heads: Sequence[Sequence[int]], n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """Check every (layer, head) lies inside the model and none repeats; returns them as int tuples."""
    result = []
    for pair in heads:
        if len(pair) != 2:
            raise ValueError(f"a head is a (layer, head) pair, got {pair!r}")
        layer, head = int(pair[0]), int(pair[1])
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"head ({layer}, {head}) is outside the model's {n_layers} layers × {n_heads} heads")
        result.append((layer, head))
    if len(set(result)) != len(result):
        raise ValueError(f"head set repeats a head: {result}")
    return result


def stability_report(scores_a: torch.Tensor, scores_b: torch.Tensor, k: int = 16) -> dict:
    """Agreement of two score matrices from disjoint probe sets: Spearman of the full ranking and top-k overlap."""
    from scipy.stats import spearmanr

    if scores_a.shape != scores_b.shape:
        raise ValueError(f"score matrices differ in shape: {tuple(scores_a.shape)} vs {tuple(scores_b.shape)}")
    top_a, top_b = top_k_heads(scores_a, k), top_k_heads(scores_b, k)
    shared = sorted(set(top_a) & set(top_b))
    rho = spearmanr(scores_a.reshape(-1).double().numpy(), scores_b.reshape(-1).double().numpy()).statistic
    return {
        "k": k,
        "spearman": float(rho),
        "top_k_shared": len(shared),
        "shared_heads": [list(h) for h in shared],
        "top_k_a": [list(h) for h in top_a],
        "top_k_b": [list(h) for h in top_b],
    }
