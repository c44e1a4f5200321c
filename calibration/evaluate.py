"""`dysco eval`: does DySCO help on this model, and at what cost?

Every method (vanilla, AttnTS, DySCO) decodes the *same* examples — one seeded set per task ×
context length — greedily, so the comparison is paired. The report holds:

- accuracy (the task's own grade, mean over examples) per task × length × method, with a seeded
  95% percentile-bootstrap interval;
- a paired comparison of every method against vanilla on the same examples: the mean per-example
  difference with a seeded 95% paired-bootstrap interval, and the exact two-sided **sign test**
  p-value (pairs that tie are dropped; with 0/1 grades this is the exact McNemar test);
- speed per method × length: time to first token (prefill + warmup + first token, per batch) and
  decode tokens/s (tokens after the first one over the time after the first one);
- DySCO's **selection recall** per task × length (exact path only): how much of the prompt span
  that holds the answer (`Task.evidence`) DySCO up-weighted, the share of its selection lying there
  and the QR heads' importance on it, overall and split by outcome (right / wrong, win / loss
  against vanilla) — see `SelectionResult` and `SELECTION_HELP`.

Vanilla and DySCO continue from one shared prefill of each batch (DySCO only changes the steps from
its warmup on), so a three-method eval reads each long prompt twice, not three times; each method's
time to first token still includes that prefill, as if it had run alone.

    >>> from calibration.evaluate import evaluate
    >>> report = evaluate(model, tokenizer, tasks=["needle", "kv"], lengths=["2k"],
    ...                   methods=["vanilla", "dysco"], n=8, seed=0, dysco=profile_or_heads)
    >>> print(report.markdown()); report.save("eval-out")   # results.md, results.json, accuracy.png

Examples are fed through `encode_prompt` (the token count the tasks sized them to) with the chat
template's positions marked, so DySCO never up-weights template tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.runner import EVIDENCE_FIELDS, summarize_selection
from calibration.stats import BOOTSTRAP_RESAMPLES, bootstrap_interval, paired_comparison, seed_for as _seed_for
from calibration.tasks import TASK_NAMES, Example, Task, encode_prompt, get_task
from decoder import METHODS
from registry.profile import library_versions

__all__ = [
    "METHODS",
    "CellResult",
    "EvalError",
    "EvalReport",
    "PairedResult",
    "SelectionResult",
    "SpeedResult",
    "bootstrap_interval",
    "evaluate",
    "format_length",
    "paired_comparison",
    "parse_length",
    "parse_lengths",
    "load_profile",
    "register_cli",
    "resolve_dysco",
    "Checkpoint",
    "examples_key",
    "run_batch",
    "selection_results",
    "shared_prefill",
    "summarize_selection",
]

BASELINE = "vanilla"
# Middle of the calibration study's AttnTS grid (0.7, 0.8, 0.9): used when neither the command line
# nor the DySCO profile (its `metrics.attnts_temperature`, the tuned one) says otherwise.
DEFAULT_ATTNTS_TEMPERATURE = 0.8
# When --max-new-tokens is not given each example may generate its answer's length plus this much:
# room for a preamble such as "The secret number of Brexstintrir is" (12 SmolLM2 tokens, and
# digits are one token each) without paying for long rambles.
ANSWER_MARGIN_TOKENS = 24
EXPERIMENT = "dysco-eval"
CHECKPOINT_NAME = "progress.jsonl"  # in --out: every finished batch, so that a rerun resumes


class EvalError(ValueError):
    """Bad input to `evaluate` or `dysco eval`, with what is accepted."""


# --------------------------------------------------------------------------- parsing input

_LENGTH = re.compile(r"^\s*(\d+)\s*([kK]?)\s*$")


def parse_length(text: str | int) -> int:
    """'2k' -> 2048, '4096' -> 4096; anything else (0, negatives, '1.5k', 'abc') raises EvalError."""
    if isinstance(text, bool):
        raise EvalError(f"bad context length {text!r}: write a token count like 4096 or 4k (k = 1024)")
    if isinstance(text, int):
        value = text
    else:
        match = _LENGTH.match(str(text))
        if not match:
            raise EvalError(f"bad context length {text!r}: write a token count like 4096 or 4k (k = 1024)")
        value = int(match.group(1)) * (1024 if match.group(2) else 1)
    if value < 1:
        raise EvalError(f"bad context length {text!r}: it must be at least 1 token (e.g. 2k or 2048)")
    return value


def parse_lengths(text: str | Sequence[str | int]) -> list[int]:
    """'2k,4k,8k' (or a list) -> [2048, 4096, 8192]; duplicates are an error."""
    items = [t for t in text.split(",")] if isinstance(text, str) else list(text)
    items = [t.strip() if isinstance(t, str) else t for t in items]
    if not items or any(t == "" for t in items):
        raise EvalError(f"bad --lengths {text!r}: give comma-separated token counts like 2k,4k,8k or 4096")
    lengths = [parse_length(t) for t in items]
    if len(set(lengths)) != len(lengths):
        raise EvalError(f"--lengths lists a length twice: {text!r}")
    return lengths


def format_length(tokens: int) -> str:
    """2048 -> '2k', 3000 -> '3000' (the inverse of parse_length where it is exact)."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def _parse_names(text: str | Sequence[str], accepted: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else [str(t).strip() for t in text]
    if not items or any(not t for t in items):
        raise EvalError(f"no {what} given in {text!r}; accepted: {', '.join(accepted)}")
    unknown = [t for t in items if t not in accepted]
    if unknown:
        raise EvalError(f"unknown {what} {unknown[0]!r}; accepted: {', '.join(accepted)}")
    if len(set(items)) != len(items):
        raise EvalError(f"a {what} is listed twice in {text!r}")
    return items


