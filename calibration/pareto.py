"""Accuracy and speed together: the study's second objective, its Pareto front, the point registered.

`calibrate --speed-objective cost|measured` makes the study two-objective: maximise the dev objective
(`calibration.study.dev_objective`), minimise what one generated token costs. Optuna's TPE sampler
handles both (multi-objective TPE); Optuna cannot prune a multi-objective trial, so there is no
pruner then. The result is the Pareto front: the complete trials no other trial beats on one
objective without losing on the other.

The two costs:

- **cost** (`token_cost`): a deterministic model, forward passes of the model per generated token
  relative to vanilla decoding. Vanilla, lagged and static DySCO run one full pass per generated
  token: 1. Dynamic DySCO first runs the probe, layers 0 .. the deepest layer of the head set S
  (the decoder stops it there), then the full pass: 1 + (deepest layer + 1) / layers. The same on
  every machine, so a study is reproducible anywhere and several hosts can share it. What it leaves
  out: the probes of the prompt's DySCO steps (part of the prompt, not of a generated token), the
  extra attention-probability write of lagged selection and the bias itself (lagged: 1.02-1.06x
  vanilla on the H200, static 1.00x; the model says 1 for both), and Python overhead on the CPU.
  Check on the H200 (`docs/benchmarks.md`, Qwen3-8B, heads up to layer 24 of 36): the model says
  1 + 25/36 = 1.69 for dynamic DySCO, measured 1.69-1.73x vanilla's ms/token from 16K to 128K.
- **measured** (`ms_per_token`): the trial's own decode time per generated token on the dev
  examples (prefill excluded: it is shared by every trial), as the runner timed it. Real, but only
  comparable between trials run on one kind of device with the same load; `CalibrationConfig`
  refuses it with several GPUs.

Which point is registered (`choose`): the most accurate point of the front whose cost is at most
`max_cost` (every point without a budget); ties go to the cheaper point, then the earlier trial. It
is always on the front. The adoption rule (`calibration.study.choose_knobs`) then compares it with
the published defaults' trial as in a one-objective study, unless the published trial is over the
budget (then the chosen point is registered, and `adoption` says why).

    >>> token_cost("dynamic", [(24, 3), (17, 0)], num_layers=36)
    1.6944444444444444

On a finished two-objective study:

    chosen = choose(study.best_trials, max_cost=1.0)     # the best one-pass profile
    print(front_table(front_points(study), "cost", chosen=chosen.number))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial

from calibration.errors import CalibrationError

SPEED_OBJECTIVES = ("none", "cost", "measured")
# The second objective's metric name in the study (`study.metric_names`) and its unit, per speed objective.
COST_METRICS = {"cost": "cost", "measured": "ms_per_token"}
COST_UNITS = {"cost": "passes per token, vanilla = 1", "ms_per_token": "decode ms per generated token"}


def token_cost(selection: str, head_set: Sequence[Sequence[int]], num_layers: int) -> float:
    """Forward passes of the model per generated token relative to vanilla decoding (the cost model)."""
    if num_layers < 1 or not head_set:
        raise ValueError(f"the cost model needs a model with layers and a head set, got {num_layers} and {head_set!r}")
    if selection != "dynamic":  # lagged and static: no probe at a generated token (rules 7 and 9 of decoder.dysco)
        return 1.0
    deepest = max(int(layer) for layer, _ in head_set)
    return 1.0 + (deepest + 1) / num_layers


def ms_per_token(decode_seconds: float, new_tokens: int) -> float:
    """Decode milliseconds per generated token."""
    if new_tokens < 1:
        raise ValueError(f"no generated token to time (decode took {decode_seconds:.3f} s)")
    return 1000.0 * decode_seconds / new_tokens


@dataclass(frozen=True)
class FrontPoint:
    """One trial of the Pareto front: its two objective values, plain dev score and knobs."""

    trial: int
    objective: float  # the dev objective (maximised)
    cost: float  # the second objective (minimised), in the study's cost unit
    score: float  # the plain dev score (the objective may carry a loss penalty)
    params: dict[str, Any]
    published: bool  # the published defaults' trial

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def front_points(best_trials: Sequence[FrozenTrial]) -> list[FrontPoint]:
    """The front (Optuna's `study.best_trials`) as points, cheapest first."""
    points = [
        FrontPoint(
            trial=t.number, objective=float(t.values[0]), cost=float(t.values[1]),
            score=float(t.user_attrs.get("score", t.values[0])), params=dict(t.params),
            published=bool(t.user_attrs.get("published_defaults")),
        )
        for t in best_trials
    ]
    return sorted(points, key=lambda p: (p.cost, -p.objective, p.trial))


def choose(best_trials: Sequence[FrozenTrial], max_cost: float | None = None) -> FrozenTrial:
    """The front's most accurate trial with cost <= `max_cost` (any cost when None); ties: cheaper, then earlier."""
    if not best_trials:
        raise CalibrationError("the study has no complete trial, so no Pareto front")
    within = [t for t in best_trials if max_cost is None or t.values[1] <= max_cost]
    if not within:
        cheapest = min(t.values[1] for t in best_trials)
        raise CalibrationError(
            f"no complete trial costs at most --max-cost {max_cost:g}: the cheapest costs {cheapest:.4g}. "
            "Raise --max-cost, or search cheaper modes (--selection lagged,static)"
        )
    return max(within, key=lambda t: (t.values[0], -t.values[1], -t.number))


def front_table(points: Sequence[FrontPoint], metric: str, chosen: int | None = None) -> str:
    """The front as an aligned text table, cheapest first; `chosen` (a trial number) is marked."""
    knobs = ("selection", "num_heads", "strength", "top_p", "top_k", "decay", "intervention_warmup")
    header = f"{'trial':>5}  {'objective':>9}  {'score':>6}  {metric:>12}  knobs"
    lines = [f"Pareto front ({metric}: {COST_UNITS[metric]}; * registered, p published defaults)", header]
    for p in points:
        mark = ("*" if p.trial == chosen else " ") + ("p" if p.published else " ")
        shown = ", ".join(f"{k}={_short(p.params[k])}" for k in knobs if k in p.params)
        if p.params.get("selection") == "lagged" and "lagged_probs" in p.params:
            shown = shown.replace("selection=lagged", f"selection=lagged/{p.params['lagged_probs']}")
        lines.append(f"{p.trial:>4}{mark}  {p.objective:>9.3f}  {p.score:>6.3f}  {p.cost:>12.4g}  {shown}")
    return "\n".join(lines)


def plot_front(
    trials: Sequence[FrozenTrial], points: Sequence[FrontPoint], path: str | Path, metric: str,
    chosen: int | None = None, title: str = "",
) -> Path:
    """Draw every complete trial (dev objective against cost), the front highlighted, to a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    on_front = {p.trial for p in points}
    others = [t for t in trials if t.values is not None and t.number not in on_front]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([t.values[1] for t in others], [t.values[0] for t in others], s=22, color="0.65",
               label="other trials", zorder=2)
    xs, ys = [p.cost for p in points], [p.objective for p in points]
    ax.step(xs, ys, where="post", color="tab:blue", linewidth=1.2, zorder=3)
    ax.scatter(xs, ys, s=40, color="tab:blue", label="Pareto front", zorder=4)
    labels: dict[tuple[float, float], list[str]] = {}  # trials at one spot share one label
    for p in points:
        labels.setdefault((p.cost, p.objective), []).append(str(p.trial))
    for (x, y), numbers in labels.items():
        ax.annotate("trial " + ",".join(numbers), (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
    every = [_as_point(t) for t in trials if t.values is not None]
    published = [p for p in every if p.published]
    if published:
        ax.scatter([published[0].cost], [published[0].objective], s=110, facecolors="none",
                   edgecolors="tab:orange", linewidths=1.6, label="published defaults", zorder=5)
    picked = [p for p in every if p.trial == chosen]  # the adoption rule may keep the published, off the front
    if picked:
        ax.scatter([picked[0].cost], [picked[0].objective], s=160, marker="*", color="tab:red",
                   label=f"registered (trial {chosen})", zorder=6)
    ax.set_xlabel(f"{metric} ({COST_UNITS[metric]}; lower is better)")
    ax.set_ylabel("dev objective (higher is better)")
    ax.set_title(title or "DySCO calibration: accuracy against cost")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _as_point(trial: FrozenTrial) -> FrontPoint:
    return front_points([trial])[0]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
