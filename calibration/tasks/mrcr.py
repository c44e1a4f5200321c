"""MRCR (OpenAI's multi-round co-reference resolution): loader, synthetic generator, grader.

A record in the published format (openai/mrcr) has the fields

    prompt                    a JSON *string*: the list of chat messages sent to the model
    answer                    the reference reply: random_string_to_prepend + the k-th matching reply
    random_string_to_prepend  the hash the model must start its reply with
    n_needles                 how many identical asks the chat holds (2, 4 or 8 in the published set)
    desired_msg_index         index in the prompt's messages of the assistant reply asked for
    total_messages            number of messages in the prompt
    n_chars                   characters in the prompt's message contents

Usage:

    task = get_task("mrcr")                                   # synthetic records
    examples = task.generate(tokenizer, n=8, context_tokens=2048, seed=0, n_needles=4)
    task = get_task("data/2needle.parquet")                   # published records, same API
    examples = task.generate(tokenizer, n=8, context_tokens=8192, seed=0)
    grade_mrcr(response, answer, random_string_to_prepend)    # the official grader

`generate` on a file picks, by seed, records whose prompt fits in `context_tokens`; only the
synthetic generator also guarantees the lower 90% bound (a file has the sizes it has).
"""

from __future__ import annotations

import json
import numbers
import os
import random
import re
import string
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any, Sequence

from .base import (
    Example,
    Messages,
    Task,
    check_fill,
    check_messages,
    count_prompt_tokens,
    count_tokens,
    example_id,
    example_rng,
    fit_units,
    invented_word,
    synthetic_words,
)

FILE_SUFFIXES = (".parquet", ".json", ".jsonl")

# Field name -> expected Python type, in the published schema.
RECORD_FIELDS: dict[str, type] = {
    "prompt": str,
    "answer": str,
    "random_string_to_prepend": str,
    "n_needles": int,
    "desired_msg_index": int,
    "total_messages": int,
    "n_chars": int,
}

FORMATS = (
    "poem", "short story", "riddle", "essay", "letter", "blog post", "song", "limerick",
    "speech", "haiku", "diary entry", "news report", "play scene", "social media post",
)
_VERSE = {"poem", "song", "limerick", "haiku"}
_TOPIC_ADJECTIVES = (
    "singing", "floating", "midnight", "paper", "glass", "northern", "sleepy", "velvet",
    "wandering", "clockwork", "lantern-lit", "forgotten", "tiny", "giant", "silver", "marsh",
)
_ASKS = (
    "Write {a} {format} about {topic}.",
    "Please write {a} {format} about {topic}.",
    "Could you write {a} {format} about {topic}?",
    "I would like {a} {format} about {topic}.",
    "Compose {a} {format} about {topic}.",
)

# ----------------------------------------------------------------------------- grading


def grade_mrcr(response: str, answer: str, random_string_to_prepend: str) -> float:
    """The official MRCR grade: 0 without the hash prefix, else difflib's ratio on the rest."""
    if not response.startswith(random_string_to_prepend):
        return 0.0
    response = response.removeprefix(random_string_to_prepend)
    answer = answer.removeprefix(random_string_to_prepend)
    return float(SequenceMatcher(None, response, answer).ratio())


# ----------------------------------------------------------------------------- records