def _resolve_tasks(tasks: str | Sequence[str | Task]) -> list[Task]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    if not tasks:
        raise EvalError(f"no task given; accepted: {', '.join(TASK_NAMES)} (or an MRCR file / Hub id)")
    resolved = []
    for item in tasks:
        if isinstance(item, Task):
            resolved.append(item)
            continue
        if not isinstance(item, str) or not item.strip():
            raise EvalError(f"bad task {item!r}; accepted: {', '.join(TASK_NAMES)} (or an MRCR file / Hub id)")
        try:
            resolved.append(get_task(item.strip()))
        except ValueError as err:
            raise EvalError(str(err)) from None
    labels = [_task_label(t) for t in resolved]
    if len(set(labels)) != len(labels):
        raise EvalError(f"a task is listed twice: {', '.join(labels)}")
    return resolved


def _task_label(task: Task) -> str:
    source = getattr(task, "source", None)
    return f"{task.name}:{Path(source).name}" if source else task.name


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EvalError(f"n (examples per task and length) must be an integer >= 1, got {n!r}")
    return n


def parse_heads(text: str) -> list[tuple[int, int]]:
    """'21:31,21:18' -> [(21, 31), (21, 18)] (`registry.parse_head_set`, as `calibrate --heads`)."""
    from registry import ProfileValidationError, parse_head_set

    try:
        return parse_head_set(text, "--heads")
    except ProfileValidationError as err:
        raise EvalError(str(err)) from None


# --------------------------------------------------------------------------- statistics


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


# --------------------------------------------------------------------------- running methods


@dataclass
class BatchTiming:
    """What one generate call cost."""

    rows: int
    new_tokens: int  # tokens actually generated (before truncating rows to their own budget)
    seconds: float  # whole call
    ttft_s: float  # from the call to the first token


@dataclass
class MethodRun:
    """One method over a list of examples: per-example scores and responses, and the batch timings.

    `selection`: per example, DySCO's selection diagnostics averaged over its generated tokens
    (`summarize_selection`), None where they were not measured (other methods, the fast path, batches
    read back from a progress file written before they existed).
    """

    scores: list[float]
    responses: list[str]
    new_tokens: list[int]
    timings: list[BatchTiming]
    selection: list[dict[str, Any] | None] = field(default_factory=list)

    def extend(self, other: MethodRun) -> None:
        """Append another run's examples and batches (the next batch of the same method)."""
        self.selection = self.selection_per_example() + other.selection_per_example()
        self.scores += other.scores
        self.responses += other.responses
        self.new_tokens += other.new_tokens
        self.timings += other.timings

    def selection_per_example(self) -> list[dict[str, Any] | None]:
        """`selection` aligned with `scores` (None for every example when it is missing or misaligned)."""
        return list(self.selection) if len(self.selection) == len(self.scores) else [None] * len(self.scores)


# An example counts as "right" for the selection table's outcome split when its score is at least
# this (0/1 grades: correct; MRCR's similarity and pathtrans's partial credit: more right than wrong).
RIGHT_SCORE = 0.5


def _evidence(tokenizer: Any, task: Task, example: Example, ids: Sequence[int]) -> list[int]:
    """The prompt positions (of `ids`, unpadded) holding `example`'s evidence; [] when unknown or not found."""
    from calibration.tasks import evidence_positions

    return evidence_positions(tokenizer, example, task.evidence(example), list(ids)) or []


def _prompt_ids(tokenizer: Any, example: Example) -> tuple[list[int], list[bool]]:
    """`encode_prompt`'s ids (what the task sized) and the chat-template mask aligned to them."""
    from decoder.template import has_chat_template
    from decoder.template import encode_chat

    ids = encode_prompt(tokenizer, example.messages)
    if not has_chat_template(tokenizer):
        return ids, [False] * len(ids)
    chat_ids, mask = encode_chat(tokenizer, example.messages)
    if chat_ids != ids:
        # Both render the same template text without added special tokens; a difference would be a
        # tokenizer quirk. The sized ids win; no template positions are known then.
        return ids, [False] * len(ids)
    return ids, mask


def example_budget(example: Example, max_new_tokens: int | None) -> int:
    """New tokens allowed for `example`: the fixed cap, or its answer's length plus a small margin."""
    if max_new_tokens is not None:
        return int(max_new_tokens)
    answer = example.meta.get("answer_tokens")
    if not isinstance(answer, int) or answer < 1:
        raise EvalError(f"example {example.id} has no meta['answer_tokens']; pass max_new_tokens explicitly")
    return answer + ANSWER_MARGIN_TOKENS


