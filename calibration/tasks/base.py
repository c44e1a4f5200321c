"""What every dev task shares: the `Example` record, the `Task` base, prompt sizing and splitting.

A task makes examples sized in the model's own tokens and grades the model's answers:

    from calibration.tasks import get_task, split, encode_prompt
    task = get_task("kv")
    examples = task.generate(tokenizer, n=10, context_tokens=2048, seed=0)
    dev, test = split(examples, seed=0, test_fraction=0.3)
    ids = encode_prompt(tokenizer, dev[0].messages)      # what the model reads
    task.grade(response_text, dev[0])                     # a float in [0, 1]

The prompt a model reads is always `render_prompt(tokenizer, messages)`: the tokenizer's chat
template when it has one, plain concatenation when it has none (Gemma 3 base). Sizing, the
decoder and `dysco eval` must all go through it, or the token counts here would not be the
token counts the model sees.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from decoder.template import has_chat_template

Messages = list[dict[str, str]]

# Sized prompts land in [LOWER_FILL * context_tokens, context_tokens].
LOWER_FILL = 0.9

_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One dev-task example: chat `messages` for the model, the reference `answer`, task `meta`."""

    id: str
    messages: Messages
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the line format of `save_examples`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "example") -> "Example":
        """The inverse of `to_dict`, checking every field; `where` names the record in errors."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        for name, kind in (("id", str), ("messages", list), ("answer", str)):
            if name not in data:
                raise ValueError(f"{where}: missing field {name!r} (an example needs id, messages, answer, meta)")
            if not isinstance(data[name], kind):
                raise ValueError(f"{where}: field {name!r} must be a {kind.__name__}, got {type(data[name]).__name__}")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
        return cls(id=data["id"], messages=check_messages(data["messages"], where=where), answer=data["answer"], meta=meta)


def check_messages(messages: Any, *, where: str = "messages") -> Messages:
    """Return `messages` if it is a non-empty list of {role, content} string dicts, else raise."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in _ROLES:
            raise ValueError(f"{where}: message {i} has role {message['role']!r}; accepted roles: {', '.join(_ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}: message {i} content must be a string, got {type(message['content']).__name__}")
    return messages


# --------------------------------------------------------------------------- prompts and sizes


def render_prompt(tokenizer: Any, messages: Messages) -> str:
    """The exact text the model reads for `messages`, ready for the assistant's reply.

    With a chat template: the template with the generation prompt appended. Without one: the
    message contents joined by blank lines, ending in a newline, so a base model continues
    after the last message.
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(message["content"] for message in messages) + "\n"


def encode_prompt(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of `render_prompt(tokenizer, messages)`, as the model must receive them.

    A chat template already writes its special tokens (BOS included), so they are not added
    twice; plain text gets the tokenizer's usual special tokens.
    """
    text = render_prompt(tokenizer, messages)
    return list(tokenizer.encode(text, add_special_tokens=not has_chat_template(tokenizer)))


def count_prompt_tokens(tokenizer: Any, messages: Messages) -> int:
    """Length in tokens of the prompt the model reads for `messages`."""
    return len(encode_prompt(tokenizer, messages))


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens in a bare piece of text (no special tokens), e.g. an answer."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def fit_units(
    tokenizer: Any,
    build: Callable[[int], Messages],
    context_tokens: int,
    *,
    min_units: int,
    task: str,
) -> tuple[int, Messages, int]:
    """Largest unit count k >= min_units whose prompt `build(k)` fits in `context_tokens`.

    A unit is whatever a task repeats to fill the context (a filler sentence, a chat turn, a
    city line, a key–value pair); the prompt must grow with k. Returns (k, messages, tokens).
    Raises when even `min_units` units do not fit.
    """
    def size(k: int) -> int:
        return count_prompt_tokens(tokenizer, build(k))

    smallest = size(min_units)
    if smallest > context_tokens:
        raise ValueError(
            f"context_tokens={context_tokens} is too small for task {task!r}: its shortest prompt "
            f"is already {smallest} tokens with this tokenizer; ask for at least {math.ceil(smallest / LOWER_FILL)}"
        )
    lo, size_lo = min_units, smallest
    hi = max(2 * min_units, min_units + 8)
    while (size_hi := size(hi)) <= context_tokens:
        lo, size_lo, hi = hi, size_hi, 2 * hi
        if hi > 50_000_000:
            raise RuntimeError(f"task {task!r}: the prompt does not grow with its unit count (a bug)")
    # Invariant: size(lo) <= context_tokens < size(hi). Prompt size is close to linear in k, so
    # interpolation lands next to the answer; every other step bisects, which bounds the worst case.
    step = 0
    while hi - lo > 1:
        if step % 2 == 0:
            guess = lo + int((context_tokens - size_lo) * (hi - lo) / max(size_hi - size_lo, 1))
        else:
            guess = (lo + hi) // 2
        guess = min(max(guess, lo + 1), hi - 1)
        if (size_guess := size(guess)) <= context_tokens:
            lo, size_lo = guess, size_guess
        else:
            hi, size_hi = guess, size_guess
        step += 1
    messages = build(lo)
    return lo, messages, count_prompt_tokens(tokenizer, messages)


