"""`evaluate`: every method on the same seeded examples of every task × context length, greedily.

It runs in four steps, each its own function: `validate` (every argument checked and DySCO's head
set resolved, before anything slow), `build_examples` (every example set made and checked against
the model's context, before any decoding), `decode` (batch by batch, every method in turn, vanilla
and DySCO from one shared prefill; resumable through a `Checkpoint`), `aggregate` (cells, paired
tests, speed, selection recall: an `EvalReport`).

Two hooks let a caller watch or feed a run without patching it: `on_batch` is called with a
`BatchDone` after every batch of every method (its scores, responses and timing; it may raise to
stop the run, the batches already finished stay in the checkpoint), and `prompt_ids` replaces how an
example becomes the model's input (`batches.prompt_ids`; a memo of it encodes each example once
across several evaluations of the same examples).

    from calibration.evaluation import evaluate
    report = evaluate(model, tokenizer, tasks=["needle", "kv"], lengths=["2k"],
                      methods=["vanilla", "dysco"], n=8, seed=0, dysco=profile_or_heads,
                      on_batch=lambda done: print(done.method, done.run.scores))
    print(report.markdown()); report.save("eval-out")   # results.md, results.json, accuracy.png
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.evaluation.batches import (
    ANSWER_MARGIN_TOKENS,
    MethodRun,
    PromptIds,
    example_budget,
    prompt_ids,
    run_batch,
    shared_prefill,
)
from calibration.evaluation.checkpoint import Checkpoint, run_fingerprint, shard_checkpoint
from calibration.evaluation.inputs import (
    EvalError,
    check_lengths,
    check_n,
    format_length,
    model_context,
    parse_lengths,
    parse_names,
    resolve_dysco,
    resolve_tasks,
    task_label,
)
from calibration.evaluation.report import EvalReport
from calibration.evaluation.statistics import (
    BASELINE,
    BOOTSTRAP_RESAMPLES,
    CellResult,
    PairedResult,
    SpeedResult,
    bootstrap_interval,
    paired_comparison,
    seed_for,
    selection_results,
)
from calibration.tasks import Example, Task
from decoder import METHODS
from registry import Profile
from registry.profile import library_versions

# Middle of the calibration study's AttnTS grid (0.7, 0.8, 0.9): used when neither the command line
# nor the DySCO profile (its `metrics.attnts_temperature`, the tuned one) says otherwise.
DEFAULT_ATTNTS_TEMPERATURE = 0.8


@dataclass(frozen=True)
class BatchDone:
    """What `evaluate`'s `on_batch` hook receives after each batch of one method."""

    task: str  # the task's label in the report
    length: int  # context length in tokens
    method: str
    start: int  # index of the batch's first example in its task × length
    examples: list[Example]
    budget: int  # new tokens the batch could run to (its largest example budget)
    run: MethodRun  # scores, responses, new tokens; one timing, the shared prefill included
    resumed: bool  # read back from the checkpoint, not decoded now


OnBatch = Callable[[BatchDone], None]
"""Called after every batch of every method; may raise to stop the evaluation."""


@dataclass
class EvalPlan:
    """An evaluation's arguments once `validate` has checked them."""

    tasks: list[Task]
    labels: list[str]  # each task's name in the report
    lengths: list[int]  # ascending
    methods: list[str]
    n: int
    seed: int
    batch_size: int
    max_new_tokens: int | None
    bootstrap_resamples: int
    name: str  # the model's name in the report
    limit: int | None  # the model's context in tokens (None: unknown)
    fast: bool
    dysco: Any  # DyscoConfig, or None without "dysco"
    dysco_info: dict[str, Any]  # where the DyscoConfig came from
    attnts_temperature: float | int
    temperature_source: str  # "given", "profile" or "default"