def _check_field(record: dict[str, Any], name: str, kind: type, where: str) -> Any:
    if record.get(name) is None:  # a parquet row lacking a field holds a null there
        raise ValueError(
            f"{where}: missing field {name!r}; an MRCR record needs {', '.join(RECORD_FIELDS)}"
        )
    value = record[name]
    if kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        value = int(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__} {value!r:.60}")
    return value


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def example_from_record(record: Any, *, id: str, where: str = "record") -> Example:
    """An `Example` from one published-format record; a missing or wrong field raises, naming it."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with the MRCR fields, got {type(record).__name__}")
    values = {}
    for name, kind in RECORD_FIELDS.items():
        if name == "prompt" and isinstance(record.get("prompt"), list):
            values[name] = record["prompt"]  # already decoded by an earlier tool: accept it as is
            continue
        values[name] = _check_field(record, name, kind, where)
    prompt = values["prompt"]
    if isinstance(prompt, str):
        try:
            prompt = json.loads(prompt)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: field 'prompt' must be a JSON string of chat messages ({err.msg})") from None
    messages = check_messages(prompt, where=f"{where}: field 'prompt'")
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: field 'prompt' must end with the user's final ask, ends with role {messages[-1]['role']!r}")
    if values["n_needles"] < 1:
        raise ValueError(f"{where}: field 'n_needles' must be positive, got {values['n_needles']}")
    meta = {"task": "mrcr"}
    meta.update({name: values[name] for name in RECORD_FIELDS if name not in ("prompt", "answer")})
    meta.update({k: _jsonable(v) for k, v in record.items() if k not in RECORD_FIELDS})
    return Example(id=id, messages=messages, answer=values["answer"], meta=meta)


def record_from_example(example: Example) -> dict[str, Any]:
    """The published-format record of an MRCR example (`prompt` as a JSON string)."""
    meta = example.meta
    record: dict[str, Any] = {
        "prompt": json.dumps(example.messages, ensure_ascii=False),
        "answer": example.answer,
    }
    for name in RECORD_FIELDS:
        if name not in record:
            if name not in meta:
                raise ValueError(f"example {example.id!r} is not an MRCR example: its meta lacks {name!r}")
            record[name] = meta[name]
    return record


def read_records(path: str | os.PathLike) -> list[Any]:
    """Raw records of a local .parquet, .json (a list of objects) or .jsonl file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"{path}: unsupported MRCR file type {suffix or '(none)'!r}; accepted: {', '.join(FILE_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"no MRCR file at {str(path)!r}")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise ValueError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of MRCR records, got a {type(data).__name__}")
        return data
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return records


def save_records(path: str | os.PathLike, records: list[dict[str, Any]]) -> Path:
    """Write published-format records to .parquet, .json or .jsonl (by suffix); returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"{path}: unsupported MRCR file type {suffix or '(none)'!r}; accepted: {', '.join(FILE_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), tmp)
    elif suffix == ".json":
        tmp.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    else:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)
    return path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` reads as a Hub dataset id ('owner/name') rather than a file path."""
    return bool(_HUB_ID.match(text)) and not text.lower().endswith(FILE_SUFFIXES)


def read_hub_records(dataset_id: str, split: str = "train") -> list[Any]:
    """Raw records of a Hub dataset through `datasets.load_dataset` (cached copies work offline)."""
    try:
        import datasets

        rows = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # network, auth, missing dataset: all end the same way for the user
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        raise ConnectionError(
            f"could not load MRCR dataset {dataset_id!r} (split {split!r}) from the Hugging Face Hub{offline}: "
            f"{type(err).__name__}: {str(err)[:300]}. No local file of that name exists either; download the "
            f"dataset's parquet files and pass a local path ({', '.join(FILE_SUFFIXES)})"
        ) from None
    return list(rows)


def load_records(source: str | os.PathLike, *, split: str = "train") -> list[Example]:
    """Validated MRCR examples from a local file or a Hub dataset id; errors name field and record."""
    key = os.fspath(source)
    if os.path.exists(key) or not looks_like_hub_id(key):
        records, label = read_records(key), key
    else:
        records, label = read_hub_records(key, split), key
    if not records:
        raise ValueError(f"{label}: holds no MRCR records")
    stem = Path(key).stem if os.path.exists(key) else key.replace("/", "-")
    return [
        example_from_record(record, id=f"mrcr-{stem}-{i}", where=f"{label}: record {i}")
        for i, record in enumerate(records)
    ]


# ----------------------------------------------------------------------------- synthetic records