def check_fill(tokens: int, context_tokens: int, *, task: str, unit: str) -> None:
    """Raise when a sized prompt falls short of the ±10% contract (the units are too coarse)."""
    if tokens > context_tokens:
        raise AssertionError(f"task {task!r} built a {tokens}-token prompt for a {context_tokens}-token budget (a bug)")
    if tokens < LOWER_FILL * context_tokens:
        raise ValueError(
            f"task {task!r} cannot fill context_tokens={context_tokens} to within 10%: one more {unit} "
            f"would overflow it and the prompt stops at {tokens} tokens; ask for a larger context"
        )


def example_rng(task: str, seed: int, index: int) -> random.Random:
    """The RNG of example `index`: example i is the same whatever n is asked for."""
    return random.Random(f"{task}:{seed}:{index}")


def example_id(task: str, seed: int, context_tokens: int, index: int) -> str:
    """A readable id that differs across task, seed, size and index."""
    return f"{task}-s{seed}-c{context_tokens}-{index}"


# --------------------------------------------------------------------------- synthetic text

# A plain vocabulary for filler prose and synthetic replies: no digits (the needle task's
# number must be the only number in its haystack) and nothing the graders parse.
VOCABULARY = tuple(
    """
    river stone window garden morning evening silver quiet bright narrow ancient gentle lantern
    harbor meadow valley market bridge tower orchard forest cloud thunder winter summer autumn
    spring candle letter journey village mountain shore island voice shadow light water fire
    paper music dance story song road field wall door table chair kettle bread salt honey
    copper iron glass wool linen velvet amber ivory scarlet golden pale deep soft slow swift
    careful patient restless hidden open distant near small great old young wise strange
    familiar warm cold wet dry hollow heavy simple tender proud humble clever weary eager
    walks carries remembers finds gathers builds watches follows answers listens waits turns
    returns keeps opens closes shares writes reads counts sings hums wanders rests breathes
    and the a of in under over beside through across toward among between after before while
    because although when where beneath along within without around behind beyond
    """.split()
)


def synthetic_words(rng: random.Random, n: int, *, extra: tuple[str, ...] = ()) -> list[str]:
    """`n` words drawn from VOCABULARY (and, now and then, from `extra`, e.g. a topic)."""
    words = []
    for _ in range(n):
        if extra and rng.random() < 0.08:
            words.append(rng.choice(extra))
        else:
            words.append(rng.choice(VOCABULARY))
    return words


def sentences(words: list[str], *, min_len: int = 6, max_len: int = 12, rng: random.Random) -> str:
    """Words cut into capitalised sentences ending in full stops."""
    out, i = [], 0
    while i < len(words):
        length = rng.randint(min_len, max_len)
        chunk = words[i : i + length]
        i += length
        out.append(chunk[0].capitalize() + (" " + " ".join(chunk[1:]) if len(chunk) > 1 else "") + ".")
    return " ".join(out)


_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gl", "h", "k", "l", "m", "n", "p", "qu", "r", "s", "st",
           "t", "th", "tr", "v", "w", "z", "sh", "ch", "fl", "pl")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "ie", "y")
_CODAS = ("", "", "n", "r", "l", "s", "m", "th", "nd", "rk", "x", "v")


