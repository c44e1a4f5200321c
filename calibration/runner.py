"""Score one decoding method on a fixed list of examples, reusing each batch's prefill.

DySCO's knobs only act on the last `context_warmup + intervention_warmup` prompt tokens (the
columns it feeds one at a time, `decoder.dysco.feed_schedule`), so the plain prefill of everything
before them is the same in every trial: it is computed once per batch of examples and kept, and each
trial decodes from it. `warmup` is how many columns that prefill leaves out: at least the most any
trial feeds one at a time (`dysco_warmup` of each trial's config; a study takes the maximum over its
search space). On CPU the prefill is most of the cost of a long prompt, so this is what makes a
study affordable. `fast=True` runs everything on the fast path (`decoder.fast.FastDecoder`: greedy,
static KV buffers, CUDA graphs on one GPU) with the same sharing: each batch's K/V prefix is kept
once and copied back into the buffers for every trial (`FastDecoder.prefill` / `generate_from`).

    runner = ExampleRunner(model, tokenizer, task, dev_examples, max_new_tokens=48,
                           warmup=max(dysco_warmup(c, tokenizer) for c in configs))
    vanilla = runner.evaluate(Method.vanilla())
    tuned = runner.evaluate(Method.dysco(config), on_batch=lambda scores: ...)
    tuned.mean, tuned.tokens_per_s
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from calibration.evaluation.statistics import EVIDENCE_FIELDS, summarize_selection
from calibration.tasks import Example, Task


def dysco_warmup(config: Any, tokenizer: Any) -> int:
    """Prompt columns a plain prefill must leave for DySCO `config` (a `decoder.dysco.DyscoConfig`) to
    continue from it: `context_warmup + intervention_warmup`, "auto" resolved against `tokenizer`.
    A prompt shorter than that is fed whole (`Decoder.prefill` and `feed_schedule` clamp alike)."""
    from decoder.template import resolve_intervention_warmup

    return config.context_warmup + resolve_intervention_warmup(config.intervention_warmup, tokenizer)


@dataclass(frozen=True)
class Method:
    """A decoding method and its settings: vanilla, AttnTS at a temperature, or DySCO."""

    name: str  # "vanilla" | "attnts" | "dysco"
    dysco: Any = None  # decoder.dysco.DyscoConfig for "dysco"
    temperature: float | None = None  # attention temperature for "attnts"

    @classmethod
    def vanilla(cls) -> Method:
        """Plain decoding."""
        return cls("vanilla")

    @classmethod
    def attnts(cls, temperature: float) -> Method:
        """Uniform attention temperature scaling (every head, prefill and decode)."""
        return cls("attnts", temperature=float(temperature))

    @classmethod
    def dysco(cls, config: Any) -> Method:
        """DySCO with a `decoder.dysco.DyscoConfig`."""
        return cls("dysco", dysco=config)


@dataclass
class Evaluation:
    """What one method scored on the examples, and how fast it decoded."""

    scores: list[float]
    responses: list[str]
    new_tokens: int
    decode_seconds: float
    complete: bool = True  # False when `on_batch` stopped it early (a pruned trial)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Mean score over the examples evaluated."""
        return sum(self.scores) / len(self.scores) if self.scores else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of decoding (prefill excluded: it is shared by all trials)."""
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def selection_summary(self) -> dict[str, float] | None:
        """Means over the examples whose evidence was located of their `summarize_selection` (None: none)."""
        rows = [row for row in self.extra.get("selection", []) if row and row["evidence_recall"] is not None]
        if not rows:
            return None
        fields = (*EVIDENCE_FIELDS, "selected")
        return {name: sum(row[name] for row in rows) / len(rows) for name in fields} | {"examples": len(rows)}


OnBatch = Callable[[list[float]], None]
"""Called after each batch with the scores of the examples done so far; may raise to stop."""


class ExampleRunner:
    """Runs methods over fixed examples in batches; caches each batch's warmup-free prefill."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        task: Task,
        examples: Sequence[Example],
        *,
        max_new_tokens: int,
        batch_size: int = 1,
        warmup: int,
        fast: bool = False,
    ) -> None:
        if not examples:
            raise ValueError("ExampleRunner needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup (prompt columns the shared prefill leaves out) must be an integer >= 0, got {warmup!r}")
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.examples = list(examples)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.warmup = warmup
        self.fast = bool(fast)
        self._fast_decoder: tuple[Method, Any] | None = None  # the fast path's decoder of the last method
        self.batches = [
            self.examples[i : i + self.batch_size] for i in range(0, len(self.examples), self.batch_size)
        ]
        self._prefills: dict[int, Any] = {}
        self._evidence: dict[int, list[list[int]] | None] = {}
        self.prefill_seconds = 0.0

    def _prefill(self, index: int, decoder: Any = None) -> Any:
        """Batch `index`'s shared prefill, made on first use (on the fast path by `decoder`, any non-AttnTS one)."""
        from decoder.generation import Decoder

        if index not in self._prefills:
            start = time.perf_counter()
            prompts = [example.messages for example in self.batches[index]]
            # A plain prefill up to the warmup: what DySCO (any knobs within `warmup`) and vanilla
            # both start from. A DySCO config needing more refuses it in generate_from.
            if self.fast:
                state = (decoder or self._fast(Method.vanilla())).prefill(
                    prompts, warmup=self.warmup, max_new_tokens=self.max_new_tokens)
                if state.input_ids.is_cuda:  # kernels run asynchronously: stop the clock when they are done
                    import torch

                    torch.cuda.synchronize(state.input_ids.device)
            else:
                state = Decoder(self.model, self.tokenizer, method="vanilla").prefill(
                    prompts, warmup=self.warmup, max_new_tokens=self.max_new_tokens
                )
            self._prefills[index] = state
            self.prefill_seconds += time.perf_counter() - start
        return self._prefills[index]

    def _fast(self, method: Method) -> Any:
        """The fast path's decoder for `method`, kept while the method stays (its buffers and graphs too)."""
        from decoder.fast import FastDecoder

        if self._fast_decoder is None or self._fast_decoder[0] != method:
            self._fast_decoder = None  # free the previous one's buffers before allocating the next
            decoder = FastDecoder(self.model, self.tokenizer, method=method.name, dysco=method.dysco,
                                  temperature=method.temperature or 1.0)
            self._fast_decoder = (method, decoder)
        return self._fast_decoder[1]

    def release(self) -> None:
        """Drop the cached prefills (their KV caches hold GPU memory; a later `evaluate` prefills again)."""
        self._prefills.clear()
        self._fast_decoder = None
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _evidence_of(self, index: int, state: Any) -> list[list[int]] | None:
        """Per example of batch `index`, the prompt positions of its evidence ([] unknown); None: none known."""
        from calibration.tasks import evidence_positions

        if index not in self._evidence:
            rows = []
            for example, ids in zip(self.batches[index], state.prompt_ids):
                rows.append(evidence_positions(self.tokenizer, example, self.task.evidence(example), list(ids)) or [])
            self._evidence[index] = rows if any(rows) else None
        return self._evidence[index]

    def _decode(self, index: int, method: Method) -> tuple[list[str], int, list[dict[str, float] | None]]:
        from decoder.generation import Decoder

        selection: list[dict[str, float] | None] = [None] * len(self.batches[index])
        if self.fast:  # greedy; DySCO's selection diagnostics as on the exact path below
            decoder = self._fast(method)
            if method.name == "attnts":  # AttnTS changes the prefill: a full run
                out = decoder.generate([example.messages for example in self.batches[index]],
                                       max_new_tokens=self.max_new_tokens)
                return list(out.texts), sum(len(ids) for ids in out.token_ids), selection
            state = self._prefill(index, decoder)
            evidence = self._evidence_of(index, state) if method.name == "dysco" else None
            out = decoder.generate_from(state, max_new_tokens=self.max_new_tokens,
                                        return_diagnostics=evidence is not None, evidence=evidence)
        elif method.name == "attnts":
            # AttnTS changes the prefill too, so nothing cached applies: a full run.
            decoder = Decoder(self.model, self.tokenizer, method="attnts", temperature=method.temperature)
            prompts = [example.messages for example in self.batches[index]]
            out = decoder.generate(prompts, max_new_tokens=self.max_new_tokens)
        else:
            decoder = Decoder(self.model, self.tokenizer, method=method.name, dysco=method.dysco)
            state = self._prefill(index)
            evidence = self._evidence_of(index, state) if method.name == "dysco" else None
            out = decoder.generate_from(
                state, max_new_tokens=self.max_new_tokens, return_diagnostics=evidence is not None, evidence=evidence
            )
        if out.diagnostics is not None:
            selection = [summarize_selection(steps, len(found)) for steps, found in zip(out.diagnostics, evidence)]
        return list(out.texts), sum(len(ids) for ids in out.token_ids), selection

    def evaluate(self, method: Method, on_batch: OnBatch | None = None) -> Evaluation:
        """Decode every example with `method`, grade it, and report after each batch."""
        result = Evaluation(scores=[], responses=[], new_tokens=0, decode_seconds=0.0)
        for index, batch in enumerate(self.batches):
            if method.name != "attnts":  # kept out of the decode timing on purpose
                self._prefill(index, self._fast(method) if self.fast else None)
            start = time.perf_counter()
            texts, new_tokens, selection = self._decode(index, method)
            result.decode_seconds += time.perf_counter() - start
            result.new_tokens += new_tokens
            result.extra.setdefault("selection", []).extend(selection)
            for example, text in zip(batch, texts, strict=True):
                result.responses.append(text)
                result.scores.append(float(self.task.grade(text, example)))
            if on_batch is not None:
                try:
                    on_batch(list(result.scores))
                except BaseException:
                    result.complete = False
                    raise
        return result