def validate(
    model: Any,
    tasks: str | Sequence[str | Task],
    lengths: str | Sequence[str | int],
    methods: str | Sequence[str],
    n: int,
    seed: int,
    *,
    dysco: Any,
    attnts_temperature: float | None,
    max_new_tokens: int | None,
    batch_size: int,
    model_name: str | None,
    bootstrap_resamples: int,
    fast: bool,
) -> EvalPlan:
    """Every argument of `evaluate` checked (EvalError naming what is accepted) and DySCO's config resolved."""
    from decoder.dysco import DyscoConfig

    task_objs = resolve_tasks(tasks)
    lengths = sorted(parse_lengths(lengths))
    methods = parse_names(methods, METHODS, "method")
    n = check_n(n)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EvalError(f"seed must be an integer, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvalError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise EvalError(f"max_new_tokens must be an integer >= 1 (or None for each answer's length + 24), got {max_new_tokens!r}")
    if isinstance(bootstrap_resamples, bool) or not isinstance(bootstrap_resamples, int) or bootstrap_resamples < 100:
        raise EvalError(f"bootstrap_resamples must be an integer >= 100, got {bootstrap_resamples!r}")
    name = model_name or getattr(model, "name_or_path", None) or type(model).__name__

    limit = model_context(model)
    check_lengths(lengths, limit, name)

    dysco_info: dict[str, Any] = {}
    if "dysco" in methods:
        if dysco is None:
            raise EvalError(
                "method 'dysco' needs a head set: pass dysco= a DyscoConfig, a list of (layer, head) pairs or a "
                "registry profile (see resolve_dysco), or leave 'dysco' out of the methods"
            )
        if isinstance(dysco, DyscoConfig):
            dysco_info = {"source": "config"}
        elif isinstance(dysco, Profile):
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
    return EvalPlan(
        tasks=task_objs, labels=[task_label(t) for t in task_objs], lengths=lengths, methods=methods, n=n, seed=seed,
        batch_size=batch_size, max_new_tokens=max_new_tokens, bootstrap_resamples=bootstrap_resamples, name=name,
        limit=limit, fast=fast, dysco=dysco if "dysco" in methods else None, dysco_info=dysco_info,
        attnts_temperature=attnts_temperature, temperature_source=temperature_source,
    )


def build_decoders(model: Any, tokenizer: Any, plan: EvalPlan) -> dict[str, Any]:
    """One decoder per method: `decoder.generation.Decoder`, or `decoder.fast.FastDecoder` with `plan.fast`."""
    from decoder.generation import Decoder

    if plan.fast:
        from decoder.fast import FastDecoder  # same constructor and greedy `generate` as Decoder

    make = FastDecoder if plan.fast else Decoder
    decoders = {}
    for method in plan.methods:
        try:
            if method == "dysco":
                decoders[method] = make(model, tokenizer, "dysco", dysco=plan.dysco)
            elif method == "attnts":
                decoders[method] = make(model, tokenizer, "attnts", temperature=float(plan.attnts_temperature))
            else:
                decoders[method] = make(model, tokenizer, "vanilla")
        except (ValueError, TypeError) as err:
            raise EvalError(f"cannot build the {method} decoder: {err}") from None
    return decoders


def build_examples(tokenizer: Any, plan: EvalPlan) -> dict[tuple[str, int], list[Example]]:
    """The seeded examples of every task × length, each checked to fit the model's context with its budget."""
    # Every example set is made (and checked against the context) before any decoding starts, so
    # bad input fails in seconds, not after an hour of decoding.
    limit, max_new_tokens = plan.limit, plan.max_new_tokens
    sets: dict[tuple[str, int], list[Example]] = {}
    for task, label in zip(plan.tasks, plan.labels):
        for length in plan.lengths:
            try:
                examples = task.generate(tokenizer, plan.n, length, plan.seed)
            except ValueError as err:
                raise EvalError(f"task {label!r} at length {format_length(length)}: {err}") from None
            if limit is not None:
                for example in examples:
                    need = example.meta.get("prompt_tokens", length) + example_budget(example, max_new_tokens)
                    if need > limit:
                        raise EvalError(
                            f"task {label!r} at length {format_length(length)}: a {example.meta.get('prompt_tokens')}-token "
                            f"prompt plus {example_budget(example, max_new_tokens)} new tokens exceeds {plan.name}'s context "
                            f"of {limit} tokens; use a shorter length or fewer new tokens"
                        )
            sets[(label, length)] = examples
    return sets


def decode(
    plan: EvalPlan,
    decoders: Mapping[str, Any],
    sets: Mapping[tuple[str, int], Sequence[Example]],
    *,
    saved: Checkpoint | None = None,
    progress: bool = False,
    on_batch: OnBatch | None = None,
    encode: PromptIds = prompt_ids,
) -> dict[tuple[str, int, str], MethodRun]:
    """Every method over every example set, batch by batch; the runs per (task label, length, method)."""
    methods, max_new_tokens = plan.methods, plan.max_new_tokens
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(sets) * len(methods) * math.ceil(plan.n / plan.batch_size)
        bar = tqdm(total=total, desc="eval", unit="batch", file=sys.stderr)

    # Batch by batch, every method in turn: vanilla and DySCO continue from one shared prefill of the
    # batch (`shared_prefill`), which is dropped before the next batch is read.
    runs: dict[tuple[str, int, str], MethodRun] = {}
    try:
        for (label, length), examples in sets.items():
            task = plan.tasks[plan.labels.index(label)]
            for method in methods:
                runs[(label, length, method)] = MethodRun(scores=[], responses=[], new_tokens=[], timings=[])
            for start in range(0, len(examples), plan.batch_size):
                batch = list(examples[start : start + plan.batch_size])
                stored = {m: saved.get(label, length, m, start, batch) if saved else None for m in methods}
                todo = {m: decoders[m] for m in methods if stored[m] is None}
                prefilled, prefill_seconds = shared_prefill(todo, batch, max_new_tokens, encode)
                for method in methods:
                    if bar is not None:
                        bar.set_postfix_str(f"{label} {format_length(length)} {method}")
                    run = stored[method]
                    if run is None:
                        shares = prefilled is not None and method != "attnts"
                        run = run_batch(
                            decoders[method], task, batch, max_new_tokens=max_new_tokens,
                            prefilled=prefilled if shares else None, prefill_seconds=prefill_seconds if shares else 0.0,
                            encode=encode,
                        )
                        if saved is not None:
                            saved.add(label, length, method, start, batch, run)
                    runs[(label, length, method)].extend(run)
                    if bar is not None:
                        bar.update(1)
                    if on_batch is not None:
                        on_batch(BatchDone(
                            task=label, length=length, method=method, start=start, examples=batch,
                            budget=max(example_budget(example, max_new_tokens) for example in batch), run=run,
                            resumed=stored[method] is not None,
                        ))
                del prefilled
    finally:
        if bar is not None:
            bar.close()
    return runs


def shard_sets(
    sets: Mapping[tuple[str, int], Sequence[Example]], shard: int, shards: int
) -> dict[tuple[str, int], list[Example]]:
    """Shard `shard` of `shards`, round robin: examples shard, shard + shards, … of every set.

    Round robin by example index keeps each shard's batches the same from one run to the next (so a
    shard's progress file resumes) and spreads long and short examples evenly over the workers.
    """
    return {key: list(examples[shard::shards]) for key, examples in sets.items()}


def merge_shards(
    parts: Sequence[Mapping[tuple[str, int, str], MethodRun]], sets: Mapping[tuple[str, int], Sequence[Example]]
) -> dict[tuple[str, int, str], MethodRun]:
    """The runs of every shard (in shard order) put back in each set's example order; batch timings pooled."""
    shards = len(parts)
    merged = {}
    for key in parts[0]:
        runs = [part[key] for part in parts]
        selections = [run.selection_per_example() for run in runs]
        # Example i of the set is example i // shards of shard i % shards (`shard_sets`).
        order = [(i % shards, i // shards) for i in range(len(sets[key[:2]]))]
        merged[key] = MethodRun(
            scores=[runs[k].scores[j] for k, j in order], responses=[runs[k].responses[j] for k, j in order],
            new_tokens=[runs[k].new_tokens[j] for k, j in order], timings=[t for run in runs for t in run.timings],
            selection=[selections[k][j] for k, j in order],
        )
    return merged


def aggregate(
    plan: EvalPlan,
    sets: Mapping[tuple[str, int], Sequence[Example]],
    runs: Mapping[tuple[str, int, str], MethodRun],
    config: dict[str, Any],
    started: float,
) -> EvalReport:
    """The report of finished runs: per-cell intervals, paired tests against vanilla, speed, selection recall.

    `started`: the `time.perf_counter()` the evaluation began at (the report's `seconds` run until now).
    """
    methods, seed, resamples = plan.methods, plan.seed, plan.bootstrap_resamples
    cells, paired, example_rows, selection = [], [], [], []
    for (label, length), examples in sets.items():
        for method in methods:
            scores = runs[(label, length, method)].scores
            low, high = bootstrap_interval(scores, seed_for(seed, "cell", label, length, method), resamples)
            cells.append(CellResult(label, length, method, len(scores), float(np.mean(scores)), low, high))
        if BASELINE in methods:
            base = runs[(label, length, BASELINE)].scores
            for method in methods:
                if method == BASELINE:
                    continue
                stats = paired_comparison(
                    runs[(label, length, method)].scores, base, seed_for(seed, "paired", label, length, method),
                    resamples,
                )
                paired.append(PairedResult(task=label, length=length, method=method, baseline=BASELINE, **stats))
        chosen = runs[(label, length, "dysco")].selection_per_example() if "dysco" in methods else None
        if chosen is not None:
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
                # not measured (batches resumed from an older progress file).
                "selection": {"dysco": chosen[i]} if chosen is not None else {},
            })

    speed = []
    for method in methods:
        for length in plan.lengths:
            timings = [t for label in plan.labels for t in runs[(label, length, method)].timings]
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
    return EvalReport(config, cells, paired, speed, example_rows, seconds=time.perf_counter() - started,
                      selection=selection)


def dysco_settings(config: Any, decoder: Any = None) -> dict[str, Any]:
    """DySCO's settings for the report; with its decoder, also the intervention warmup in tokens."""
    out = {
        "head_set": [list(p) for p in config.head_set], "strength": config.strength, "top_p": config.top_p,
        "top_k": config.top_k, "decay": config.decay, "context_warmup": config.context_warmup,
        "selection": config.selection, "lagged_probs": config.lagged_probs, "intervention_warmup": config.intervention_warmup,
    }
    if decoder is not None:
        out["intervention_warmup_tokens"] = decoder.intervention_warmup  # "auto" resolved against the tokenizer
    return out


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
    on_batch: OnBatch | None = None,
    prompt_ids: PromptIds = prompt_ids,
    shards: int = 1,
    shard: int | None = None,
    before_merge: Callable[[], None] | None = None,
    session: str | None = None,
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
    `on_batch`: called with a `BatchDone` after every batch of every method (read back or decoded);
    it may raise to stop the run. `prompt_ids`: (tokenizer, example) -> (ids, template mask), by
    default `batches.prompt_ids`; a memo of it saves re-encoding the same examples in another call.

    Sharding (`dysco eval --devices`: one process per device, meeting in their progress files):
    `shards` K > 1 splits every example set round robin (`shard_sets`), each shard with its own
    progress file (`checkpoint.shard_checkpoint`). With `shard=i` this call decodes shard i only and
    reports on its examples (a worker). Without it, this call decodes shard 0, calls `before_merge`
    (wait for the workers), reads the other shards' batches back from their files (decoding any a
    worker did not finish) and reports on every example, in order: the same report as K = 1.
    `session`: the id shared by the parent and its workers (their batches do not count as resumed).
    `on_batch`'s `start` is then the batch's index within its shard.
    """
    started = time.perf_counter()
    plan = validate(
        model, tasks, lengths, methods, n, seed, dysco=dysco, attnts_temperature=attnts_temperature,
        max_new_tokens=max_new_tokens, batch_size=batch_size, model_name=model_name,
        bootstrap_resamples=bootstrap_resamples, fast=fast,
    )
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= plan.n:
        raise EvalError(f"shards must be an integer from 1 to n={plan.n} (every shard needs an example), got {shards!r}")
    if shard is not None and (isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < shards):
        raise EvalError(f"shard must be an integer from 0 to shards - 1 = {shards - 1}, got {shard!r}")
    if shards > 1 and checkpoint is None:
        raise EvalError("a sharded evaluation needs a checkpoint: the shards' results meet in their progress files")
    decoders = build_decoders(model, tokenizer, plan)
    sets = build_examples(tokenizer, plan)
    settings = dysco_settings(plan.dysco, decoders["dysco"]) if "dysco" in plan.methods else None
    attnts = float(plan.attnts_temperature) if "attnts" in plan.methods else None
    fingerprint = None
    if checkpoint is not None:
        fingerprint = run_fingerprint(model, {
            "seed": plan.seed, "n": plan.n, "batch_size": plan.batch_size, "max_new_tokens": plan.max_new_tokens,
            "fast": plan.fast, "attnts_temperature": attnts, "dysco": settings,
        })

    def saved_for(index: int, empty: bool) -> Checkpoint:
        path = shard_checkpoint(checkpoint, index, shards) if shards > 1 else checkpoint
        return Checkpoint(path, fingerprint, fresh=empty, session=session)

    resumed = 0
    if shards == 1 or shard is not None:
        saved = saved_for(shard or 0, fresh) if checkpoint is not None else None
        if shard is not None:
            sets = shard_sets(sets, shard, shards)
        runs = decode(plan, decoders, sets, saved=saved, progress=progress, on_batch=on_batch, encode=prompt_ids)
        resumed = saved.resumed if saved is not None else 0
    else:
        own = saved_for(0, fresh)
        parts = [decode(plan, decoders, shard_sets(sets, 0, shards), saved=own, progress=progress, on_batch=on_batch,
                        encode=prompt_ids)]
        if before_merge is not None:
            before_merge()  # the workers' files are complete (or cut by a kill) only once they have exited
        resumed = own.resumed
        for index in range(1, shards):
            # Read back what the worker wrote; what it did not finish (it died) is decoded here.
            other = saved_for(index, fresh and before_merge is None)
            parts.append(decode(plan, decoders, shard_sets(sets, index, shards), saved=other, on_batch=on_batch,
                                encode=prompt_ids))
            resumed += other.resumed
        runs = merge_shards(parts, sets)
    config = {
        "model": plan.name,
        "tasks": plan.labels,
        "lengths": plan.lengths,
        "methods": plan.methods,
        "n": plan.n,
        "seed": plan.seed,
        "max_new_tokens": plan.max_new_tokens,
        "max_new_tokens_rule": "fixed" if plan.max_new_tokens is not None else f"answer tokens + {ANSWER_MARGIN_TOKENS}",
        "batch_size": plan.batch_size,
        "decoding": "greedy",
        "path": "fast" if plan.fast else "exact",
        "resumed_batches": resumed,
        "shards": shards,
        **({"shard": shard} if shard is not None else {}),
        "attnts_temperature": attnts,
        "attnts_temperature_source": plan.temperature_source if "attnts" in plan.methods else None,
        "dysco": settings,
        "dysco_source": plan.dysco_info or None,
        "bootstrap_resamples": plan.bootstrap_resamples,
        "paired_test": PairedResult.test,
        "library_versions": library_versions(),
        **dict(extra_config or {}),
    }
    return aggregate(plan, sets, runs, config, started)
