"""DySCO's settings and its three small steps: importance, selection, bias.

`DyscoConfig` holds the head set S and the knobs. The steps are pure functions on batched tensors
(no Python loops over positions, no host syncs), so the decoder can run them on the GPU as they are:

    >>> importance = update_importance(past, cur, decay=0.75)          # [batch, n], rows sum to 1
    >>> selected = select_positions(importance, top_p=0.975, top_k=4096)  # bool [batch, n]
    >>> bias = dysco_bias(selected, strength=2.0, template=template, real=real)  # [batch, n]

How DySCO runs (ALGORITHMS.md, with the decisions it leaves open; the decoder follows this):

1. Prefill all but the last `context_warmup` prompt tokens with plain attention.
2. Feed the warmup tokens one at a time with plain attention except the last one. Each step reads
   `cur` from the heads in S (mean over S of the current query's attention probabilities, softmax over
   all positions including the current one) and sets `importance = normalise(cur + decay * past)`,
   `past` extended by a zero for the new position. A row whose token at that step is left padding
   keeps its importance (extended by a zero).
3. Feeding the *last* prompt token is the first real decode step, so every generated token, the first
   included, comes from a DySCO full pass. A real decode step: probe (plain attention, layers up to the
   deepest layer in S, nothing written to the cache) → importance update → select → full pass with the
   bias in every head of every layer → logits → next token.
4. Selection: the nucleus (highest-importance positions until their mass reaches `top_p`; at least
   one; positions of zero importance never) capped at the `top_k` highest. Chat-template positions
   and padding are removed *after* selection (their mass still counts towards the nucleus); the
   current position is always added.
5. Bias: `log(strength)` on the up-weighted positions, 0 elsewhere; `strength >= 99` (hard) is 0 on
   them and -inf elsewhere.
6. `selection="static"`: select once at the first real decode step and keep that set; later steps
   up-weight it plus their own current position (no probe is needed after the first step).
7. `context_warmup=0`: prefill everything; the first token comes from the plain prefill logits, and
   importance starts at the first decode step. A prompt shorter than the warmup is fed token by token
   from its first token.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

__all__ = [
    "HARD_STRENGTH",
    "DyscoConfig",
    "dysco_bias",
    "select_positions",
    "update_importance",
    "upweighted_positions",
]

HARD_STRENGTH = 99.0  # strength at or above this masks out every unselected position
SELECTIONS = ("dynamic", "static")


@dataclass(frozen=True)
class DyscoConfig:
    """The head set S and DySCO's knobs (published defaults); validated on construction.

    >>> DyscoConfig(head_set=[(21, 31), (21, 18)], strength=2.0).hard
    False
    """

    head_set: tuple[tuple[int, int], ...]
    strength: float = 2.0
    top_p: float = 0.975
    top_k: int = 4096
    decay: float = 0.75
    context_warmup: int = 8
    selection: str = "dynamic"
    heads_by_layer: dict[int, tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_set", _as_head_set(self.head_set))
        for name in ("strength", "top_p", "decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"DySCO {name} must be a finite number, got {value!r}")
        if self.strength <= 0:
            raise ValueError(
                f"DySCO strength must be > 0 (1.0 = no change, 2.0 published, >= {HARD_STRENGTH:g} = hard mask), "
                f"got {self.strength}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"DySCO top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"DySCO top_k must be an integer >= 1, got {self.top_k!r}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"DySCO decay must be in [0, 1), got {self.decay}")
        if isinstance(self.context_warmup, bool) or not isinstance(self.context_warmup, int) or self.context_warmup < 0:
            raise ValueError(f"DySCO context_warmup must be an integer >= 0, got {self.context_warmup!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"DySCO selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        by_layer: dict[int, list[int]] = {}
        for layer, head in self.head_set:
            by_layer.setdefault(layer, []).append(head)
        object.__setattr__(self, "heads_by_layer", {layer: tuple(heads) for layer, heads in sorted(by_layer.items())})

    @property
    def hard(self) -> bool:
        """Whether this is the hard variant (unselected positions masked out)."""
        return self.strength >= HARD_STRENGTH

    @property
    def deepest_layer(self) -> int:
        """The deepest layer in S: where the probe stops."""
        return max(layer for layer, _ in self.head_set)

    def check_model(self, n_layers: int, n_heads: int, attention_layers: Iterable[int] | None = None) -> None:
        """Raise ValueError when a head of S is not in a model of `n_layers` × `n_heads`."""
        outside = [(l, h) for l, h in self.head_set if not (0 <= l < n_layers and 0 <= h < n_heads)]
        if outside:
            raise ValueError(
                f"head set has {len(outside)} head(s) outside the model, e.g. (layer, head) = {outside[0]}; this model "
                f"has {n_layers} layers × {n_heads} heads (layers 0..{n_layers - 1}, heads 0..{n_heads - 1})"
            )
        if attention_layers is not None:
            usable = set(attention_layers)
            missing = sorted({l for l, _ in self.head_set} - usable)
            if missing:
                raise ValueError(f"head set uses layer(s) {missing}, which have no attention through the interface")

    def replace(self, **changes) -> DyscoConfig:
        """A copy with some fields changed (validated again)."""
        fields = {name: getattr(self, name) for name in
                  ("head_set", "strength", "top_p", "top_k", "decay", "context_warmup", "selection")}
        fields.update(changes)
        return DyscoConfig(**fields)


def _as_head_set(head_set) -> tuple[tuple[int, int], ...]:
    if isinstance(head_set, (str, bytes)) or not isinstance(head_set, Iterable):
        raise ValueError(f"head_set must be a list of (layer, head) pairs, got {head_set!r}")
    pairs = []
    for item in head_set:
        try:
            layer, head = item
        except (TypeError, ValueError):
            raise ValueError(f"head_set entries must be (layer, head) pairs, got {item!r}") from None
        try:
            if isinstance(layer, bool) or isinstance(head, bool):
                raise TypeError
            pairs.append((operator.index(layer), operator.index(head)))
        except TypeError:
            raise ValueError(f"head_set entries must be pairs of integers, got {item!r}") from None
    if not pairs:
        raise ValueError("head_set is empty; DySCO needs at least one (layer, head) to read importance from")
    if len(set(pairs)) != len(pairs):
        duplicated = next(p for p in pairs if pairs.count(p) > 1)
        raise ValueError(f"head_set lists {duplicated} more than once")
    if any(l < 0 or h < 0 for l, h in pairs):
        raise ValueError(f"head_set indices must be >= 0, got {[p for p in pairs if min(p) < 0][0]}")
    return tuple(pairs)


def update_importance(past: torch.Tensor | None, cur: torch.Tensor, decay: float) -> torch.Tensor:
    """`normalise(cur + decay * past)`, `past` [batch, m <= n] zero-extended to `cur`'s [batch, n]; float32."""
    cur = cur.float()
    if past is None:
        blended = cur
    else:
        past = torch.nn.functional.pad(past.float(), (0, cur.shape[-1] - past.shape[-1]))
        blended = cur + decay * past
    return blended / blended.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def select_positions(importance: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """The nucleus of `importance` [batch, n] reaching `top_p` (at least one), capped at `top_k`: bool [batch, n]."""
    ordered, order = importance.sort(dim=-1, descending=True, stable=True)  # [batch, n]
    mass_before = ordered.cumsum(-1) - ordered  # mass of the strictly higher-ranked positions
    rank = torch.arange(importance.shape[-1], device=importance.device)
    keep = ((mass_before < top_p) & (ordered > 0)) | (rank == 0)
    keep &= rank < top_k
    return torch.zeros_like(keep).scatter(-1, order, keep)


def upweighted_positions(
    selected: torch.Tensor, template: torch.Tensor | None = None, real: torch.Tensor | None = None
) -> torch.Tensor:
    """Selected minus template and padding positions, plus the current (last) position: bool [batch, n]."""
    up = selected.clone()
    if template is not None:
        up &= ~template
    if real is not None:
        up &= real
    up[..., -1] = True
    return up


def dysco_bias(
    selected: torch.Tensor,
    strength: float,
    *,
    template: torch.Tensor | None = None,
    real: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The additive logit bias [batch, n]: log(strength) on up-weighted positions; hard: 0 there, -inf elsewhere."""
    up = upweighted_positions(selected, template, real)
    if strength >= HARD_STRENGTH:
        return torch.zeros(up.shape, dtype=dtype, device=up.device).masked_fill(~up, float("-inf"))
    return torch.zeros(up.shape, dtype=dtype, device=up.device).masked_fill(up, math.log(strength))
