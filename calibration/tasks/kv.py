"""Key–value retrieval over a JSON object of random UUID-like ids.

    task = KVTask()
    [ex] = task.generate(tokenizer, n=1, context_tokens=2048, seed=0)
    ex.meta["key"], ex.answer       # two ids; the prompt asks for the key's value
    task.grade(f' "{ex.answer}" ', ex)   # → 1.0

Grading is exact match after dropping whitespace, surrounding quotes/backticks and a final full
stop, case-insensitively (the ids are hex, so case carries no information).
"""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

from .base import Example, Messages, Task, check_fill, count_tokens, example_id, example_rng, fit_units


def random_id(rng: random.Random) -> str:
    """A UUID4-shaped id drawn from `rng` (never from the system's entropy)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def normalise_value(text: str) -> str:
    """The comparable form of a value: no whitespace, no wrapping quotes/backticks, no final '.'."""
    text = "".join(text.split())
    previous = None
    while text != previous:
        previous = text
        text = text.rstrip(".,;")
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
            text = text[1:-1]
    return text.lower()


class KVTask(Task):
    """A JSON object of random id pairs; the question asks for the value of one key."""

    name = "kv"
    description = "key-value retrieval: return the value of one key in a JSON object of random ids"

    def _generate(self, tokenizer: Any, n: int, context_tokens: int, seed: int, *, depth: float | None = None) -> list[Example]:
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1):
            raise ValueError(f"depth must be a fraction in [0, 1] (0 = first pair) or None for random, got {depth!r}")
        return [self._one(tokenizer, context_tokens, seed, i, depth) for i in range(n)]

    def _one(self, tokenizer: Any, context_tokens: int, seed: int, index: int, depth: float | None) -> Example:
        rng = example_rng(self.name, seed, index)
        key, value = random_id(rng), random_id(rng)
        key_depth = rng.random() if depth is None else float(depth)
        distractors: list[tuple[str, str]] = []
        seen = {key, value}

        def build(k: int) -> Messages:
            # k pairs in all: k - 1 distractors and the asked pair at the chosen depth.
            while len(distractors) < k - 1:
                pair = (random_id(rng), random_id(rng))
                if not seen.intersection(pair):
                    seen.update(pair)
                    distractors.append(pair)
            at = round(key_depth * (k - 1))
            pairs = distractors[:at] + [(key, value)] + distractors[at : k - 1]
            blob = json.dumps(dict(pairs), indent=0)
            content = (
                "Below is a JSON object whose keys and values are random ids.\n\n"
                f"{blob}\n\n"
                f'What is the value of the key "{key}"? Answer with the value only.'
            )
            return [{"role": "user", "content": content}]

        k, messages, tokens = fit_units(tokenizer, build, context_tokens, min_units=1, task=self.name)
        check_fill(tokens, context_tokens, task=self.name, unit="key-value pair")
        return Example(
            id=example_id(self.name, seed, context_tokens, index),
            messages=messages,
            answer=value,
            meta={
                "task": self.name,
                "key": key,
                "depth": key_depth,
                "n_pairs": k,
                "key_index": round(key_depth * (k - 1)),
                "prompt_tokens": tokens,
                "answer_tokens": count_tokens(tokenizer, value),
                "context_tokens": context_tokens,
            },
        )

    def evidence(self, example: Example) -> list[str]:
        """The asked key's line of the JSON object: `"key": "value"`."""
        key = example.meta.get("key")
        return [f"{json.dumps(key)}: {json.dumps(example.answer)}"] if isinstance(key, str) else []

    def grade(self, response: str, example: Example) -> float:
        """1.0 when the response is the key's value (whitespace/quotes/case aside), else 0.0."""
        return 1.0 if normalise_value(response) == normalise_value(example.answer) else 0.0
