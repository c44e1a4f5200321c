"""DySCO's settings and its small steps: feed schedule, importance, selection, bias.

`DyscoConfig` holds the head set S and the knobs. The steps are pure functions on batched tensors
(no Python loops over positions, no host syncs), so the decoder can run them on the GPU as they are:

    importance = update_importance(past, cur, decay=0.75)          # [batch, n], rows sum to 1
    selected = select_positions(importance, top_p=0.975, top_k=4096)  # bool [batch, n]
    up = upweighted_positions(selected, template, real, hard=False)   # bool [batch, n]
    bias = dysco_bias(up, strength=2.0)                               # [batch, n]
    stats = selection_statistics(importance, up, evidence)            # [batch, 5]: the step's diagnostics

How DySCO runs. These are the rules of the authors' published code (princeton-pli/DySCO,
`rescale_generate`, as configured by its YAML files), which is the definition we follow token for
token; `docs/design.md` lists them with the places where the paper's prose reads differently.

1. Feed schedule (`feed_schedule`). With `T = context_warmup + intervention_warmup` (at most the
   prompt), prefill all but the last T prompt tokens with plain attention, then feed those T tokens
   one at a time. The first of them that are older than the last `intervention_warmup + 1` prompt
   tokens (`context_warmup - 1` of them) only update importance (plain attention). The last
   `intervention_warmup + 1` prompt tokens (the chat template's generation prompt and the token
   before it) already run a full DySCO step (probe, select, biased pass; their biased keys and values
   stay in the cache), and so does every generated token. `intervention_warmup="auto"` is the length
   of the generation prompt the tokenizer's chat template appends (0 without a chat template).
2. Importance: `cur` = mean over S of the current query's attention probabilities (softmax over all
   positions including the current one); `importance = normalise(cur + decay * past)`, `past`
   extended by a zero for the new position. A row whose token at that step is left padding keeps its
   importance (extended by a zero).
3. A DySCO step: probe (plain attention, layers up to the deepest layer in S, nothing written to the
   cache) → importance update → select → full pass with the bias in every head of every layer.
4. Selection (`select_positions`): renormalise, sort descending, keep every position whose cumulative
   mass *including itself* is `<= top_p` (the top one always); if that keeps more than `top_k`, keep the
   `top_k` highest. Ties keep position order. Positions outside `valid` (padding, unfed columns) rank
   last and are never kept.
5. Up-weighted set (`upweighted_positions`): the selected positions minus chat-template positions
   (their mass still counts towards the nucleus), plus the current position. In the hard variant
   (`strength >= 99`) the published code skips the template exclusion: a selected template position
   stays visible. Padding is never up-weighted.
6. Bias (`dysco_bias`): `log(strength)` on the up-weighted positions, 0 elsewhere; hard: 0 there,
   -inf elsewhere.
7. `selection="static"`: at the first DySCO step, select once from the importance the importance-only
   steps built (no probe, the current position not in it) and keep that set; every DySCO step
   up-weights it plus its own current position. With no importance yet (`context_warmup <= 1`, where
   the published code divides by zero), the first step probes first.
8. `context_warmup=0` and `intervention_warmup=0`: prefill everything; the first token comes from the
   plain prefill logits, and importance starts at the first decode step. A prompt shorter than T is fed
   token by token from its first token.
9. `selection="lagged"` (ours, not the authors'; issue 13): a generated token's DySCO step runs no probe. Step t selects
   from the importance as it stood after step t - 1 (columns 0..t-1; the current column is up-weighted
   but not ranked), then runs the full biased pass, which also returns the heads of S's attention
   probabilities of the current query; their mean over S updates the importance for step t + 1.
   `lagged_probs` says which probabilities: "plain" (the default) = a plain softmax of the same logits
   q·k without the DySCO bias (padding still masked), i.e. what the probe would have read; "biased" =
   the probabilities of the biased softmax the pass actually used (measured on SmolLM2 needles at 1–2K:
   the same tokens as plain on every example, docs/benchmarks.md; plain is the default because it has
   no feedback of the selection into the importance). The prompt's DySCO steps (the teacher-forced
   generation prompt, whose last step gives the first token) are dynamic steps, probe included, so the
   first token and the importance it leaves are dynamic DySCO's: on SmolLM2 needles at 4K a lag there
   changed the first token of 38 of 200 answers and lost 30 of them, while the answers whose first
   token agreed scored as dynamic's (docs/benchmarks.md, "H200: lagged vs dynamic"). With no importance
   yet (`context_warmup <= 1`) the first generated token's step is a dynamic step too.
   Cost: one pass per generated token, like vanilla, plus `intervention_warmup + 1` probes per prompt.
   With `max_new_tokens=1` lagged equals dynamic.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

# The knobs' one home (no torch there): defaults, the accepted values and the intervention-warmup parser.
from registry.profile import LAGGED_PROBS, SELECTIONS, Knobs, parse_intervention_warmup

_PUBLISHED = Knobs()  # the published defaults, defined once in registry.Knobs

__all__ = [
    "HARD_STRENGTH",
    "LAGGED_PROBS",
    "SELECTION_FIELDS",
    "SELECTIONS",
    "DyscoConfig",
    "FeedSchedule",
    "dysco_bias",
    "evidence_mask",
    "feed_schedule",
    "select_positions",
    "selection_diagnostics",
    "selection_row",
    "selection_statistics",
    "update_importance",
    "upweighted_positions",
]

HARD_STRENGTH = 99.0  # strength at or above this masks out every unselected position


@dataclass(frozen=True)
class DyscoConfig:
    """The head set S and DySCO's knobs (published defaults); validated on construction.

    >>> DyscoConfig(head_set=[(21, 31), (21, 18)], strength=2.0).hard
    False
    """

    head_set: tuple[tuple[int, int], ...]
    strength: float = _PUBLISHED.strength
    top_p: float = _PUBLISHED.top_p
    top_k: int = _PUBLISHED.top_k
    decay: float = _PUBLISHED.decay
    context_warmup: int = _PUBLISHED.context_warmup
    selection: str = _PUBLISHED.selection
    intervention_warmup: int | str = _PUBLISHED.intervention_warmup
    lagged_probs: str = _PUBLISHED.lagged_probs  # selection="lagged" only: "plain" or "biased" probabilities (rule 9)
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
        object.__setattr__(
            self, "intervention_warmup", parse_intervention_warmup(self.intervention_warmup, "DySCO intervention_warmup")
        )
        if self.selection not in SELECTIONS:
            raise ValueError(f"DySCO selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.lagged_probs not in LAGGED_PROBS:
            raise ValueError(f"DySCO lagged_probs must be one of {', '.join(LAGGED_PROBS)}, got {self.lagged_probs!r}")
        by_layer: dict[int, list[int]] = {}
        for layer, head in self.head_set:
            by_layer.setdefault(layer, []).append(head)
        object.__setattr__(self, "heads_by_layer", {layer: tuple(heads) for layer, heads in sorted(by_layer.items())})

    @property
    def hard(self) -> bool:
        """Whether this is the hard variant (unselected positions masked out)."""
        return self.strength >= HARD_STRENGTH

    @property
    def lagged(self) -> bool:
        """Whether steps select from the previous full pass's importance (no probe; rule 9)."""
        return self.selection == "lagged"

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

    @classmethod
    def from_profile(cls, profile) -> DyscoConfig:
        """The DySCO settings a registry profile holds: its head set and every knob both share."""
        shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(profile.knobs)}
        return cls(head_set=[tuple(pair) for pair in profile.head_set],
                   **{name: getattr(profile.knobs, name) for name in sorted(shared)})

    def replace(self, **changes) -> DyscoConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


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


