"""Evaluation: does DySCO help on this model, and at what cost? (`dysco eval`; the study's statistics)

Every method (vanilla, AttnTS, DySCO) decodes the *same* examples — one seeded set per task ×
context length — greedily, so the comparison is paired. The report holds:

- accuracy (the task's own grade, mean over examples) per task × length × method, with a seeded
  95% percentile-bootstrap interval;
- a paired comparison of every method against vanilla on the same examples: the mean per-example
  difference with a seeded 95% paired-bootstrap interval, and the exact two-sided **sign test**
  p-value (pairs that tie are dropped; with 0/1 grades this is the exact McNemar test);
- speed per method × length: time to first token (prefill + warmup + first token, per batch) and
  decode tokens/s (tokens after the first one over the time after the first one);
- DySCO's **selection recall** per task × length (exact and fast path): how much of the prompt span
  that holds the answer (`Task.evidence`) DySCO up-weighted, the share of its selection lying there
  and the QR heads' importance on it, overall and split by outcome (right / wrong, win / loss
  against vanilla) — see `SelectionResult` and `report.SELECTION_HELP`.

Vanilla and DySCO continue from one shared prefill of each batch (DySCO only changes the steps from
its warmup on), so a three-method eval reads each long prompt twice, not three times; each method's
time to first token still includes that prefill, as if it had run alone.

Modules, in the order a run uses them: `inputs` (checks and DySCO's head set: validate), `run`
(`evaluate`: validate → build examples → decode → aggregate, with its `on_batch` and `prompt_ids`
hooks), `batches` (one batch of one method, decoded and graded), `checkpoint` (resuming),
`statistics` (bootstrap, sign test, paired comparison, result rows; also used by the calibration
study), `report` (`EvalReport`: markdown, JSON, plot, MLflow), `cli` (`dysco eval`, and the worker
processes of `dysco eval --devices`, each on one round-robin shard of the examples).

    from calibration.evaluation import evaluate
    report = evaluate(model, tokenizer, tasks=["needle", "kv"], lengths=["2k"],
                      methods=["vanilla", "dysco"], n=8, seed=0, dysco=profile_or_heads)
    print(report.markdown()); report.save("eval-out")   # results.md, results.json, accuracy.png
"""

from __future__ import annotations

from calibration.evaluation.batches import ANSWER_MARGIN_TOKENS, BatchTiming, MethodRun, example_budget, prompt_ids
from calibration.evaluation.checkpoint import CHECKPOINT_NAME, Checkpoint, examples_key
from calibration.evaluation.inputs import (
    EvalError,
    format_length,
    load_profile,
    parse_heads,
    parse_length,
    parse_lengths,
    resolve_dysco,
)
from calibration.evaluation.report import EvalReport, log_to_mlflow
from calibration.evaluation.run import DEFAULT_ATTNTS_TEMPERATURE, BatchDone, EvalPlan, OnBatch, evaluate
from calibration.evaluation.statistics import (
    BASELINE,
    BOOTSTRAP_RESAMPLES,
    EVIDENCE_FIELDS,
    CellResult,
    PairedResult,
    SelectionResult,
    SpeedResult,
    bootstrap_interval,
    paired_comparison,
    selection_results,
    sign_test,
    summarize_selection,
)

__all__ = [
    "ANSWER_MARGIN_TOKENS",
    "BASELINE",
    "BOOTSTRAP_RESAMPLES",
    "CHECKPOINT_NAME",
    "DEFAULT_ATTNTS_TEMPERATURE",
    "EVIDENCE_FIELDS",
    "BatchDone",
    "BatchTiming",
    "CellResult",
    "Checkpoint",
    "EvalError",
    "EvalPlan",
    "EvalReport",
    "MethodRun",
    "OnBatch",
    "PairedResult",
    "SelectionResult",
    "SpeedResult",
    "bootstrap_interval",
    "evaluate",
    "example_budget",
    "examples_key",
    "format_length",
    "load_profile",
    "log_to_mlflow",
    "paired_comparison",
    "parse_heads",
    "parse_length",
    "parse_lengths",
    "prompt_ids",
    "resolve_dysco",
    "selection_results",
    "sign_test",
    "summarize_selection",
]
