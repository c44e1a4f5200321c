"""Path traversal (LongProc's task, called PathTrans in the DySCO paper).

The prompt lists shuffled lines "A is a lively city. You can travel from A to B by bus." in
which every city has exactly one outgoing connection. Following them from X reaches Y after
`path_length` hops; distractor chains merge into that path, and the cities after Y lead back
to X. The model writes the route inside <Route>…</Route>, one "From A, take a T to B." a step.

    task = PathTransTask()
    [ex] = task.generate(tokenizer, n=1, context_tokens=4096, seed=0, path_length=5)
    task.grade(ex.answer, ex), grade_exact(ex.answer, ex)   # → (1.0, 1.0)

`grade` is partial accuracy (the share of gold steps matched as a prefix); `grade_exact` is 1.0
only for exactly the gold route.
"""

from __future__ import annotations

import random
import re
from typing import Any

from .base import Example, Messages, Task, VOCABULARY, check_fill, count_tokens, example_id, example_rng, fit_units, invented_word

MODES = ("bus", "train", "plane", "ferry")

_STEP = re.compile(r"From\s+([A-Za-z]+)\s*,\s*take\s+an?\s+([A-Za-z]+)\s+to\s+([A-Za-z]+)", re.IGNORECASE)

Step = tuple[str, str, str]  # (from_city, mode, to_city)


def city_line(city: str, target: str, mode: str) -> str:
    """The context line that gives `city` its one outgoing connection."""
    return f"{city} is a lively city. You can travel from {city} to {target} by {mode}."


def format_route(steps: list[Step]) -> str:
    """The reference answer: one 'From A, take a T to B.' line a step, inside <Route> tags."""
    lines = [f"From {a}, take a {mode} to {b}." for a, mode, b in steps]
    return "<Route>\n" + "\n".join(lines) + "\n</Route>"


def parse_route(text: str) -> list[Step]:
    """Steps written in `text`: inside the first <Route> block when there is one (an unclosed
    block runs to the end), else anywhere; city names keep their case, modes are lower-cased."""
    start = text.find("<Route>")
    if start >= 0:
        text = text[start + len("<Route>") :]
        end = text.find("</Route>")
        if end >= 0:
            text = text[:end]
    return [(a, mode.lower(), b) for a, mode, b in _STEP.findall(text)]


def partial_accuracy(predicted: list[Step], gold: list[Step]) -> float:
    """Share of gold steps reproduced in order from the start (the correct prefix)."""
    correct = 0
    for got, want in zip(predicted, gold):
        if got != want:
            break
        correct += 1
    return correct / len(gold) if gold else 0.0


def grade_exact(response: str, example: Example) -> float:
    """1.0 when the response's route is exactly the gold route (no step missing or extra)."""
    return 1.0 if parse_route(response) == parse_route(example.answer) else 0.0


def grade_partial(response: str, example: Example) -> float:
    """Partial accuracy of the response's route against the gold route."""
    return partial_accuracy(parse_route(response), parse_route(example.answer))


class _Cities:
    """Distinct invented city names, drawn from one RNG."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.taken = set(VOCABULARY) | set(MODES) | {"from", "take", "to", "route"}

    def new(self) -> str:
        while True:
            name = invented_word(self.rng, self.rng.choice((2, 2, 3))).capitalize()
            if name.lower() not in self.taken and 4 <= len(name) <= 14:
                self.taken.add(name.lower())
                return name


class PathTransTask(Task):
    """Route finding through shuffled one-way city connections with merging distractor chains."""

    name = "pathtrans"
    description = "path traversal: write the route from one invented city to another"

    def _generate(
        self, tokenizer: Any, n: int, context_tokens: int, seed: int, *, path_length: int = 5
    ) -> list[Example]:
        if isinstance(path_length, bool) or not isinstance(path_length, int) or path_length < 1:
            raise ValueError(f"path_length must be a positive integer number of hops, got {path_length!r}")
        return [self._one(tokenizer, context_tokens, seed, i, path_length) for i in range(n)]

    def _one(self, tokenizer: Any, context_tokens: int, seed: int, index: int, path_length: int) -> Example:
        rng = example_rng(self.name, seed, index)
        cities = _Cities(rng)
        path = [cities.new() for _ in range(path_length + 1)]
        tail = [cities.new() for _ in range(rng.randint(1, 3))]
        source, target = path[0], path[-1]
        # Every line carries a random sort key fixed when it is made, so adding distractors
        # slots new lines in without reordering the others.
        route: list[Step] = [(a, rng.choice(MODES), b) for a, b in zip(path, path[1:])]
        loop = path[-1:] + tail + path[:1]  # Y -> tail -> back to X: Y also has an outgoing edge
        edges: list[Step] = route + [(a, rng.choice(MODES), b) for a, b in zip(loop, loop[1:])]
        fixed = [(rng.random(), city_line(a, b, mode)) for a, mode, b in edges]
        reachable = list(path[1:]) + tail  # where a distractor chain may merge
        distractors: list[tuple[float, str]] = []

        def grow() -> None:
            # One chain d1 -> ... -> dm -> (a city already placed), emitted end first so any
            # prefix of the stream gives every named city its own outgoing line.
            m = rng.randint(1, 4)
            chain = [cities.new() for _ in range(m)]
            merge = rng.choice(path[1:]) if rng.random() < 0.6 else rng.choice(reachable)
            hops = list(zip(chain, chain[1:] + [merge]))
            for a, b in reversed(hops):
                distractors.append((rng.random(), city_line(a, b, rng.choice(MODES))))
            reachable.extend(chain)

        def build(k: int) -> Messages:
            while len(distractors) < k:
                grow()
            lines = [line for _, line in sorted(fixed + distractors[:k])]
            content = (
                "Each city below has exactly one outgoing connection.\n\n"
                + "\n".join(lines)
                + f"\n\nFind the route from {source} to {target}. Follow the connections one by one and "
                "write each step on its own line as \"From A, take a T to B.\" (T is bus, train, plane or "
                "ferry). Put all the steps between <Route> and </Route>."
            )
            return [{"role": "user", "content": content}]

        k, messages, tokens = fit_units(tokenizer, build, context_tokens, min_units=0, task=self.name)
        check_fill(tokens, context_tokens, task=self.name, unit="city line")
        answer = format_route(route)
        return Example(
            id=example_id(self.name, seed, context_tokens, index),
            messages=messages,
            answer=answer,
            meta={
                "task": self.name,
                "source": source,
                "target": target,
                "path_length": path_length,
                "route": [list(step) for step in route],
                "n_cities": len(edges) + k,
                "prompt_tokens": tokens,
                "answer_tokens": count_tokens(tokenizer, answer),
                "context_tokens": context_tokens,
            },
        )

    def evidence(self, example: Example) -> list[str]:
        """The context lines of the route's hops."""
        route = example.meta.get("route")
        if not isinstance(route, list):
            return []
        return [city_line(a, b, mode) for a, mode, b in route]

    def grade(self, response: str, example: Example) -> float:
        """Partial accuracy (correct-prefix share of the gold route); see `grade_exact` for exact."""
        return grade_partial(response, example)