@dataclass(frozen=True)
class FeedSchedule:
    """Which prompt columns a DySCO generation prefills, feeds for importance only, and intervenes on."""

    prefill_end: int  # columns [0, prefill_end) are prefilled together with plain attention
    intervene_from: int  # columns [prefill_end, intervene_from) only update importance; later ones intervene
    prompt_len: int

    @property
    def importance_only(self) -> range:
        """Prompt columns fed one at a time with plain attention, reading importance."""
        return range(self.prefill_end, self.intervene_from)

    @property
    def intervened(self) -> range:
        """Prompt columns fed one at a time with a full DySCO step (probe, select, biased pass)."""
        return range(self.intervene_from, self.prompt_len)


def feed_schedule(prompt_len: int, context_warmup: int, intervention_warmup: int) -> FeedSchedule:
    """The published feed schedule of a `prompt_len`-column prompt (rule 1 of this module)."""
    if prompt_len < 1:
        raise ValueError(f"a prompt needs at least one token, got {prompt_len}")
    if isinstance(intervention_warmup, str):
        raise ValueError("resolve intervention_warmup='auto' against a tokenizer first (Decoder does)")
    fed = min(context_warmup + intervention_warmup, prompt_len)
    prefill_end = prompt_len - fed
    intervene_from = max(prefill_end, prompt_len - intervention_warmup - 1)
    return FeedSchedule(prefill_end, intervene_from, prompt_len)