def run_batch(
    decoder: Any,
    task: Task,
    batch: Sequence[Example],
    *,
    max_new_tokens: int | None = None,
    prefilled: Any = None,
    prefill_seconds: float = 0.0,
    diagnostics: bool = True,
) -> MethodRun:
    """Decode one batch greedily with `decoder` (a `decoder.generation.Decoder`) and grade it.

    `prefilled`: a `Decoder.prefill` state of this batch to continue from (vanilla and DySCO share
    one); its `prefill_seconds` are counted in this batch's time, so each method's time is what it
    would cost alone. Each row keeps only its own budget of tokens (`example_budget`), so a row's
    result does not depend on which batch it shared; a batch runs to its largest budget.
    `diagnostics`: for DySCO on the exact path, also measure the selection recall of each example's
    evidence (`MethodRun.selection`); the fast path and the other methods have none (None per example).
    """
    tokenizer = decoder.tokenizer
    budgets = [example_budget(example, max_new_tokens) for example in batch]
    first: list[float] = []

    def on_step(event) -> None:
        if event.step == 0 and not first:
            first.append(time.perf_counter())

    exact = hasattr(decoder, "generate_from")
    encoded = [_prompt_ids(tokenizer, example) for example in batch] if not exact or prefilled is None else None
    measure: dict[str, Any] = {}
    evidence: list[list[int]] = []
    if diagnostics and exact and getattr(decoder, "method", None) == "dysco":
        # Found before the clock starts: the tokenizer pass that maps the evidence is no decoding time.
        prompts = [ids for ids, _ in encoded] if encoded is not None else prefilled.prompt_ids
        evidence = [_evidence(tokenizer, task, example, ids) for example, ids in zip(batch, prompts)]
        measure = {"return_diagnostics": True, "evidence": evidence}
    began = time.perf_counter()
    if not exact:  # the fast path (decoder.fast.FastDecoder): greedy, timed inside
        out = decoder.generate([ids for ids, _ in encoded], template_mask=[mask for _, mask in encoded],
                               max_new_tokens=max(budgets))
        timed = out.timings or {}
        first.append(began + timed.get("prepare_s", 0.0) + timed.get("ttft_s", time.perf_counter() - began))
    elif prefilled is None:
        out = decoder.generate(
            [ids for ids, _ in encoded], template_mask=[mask for _, mask in encoded],
            max_new_tokens=max(budgets), do_sample=False, callback=on_step, **measure,
        )
    else:
        out = decoder.generate_from(prefilled, max_new_tokens=max(budgets), do_sample=False, callback=on_step,
                                    **measure)
    ended = time.perf_counter()
    run = MethodRun(scores=[], responses=[], new_tokens=[], timings=[BatchTiming(
        rows=len(batch), new_tokens=sum(len(ids) for ids in out.token_ids),
        seconds=prefill_seconds + ended - began, ttft_s=prefill_seconds + (first[0] if first else ended) - began,
    )])
    steps = getattr(out, "diagnostics", None) if measure else None
    for row, (example, ids, reason, budget) in enumerate(zip(batch, out.token_ids, out.finish_reasons, budgets)):
        kept = ids[:budget]
        # The row's own steps only (its EOS step included), so the means do not depend on the batch.
        run.selection.append(summarize_selection(steps[row][: len(kept)], len(evidence[row])) if steps else None)
        if reason == "eos" and len(kept) == len(ids):
            kept = kept[:-1]  # the EOS token itself is not part of the answer
        text = tokenizer.decode(kept, skip_special_tokens=True)
        run.responses.append(text)
        run.scores.append(float(task.grade(text, example)))
        run.new_tokens.append(len(kept))
    return run


def shared_prefill(
    decoders: Mapping[str, Any], batch: Sequence[Example], max_new_tokens: int | None
) -> tuple[Any, float]:
    """One plain prefill of `batch` that vanilla and DySCO both continue from, and its seconds.

    It stops before DySCO's warmup (its context plus intervention warmup: the only part of the prompt
    DySCO treats differently; each decoder's `_warmup` of the batch's width, the largest of those that
    continue from it), so the prompt, the costly part of a long-context example, is read once for
    both. None when fewer than two of the methods can share it (AttnTS changes the prefill itself).
    """
    sharing = [decoders[m] for m in ("vanilla", "dysco") if m in decoders]
    if len(sharing) < 2 or not all(hasattr(d, "prefill") and hasattr(d, "_warmup") for d in sharing):
        return None, 0.0  # the fast path (no `prefill`) prefills inside its own generate
    plain = decoders["vanilla"]
    encoded = [_prompt_ids(plain.tokenizer, example) for example in batch]
    budget = max(example_budget(example, max_new_tokens) for example in batch)
    width = max(len(ids) for ids, _ in encoded)
    began = time.perf_counter()
    state = plain.prefill(
        [ids for ids, _ in encoded], template_mask=[mask for _, mask in encoded],
        warmup=max(d._warmup(width) for d in sharing), max_new_tokens=budget,
    )
    if state.input_ids.is_cuda:  # kernels run asynchronously: stop the clock when they are done
        import torch

        torch.cuda.synchronize(state.input_ids.device)
    return state, time.perf_counter() - began


# --------------------------------------------------------------------------- the report


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


# The outcome groups of the selection table: every example, those DySCO got right / wrong (score >=
# RIGHT_SCORE or not), and those it won / lost against vanilla on the same example (where vanilla ran).
OUTCOMES = ("all", "right", "wrong", "win", "loss")
_OUTCOME_TEXT = {"all": "all", "right": f"right (score ≥ {RIGHT_SCORE:g})", "wrong": "wrong",
                 "win": f"win vs {BASELINE}", "loss": f"loss vs {BASELINE}"}


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


