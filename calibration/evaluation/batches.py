"""Decoding one batch of examples with one method, and grading it.

`run_batch` decodes a batch greedily (exact path: from a shared prefill when given one; fast path:
`decoder.fast.FastDecoder`), keeps each row to its own token budget, grades every response with the
task, and, for DySCO (either path), measures how much of each example's evidence it selected.
`shared_prefill` reads a batch's prompts once for vanilla and DySCO both.

Examples are fed through `encode_prompt` (the token count the tasks sized them to) with the chat
template's positions marked, so DySCO never up-weights template tokens (`prompt_ids`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from calibration.evaluation.inputs import EvalError
from calibration.evaluation.statistics import summarize_selection
from calibration.tasks import Example, Task, encode_prompt, evidence_positions
from decoder.protocols import ResumableDecoder
from decoder.template import encode_chat, has_chat_template

# When --max-new-tokens is not given each example may generate its answer's length plus this much:
# room for a preamble such as "The secret number of Brexstintrir is" (12 SmolLM2 tokens, and
# digits are one token each) without paying for long rambles.
ANSWER_MARGIN_TOKENS = 24

PromptIds = Callable[[Any, Example], tuple[list[int], list[bool]]]
"""(tokenizer, example) -> (prompt ids, chat-template mask): how an example becomes the model's input."""


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
    (`summarize_selection`), None where they were not measured (other methods, batches read back from
    a progress file written before they existed, or before the fast path measured them).
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


def _evidence(tokenizer: Any, task: Task, example: Example, ids: Sequence[int]) -> list[int]:
    """The prompt positions (of `ids`, unpadded) holding `example`'s evidence; [] when unknown or not found."""
    return evidence_positions(tokenizer, example, task.evidence(example), list(ids)) or []


def prompt_ids(tokenizer: Any, example: Example) -> tuple[list[int], list[bool]]:
    """`encode_prompt`'s ids (what the task sized) and the chat-template mask aligned to them."""
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
    encode: PromptIds = prompt_ids,
) -> MethodRun:
    """Decode one batch greedily with `decoder` (a `decoder.generation.Decoder`) and grade it.

    `prefilled`: a `Decoder.prefill` state of this batch to continue from (vanilla and DySCO share
    one); its `prefill_seconds` are counted in this batch's time, so each method's time is what it
    would cost alone. Each row keeps only its own budget of tokens (`example_budget`), so a row's
    result does not depend on which batch it shared; a batch runs to its largest budget.
    `diagnostics`: for DySCO (exact or fast path), also measure the selection recall of each example's
    evidence (`MethodRun.selection`); the other methods have none (None per example).
    `encode`: how an example becomes prompt ids and template mask (`prompt_ids`, or a memo of it).
    """
    tokenizer = decoder.tokenizer
    budgets = [example_budget(example, max_new_tokens) for example in batch]
    first: list[float] = []

    def on_step(event) -> None:
        if event.step == 0 and not first:
            first.append(time.perf_counter())

    from decoder.fast import FastDecoder  # torch and the kernels: only once decoding starts

    exact = not isinstance(decoder, FastDecoder)  # the fast path is greedy and timed inside
    encoded = [encode(tokenizer, example) for example in batch] if not exact or prefilled is None else None
    measure: dict[str, Any] = {}
    evidence: list[list[int]] = []
    if diagnostics and getattr(decoder, "method", None) == "dysco":
        # Found before the clock starts: the tokenizer pass that maps the evidence is no decoding time.
        prompts = [ids for ids, _ in encoded] if encoded is not None else prefilled.prompt_ids
        evidence = [_evidence(tokenizer, task, example, ids) for example, ids in zip(batch, prompts)]
        measure = {"return_diagnostics": True, "evidence": evidence}
    began = time.perf_counter()
    if not exact:  # the fast path (decoder.fast.FastDecoder): greedy, timed inside
        out = decoder.generate([ids for ids, _ in encoded], template_mask=[mask for _, mask in encoded],
                               max_new_tokens=max(budgets), **measure)
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
    decoders: Mapping[str, Any], batch: Sequence[Example], max_new_tokens: int | None, encode: PromptIds = prompt_ids,
) -> tuple[Any, float]:
    """One plain prefill of `batch` that vanilla and DySCO both continue from, and its seconds.

    It stops before DySCO's warmup (its context plus intervention warmup: the only part of the prompt
    DySCO treats differently; each decoder's `warmup_columns` of the batch's width, the largest of those that
    continue from it), so the prompt, the costly part of a long-context example, is read once for
    both. None when fewer than two of the methods can share it (AttnTS changes the prefill itself).
    """
    sharing = [decoders[m] for m in ("vanilla", "dysco") if m in decoders]
    if len(sharing) < 2 or not all(isinstance(d, ResumableDecoder) for d in sharing):
        return None, 0.0  # the fast path (no `warmup_columns`) prefills inside its own generate
    plain = decoders["vanilla"]
    encoded = [encode(plain.tokenizer, example) for example in batch]
    budget = max(example_budget(example, max_new_tokens) for example in batch)
    width = max(len(ids) for ids, _ in encoded)
    began = time.perf_counter()
    state = plain.prefill(
        [ids for ids, _ in encoded], template_mask=[mask for _, mask in encoded],
        warmup=max(d.warmup_columns(width) for d in sharing), max_new_tokens=budget,
    )
    if state.input_ids.is_cuda:  # kernels run asynchronously: stop the clock when they are done
        import torch

        torch.cuda.synchronize(state.input_ids.device)
    return state, time.perf_counter() - began