def update_importance(past: torch.Tensor | None, cur: torch.Tensor, decay: float) -> torch.Tensor:
    """`normalise(cur + decay * past)`, `past` [batch, m <= n] zero-extended to `cur`'s [batch, n]; float32."""
    cur = cur.float()
    if past is None:
        blended = cur
    else:
        past = torch.nn.functional.pad(past.float(), (0, cur.shape[-1] - past.shape[-1]))
        blended = cur + decay * past
    return blended / blended.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def select_positions(
    importance: torch.Tensor, top_p: float, top_k: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Positions whose cumulative importance, themselves included, is <= `top_p` (the top one always),
    capped at the `top_k` highest: bool [batch, n]. `valid` (bool, broadcastable) excludes positions."""
    if valid is not None:
        importance = importance.masked_fill(~valid, 0.0)
    # The published code renormalises here although importance is already normalised; doing the
    # same keeps the float rounding of the `<= top_p` boundary identical.
    importance = importance / importance.sum(-1, keepdim=True).clamp_min(torch.finfo(importance.dtype).tiny)
    # Invalid positions sort after every valid one (ties of equal importance keep position order).
    key = importance if valid is None else importance.masked_fill(~valid, -1.0)
    _, order = key.sort(dim=-1, descending=True, stable=True)  # [batch, n]
    ordered = importance.gather(-1, order)
    rank = torch.arange(importance.shape[-1], device=importance.device)
    keep = (ordered.cumsum(-1) <= top_p) | (rank == 0)
    keep &= rank < top_k
    if valid is not None:
        keep &= valid.expand_as(importance).gather(-1, order)
    return torch.zeros_like(keep).scatter(-1, order, keep)


def upweighted_positions(
    selected: torch.Tensor,
    template: torch.Tensor | None = None,
    real: torch.Tensor | None = None,
    *,
    hard: bool = False,
    current: bool = True,
) -> torch.Tensor:
    """Selected minus template (not when `hard`) and padding positions, plus the current (last) one when
    `current`: bool [batch, n]."""
    up = selected.clone()
    if template is not None and not hard:
        up &= ~template
    if real is not None:
        up &= real
    if current:
        up[..., -1] = True
    return up


def dysco_bias(up: torch.Tensor, strength: float, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive logit bias [batch, n] from the up-weighted positions: log(strength) there; hard: 0 there, -inf elsewhere."""
    if strength >= HARD_STRENGTH:
        return torch.zeros(up.shape, dtype=dtype, device=up.device).masked_fill(~up, float("-inf"))
    return torch.zeros(up.shape, dtype=dtype, device=up.device).masked_fill(up, math.log(strength))


# The per-step selection diagnostics, in the column order of `selection_statistics`.
SELECTION_FIELDS = ("selected", "mass", "evidence_recall", "evidence_share", "evidence_importance")


def selection_statistics(
    importance: torch.Tensor, up: torch.Tensor, evidence: torch.Tensor | None = None
) -> torch.Tensor:
    """One DySCO step's selection diagnostics as float32 [batch, 5] (`SELECTION_FIELDS`), with no host sync.

    `importance` [batch, n] is the importance the step selected from; `up` and `evidence` (bool, at least
    n columns) are cut to its n columns. Per row:

    - `selected`: how many positions were up-weighted; `mass`: their importance;
    - `evidence_recall`: share of the evidence positions (the prompt tokens that hold the answer) that
      were up-weighted;
    - `evidence_share`: share of the up-weighted importance that lies on evidence positions;
    - `evidence_importance`: importance mass on the evidence, selected or not (do the QR heads see it?).

    The evidence columns are NaN for a row without evidence positions (and for every row without
    `evidence`). Both decoding paths call this: the exact one per step, the fast one inside its step.

    >>> selection_statistics(torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[True, False, True]]),
    ...                      torch.tensor([[False, True, True]])).tolist()
    [[2.0, 0.699999988079071, 0.5, 0.2857142984867096, 0.5]]
    """
    n = importance.shape[-1]
    importance = importance.float()
    up = up[:, :n].float()  # [batch, n]
    selected_mass = (importance * up).sum(-1)  # [batch]
    columns = [up.sum(-1), selected_mass]
    if evidence is None:
        columns += [torch.full_like(selected_mass, math.nan)] * 3
        return torch.stack(columns, dim=-1)
    ev = evidence[:, :n].float()
    count = ev.sum(-1)
    columns += [
        (up * ev).sum(-1) / count.clamp_min(1),
        (importance * up * ev).sum(-1) / selected_mass.clamp_min(torch.finfo(torch.float32).tiny),
        (importance * ev).sum(-1),
    ]
    stats = torch.stack(columns, dim=-1)  # [batch, 5]
    return stats.masked_fill((count == 0)[:, None] & (torch.arange(5, device=stats.device) >= 2), math.nan)


def selection_row(values: Sequence[float], evidence: bool) -> dict[str, float | int | None]:
    """One row of `selection_statistics` (5 floats) as the diagnostics dict both decoding paths return:
    `selected` and `mass`, plus the three evidence fields (None where NaN) when `evidence` was given."""
    row: dict[str, float | int | None] = {"selected": int(values[0]), "mass": float(values[1])}
    if evidence:
        for name, value in zip(SELECTION_FIELDS[2:], values[2:]):
            row[name] = None if math.isnan(value) else float(value)
    return row


def selection_diagnostics(
    importance: torch.Tensor, up: torch.Tensor, evidence: torch.Tensor | None = None
) -> list[dict[str, float | int | None]]:
    """Per row, `selection_statistics` as a dict (`selection_row`): how many positions were up-weighted
    and their importance mass; with an `evidence` mask (bool [batch, n], the positions that hold the
    answer), also the selection recall (None for a row without evidence positions)."""
    return [selection_row(values, evidence is not None)
            for values in selection_statistics(importance, up, evidence).tolist()]


def evidence_mask(
    evidence: Sequence[Sequence[int]], prompt_lengths: Sequence[int], width: int, total: int, device=None
) -> torch.Tensor:
    """bool [batch, total]: the `evidence` positions (per prompt, indices into its unpadded tokens) of a
    batch left-padded to `width` columns; ValueError for a row count or a position that does not fit."""
    if len(evidence) != len(prompt_lengths):
        raise ValueError(f"evidence has {len(evidence)} rows for a batch of {len(prompt_lengths)} prompts")
    mask = torch.zeros(len(prompt_lengths), total, dtype=torch.bool)
    for i, (positions, length) in enumerate(zip(evidence, prompt_lengths)):
        bad = [p for p in positions if not 0 <= int(p) < length]
        if bad:
            raise ValueError(f"evidence row {i} has position {bad[0]} outside its prompt of {length} tokens")
        offset = width - length  # left padding
        mask[i, [offset + int(p) for p in positions]] = True
    return mask.to(device) if device is not None else mask