SELECTION_TITLE = "Selection recall (DySCO, exact path)"
SELECTION_HELP = (
    "For each generated token, over the prompt tokens that hold the answer (the task's evidence: the needle "
    "sentence, the key's pair, the route's lines, the asked-for MRCR reply): **recall** = the share of them "
    "DySCO up-weighted; **share** = the share of the up-weighted importance that lies on them; **evidence "
    "importance** = the QR heads' importance mass on them, selected or not; **selected** = positions "
    "up-weighted per token. Each example's mean over its generated tokens, then the mean over the examples "
    "of the group (n = examples measured with their evidence located / examples in the group). How to read "
    "it: low evidence importance → the QR heads do not see the evidence (wrong heads, or heads that do not "
    "fit this model); high importance and recall but still wrong → the evidence is selected and not used "
    "(the bias is too weak: raise strength, or tune top_k); high recall with a low share → the selection is "
    "too broad (lower top_p or top_k)."
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
    selection: list[SelectionResult] = field(default_factory=list)  # DySCO's selection recall (exact path only)

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
        """Why the report has no selection recall (DySCO not run, or the fast path); None when it was measured."""
        if "dysco" not in self.methods:
            return "DySCO was not among the methods"
        if self.config.get("path") == "fast":
            return ("the diagnostic needs the exact path: this run decoded with --fast (FastDecoder reports no "
                    "selection); run without --fast to measure it")
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


# --------------------------------------------------------------------------- DySCO's head set


def resolve_dysco(
    model: Any,
    name: str,
    *,
    profile: str | Any | None = None,
    heads: Sequence[Sequence[int]] | None = None,
    registry: str | Path | None = None,
    force: bool = False,
    intervention_warmup: int | str | None = None,
    profile_ref: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The DyscoConfig for `model` from heads, a profile (ref or object), or the registry's `name@latest`.

    Returns (config, info) where info says where it came from: for a profile its resolved reference
    (`name@3`, never `@latest`) and content hash, and its tuned AttnTS temperature when it has one.
    `profile_ref` labels a profile given as an object (see `load_profile`). `intervention_warmup`
    ("auto" or a token count) overrides the profile's (heads: the published "auto"); None keeps it.
    """
    from decoder.dysco import DyscoConfig
    from decoder.loading import model_shape

    if profile is not None and heads is not None:
        raise EvalError("give either a profile or a head list (--heads), not both")
    overrides: dict[str, Any] = {}
    if intervention_warmup is not None:
        overrides["intervention_warmup"] = _intervention_warmup(intervention_warmup)
    if heads is not None:
        layers, per_layer = model_shape(model)
        pairs = [tuple(int(v) for v in pair) for pair in heads]
        bad = [p for p in pairs if not (0 <= p[0] < layers and 0 <= p[1] < per_layer)]
        if bad:
            raise EvalError(
                f"head {bad[0][0]}:{bad[0][1]} is outside {name} ({layers} layers × {per_layer} heads; "
                f"layers 0–{layers - 1}, heads 0–{per_layer - 1})"
            )
        try:
            return DyscoConfig(head_set=pairs, **overrides), {"source": "heads", "head_set": [list(p) for p in pairs]}
        except ValueError as err:
            raise EvalError(f"bad head list: {err}") from None

    from decoder.loading import model_identity
    from registry import RegistryError, check_model

    if profile is None or isinstance(profile, str):
        ref, loaded = load_profile(name, profile, registry)
    else:
        loaded = profile
        ref = profile_ref
    try:
        basis = check_model(loaded, model_identity(model, name), force=force)
    except RegistryError as err:
        raise EvalError(f"profile {ref or loaded.model.name!r} does not fit {name!r}: {err}") from None
    knobs = loaded.knobs
    if knobs.attnts_temperature is not None:
        raise EvalError(f"profile {ref or loaded.model.name!r} is an AttnTS profile (no DySCO knobs); give a DySCO "
                        "profile or --heads")
    config = DyscoConfig.from_profile(loaded).replace(**overrides)
    # The resolved version and the content hash: `@latest` (or a tag) names another profile tomorrow.
    info = {"source": "profile", "profile": ref or loaded.model.name, "content_hash": loaded.content_hash(),
            "match": basis}
    tuned = (loaded.metrics or {}).get("attnts_temperature")
    if isinstance(tuned, (int, float)) and not isinstance(tuned, bool) and tuned > 0:
        info["attnts_temperature"] = float(tuned)
    return config, info


def load_profile(name: str, profile: str | None = None, registry: str | Path | None = None) -> tuple[str, Any]:
    """(resolved reference, Profile) of `profile` (a reference), or of the registry's `name@latest`.

    The reference returned is the version it resolved to (`name@3`, or `name@seed`), so a report
    says which profile it used even after `@latest` moves. Needs no model: the CLI calls it before loading.
    """
    from registry import InvalidReference, ProfileNotFound, Registry, RegistryError

    try:
        store = Registry(registry)
    except RegistryError as err:
        raise EvalError(f"--registry: {err}") from None
    ref = profile or f"{name}@latest"
    try:
        found, version = store.resolve(ref)
        resolved = f"{found}@{version}"
        return resolved, store.load(resolved)
    except InvalidReference as err:
        raise EvalError(str(err)) from None
    except ProfileNotFound as err:
        if profile is not None:
            raise EvalError(f"profile {ref!r} not found: {err}") from None
        raise EvalError(
            f"method 'dysco' needs a head set and the registry ({store.root}) has no profile for {name!r}: "
            f"run `headfinder detect --model {name} --register` first, or pass --profile REF or "
            "--heads L:H,… (or leave dysco out of --methods)"
        ) from None
    except RegistryError as err:
        raise EvalError(f"cannot read profile {ref!r}: {err}") from None


def _intervention_warmup(value: Any) -> int | str:
    """`intervention_warmup` checked: "auto" or an integer >= 0 (EvalError otherwise)."""
    from registry import ProfileValidationError, parse_intervention_warmup

    try:
        return parse_intervention_warmup(value, "--intervention-warmup")
    except ProfileValidationError as err:
        raise EvalError(str(err)) from None


def _dysco_dict(config: Any, decoder: Any = None) -> dict[str, Any]:
    """DySCO's settings for the report; with its decoder, also the intervention warmup in tokens."""
    out = {
        "head_set": [list(p) for p in config.head_set], "strength": config.strength, "top_p": config.top_p,
        "top_k": config.top_k, "decay": config.decay, "context_warmup": config.context_warmup,
        "selection": config.selection, "lagged_probs": config.lagged_probs, "intervention_warmup": config.intervention_warmup,
    }
    if decoder is not None:
        out["intervention_warmup_tokens"] = decoder.intervention_warmup  # "auto" resolved against the tokenizer
    return out


# --------------------------------------------------------------------------- resuming


class Checkpoint:
    """Finished batches of one evaluation, one JSON line each, so that an interrupted run resumes.

    A line holds the batch's results, the fingerprint of everything that decides them (model config
    and weights, dtype, seed, n, batch size, budgets, knobs, decoding path) and a hash of the batch's
    examples themselves (`examples_key`: prompts, answers, meta); a line is read back only when both
    match, so a changed command or a changed task option (a needle depth, a distractor count) decodes
    again in the same file. A line cut short by a kill is dropped and overwritten.
    """

    def __init__(self, path: str | Path, fingerprint: str, fresh: bool = False) -> None:
        self.path, self.fingerprint = Path(path), fingerprint
        self.done: dict[tuple[str, int, str, int, str | None], dict[str, Any]] = {}
        if fresh:
            self.path.unlink(missing_ok=True)
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):  # the last write was cut: drop the partial line
                text = text[: text.rfind("\n") + 1]
                self.path.write_text(text, encoding="utf-8")
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("fingerprint") == fingerprint:
                    key = (record["task"], record["length"], record["method"], record["start"], record.get("examples"))
                    self.done[key] = record
        self.resumed = 0

    def get(self, task: str, length: int, method: str, start: int, batch: Sequence[Example]) -> MethodRun | None:
        """The stored run of this batch, if it was finished on the very same examples."""
        # Ids alone are not enough: the same seed and id can hold another needle depth or distractor count.
        record = self.done.get((task, length, method, start, examples_key(batch)))
        if record is None:
            return None
        self.resumed += 1
        run = record["run"]
        # Progress files written before the selection diagnostic have no "selection": missing, not zero.
        selection = run.get("selection")
        if not isinstance(selection, list) or len(selection) != len(run["scores"]):
            selection = [None] * len(run["scores"])
        return MethodRun(run["scores"], run["responses"], run["new_tokens"], [BatchTiming(**t) for t in run["timings"]],
                         selection)

    def add(self, task: str, length: int, method: str, start: int, batch: Sequence[Example], run: MethodRun) -> None:
        """Append one finished batch (flushed and synced: a kill loses at most the batch under way)."""
        record = {
            "fingerprint": self.fingerprint, "task": task, "length": length, "method": method, "start": start,
            "ids": [example.id for example in batch], "examples": examples_key(batch),
            "run": {"scores": run.scores, "responses": run.responses, "new_tokens": run.new_tokens,
                    "timings": [asdict(t) for t in run.timings], "selection": run.selection_per_example()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def examples_key(batch: Sequence[Example]) -> str:
    """sha256 of a batch's examples as the model sees and grades them (ids, messages, answers, meta)."""
    content = [example.to_dict() for example in batch]
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _run_fingerprint(model: Any, settings: Mapping[str, Any]) -> str:
    """sha256 of what decides an evaluation's answers: the model's config, weights and dtype, and `settings`."""
    from decoder.loading import config_fingerprint, weights_fingerprint

    identity = {"config": config_fingerprint(model.config), "weights": weights_fingerprint(model),
                "dtype": str(getattr(model, "dtype", "")), **settings}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- evaluate


def _context_limit(model: Any) -> int | None:
    from decoder.loading import context_limit

    return context_limit(model.config)


def _check_lengths(lengths: Sequence[int], limit: int | None, name: str) -> None:
    """EvalError unless every context length fits the model's context of `limit` tokens (None: no limit known)."""
    too_long = [length for length in lengths if limit is not None and length > limit]
    if too_long:
        raise EvalError(
            f"length {format_length(too_long[0])} ({too_long[0]} tokens) is beyond {name}'s context of {limit} "
            f"tokens; accepted: lengths up to {limit} tokens minus the new tokens"
        )



def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str | Task],
    lengths: str | Sequence[str | int],
    methods: str | Sequence[str],
    n: int,
    seed: int = 0,
    *,
    dysco: Any = None,
    attnts_temperature: float | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 1,
    model_name: str | None = None,
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES,
    progress: bool = False,
    extra_config: Mapping[str, Any] | None = None,
    fast: bool = False,
    checkpoint: str | Path | None = None,
    fresh: bool = False,
) -> EvalReport:
    """Run every method on the same seeded examples of every task × length and report accuracy and speed.

    `dysco` (needed when "dysco" is a method): a `DyscoConfig`, a list of (layer, head) pairs or a
    registry `Profile`. `attnts_temperature` defaults to the profile's tuned one, else 0.8.
    `max_new_tokens` None: each example gets its answer's length plus 24 tokens.
    `fast`: decode with `decoder.fast.FastDecoder` (static KV buffers, fused biased attention, CUDA
    graphs on one GPU; the same greedy tokens as the exact path) instead of `decoder.generation.Decoder`.
    `checkpoint`: a JSONL file that every finished batch is appended to; run the same evaluation
    again with it and the finished batches are read back instead of decoded (see `Checkpoint`);
    `fresh` empties it first (once every input has passed its checks, so bad input loses nothing).
    """
    from decoder.dysco import DyscoConfig
    from decoder.generation import Decoder

    started = time.perf_counter()
    task_objs = _resolve_tasks(tasks)
    lengths = sorted(parse_lengths(lengths))
    methods = _parse_names(methods, METHODS, "method")
    n = _check_n(n)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EvalError(f"seed must be an integer, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvalError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise EvalError(f"max_new_tokens must be an integer >= 1 (or None for each answer's length + 24), got {max_new_tokens!r}")
    if isinstance(bootstrap_resamples, bool) or not isinstance(bootstrap_resamples, int) or bootstrap_resamples < 100:
        raise EvalError(f"bootstrap_resamples must be an integer >= 100, got {bootstrap_resamples!r}")
    name = model_name or getattr(model, "name_or_path", None) or type(model).__name__

    limit = _context_limit(model)
    _check_lengths(lengths, limit, name)

    dysco_info: dict[str, Any] = {}
    if "dysco" in methods:
        if dysco is None:
            raise EvalError(
                "method 'dysco' needs a head set: pass dysco= a DyscoConfig, a list of (layer, head) pairs or a "
                "registry profile (see resolve_dysco), or leave 'dysco' out of the methods"
            )
        if isinstance(dysco, DyscoConfig):
            dysco_info = {"source": "config"}
        elif hasattr(dysco, "head_set") and hasattr(dysco, "knobs"):
            dysco, dysco_info = resolve_dysco(model, name, profile=dysco)
        else:
            dysco, dysco_info = resolve_dysco(model, name, heads=dysco)
    if attnts_temperature is None:
        attnts_temperature = dysco_info.get("attnts_temperature", DEFAULT_ATTNTS_TEMPERATURE)
        temperature_source = "profile" if "attnts_temperature" in dysco_info else "default"
    else:
        temperature_source = "given"
    if isinstance(attnts_temperature, bool) or not isinstance(attnts_temperature, (int, float)) or not (
        math.isfinite(attnts_temperature) and attnts_temperature > 0
    ):
        raise EvalError(f"attnts_temperature must be a finite number > 0, got {attnts_temperature!r}")

    if fast:
        from decoder.fast import FastDecoder  # same constructor and greedy `generate` as Decoder

    make = FastDecoder if fast else Decoder
    decoders = {}
    for method in methods:
        try:
            if method == "dysco":
                decoders[method] = make(model, tokenizer, "dysco", dysco=dysco)
            elif method == "attnts":
                decoders[method] = make(model, tokenizer, "attnts", temperature=float(attnts_temperature))
            else:
                decoders[method] = make(model, tokenizer, "vanilla")
        except (ValueError, TypeError) as err:
            raise EvalError(f"cannot build the {method} decoder: {err}") from None

    # Every example set is made (and checked against the context) before any decoding starts, so
    # bad input fails in seconds, not after an hour of decoding.
    labels = [_task_label(t) for t in task_objs]
    sets: dict[tuple[str, int], list[Example]] = {}
    for task, label in zip(task_objs, labels):
        for length in lengths:
            try:
                examples = task.generate(tokenizer, n, length, seed)
            except ValueError as err:
                raise EvalError(f"task {label!r} at length {format_length(length)}: {err}") from None
            if limit is not None:
                for example in examples:
                    need = example.meta.get("prompt_tokens", length) + example_budget(example, max_new_tokens)
                    if need > limit:
                        raise EvalError(
                            f"task {label!r} at length {format_length(length)}: a {example.meta.get('prompt_tokens')}-token "
                            f"prompt plus {example_budget(example, max_new_tokens)} new tokens exceeds {name}'s context "
                            f"of {limit} tokens; use a shorter length or fewer new tokens"
                        )
            sets[(label, length)] = examples

    batches_per_set = math.ceil(n / batch_size)
    total = len(sets) * len(methods) * batches_per_set
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="eval", unit="batch", file=sys.stderr)

    # Batch by batch, every method in turn: vanilla and DySCO continue from one shared prefill of the
    # batch (`shared_prefill`), which is dropped before the next batch is read.
    saved = None
    if checkpoint is not None:
        saved = Checkpoint(checkpoint, fresh=fresh, fingerprint=_run_fingerprint(model, {
            "seed": seed, "n": n, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "fast": fast,
            "attnts_temperature": float(attnts_temperature) if "attnts" in methods else None,
            "dysco": _dysco_dict(dysco, decoders["dysco"]) if "dysco" in methods else None,
        }))
    runs: dict[tuple[str, int, str], MethodRun] = {}
    try:
        for (label, length), examples in sets.items():
            task = task_objs[labels.index(label)]
            for method in methods:
                runs[(label, length, method)] = MethodRun(scores=[], responses=[], new_tokens=[], timings=[])
            for start in range(0, len(examples), batch_size):
                batch = list(examples[start : start + batch_size])
                stored = {m: saved.get(label, length, m, start, batch) if saved else None for m in methods}
                todo = {m: decoders[m] for m in methods if stored[m] is None}
                prefilled, prefill_seconds = shared_prefill(todo, batch, max_new_tokens)
                for method in methods:
                    if bar is not None:
                        bar.set_postfix_str(f"{label} {format_length(length)} {method}")
                    run = stored[method]
                    if run is None:
                        shares = prefilled is not None and method != "attnts"
                        run = run_batch(
                            decoders[method], task, batch, max_new_tokens=max_new_tokens,
                            prefilled=prefilled if shares else None, prefill_seconds=prefill_seconds if shares else 0.0,
                        )
                        if saved is not None:
                            saved.add(label, length, method, start, batch, run)
                    runs[(label, length, method)].extend(run)
                    if bar is not None:
                        bar.update(1)
                del prefilled
    finally:
        if bar is not None:
            bar.close()

    cells, paired, example_rows, selection = [], [], [], []
    for (label, length), examples in sets.items():
        for method in methods:
            scores = runs[(label, length, method)].scores
            low, high = bootstrap_interval(scores, _seed_for(seed, "cell", label, length, method), bootstrap_resamples)
            cells.append(CellResult(label, length, method, len(scores), float(np.mean(scores)), low, high))
        if BASELINE in methods:
            base = runs[(label, length, BASELINE)].scores
            for method in methods:
                if method == BASELINE:
                    continue
                stats = paired_comparison(
                    runs[(label, length, method)].scores, base, _seed_for(seed, "paired", label, length, method),
                    bootstrap_resamples,
                )
                paired.append(PairedResult(task=label, length=length, method=method, baseline=BASELINE, **stats))
        chosen = runs[(label, length, "dysco")].selection_per_example() if "dysco" in methods else None
        if chosen is not None and not fast:
            selection += selection_results(
                label, length, chosen, runs[(label, length, "dysco")].scores,
                runs[(label, length, BASELINE)].scores if BASELINE in methods else None,
            )
        for i, example in enumerate(examples):
            example_rows.append({
                "task": label,
                "length": length,
                "index": i,
                "id": example.id,
                "prompt_tokens": example.meta.get("prompt_tokens"),
                "answer": example.answer,
                "scores": {m: runs[(label, length, m)].scores[i] for m in methods},
                "new_tokens": {m: runs[(label, length, m)].new_tokens[i] for m in methods},
                "responses": {m: runs[(label, length, m)].responses[i] for m in methods},
                # DySCO's selection of this example's evidence (means over its generated tokens); None where
                # not measured (the fast path, batches resumed from an older progress file).
                "selection": {"dysco": chosen[i]} if chosen is not None else {},
            })

    speed = []
    for method in methods:
        for length in lengths:
            timings = [t for label in labels for t in runs[(label, length, method)].timings]
            tokens = sum(t.new_tokens for t in timings)
            seconds = sum(t.seconds for t in timings)
            after_first = sum(t.seconds - t.ttft_s for t in timings)
            tokens_after_first = tokens - sum(t.rows for t in timings)
            speed.append(SpeedResult(
                method=method, length=length, batches=len(timings), new_tokens=tokens, seconds=seconds,
                ttft_s=float(np.mean([t.ttft_s for t in timings])),
                decode_tokens_per_s=tokens_after_first / after_first if after_first > 0 and tokens_after_first > 0 else 0.0,
                tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
            ))

    config = {
        "model": name,
        "tasks": labels,
        "lengths": lengths,
        "methods": methods,
        "n": n,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "max_new_tokens_rule": "fixed" if max_new_tokens is not None else f"answer tokens + {ANSWER_MARGIN_TOKENS}",
        "batch_size": batch_size,
        "decoding": "greedy",
        "path": "fast" if fast else "exact",
        "resumed_batches": saved.resumed if saved is not None else 0,
        "attnts_temperature": float(attnts_temperature) if "attnts" in methods else None,
        "attnts_temperature_source": temperature_source if "attnts" in methods else None,
        "dysco": _dysco_dict(dysco, decoders["dysco"]) if "dysco" in methods else None,
        "dysco_source": dysco_info or None,
        "bootstrap_resamples": bootstrap_resamples,
        "paired_test": PairedResult.test,
        "library_versions": library_versions(),
        **dict(extra_config or {}),
    }
    return EvalReport(config, cells, paired, speed, example_rows, seconds=time.perf_counter() - started,
                      selection=selection)


# --------------------------------------------------------------------------- MLflow


def log_to_mlflow(report: EvalReport, tracking_uri: str, files: Mapping[str, Path] | None = None, experiment: str = EXPERIMENT) -> str:
    """Log one run (parameters, every cell's score, speed, the written files) to MLflow; returns the run id."""
    import warnings

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


# --------------------------------------------------------------------------- CLI

_EPILOG = """\
examples:
  dysco eval --model smollm2-135m --tasks needle,kv --lengths 2k --methods vanilla,dysco --n 8
  dysco eval --model smollm2-135m --heads 14:2,17:5 --tasks mrcr --lengths 2k,4k --n 20 --out eval/smollm2
  dysco eval --model ./my-checkpoint --profile my-model@3 --tasks pathtrans --lengths 4096 --n 50 --json
  dysco eval --model qwen2.5-coder-0.5b --device cuda --dtype bfloat16 --fast --batch-size 16 --tasks kv --lengths 16k

Without --profile or --heads, dysco uses the registry's NAME@latest profile (from `headfinder` or
`calibrate`). Accuracy intervals are 95% percentile bootstraps of the mean (seeded); each method is
compared with vanilla on the same examples by a paired bootstrap of the mean difference and an
exact two-sided sign test; on the exact path (not --fast) the report also says how much of each
answer's evidence DySCO selected (selection recall). Writes results.md, results.json (per-example
scores, responses and selection) and accuracy.png into --out. An interrupted run resumes: the same command again reads the batches already
in --out's progress.jsonl back instead of decoding them (--fresh discards them).
"""


def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return wrapped


def _task_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",")]
    _resolve_tasks(names)  # unknown names fail while parsing, before the model loads
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"must be an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a finite number > 0, got {text!r}")
    return value


