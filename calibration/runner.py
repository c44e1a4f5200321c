"""Score one decoding method on a fixed list of examples, reusing each batch's prefill.

DySCO's knobs only act on the last `context_warmup + intervention_warmup` prompt tokens (the
columns it feeds one at a time, `decoder.dysco.feed_schedule`), so the plain prefill of everything
before them is the same in every trial: it is computed once per batch of examples and kept, and each
trial decodes from it. `warmup` is how many columns that prefill leaves out: at least the most any
trial feeds one at a time (`dysco_warmup` of each trial's config; a study takes the maximum over its
search space). On CPU the prefill is most of the cost of a long prompt, so this is what makes a
study affordable.

    >>> runner = ExampleRunner(model, tokenizer, task, dev_examples, max_new_tokens=48,
    ...                        warmup=max(dysco_warmup(c, tokenizer) for c in configs))
    >>> vanilla = runner.evaluate(Method.vanilla())
    >>> tuned = runner.evaluate(Method.dysco(config), on_batch=lambda done, mean: ...)
    >>> tuned.mean, tuned.tokens_per_s
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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


OnBatch = Callable[[int, float], None]
"""Called after each batch with (examples done, running mean score); may raise to stop."""


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
        self.batches = [
            self.examples[i : i + self.batch_size] for i in range(0, len(self.examples), self.batch_size)
        ]
        self._prefills: dict[int, Any] = {}
        self.prefill_seconds = 0.0

    def _prefill(self, index: int) -> Any:
        from decoder.generation import Decoder

        if index not in self._prefills:
            start = time.perf_counter()
            prompts = [example.messages for example in self.batches[index]]
            # A plain prefill up to the warmup: what DySCO (any knobs within `warmup`) and vanilla
            # both start from. A DySCO config needing more refuses it in generate_from.
            self._prefills[index] = Decoder(self.model, self.tokenizer, method="vanilla").prefill(
                prompts, warmup=self.warmup, max_new_tokens=self.max_new_tokens
            )
            self.prefill_seconds += time.perf_counter() - start
        return self._prefills[index]

    def _decode(self, index: int, method: Method) -> tuple[list[str], int]:
        from decoder.generation import Decoder

        if method.name == "attnts":
            # AttnTS changes the prefill too, so nothing cached applies: a full run.
            decoder = Decoder(self.model, self.tokenizer, method="attnts", temperature=method.temperature)
            prompts = [example.messages for example in self.batches[index]]
            out = decoder.generate(prompts, max_new_tokens=self.max_new_tokens)
        else:
            decoder = Decoder(self.model, self.tokenizer, method=method.name, dysco=method.dysco)
            out = decoder.generate_from(self._prefill(index), max_new_tokens=self.max_new_tokens)
        return list(out.texts), sum(len(ids) for ids in out.token_ids)

    def evaluate(self, method: Method, on_batch: OnBatch | None = None) -> Evaluation:
        """Decode every example with `method`, grade it, and report after each batch."""
        result = Evaluation(scores=[], responses=[], new_tokens=0, decode_seconds=0.0)
        for index, batch in enumerate(self.batches):
            if method.name != "attnts":
                self._prefill(index)  # kept out of the decode timing on purpose
            start = time.perf_counter()
            texts, new_tokens = self._decode(index, method)
            result.decode_seconds += time.perf_counter() - start
            result.new_tokens += new_tokens
            for example, text in zip(batch, texts, strict=True):
                result.responses.append(text)
                result.scores.append(float(self.task.grade(text, example)))
            if on_batch is not None:
                try:
                    on_batch(len(result.scores), result.mean)
                except BaseException:
                    result.complete = False
                    raise
        return result
