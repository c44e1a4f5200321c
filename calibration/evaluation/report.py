"""An evaluation's report: the accuracy table with intervals and paired tests, speed, DySCO's
selection recall; as markdown, JSON and a plot (`EvalReport`), and as an MLflow run (`log_to_mlflow`).

    report = EvalReport.from_dict(json.loads(Path("eval-out/results.json").read_text()))
    print(report.markdown()); report.save("eval-out")
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from calibration.evaluation.inputs import format_length, parse_length
from calibration.evaluation.statistics import (
    BASELINE,
    EVIDENCE_FIELDS,
    RIGHT_SCORE,
    CellResult,
    PairedResult,
    SelectionResult,
    SpeedResult,
)

EXPERIMENT = "dysco-eval"  # the MLflow experiment `dysco eval --tracking-uri` logs to
_OUTCOME_TEXT = {"all": "all", "right": f"right (score ≥ {RIGHT_SCORE:g})", "wrong": "wrong",
                 "win": f"win vs {BASELINE}", "loss": f"loss vs {BASELINE}"}


SELECTION_TITLE = "Selection recall (DySCO)"
SELECTION_HELP = (
    "For each generated token, over the prompt tokens that hold the answer (the task's evidence: the needle "
    "sentence, the key's pair, the route's lines, the asked-for MRCR reply): **recall** = the share of them "
    "DySCO up-weighted; **share** = the share of the up-weighted importance that lies on them; **evidence "
    "importance** = the QR heads' importance mass on them, selected or not; **selected** = positions "
    "up-weighted per token. Each example's mean over its generated tokens, then the mean over the examples "
    "of the group (n = examples measured with their evidence located / examples in the group). How to read "
    "it: low evidence importance → the QR heads do not see the evidence (wrong heads, or heads that do not "
    "fit this task: detect them on probes shaped like it, e.g. `headfinder detect --probes kv`, and let "
    "calibration try fewer heads); high importance and recall but still wrong → the evidence is selected "
    "and not used (the bias is too weak: raise strength, or tune top_k); high recall with a low share → the "
    "selection is too broad (lower top_p or top_k)."
)


@dataclass
class EvalReport:
    """Everything `evaluate` measured; `markdown()`, `to_dict()`, `plot()` and `save()` present it."""

    config: dict[str, Any]
    cells: list[CellResult]
    paired: list[PairedResult]
    speed: list[SpeedResult]
    examples: list[dict[str, Any]]  # per example: task, length, id, scores/responses per method, DySCO's selection
    seconds: float = 0.0
    selection: list[SelectionResult] = field(default_factory=list)  # DySCO's selection recall (exact or fast path)

    @property
    def methods(self) -> list[str]:
        """Methods in the order they were asked for."""
        return list(self.config["methods"])

    @property
    def tasks(self) -> list[str]:
        """Task labels in the order they were asked for."""
        return list(self.config["tasks"])

    @property
    def lengths(self) -> list[int]:
        """Context lengths (tokens), ascending."""
        return list(self.config["lengths"])

    def cell(self, task: str, length: int | str, method: str) -> CellResult:
        """The result of one task × length × method."""
        length = parse_length(length)
        for cell in self.cells:
            if (cell.task, cell.length, cell.method) == (task, length, method):
                return cell
        raise KeyError(f"no result for task {task!r}, length {length}, method {method!r}")

    def scores(self, task: str, length: int | str, method: str) -> list[float]:
        """Per-example scores of one cell, in example order."""
        length = parse_length(length)
        return [e["scores"][method] for e in self.examples if e["task"] == task and e["length"] == length]

    def selection_unavailable(self) -> str | None:
        """Why the report has no selection recall (DySCO not run, or a fast-path run made before the fast path
        measured it); None when it was measured."""
        if "dysco" not in self.methods:
            return "DySCO was not among the methods"
        if self.config.get("path") == "fast" and not self.selection:
            return ("this run decoded with --fast in a version whose fast path did not measure it; run it again "
                    "to measure it")
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: config, cells, paired tests, speed, selection recall and every example's scores."""
        return {
            "config": self.config,
            "seconds": self.seconds,
            "cells": [asdict(c) for c in self.cells],
            "paired": [asdict(p) for p in self.paired],
            "speed": [asdict(s) for s in self.speed],
            "selection": [asdict(s) for s in self.selection],
            "selection_unavailable": self.selection_unavailable(),
            "examples": self.examples,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        """The inverse of `to_dict` (e.g. to re-plot a saved results.json); older files have no selection."""
        return cls(
            config=dict(data["config"]),
            cells=[CellResult(**c) for c in data["cells"]],
            paired=[PairedResult(**p) for p in data["paired"]],
            speed=[SpeedResult(**s) for s in data["speed"]],
            examples=list(data["examples"]),
            seconds=float(data.get("seconds", 0.0)),
            selection=[SelectionResult(**s) for s in data.get("selection") or []],
        )

    def to_json(self) -> str:
        """`to_dict()` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def lengths_of(self, task: str) -> list[int]:
        """The lengths `task` has results for (all of them, unless reports of partial runs were merged)."""
        return sorted({c.length for c in self.cells if c.task == task})

    def _n_text(self) -> str:
        """'50 examples per task × length', or the count of each task × length when they differ."""
        counts = {(c.task, c.length): c.n for c in self.cells}
        if len(set(counts.values())) == 1:
            return f"{next(iter(counts.values()))} examples per task × length"
        return "examples per task × length: " + ", ".join(
            f"{task} {format_length(length)} {n}" for (task, length), n in counts.items()
        )

    def markdown(self) -> str:
        """The accuracy table (with intervals and paired tests), the speed table and DySCO's selection recall, in markdown."""
        methods, cfg = self.methods, self.config
        lines = [
            f"Model `{cfg['model']}`; {self._n_text()} (seed {cfg['seed']}); greedy decoding; "
            f"scores in % with 95% bootstrap intervals ({cfg['bootstrap_resamples']} resamples).",
            *self._dysco_lines(),
            "",
        ]
        paired = {(p.task, p.length, p.method): p for p in self.paired}
        compared = [m for m in methods if m != BASELINE and any(k[2] == m for k in paired)]
        header = ["task", "length", *methods, *[f"{m} − {BASELINE} (95% CI), sign-test p" for m in compared]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for task in self.tasks:
            for length in self.lengths_of(task):
                row = [task, format_length(length)]
                for method in methods:
                    c = self.cell(task, length, method)
                    row.append(f"{100 * c.mean:.1f} [{100 * c.low:.1f}, {100 * c.high:.1f}]")
                for method in compared:
                    p = paired[(task, length, method)]
                    row.append(
                        f"{100 * p.mean_difference:+.1f} [{100 * p.low:+.1f}, {100 * p.high:+.1f}], "
                        f"{p.wins}W/{p.losses}L/{p.ties}T, p={p.p_value:.3g}"
                    )
                lines.append("| " + " | ".join(row) + " |")
        batch_sizes = cfg.get("batch_size_per_unit") or {}
        batch_text = (f"batch size {cfg['batch_size']}" if len(set(batch_sizes.values())) <= 1
                      else "batch sizes " + ", ".join(f"{unit} {b}" for unit, b in batch_sizes.items()))
        lines += [
            "",
            "Speed (the tasks of each length pooled): time to first token = prefill + warmup + first token, mean per "
            f"batch ({batch_text}); decode tokens/s counts the tokens after the first, over all rows of a batch."
            + (" Vanilla and DySCO continue one shared prefill per batch; its time is in both TTFTs."
               if {"vanilla", "dysco"} <= set(methods) and cfg.get("path") == "exact" else ""),  # older reports: no key
            "",
            "| method | length | TTFT (s) | decode tokens/s | tokens generated |",
            "|---|---|---|---|---|",
        ]
        for s in self.speed:
            lines.append(
                f"| {s.method} | {format_length(s.length)} | {s.ttft_s:.2f} | {s.decode_tokens_per_s:.1f} | {s.new_tokens} |"
            )
        lines += self._selection_lines()
        return "\n".join(lines) + "\n"

    def _dysco_lines(self) -> list[str]:
        """Which profile DySCO decoded with: its resolved version and content hash (none for --heads)."""
        cfg = self.config
        source = cfg.get("dysco_resolved") or cfg.get("dysco_source") or {}
        if "dysco" not in self.methods or not source.get("profile"):
            return []
        digest = source.get("content_hash")
        return [f"DySCO profile `{source['profile']}`" + (f" (content sha256 `{digest}`)." if digest else ".")]

    def _selection_lines(self) -> list[str]:
        """The selection-recall section: its table, or why there is none (nothing for reports that predate it)."""
        if "dysco" not in self.methods:
            return []
        missing = self.selection_unavailable()
        if missing is not None:
            return ["", f"{SELECTION_TITLE}: not available — {missing}."]
        if not self.selection:
            return []  # a report written before the diagnostic existed

        def number(value: float | None) -> str:
            return "–" if value is None else f"{value:.3f}"

        lines = ["", f"{SELECTION_TITLE}. {SELECTION_HELP}", "",
                 "| task | length | outcome | n | recall | share | evidence importance | selected |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.selection:
            if r.examples == 0 and r.outcome != "all":
                continue  # an empty group (no wins, say) has nothing to show
            lines.append(
                f"| {r.task} | {format_length(r.length)} | {_OUTCOME_TEXT.get(r.outcome, r.outcome)} | {r.n}/{r.examples} | "
                f"{number(r.evidence_recall)} | {number(r.evidence_share)} | {number(r.evidence_importance)} | "
                f"{'–' if r.selected is None else f'{r.selected:.1f}'} |"
            )
        return lines

    def plot(self, path: str | Path) -> Path:
        """Accuracy vs context length, one panel per task, one line per method with its interval."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tasks = self.tasks
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False, sharey=True)
        for ax, task in zip(axes[0], tasks):
            lengths = self.lengths_of(task)
            for k, method in enumerate(self.methods):
                cells = [self.cell(task, length, method) for length in lengths]
                # Small horizontal offsets keep overlapping intervals readable.
                xs = [length * (1 + 0.03 * (k - (len(self.methods) - 1) / 2)) for length in lengths]
                ys = [100 * c.mean for c in cells]
                err = [[100 * (c.mean - c.low) for c in cells], [100 * (c.high - c.mean) for c in cells]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
            ax.set_xscale("log", base=2)
            # A fixed margin: with a single length matplotlib would spread the offsets edge to edge.
            ax.set_xlim(min(lengths) / 1.3, max(lengths) * 1.3)
            ax.set_xticks(lengths)
            ax.set_xticklabels([format_length(length) for length in lengths])
            ax.minorticks_off()
            counts = sorted({c.n for c in self.cells if c.task == task})
            ax.set_title(f"{task} (n={'/'.join(map(str, counts))})")
            ax.set_xlabel("context length (tokens)")
            ax.set_ylim(-5, 105)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("score (%)")
        axes[0][-1].legend(loc="best", fontsize="small")
        fig.suptitle(f"{self.config['model']}: 95% bootstrap intervals", fontsize="medium")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write results.md, results.json and accuracy.png into `out_dir`; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / "results.md", "json": out / "results.json", "plot": out / "accuracy.png"}
        paths["markdown"].write_text(self.markdown(), encoding="utf-8")
        paths["json"].write_text(self.to_json() + "\n", encoding="utf-8")
        self.plot(paths["plot"])
        return paths



def log_to_mlflow(report: EvalReport, tracking_uri: str, files: Mapping[str, Path] | None = None, experiment: str = EXPERIMENT) -> str:
    """Log one run (parameters, every cell's score, speed, the written files) to MLflow; returns the run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        try:
            experiment_id = client.create_experiment(experiment)
        except MlflowException:  # created meanwhile by another process
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    cfg = report.config
    run = client.create_run(experiment_id, run_name=f"eval-{cfg['model']}", tags={"dysco.kind": "eval"})
    run_id = run.info.run_id
    params = {k: v for k, v in cfg.items() if k not in ("library_versions",)}
    client.log_batch(run_id, params=[
        Param(k, (v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str))[:6000]) for k, v in sorted(params.items())
    ])
    stamp = int(time.time() * 1000)
    metrics = []

    def key(*parts: Any) -> str:
        # MLflow keys allow letters, digits, _ - . / and spaces only.
        return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]", "_", str(p)) for p in parts)

    for c in report.cells:
        metrics += [Metric(key("score", c.task, format_length(c.length), c.method), c.mean, stamp, 0),
                    Metric(key("score_low", c.task, format_length(c.length), c.method), c.low, stamp, 0),
                    Metric(key("score_high", c.task, format_length(c.length), c.method), c.high, stamp, 0)]
    for p in report.paired:
        metrics += [Metric(key("diff", p.task, format_length(p.length), p.method), p.mean_difference, stamp, 0),
                    Metric(key("sign_p", p.task, format_length(p.length), p.method), p.p_value, stamp, 0)]
    for s in report.speed:
        metrics += [Metric(key("ttft_s", format_length(s.length), s.method), s.ttft_s, stamp, 0),
                    Metric(key("decode_tokens_per_s", format_length(s.length), s.method), s.decode_tokens_per_s, stamp, 0)]
    for r in report.selection:  # DySCO's selection recall: the measured groups only
        for name in (*EVIDENCE_FIELDS, "selected"):
            value = getattr(r, name)
            if value is not None:
                metrics.append(Metric(key(f"selection_{name}", r.task, format_length(r.length), r.outcome), value, stamp, 0))
    for start in range(0, len(metrics), 900):  # MLflow's batch limit is 1000 metrics
        client.log_batch(run_id, metrics=metrics[start : start + 900])
    for path in (files or {}).values():
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id