def register_cli(subparsers: Any) -> None:
    """Add `dysco eval` to the umbrella command."""
    p = subparsers.add_parser(
        "eval",
        help="compare vanilla, AttnTS and DySCO on the same examples (accuracy with intervals, speed)",
        description="Run every decoding method on the same seeded examples of each task × context length; "
        "report accuracy with 95% bootstrap intervals, a paired test of each method vs vanilla, "
        "time to first token and decode tokens/s; write a markdown table, JSON and a plot.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="catalogue name, local folder or .gguf, or Hub id (default: smollm2-135m)")
    heads = p.add_mutually_exclusive_group()
    heads.add_argument("--profile", metavar="REF", help="registry profile for dysco (NAME@latest, NAME@3, a hash); default: MODEL@latest")
    heads.add_argument("--heads", type=_arg(parse_heads), metavar="L:H,…", help="head set for dysco with the published knobs, e.g. 14:2,17:5")
    p.add_argument("--intervention-warmup", metavar="auto|N", default=None,
                   help="DySCO's intervention warmup: auto = the chat template's generation-prompt length, published "
                   "default; an integer otherwise (prompt tokens before the last one that already get a DySCO step). "
                   "Default: the profile's (auto with --heads)")
    p.add_argument("--tasks", type=_arg(_task_list), default=["needle", "kv"],
                   help=f"comma-separated: {', '.join(TASK_NAMES)}, or an MRCR file / Hub id (default: needle,kv)")
    p.add_argument("--lengths", type=_arg(parse_lengths), default=[2048], help="context lengths, e.g. 2k,4k,8k or 4096 (k = 1024; default: 2k)")
    p.add_argument("--methods", type=_arg(lambda t: _parse_names(t, METHODS, "method")), default=list(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)} (default: all)")
    p.add_argument("--n", type=_arg(_positive_int), default=8, help="examples per task × length (default: 8; ≥ 50 for intervals that mean much)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and the bootstrap (default: 0)")
    p.add_argument("--max-new-tokens", type=_arg(_positive_int), default=None,
                   help=f"new-token cap per example (default: its answer's length + {ANSWER_MARGIN_TOKENS})")
    p.add_argument("--attnts-temperature", type=_arg(_positive_float), default=None,
                   help=f"AttnTS attention temperature (default: the profile's tuned one, else {DEFAULT_ATTNTS_TEMPERATURE})")
    p.add_argument("--batch-size", type=_arg(_positive_int), default=1, help="prompts decoded together (default: 1)")
    p.add_argument("--fast", action="store_true",
                   help="decode on the fast path (static KV buffers, fused biased attention, CUDA graphs on one GPU; "
                   "same greedy tokens as the exact path; worth it on a GPU)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 … (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where results.md, results.json, accuracy.png go (default: eval-<model>); finished batches are "
                   f"kept in DIR/{CHECKPOINT_NAME}, so the same command run again resumes where it stopped")
    p.add_argument("--fresh", action="store_true", help=f"discard DIR/{CHECKPOINT_NAME} and decode everything again")
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="log the run to this MLflow tracking store (e.g. sqlite:///mlflow.db)")
    p.add_argument("--registry", default=None, metavar="DIR", help="registry root (default: the user's registry)")
    p.add_argument("--force", action="store_true", help="use a profile even if its model fingerprint does not match (warns)")
    p.add_argument("--threads", type=_arg(_positive_int), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from decoder.cli_common import EXIT_RUNTIME, EXIT_USAGE, UsageError

    try:
        return _run_cli(args)
    except UsageError as err:
        print(f"dysco eval: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (EvalError, OSError, ConnectionError) as err:  # what the arguments name fails, or does not fit
        print(f"dysco eval: error: {err}", file=sys.stderr)
        return EXIT_RUNTIME


def _check_cli_arguments(args: argparse.Namespace) -> list[Task]:
    """Every check that needs no model, as a UsageError: a typo must not cost a model load."""
    from decoder.cli_common import UsageError, check_model_options
    from registry import InvalidReference, parse_ref

    try:
        tasks = _resolve_tasks(args.tasks)
        if args.intervention_warmup is not None:
            args.intervention_warmup = _intervention_warmup(args.intervention_warmup)
        if args.profile is not None:
            parse_ref(args.profile)
    except (EvalError, InvalidReference) as err:
        raise UsageError(str(err)) from None
    check_model_options(args.device, args.dtype)
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder for results.md, results.json and accuracy.png")
    return tasks


def _check_lengths_on_disk(spec: str, lengths: Sequence[int], name: str) -> None:
    """The lengths against the model's context from its config alone, when the checkpoint is on disk already."""
    from decoder.loading import checkpoint_on_disk, context_limit

    folder = checkpoint_on_disk(spec)
    if folder is None:
        return
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
    except Exception:  # remote code, a damaged file …: the model load reports it (or rebuilds the cache)
        return
    _check_lengths(lengths, context_limit(config), name)


def _run_cli(args: argparse.Namespace) -> int:
    from decoder.loading import model_name

    tasks = _check_cli_arguments(args)
    name = model_name(args.model)
    # What the arguments name is read before the model loads too: the profile, the tracking server.
    profile = profile_ref = None
    if "dysco" in args.methods and args.heads is None:
        profile_ref, profile = load_profile(name, args.profile, args.registry)
    if args.tracking_uri:
        from calibration.tracking import check_reachable

        check_reachable(args.tracking_uri, advice="start it (`mlflow server`) or fix --tracking-uri")
    _check_lengths_on_disk(args.model, args.lengths, name)

    import torch

    from decoder.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, progress=not args.quiet)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise EvalError(f"cannot load model {args.model!r}: {err}") from None
    dysco = None
    extra: dict[str, Any] = {"model_spec": args.model}
    if "dysco" in args.methods:
        dysco, info = resolve_dysco(model, name, profile=profile, profile_ref=profile_ref, heads=args.heads,
                                    force=args.force, intervention_warmup=args.intervention_warmup)
        extra["dysco_resolved"] = info
        if args.attnts_temperature is None and "attnts_temperature" in info:
            args.attnts_temperature = info["attnts_temperature"]
            extra["attnts_temperature_from_profile"] = True
    out = Path(args.out) if args.out else Path(f"eval-{name}")
    checkpoint = out / CHECKPOINT_NAME
    report = evaluate(
        model, tokenizer, tasks, args.lengths, args.methods, args.n, args.seed,
        dysco=dysco, attnts_temperature=args.attnts_temperature, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, model_name=name, progress=not args.quiet, extra_config=extra, fast=args.fast,
        checkpoint=checkpoint, fresh=args.fresh,
    )
    if report.config["resumed_batches"] and not args.quiet:
        print(f"resumed: {report.config['resumed_batches']} finished batches read back from {checkpoint}", file=sys.stderr)
    files = report.save(out)
    if args.tracking_uri:
        report.config["mlflow_run_id"] = log_to_mlflow(report, args.tracking_uri, files)
        files["json"].write_text(report.to_json() + "\n", encoding="utf-8")
    if args.json:
        print(report.to_json())
    else:
        print(report.markdown())
        print(f"wrote {', '.join(str(p) for p in files.values())} in {report.seconds:.0f} s")
    return 0
