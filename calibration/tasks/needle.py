"""Needle in a haystack: one sentence holding a random number, hidden in filler prose.

    task = NeedleTask()
    [ex] = task.generate(tokenizer, n=1, context_tokens=4096, seed=0, depth=0.5)
    ex.answer                      # e.g. '4830215'
    task.grade("It is 4830215.", ex)   # → 1.0

The filler has no digits, so the needle's number is the only number in the prompt; the grade is
1.0 when the first number in the response is that number (commas allowed), else 0.0.
"""

from __future__ import annotations

import re
from typing import Any

from .base import (
    Example,
    Messages,
    Task,
    check_fill,
    count_tokens,
    example_id,
    example_rng,
    fit_units,
    invented_names,
    sentences,
    synthetic_words,
)

_NUMBER = re.compile(r"\d+(?:,\d{3})*")


def first_number(text: str) -> str | None:
    """The first whole number written in `text`, commas removed; None when there is none."""
    match = _NUMBER.search(text)
    return match.group(0).replace(",", "") if match else None


class NeedleTask(Task):
    """A needle sentence with a random number at a chosen depth of filler; asks for the number."""

    name = "needle"
    description = "needle in a haystack: find the secret number hidden in filler text"

    def _generate(
        self,
        tokenizer: Any,
        n: int,
        context_tokens: int,
        seed: int,
        *,
        depth: float | None = None,
        digits: int = 7,
    ) -> list[Example]:
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1):
            raise ValueError(f"depth must be a fraction in [0, 1] (0 = start of the text) or None for random, got {depth!r}")
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 18:
            raise ValueError(f"digits must be an integer in [1, 18], got {digits!r}")
        return [self._one(tokenizer, context_tokens, seed, i, depth, digits) for i in range(n)]

    def _one(self, tokenizer: Any, context_tokens: int, seed: int, index: int, depth: float | None, digits: int) -> Example:
        rng = example_rng(self.name, seed, index)
        [owner] = invented_names(rng, 1)
        number = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        needle_depth = rng.random() if depth is None else float(depth)
        needle = f"The secret number of {owner} is {number}."
        question = f"What is the secret number of {owner}? Answer with the number only."

        filler: list[str] = []  # grows on demand, always drawn in the same order

        def build(k: int) -> Messages:
            while len(filler) < k:
                filler.append(sentences(synthetic_words(rng, rng.randint(8, 16)), min_len=20, max_len=20, rng=rng))
            at = round(needle_depth * k)
            haystack = " ".join(filler[:at] + [needle] + filler[at:k])
            content = (
                "Read the text below, then answer the question after it.\n\n"
                f"<text>\n{haystack}\n</text>\n\nQuestion: {question}"
            )
            return [{"role": "user", "content": content}]

        k, messages, tokens = fit_units(tokenizer, build, context_tokens, min_units=0, task=self.name)
        check_fill(tokens, context_tokens, task=self.name, unit="filler sentence")
        return Example(
            id=example_id(self.name, seed, context_tokens, index),
            messages=messages,
            answer=number,
            meta={
                "task": self.name,
                "depth": needle_depth,
                "needle": needle,
                "filler_sentences": k,
                "needle_index": round(needle_depth * k),
                "prompt_tokens": tokens,
                "answer_tokens": count_tokens(tokenizer, number),
                "context_tokens": context_tokens,
            },
        )

    def evidence(self, example: Example) -> list[str]:
        """The needle sentence."""
        needle = example.meta.get("needle")
        return [needle] if isinstance(needle, str) else []

    def grade(self, response: str, example: Example) -> float:
        """1.0 when the first number in `response` is the needle's number, else 0.0."""
        return 1.0 if first_number(response) == example.answer else 0.0
