"""The causal check: does zeroing a head set's outputs break needle retrieval more than random heads?

Needle accuracy is measured with no ablation, with the chosen heads' attention outputs zeroed, and
with `draws` sets of as many random heads (drawn from the heads outside the chosen set) zeroed.

    report = validate_heads(model, tokenizer, heads, make_needle_probes(tokenizer, 16, 1024), draws=5)
    report.drop, report.random_drop, report.ratio
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Sequence

from headfinder.head_sets import validate_head_set
from headfinder.probes import NeedleProbe
from headfinder.scores import model_shape, needle_accuracy


def random_head_sets(
    n_layers: int, n_heads: int, size: int, draws: int, seed: int, exclude: Sequence[tuple[int, int]] = ()
) -> list[list[tuple[int, int]]]:
    """`draws` random sets of `size` distinct heads, none in `exclude`, reproducible from `seed`."""
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in set(exclude)]
    if size > len(pool):
        raise ValueError(f"cannot draw {size} random heads from the {len(pool)} heads outside the chosen set")
    rng = random.Random(f"random-heads-{seed}")
    return [sorted(rng.sample(pool, size)) for _ in range(draws)]


@dataclass
class ValidationReport:
    """Needle accuracy without ablation, with the chosen heads ablated, and with each random draw ablated."""

    heads: list[tuple[int, int]]
    n_probes: int
    context_tokens: int
    baseline_accuracy: float
    ablated_accuracy: float
    random_heads: list[list[tuple[int, int]]]
    random_accuracies: list[float]

    @property
    def drop(self) -> float:
        """Accuracy lost by zeroing the chosen heads."""
        return self.baseline_accuracy - self.ablated_accuracy

    @property
    def random_drop(self) -> float:
        """Accuracy lost by zeroing as many random heads, mean over the draws."""
        return self.baseline_accuracy - sum(self.random_accuracies) / len(self.random_accuracies)

    @property
    def ratio(self) -> float:
        """How many times more the chosen heads' ablation costs than random heads' (inf when random costs nothing)."""
        if self.random_drop <= 0:
            return math.inf if self.drop > 0 else float("nan")
        return self.drop / self.random_drop

    def to_dict(self) -> dict:
        """JSON-ready dict, the derived figures included (inf/nan written as strings)."""
        data = asdict(self)
        data["heads"] = [list(h) for h in self.heads]
        data["random_heads"] = [[list(h) for h in draw] for draw in self.random_heads]
        for name in ("drop", "random_drop", "ratio"):
            value = getattr(self, name)
            data[name] = value if math.isfinite(value) else str(value)
        return data


def validate_heads(
    model,
    tokenizer,
    heads: Sequence[tuple[int, int]],
    probes: Sequence[NeedleProbe],
    *,
    draws: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> ValidationReport:
    """Needle accuracy with `heads` zeroed vs `draws` random sets of as many heads (see the module docstring)."""
    n_layers, n_heads = model_shape(model)
    heads = validate_head_set(heads, n_layers, n_heads)
    if not heads:
        raise ValueError("the head set to validate is empty")
    if draws < 1:
        raise ValueError(f"need at least one random draw, got {draws}")
    if not probes:
        raise ValueError("validation needs at least one needle probe")
    random_sets = random_head_sets(n_layers, n_heads, len(heads), draws, seed, exclude=heads)
    baseline = needle_accuracy(model, tokenizer, probes, (), progress=progress, desc="no ablation")
    ablated = needle_accuracy(model, tokenizer, probes, heads, progress=progress, desc=f"top {len(heads)} ablated")
    randoms = [
        needle_accuracy(model, tokenizer, probes, draw, progress=progress, desc=f"random draw {i + 1}/{draws}")
        for i, draw in enumerate(random_sets)
    ]
    return ValidationReport(
        heads=heads, n_probes=len(probes), context_tokens=max(len(p.prompt_ids) for p in probes),
        baseline_accuracy=baseline, ablated_accuracy=ablated, random_heads=random_sets, random_accuracies=randoms,
    )
