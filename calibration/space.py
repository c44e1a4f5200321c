"""The knobs a calibration study searches, clipped to the model it runs on.

Ranges are wide enough to hold the published defaults (strength 2.0, top_k 4096, top_p 0.975,
decay 0.75, 16 heads, intervention_warmup "auto") and never reach past the model: top_k stops at
its context length and the number of heads at the length of the head ranking (at most layers x heads).

`intervention_warmup` (how many prompt tokens before the last one already get a full DySCO step) is
a categorical knob: "auto" (the chat template's generation-prompt length, resolved against the
tokenizer by the decoder) or a few small token counts. `for_model(..., intervention_warmup=V)` fixes
it to V (a single choice) instead of searching it.

`selection` (dynamic | lagged | static, rules 7 and 9 of `decoder.dysco`) is searched only when asked
for (`for_model(..., selection=("dynamic", "lagged"))`): by default it is no parameter at all and every
trial uses the starting profile's selection, so a space without it stores (and compares) exactly as
before the knob existed. A trial whose selection is "lagged" also draws `lagged_probs`. Both are drawn
before the other knobs: a trial that has drawn its last knob has drawn them all (`storage` re-queues
the parameters of such a trial when its process dies).

    >>> space = SearchSpace.for_model(context_length=8192, ranking_length=270)
    >>> space.defaults()
    {'strength': 2.0, 'top_k': 4096, 'top_p': 0.975, 'decay': 0.75, 'num_heads': 16, 'intervention_warmup': 'auto'}

Inside an Optuna objective, `params = space.suggest(trial)` draws one setting; with
`for_model(8192, 270, selection=("dynamic", "lagged"))` the selection rule is one of its parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import optuna

from decoder.template import resolve_intervention_warmup
from registry.profile import LAGGED_PROBS, SELECTIONS, Knobs, ProfileValidationError, parse_intervention_warmup

_PUBLISHED_KNOBS = Knobs()  # the published defaults live in registry.Knobs; never re-typed here
PUBLISHED = {
    "strength": _PUBLISHED_KNOBS.strength,
    "top_k": _PUBLISHED_KNOBS.top_k,
    "top_p": _PUBLISHED_KNOBS.top_p,
    "decay": _PUBLISHED_KNOBS.decay,
    "num_heads": 16,
    "intervention_warmup": _PUBLISHED_KNOBS.intervention_warmup,
}
# The searched intervention warmups: the published "auto" first, then token counts from none (only the
# last prompt token gets a DySCO step, as before the knob existed) to a little past a typical template.
INTERVENTION_WARMUPS: tuple[int | str, ...] = (_PUBLISHED_KNOBS.intervention_warmup, 0, 1, 2, 4, 8)
CATEGORICAL = ("intervention_warmup",)  # knobs given as a tuple of choices, not (low, high) bounds
SELECTION_KNOBS = ("selection", "lagged_probs")  # searched on request only; drawn first (see above)


@dataclass(frozen=True)
class SearchSpace:
    """Bounds of every searched knob; `top_k` and `num_heads` are sampled on a log scale;
    `intervention_warmup` holds its choices. `selection` holds its choices, empty when it is not
    searched (the starting profile's is used); `lagged_probs` is drawn by the lagged trials only."""

    strength: tuple[float, float] = (1.0, 8.0)
    top_k: tuple[int, int] = (16, 8192)
    top_p: tuple[float, float] = (0.5, 1.0)
    decay: tuple[float, float] = (0.0, 0.95)
    num_heads: tuple[int, int] = (1, 64)
    intervention_warmup: tuple[int | str, ...] = INTERVENTION_WARMUPS
    selection: tuple[str, ...] = ()
    lagged_probs: tuple[str, ...] = LAGGED_PROBS

    def __post_init__(self) -> None:
        try:
            choices = tuple(parse_intervention_warmup(c, "a searched intervention_warmup")
                            for c in self.intervention_warmup)
        except (TypeError, ProfileValidationError) as err:
            raise ValueError(str(err)) from None
        if not choices or len(set(choices)) != len(choices):
            raise ValueError(f"intervention_warmup needs distinct choices, got {self.intervention_warmup!r}")
        object.__setattr__(self, "intervention_warmup", choices)
        object.__setattr__(self, "selection", _choices(self.selection, SELECTIONS, "selection", empty_ok=True))
        object.__setattr__(self, "lagged_probs", _choices(self.lagged_probs, LAGGED_PROBS, "lagged_probs"))

    @classmethod
    def for_model(
        cls, context_length: int, ranking_length: int, intervention_warmup: int | str | None = None,
        selection: Sequence[str] = (), lagged_probs: Sequence[str] = LAGGED_PROBS,
    ) -> SearchSpace:
        """The default space clipped to a model's context length and its head ranking's length;
        `intervention_warmup` given: that knob fixed to it instead of searched; `selection` given:
        searched over those modes (`lagged_probs` over those choices when a trial is lagged)."""
        if context_length < 1 or ranking_length < 1:
            raise ValueError(
                f"a search space needs a context length >= 1 and at least one ranked head, got "
                f"context_length={context_length}, ranking_length={ranking_length}"
            )
        base = cls()
        top_k_hi = min(base.top_k[1], context_length)
        heads_hi = min(base.num_heads[1], ranking_length)
        fixed = {} if intervention_warmup is None else {"intervention_warmup": (intervention_warmup,)}
        return cls(
            top_k=(min(base.top_k[0], top_k_hi), top_k_hi),
            num_heads=(min(base.num_heads[0], heads_hi), heads_hi),
            selection=tuple(selection), lagged_probs=tuple(lagged_probs),
            **fixed,
        )

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Optuna distributions of every knob, in a fixed order."""
        D = optuna.distributions
        searched = {"selection": D.CategoricalDistribution(self.selection)} if self.selection else {}
        if "lagged" in self.selection:
            searched["lagged_probs"] = D.CategoricalDistribution(self.lagged_probs)
        return searched | {
            "strength": D.FloatDistribution(*self.strength, log=True),
            "top_k": D.IntDistribution(*self.top_k, log=True),
            "top_p": D.FloatDistribution(*self.top_p),
            "decay": D.FloatDistribution(*self.decay),
            "num_heads": D.IntDistribution(*self.num_heads, log=True),
            "intervention_warmup": D.CategoricalDistribution(self.intervention_warmup),
        }

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Ask `trial` for one value of every knob (`lagged_probs` only when its selection is lagged)."""
        drawn: dict[str, Any] = {}
        if self.selection:
            drawn["selection"] = trial.suggest_categorical("selection", self.selection)
            if drawn["selection"] == "lagged":
                drawn["lagged_probs"] = trial.suggest_categorical("lagged_probs", self.lagged_probs)
        return drawn | {
            "strength": trial.suggest_float("strength", *self.strength, log=True),
            "top_k": trial.suggest_int("top_k", *self.top_k, log=True),
            "top_p": trial.suggest_float("top_p", *self.top_p),
            "decay": trial.suggest_float("decay", *self.decay),
            "num_heads": trial.suggest_int("num_heads", *self.num_heads, log=True),
            "intervention_warmup": trial.suggest_categorical("intervention_warmup", self.intervention_warmup),
        }

    def defaults(self) -> dict[str, Any]:
        """The published defaults, clipped into this space (the study's first, enqueued trial)."""
        out: dict[str, Any] = {}
        if self.selection:
            published = _PUBLISHED_KNOBS.selection
            out["selection"] = published if published in self.selection else self.selection[0]
            if out["selection"] == "lagged":
                published = _PUBLISHED_KNOBS.lagged_probs
                out["lagged_probs"] = published if published in self.lagged_probs else self.lagged_probs[0]
        for name, value in PUBLISHED.items():
            if name in CATEGORICAL:
                choices = getattr(self, name)
                out[name] = value if value in choices else choices[0]
                continue
            lo, hi = getattr(self, name)
            out[name] = type(value)(min(max(value, lo), hi))
        return out

    def intervention_warmup_tokens(self, tokenizer: Any) -> int:
        """The largest intervention warmup any trial can use, in tokens ("auto" resolved against
        `tokenizer`): a prefill shared by every trial must stop this much (plus the context warmup)
        before the end of the prompt."""
        return max(resolve_intervention_warmup(choice, tokenizer) for choice in self.intervention_warmup)

    def to_dict(self) -> dict[str, list[Any]]:
        """The bounds (choices, for a categorical knob) as JSON, stored with the study so a resumed
        run can check them. The selection knobs appear only when searched, so a space without them
        is stored as before they existed (and a study made then resumes)."""
        out = {name: list(bounds) for name, bounds in asdict(self).items() if name not in SELECTION_KNOBS}
        if self.selection:
            out["selection"] = list(self.selection)
            if "lagged" in self.selection:
                out["lagged_probs"] = list(self.lagged_probs)
        return out


def _choices(values: Sequence[str], accepted: Sequence[str], name: str, empty_ok: bool = False) -> tuple[str, ...]:
    """`values` as a tuple of distinct members of `accepted`, else a ValueError naming `name` and them."""
    values = (values,) if isinstance(values, str) else tuple(values)
    bad = [v for v in values if v not in accepted]
    if bad or len(set(values)) != len(values) or not (values or empty_ok):
        raise ValueError(
            f"{name} choices must be distinct values among {', '.join(accepted)}, got {', '.join(map(str, values)) or 'none'}"
        )
    return values


# Every trial's parameters, in the search space's order; a trial with a searched selection draws
# SELECTION_KNOBS (or the first of them) before these.
KNOBS = tuple(f.name for f in fields(SearchSpace) if f.name not in SELECTION_KNOBS)