def ordinal(k: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 23 -> '23rd'."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _random_hash(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(10))


class _Piece:
    """One requested piece of writing: its ask and a reply whose length is fitted in tokens."""

    def __init__(self, rng: random.Random, tokenizer: Any, fmt: str, topic: str, reply_tokens: tuple[int, int]):
        self.fmt, self.topic = fmt, topic
        self.ask = rng.choice(_ASKS).format(a=_article(fmt), format=fmt, topic=topic)
        budget = rng.randint(*reply_tokens)
        self.words = synthetic_words(rng, budget, extra=tuple(topic.split()))
        self.cuts = [rng.randint(4, 7) if fmt in _VERSE else rng.randint(6, 12) for _ in range(budget)]
        # The longest word prefix whose text fits the drawn token budget (at least one word).
        lo, hi = 1, len(self.words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(tokenizer, self.text(mid)) <= budget:
                lo = mid
            else:
                hi = mid - 1
        del self.words[lo:]

    def text(self, n_words: int | None = None) -> str:
        """The reply cut to its first `n_words` words: verse in lines, prose in sentences."""
        words = self.words[: len(self.words) if n_words is None else n_words]
        chunks, i = [], 0
        for cut in self.cuts:
            if i >= len(words):
                break
            chunk = words[i : i + cut]
            i += cut
            chunks.append(chunk[0].capitalize() + "".join(" " + w for w in chunk[1:]))
        if self.fmt in _VERSE:
            return "\n".join(chunks)
        return " ".join(chunk + "." for chunk in chunks)


def _reply_range(reply_tokens: Any) -> tuple[int, int]:
    if isinstance(reply_tokens, int) and not isinstance(reply_tokens, bool):
        reply_tokens = (reply_tokens, reply_tokens)
    if (
        not isinstance(reply_tokens, Sequence)
        or len(reply_tokens) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in reply_tokens)
        or not 1 <= reply_tokens[0] <= reply_tokens[1]
    ):
        raise ValueError(f"reply_tokens must be a token count or a (min, max) pair with 1 <= min <= max, got {reply_tokens!r}")
    return int(reply_tokens[0]), int(reply_tokens[1])


def synthetic_record(
    tokenizer: Any,
    context_tokens: int,
    rng: random.Random,
    *,
    n_needles: int = 2,
    reply_tokens: tuple[int, int] = (20, 60),
) -> dict[str, Any]:
    """One published-format MRCR record whose rendered prompt holds 90–100% of `context_tokens`.

    The chat asks for pieces of writing about invented topics; `n_needles` of the asks share one
    format and topic; some other asks share only the format or only the topic (near misses).
    """
    topics: list[str] = []
    while len(topics) < 8 + n_needles:
        topic = f"{rng.choice(_TOPIC_ADJECTIVES)} {invented_word(rng)}s"
        if topic not in topics:
            topics.append(topic)
    needle_fmt, needle_topic = rng.choice(FORMATS), topics[0]
    needles = [_Piece(rng, tokenizer, needle_fmt, needle_topic, reply_tokens) for _ in range(n_needles)]
    # Where the needles sit, as fractions of the chat, fixed before its length is known.
    needle_at = sorted(rng.random() for _ in range(n_needles))
    k = rng.randint(1, n_needles)
    secret = _random_hash(rng)
    final_ask = (
        f"Prepend {secret} to the {ordinal(k)} (1 indexed) {needle_fmt} about {needle_topic}. "
        "Do not include any other text in your response."
    )
    fillers: list[_Piece] = []

    def filler(i: int) -> _Piece:
        while len(fillers) <= i:
            roll = rng.random()
            if roll < 0.25:  # same format, another topic
                fmt, topic = needle_fmt, rng.choice(topics[1:])
            elif roll < 0.5:  # same topic, another format
                fmt, topic = rng.choice([f for f in FORMATS if f != needle_fmt]), needle_topic
            else:
                fmt, topic = rng.choice(FORMATS), rng.choice(topics[1:])
            fillers.append(_Piece(rng, tokenizer, fmt, topic, reply_tokens))
        return fillers[i]

    def turns(filler_words: int) -> tuple[list[tuple[str, str]], int]:
        # Fillers in stream order until `filler_words` reply words are spent (the last one cut
        # short), with the needles slotted in at their fractions; returns the turns and the
        # position of the k-th needle among them.
        body: list[tuple[str, str]] = []
        used, i = 0, 0
        while used < filler_words:
            piece = filler(i)
            take = min(len(piece.words), filler_words - used)
            body.append((piece.ask, piece.text(take)))
            used += take
            i += 1
        gaps = [min(int(f * (len(body) + 1)), len(body)) for f in needle_at]
        out: list[tuple[str, str]] = []
        wanted = -1
        for j in range(len(body) + 1):
            for n, gap in enumerate(gaps):
                if gap == j:
                    if n == k - 1:
                        wanted = len(out)
                    out.append((needles[n].ask, needles[n].text()))
            if j < len(body):
                out.append(body[j])
        return out, wanted

    def build(filler_words: int) -> Messages:
        chat, _ = turns(filler_words)
        messages: Messages = []
        for ask, reply in chat:
            messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": reply}]
        return messages + [{"role": "user", "content": final_ask}]

    words, messages, tokens = fit_units(tokenizer, build, context_tokens, min_units=0, task="mrcr")
    check_fill(tokens, context_tokens, task="mrcr", unit="reply word")
    _, wanted = turns(words)
    desired = 2 * wanted + 1  # each turn is (user, assistant); the reply is the second
    reply = messages[desired]["content"]
    return {
        "prompt": json.dumps(messages, ensure_ascii=False),
        "answer": secret + reply,
        "random_string_to_prepend": secret,
        "n_needles": n_needles,
        "desired_msg_index": desired,
        "total_messages": len(messages),
        "n_chars": sum(len(m["content"]) for m in messages),
    }


# ----------------------------------------------------------------------------- the task


class MRCRTask(Task):
    """MRCR examples: synthetic ones by default, or records from `source` (a file or Hub id)."""

    name = "mrcr"
    description = "multi-round co-reference: repeat the k-th of several identical asks, prefixed by a hash"

    def __init__(self, source: str | os.PathLike | None = None, *, split: str = "train"):
        self.source = None if source is None else os.fspath(source)
        self.records = None if source is None else load_records(self.source, split=split)

    def _generate(
        self,
        tokenizer: Any,
        n: int,
        context_tokens: int,
        seed: int,
        *,
        n_needles: int | None = None,
        reply_tokens: int | tuple[int, int] = (20, 60),
    ) -> list[Example]:
        if n_needles is not None and (isinstance(n_needles, bool) or not isinstance(n_needles, int) or not 1 <= n_needles <= 64):
            raise ValueError(f"n_needles must be an integer in [1, 64] (the published sets use 2, 4, 8), got {n_needles!r}")
        if self.records is not None:
            if reply_tokens != (20, 60):
                raise ValueError(f"reply_tokens applies to synthetic MRCR only; {self.source!r} holds fixed records")
            return self._pick(tokenizer, n, context_tokens, seed, n_needles)
        reply_range = _reply_range(reply_tokens)
        needles = 2 if n_needles is None else n_needles
        examples = []
        for i in range(n):
            record = synthetic_record(
                tokenizer, context_tokens, example_rng(self.name, seed, i), n_needles=needles, reply_tokens=reply_range
            )
            example = example_from_record(record, id=example_id(self.name, seed, context_tokens, i) + f"-n{needles}")
            examples.append(self._sized(tokenizer, example, context_tokens))
        return examples

    def _pick(self, tokenizer: Any, n: int, context_tokens: int, seed: int, n_needles: int | None) -> list[Example]:
        pool = [e for e in self.records if n_needles is None or e.meta["n_needles"] == n_needles]
        order = list(range(len(pool)))
        random.Random(f"mrcr-pick:{seed}").shuffle(order)
        picked: list[Example] = []
        for i in order:
            example = pool[i]
            # No tokenizer packs 20 characters a token: skip the hopeless without tokenizing.
            if example.meta["n_chars"] > 20 * context_tokens:
                continue
            if count_prompt_tokens(tokenizer, example.messages) <= context_tokens:
                picked.append(self._sized(tokenizer, example, context_tokens))
                if len(picked) == n:
                    return picked
        which = "" if n_needles is None else f" with n_needles={n_needles}"
        raise ValueError(
            f"only {len(picked)} of the {len(pool)} records{which} in {self.source!r} fit in "
            f"context_tokens={context_tokens}; {n} were asked for: raise the context or lower n"
        )

    @staticmethod
    def _sized(tokenizer: Any, example: Example, context_tokens: int) -> Example:
        meta = dict(example.meta)
        meta.update(
            prompt_tokens=count_prompt_tokens(tokenizer, example.messages),
            answer_tokens=count_tokens(tokenizer, example.answer),
            context_tokens=context_tokens,
        )
        return Example(id=example.id, messages=example.messages, answer=example.answer, meta=meta)

    def load(self, path: str | os.PathLike) -> list[Example]:
        """Published-format MRCR records from a .parquet/.json/.jsonl file or a Hub dataset id."""
        return load_records(path)

    def evidence(self, example: Example) -> list[str]:
        """The assistant reply the final question asks for (`desired_msg_index`)."""
        index = example.meta.get("desired_msg_index")
        if isinstance(index, int) and 0 <= index < len(example.messages):
            return [example.messages[index]["content"]]
        return []

    def grade(self, response: str, example: Example) -> float:
        """The official MRCR grade of `response` (see `grade_mrcr`)."""
        return grade_mrcr(response, example.answer, example.meta["random_string_to_prepend"])

    def __repr__(self) -> str:
        return f"MRCRTask(source={self.source!r})" if self.source else "MRCRTask()"