def invented_word(rng: random.Random, syllables: int = 2) -> str:
    """A pronounceable made-up word (lower case), e.g. 'travelm'."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(syllables))


def invented_names(rng: random.Random, n: int, *, avoid: set[str] | None = None) -> list[str]:
    """`n` distinct capitalised invented names, none in `avoid` nor in VOCABULARY."""
    taken = set(avoid or ()) | set(VOCABULARY)
    names: list[str] = []
    while len(names) < n:
        name = invented_word(rng, rng.choice((2, 2, 3))).capitalize()
        if name.lower() not in taken and 4 <= len(name) <= 14:
            taken.add(name.lower())
            names.append(name)
    return names


# --------------------------------------------------------------------------- tasks


class Task:
    """A dev task: generates sized examples, loads saved ones, grades responses.

    Subclasses set `name`, implement `_generate(tokenizer, n, context_tokens, seed, **opts)`
    with keyword-only options, and `grade(response, example)`. `generate` checks the common
    arguments and the option names once, here.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def generate(self, tokenizer: Any, n: int, context_tokens: int, seed: int = 0, **opts: Any) -> list[Example]:
        """`n` examples whose rendered prompts hold between 90% and 100% of `context_tokens` tokens."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer number of examples, got {n!r}")
        if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 1:
            raise ValueError(f"context_tokens must be a positive integer, got {context_tokens!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        accepted = self.options()
        unknown = sorted(set(opts) - set(accepted))
        if unknown:
            listed = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
            raise ValueError(f"task {self.name!r} has no option {', '.join(unknown)}; its options (defaults): {listed}")
        return self._generate(tokenizer, n, context_tokens, seed, **opts)

    def options(self) -> dict[str, Any]:
        """The keyword options `generate` accepts, with their defaults."""
        params = inspect.signature(self._generate).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def _generate(self, tokenizer: Any, n: int, context_tokens: int, seed: int) -> list[Example]:
        raise NotImplementedError

    def load(self, path: str | os.PathLike) -> list[Example]:
        """Examples saved by `save_examples` (JSON Lines), checked field by field."""
        return load_examples(path)

    def grade(self, response: str, example: Example) -> float:
        """Score of `response` against `example`, in [0, 1]."""
        raise NotImplementedError

    def evidence(self, example: Example) -> list[str]:
        """The pieces of the prompt that hold the answer (each found verbatim in it); [] when unknown."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def save_examples(path: str | os.PathLike, examples: list[Example]) -> Path:
    """Write examples as JSON Lines (one `Example.to_dict()` a line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for example in examples:
            fh.write(json.dumps(example.to_dict(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def load_examples(path: str | os.PathLike) -> list[Example]:
    """Read a `save_examples` file; a bad line raises naming the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no examples file at {str(path)!r}")
    examples = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            examples.append(Example.from_dict(data, where=where))
    if not examples:
        raise ValueError(f"{path}: holds no examples")
    return examples


def split(examples: list[Example], seed: int, test_fraction: float) -> tuple[list[Example], list[Example]]:
    """Deterministic (dev, test) split by seed; each keeps the input order.

    Membership depends on the seed and the example ids only, not on the list order. The test
    part holds round(n * test_fraction) examples, at least one of each part when 0 < f < 1
    and n >= 2.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be a number in [0, 1), got {test_fraction!r}")
    ids = [example.id for example in examples]
    if len(set(ids)) != len(ids):
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"example ids must be unique to split them; repeated: {', '.join(duplicated[:5])}")
    n = len(examples)
    n_test = round(n * test_fraction)
    if 0 < test_fraction and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    test_ids = set(ranked[:n_test])
    dev = [e for e in examples if e.id not in test_ids]
    test = [e for e in examples if e.id in test_ids]
    return dev, test


def evidence_positions(tokenizer: Any, example: Example, evidence: list[str], ids: list[int]) -> list[int] | None:
    """Token positions of `ids` (the example's prompt, `encode_prompt`'s ids) that overlap the evidence.

    Each evidence string is searched in the rendered prompt (its first occurrence inside a message's
    content, after the chat template's preamble); a token counts when any of its characters lies in
    it. None when the evidence is unknown or not found, or when the tokenizer gives no offsets.
    """
    if not evidence:
        return None
    text = render_prompt(tokenizer, example.messages)
    try:
        encoding = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer), return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        return None
    if list(encoding["input_ids"]) != list(ids):
        return None
    spans = []
    for piece in evidence:
        at = text.find(piece)
        if not piece or at < 0:
            return None
        spans.append((at, at + len(piece)))
    positions = [
        i for i, (start, end) in enumerate(encoding["offset_mapping"])
        if end > start and any(start < b and end > a for a, b in spans)
    ]
    return positions or None
