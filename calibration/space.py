"""The knobs a calibration study searches, clipped to the model it runs on.

Ranges are wide enough to hold the published defaults (strength 2.0, top_k 4096, top_p 0.975,
decay 0.75, 16 heads) and never reach past the model: top_k stops at its context length and the
number of heads at the length of the head ranking (at most layers x heads).

    >>> space = SearchSpace.for_model(context_length=8192, ranking_length=270)
    >>> space.defaults()
    {'strength': 2.0, 'top_k': 4096, 'top_p': 0.975, 'decay': 0.75, 'num_heads': 16}
    >>> params = space.suggest(trial)       # inside an Optuna objective
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import optuna

PUBLISHED = {"strength": 2.0, "top_k": 4096, "top_p": 0.975, "decay": 0.75, "num_heads": 16}


@dataclass(frozen=True)
class SearchSpace:
    """Bounds of every searched knob; `top_k` and `num_heads` are sampled on a log scale."""

    strength: tuple[float, float] = (1.0, 8.0)
    top_k: tuple[int, int] = (16, 8192)
    top_p: tuple[float, float] = (0.5, 1.0)
    decay: tuple[float, float] = (0.0, 0.95)
    num_heads: tuple[int, int] = (1, 64)

    @classmethod
    def for_model(cls, context_length: int, ranking_length: int) -> SearchSpace:
        """The default space clipped to a model's context length and its head ranking's length."""
        if context_length < 1 or ranking_length < 1:
            raise ValueError(
                f"a search space needs a context length >= 1 and at least one ranked head, got "
                f"context_length={context_length}, ranking_length={ranking_length}"
            )
        base = cls()
        top_k_hi = min(base.top_k[1], context_length)
        heads_hi = min(base.num_heads[1], ranking_length)
        return cls(
            top_k=(min(base.top_k[0], top_k_hi), top_k_hi),
            num_heads=(min(base.num_heads[0], heads_hi), heads_hi),
        )

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Optuna distributions of every knob, in a fixed order."""
        D = optuna.distributions
        return {
            "strength": D.FloatDistribution(*self.strength, log=True),
            "top_k": D.IntDistribution(*self.top_k, log=True),
            "top_p": D.FloatDistribution(*self.top_p),
            "decay": D.FloatDistribution(*self.decay),
            "num_heads": D.IntDistribution(*self.num_heads, log=True),
        }

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Ask `trial` for one value of every knob."""
        return {
            "strength": trial.suggest_float("strength", *self.strength, log=True),
            "top_k": trial.suggest_int("top_k", *self.top_k, log=True),
            "top_p": trial.suggest_float("top_p", *self.top_p),
            "decay": trial.suggest_float("decay", *self.decay),
            "num_heads": trial.suggest_int("num_heads", *self.num_heads, log=True),
        }

    def defaults(self) -> dict[str, Any]:
        """The published defaults, clipped into this space (the study's first, enqueued trial)."""
        out: dict[str, Any] = {}
        for name, value in PUBLISHED.items():
            lo, hi = getattr(self, name)
            out[name] = type(value)(min(max(value, lo), hi))
        return out

    def to_dict(self) -> dict[str, list[float]]:
        """The bounds as JSON (stored with the study so a resumed run can check them)."""
        return {name: list(bounds) for name, bounds in asdict(self).items()}
