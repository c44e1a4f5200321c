"""Synthetic probes for head detection, sized in the model's own tokens.

Three kinds, all seeded and deterministic, all about invented things so no world knowledge helps:

- `QRProbe`: several short documents about invented people (or organisations), then a question
  answerable from one gold document (or, in the multi-hop variant, from two). Each probe carries the
  token ids of the prompt with the question and with the null query "N/A"; both share a prefix that
  holds every document, so the prefix is prefilled once.
- Key-value probes (`make_kv_probes`, also `QRProbe`s): a JSON object of random ids, each pair a
  document, and a question naming one key: the QR score on the shape of a retrieval task.
- `NeedleProbe`: a needle sentence inside filler text at a chosen depth, then a question whose answer
  is the needle repeated (Wu et al. 2024).

    probes = make_qr_probes(tokenizer, n=8, context_tokens=1024, seed=0)
    probes[0].doc_spans[probes[0].gold[0]]      # token span of the gold document   # → (211, 287)
    kv = make_kv_probes(tokenizer, n=8, context_tokens=3072, seed=0)   # kv[0].entity: the asked key
    needles = make_needle_probes(tokenizer, n=4, context_tokens=1024, seed=0)
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from typing import Sequence

from decoder.template import has_chat_template

NULL_QUERY = "N/A"

QR_INSTRUCTION = "Read the documents below and answer the question that follows them."
KV_INSTRUCTION = "Below is a JSON object whose keys and values are random ids."
NEEDLE_INSTRUCTION = "Read the text below. One sentence in it states a special magic number."

# Invented-name syllables: pronounceable, unlikely to name anything real.
_ONSETS = ["b", "br", "d", "dr", "f", "g", "gl", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "sk", "t", "th", "v", "z"]
_NUCLEI = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "th", "sk", "m", "x", "nd", "v"]

_PROFESSIONS = ["baker", "cartographer", "glassblower", "ferry pilot", "beekeeper", "clockmaker", "librarian",
                "stonemason", "weaver", "apothecary", "harbour master", "tanner", "violin maker", "surveyor",
                "bookbinder", "lamplighter", "cooper", "falconer", "chandler", "rope maker"]
_ANIMALS = ["cat", "parrot", "tortoise", "goat", "hedgehog", "ferret", "donkey", "owl", "rabbit", "lizard"]
_COLOURS = ["ochre", "teal", "crimson", "violet", "amber", "indigo", "olive", "scarlet", "silver", "jade"]
_HOBBIES = ["carving wooden spoons", "sailing small boats", "collecting beetles", "playing the flute",
            "growing pumpkins", "painting lighthouses", "racing pigeons", "knitting scarves", "fishing at dawn",
            "climbing old towers", "pressing flowers", "brewing nettle tea"]
_ORG_KINDS = ["foundry", "observatory", "shipyard", "orchard cooperative", "printing house", "guild hall",
              "seed bank", "rope works", "glass works", "salt mine"]
_SPECIALTIES = ["its copper bells", "its winter markets", "its blue glass", "its long ledgers", "its strong rope",
                "its night lanterns", "its careful maps", "its sweet cider", "its iron gates", "its quiet gardens"]

_QUESTIONS = {
    "town": ("In which town does {name} live?", "town"),
    "profession": ("What is the profession of {name}?", "profession"),
    "pet": ("What is the name of the {animal} that {name} keeps?", "pet_name"),
    "age": ("How old is {name}?", "age"),
    "colour": ("What is the favourite colour of {name}?", "colour"),
}

_FILLER_SUBJECTS = ["The old road", "A grey heron", "The market square", "The river", "A quiet wind", "The stone bridge",
                    "The baker's cart", "A row of poplars", "The harbour", "An empty field", "The village clock",
                    "A flock of sheep", "The morning fog", "The mill wheel", "A narrow lane"]
_FILLER_VERBS = ["runs past", "rests beside", "leans toward", "drifts over", "waits near", "turns around",
                 "stretches along", "hides behind", "looks across", "winds through"]
_FILLER_OBJECTS = ["the low hills", "the church yard", "the wooden fence", "the drying nets", "the chalk cliffs",
                   "the sleepy inn", "the barley rows", "the far shore", "the old well", "the painted doors"]
_FILLER_TAILS = ["as it has for many years", "while the light fades", "in the cool of the evening",
                 "without a sound", "long before noon", "after the rain", "on most days", "under a pale sky"]


@dataclass(frozen=True)
class QRProbe:
    """One query-focused multi-document probe, tokenised.

    `query_ids` and `null_ids` are the whole prompts; they agree on their first `prefix_len` tokens,
    which hold every document. `query_rows` / `null_rows` are the token spans of the question and of
    the null query inside each prompt; `doc_spans` are half-open token spans, all inside the prefix.
    """

    query_ids: list[int]
    null_ids: list[int]
    prefix_len: int
    query_rows: tuple[int, int]
    null_rows: tuple[int, int]
    doc_spans: list[tuple[int, int]]
    gold: list[int]
    question: str
    answer: str
    seed: int
    hops: int = 1
    entity: str = ""  # the invented person the question asks about

    @property
    def num_docs(self) -> int:
        """How many documents the probe holds."""
        return len(self.doc_spans)


@dataclass(frozen=True)
class NeedleProbe:
    """One needle-in-a-haystack copy probe, tokenised.

    The model reads `prompt_ids` and should reply with the needle sentence; `needle_span` is the
    half-open token span of the needle inside the prompt and `key` the string whose presence in the
    reply counts as a successful retrieval.
    """

    prompt_ids: list[int]
    needle_span: tuple[int, int]
    needle: str
    key: str
    depth: float
    seed: int
    max_new_tokens: int = field(default=32)

    @property
    def needle_len(self) -> int:
        """Number of needle tokens in the prompt."""
        return self.needle_span[1] - self.needle_span[0]


# ----------------------------------------------------------------------------------------------
# Invented worlds


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(syllables))


def _unique_names(rng: random.Random, count: int, syllables: Sequence[int], used: set[str]) -> list[str]:
    names = []
    while len(names) < count:
        word = _word(rng, rng.choice(list(syllables))).capitalize()
        if word not in used and len(word) >= 4:
            used.add(word)
            names.append(word)
    return names


def _person(rng: random.Random, used: set[str]) -> dict:
    first, last, town, pet = _unique_names(rng, 4, (2, 2, 3), used)
    return {
        "name": f"{first} {last}",
        "first": first,
        "town": town,
        "profession": rng.choice(_PROFESSIONS),
        "animal": rng.choice(_ANIMALS),
        "pet_name": pet,
        "age": str(rng.randint(19, 88)),
        "colour": rng.choice(_COLOURS),
        "hobby": rng.choice(_HOBBIES),
    }


def _person_text(p: dict, rng: random.Random, org: str | None = None) -> str:
    sentences = [
        f"{p['name']} is a {p['profession']} who lives in the town of {p['town']}.",
        f"{p['first']} is {p['age']} years old.",
        f"{p['name']} keeps a {p['animal']} called {p['pet_name']}.",
        f"On free days {p['first']} enjoys {p['hobby']}.",
        f"The favourite colour of {p['first']} is {p['colour']}.",
    ]
    if org is not None:
        sentences.append(f"{p['name']} works for the {org}.")
    head, rest = sentences[0], sentences[1:]
    rng.shuffle(rest)
    return " ".join([head, *rest])


def _org(rng: random.Random, used: set[str]) -> dict:
    word, town = _unique_names(rng, 2, (2, 3), used)
    kind = rng.choice(_ORG_KINDS)
    return {"name": f"{word} {kind.title()}", "kind": kind, "town": town, "year": str(rng.randint(1701, 1989)),
            "staff": str(rng.randint(7, 900)), "specialty": rng.choice(_SPECIALTIES)}


def _org_text(o: dict, rng: random.Random) -> str:
    rest = [
        f"It was founded in {o['year']} and employs {o['staff']} people.",
        f"The {o['name']} is known for {o['specialty']}.",
    ]
    rng.shuffle(rest)
    return " ".join([f"The {o['name']} is a {o['kind']} located in the town of {o['town']}.", *rest])


# ----------------------------------------------------------------------------------------------
# Rendering and token bookkeeping


def render_prompt(tokenizer, user_text: str, answer_prefix: str = "") -> str:
    """The text the model reads: the user turn through the chat template, or plain text without one."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = f"{user_text}\nAnswer:" + (" " if answer_prefix else "")
    return text + answer_prefix


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    # A rendered chat template already carries its special tokens as text; plain text gets the
    # tokenizer's own (a BOS, for instance).
    add_special = not has_chat_template(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is a slow tokenizer; probes need character offsets, which only "
            "fast (tokenizers-backed) tokenizers give. Load the model's fast tokenizer."
        )
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _token_span(offsets: list[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int]:
    """Half-open span of the (non-empty) tokens that overlap characters [char_start, char_end)."""
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < char_end and e > char_start]
    if not inside:
        raise ValueError(f"no token starts inside characters {char_start}..{char_end}")
    return inside[0], inside[-1] + 1


def _count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_request(n: int, context_tokens: int) -> None:
    # The smallest context that works depends on the tokenizer: each maker measures it (`_TooShort`).
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of probes must be a positive integer, got {n!r}")
    if not isinstance(context_tokens, int) or context_tokens < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context_tokens!r}")


# ----------------------------------------------------------------------------------------------
# Query-focused multi-document probes


def make_qr_probes(
    tokenizer,
    n: int,
    context_tokens: int,
    seed: int = 0,
    *,
    multi_hop_every: int = 4,
) -> list[QRProbe]:
    """`n` query-focused probes of at most `context_tokens` tokens each; every `multi_hop_every`-th is two-hop.

    Probe `i` depends only on (`seed`, `i`), so a probe set is a prefix of any larger one with the same
    seed, and two seeds give disjoint invented worlds.
    """
    _check_request(n, context_tokens)
    probes, needed = [], 0
    for i in range(n):
        rng = random.Random(f"qr-{seed}-{i}")
        two_hop = multi_hop_every > 0 and i % multi_hop_every == multi_hop_every - 1
        try:
            probes.append(_qr_probe(tokenizer, context_tokens, rng, seed, two_hop))
        except _TooShort as short:
            needed = max(needed, short.tokens)  # every probe is measured, so the minimum given works for all
    if needed:
        raise ValueError(
            f"context of {context_tokens} tokens is too short for these probes: with this tokenizer it cannot hold "
            f"even two documents of every probe; use at least {needed} tokens"
        )
    return probes


class _TooShort(Exception):
    """A QR probe that does not fit even with two documents; `tokens` is what it needs."""

    def __init__(self, tokens: int) -> None:
        super().__init__(tokens)
        self.tokens = tokens


def _qr_documents(rng: random.Random, two_hop: bool, count: int):
    """Documents (titles added later), question, answer, gold document indices and the asked person."""
    used: set[str] = set()
    if not two_hop:
        people = [_person(rng, used) for _ in range(count)]
        docs = [_person_text(p, rng) for p in people]
        gold = rng.randrange(count)
        kind = rng.choice(sorted(_QUESTIONS))
        template, answer_key = _QUESTIONS[kind]
        target = people[gold]
        return docs, template.format(**target), target[answer_key], [gold], target["name"]
    # Two hops: a person works for an organisation; the organisation's document says where it is.
    n_people = max(1, count // 2)
    n_orgs = max(1, count - n_people)
    orgs = [_org(rng, used) for _ in range(n_orgs)]
    people = [_person(rng, used) for _ in range(n_people)]
    employers = [rng.randrange(n_orgs) for _ in people]
    docs = [_person_text(p, rng, orgs[e]["name"]) for p, e in zip(people, employers)]
    docs += [_org_text(o, rng) for o in orgs]
    order = list(range(len(docs)))
    rng.shuffle(order)
    docs = [docs[j] for j in order]
    who = rng.randrange(n_people)
    gold = sorted([order.index(who), order.index(n_people + employers[who])])
    question = f"In which town is the organisation that {people[who]['name']} works for located?"
    return docs, question, orgs[employers[who]]["town"], gold, people[who]["name"]


def _qr_probe(tokenizer, context_tokens: int, rng: random.Random, seed: int, two_hop: bool) -> QRProbe:
    state = rng.getstate()
    # Size the document count from a measured average, then drop documents until the prompt fits.
    sample_docs, question, *_ = _qr_documents(random.Random(rng.random()), two_hop, 6)
    per_doc = sum(_count_tokens(tokenizer, d) + 6 for d in sample_docs) / len(sample_docs)
    overhead = _count_tokens(tokenizer, render_prompt(tokenizer, QR_INSTRUCTION + "\n\n" + question)) + 8
    # Start a little above the estimate (documents vary in length) and shrink until it fits.
    count = max(2, int(1.15 * (context_tokens - overhead) / per_doc) + 1)
    while True:
        rng.setstate(state)
        docs, question, answer, gold, entity = _qr_documents(rng, two_hop, count)
        probe = _assemble_qr(tokenizer, docs, question, answer, gold, seed, two_hop, entity)
        if len(probe.query_ids) <= context_tokens and len(probe.null_ids) <= context_tokens:
            return probe
        if count <= 2:
            raise _TooShort(max(len(probe.query_ids), len(probe.null_ids)))
        count -= 1


def _assemble_qr(tokenizer, docs, question, answer, gold, seed, two_hop, entity) -> QRProbe:
    titled = [f"Document {k + 1}: {d}" for k, d in enumerate(docs)]
    return _assemble(tokenizer, QR_INSTRUCTION + "\n\n", titled, "\n\n", "\n\nQuestion: ", question, answer, gold,
                     seed, 2 if two_hop else 1, entity)


def _assemble(tokenizer, intro: str, docs: list[str], separator: str, outro: str, question: str, answer: str,
              gold, seed: int, hops: int, entity: str) -> QRProbe:
    """A `QRProbe` whose prompt is `intro + separator.join(docs) + outro` then the question (or the null query)."""
    body = intro + separator.join(docs) + outro
    query_text = render_prompt(tokenizer, body + question)
    null_text = render_prompt(tokenizer, body + NULL_QUERY)
    query_ids, query_offsets = _encode(tokenizer, query_text)
    null_ids, null_offsets = _encode(tokenizer, null_text)

    body_at = query_text.index(body)
    doc_chars, cursor = [], body_at + len(intro)
    for d in docs:
        start = query_text.index(d, cursor)
        doc_chars.append((start, start + len(d)))
        cursor = start + len(d)
    doc_spans = [_token_span(query_offsets, s, e) for s, e in doc_chars]
    q_at = body_at + len(body)
    query_rows = _token_span(query_offsets, q_at, q_at + len(question))
    null_rows = _token_span(null_offsets, q_at, q_at + len(NULL_QUERY))

    prefix_len = 0
    for a, b in zip(query_ids, null_ids):
        if a != b:
            break
        prefix_len += 1
    # The shared prefix must hold every document and stop before either query starts.
    prefix_len = min(prefix_len, query_rows[0], null_rows[0])
    if doc_spans[-1][1] > prefix_len:
        raise ValueError("tokenizer merges the last document with the question; cannot share the prefix")
    return QRProbe(
        query_ids=query_ids, null_ids=null_ids, prefix_len=prefix_len, query_rows=query_rows,
        null_rows=null_rows, doc_spans=doc_spans, gold=list(gold), question=question, answer=answer,
        seed=seed, hops=hops, entity=entity,
    )


# ----------------------------------------------------------------------------------------------
# Key-value probes: the QR score on the shape of a retrieval task instead of prose


def _random_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_kv_probes(tokenizer, n: int, context_tokens: int, seed: int = 0) -> list[QRProbe]:
    """`n` key-value probes of at most `context_tokens` tokens: a JSON object of random ids, one key asked.

    Each key-value pair is a "document" (its line of the object, `"key": "value"`), the asked pair
    the gold one, and the question names the key, so the QR score measures which heads attend from
    the question to the pair it asks about — on text made of ids, where the prose of `make_qr_probes`
    may find other heads. Probe `i` depends only on (`seed`, `i`), as for `make_qr_probes`.
    """
    _check_request(n, context_tokens)
    probes, needed = [], 0
    for i in range(n):
        try:
            probes.append(_kv_probe(tokenizer, context_tokens, random.Random(f"kv-{seed}-{i}"), seed))
        except _TooShort as short:
            needed = max(needed, short.tokens)
    if needed:
        raise ValueError(
            f"context of {context_tokens} tokens is too short for these probes: with this tokenizer it cannot hold "
            f"two key-value pairs; use at least {needed} tokens"
        )
    return probes


def _kv_probe(tokenizer, context_tokens: int, rng: random.Random, seed: int) -> QRProbe:
    state = rng.getstate()

    def build(count: int) -> QRProbe:
        rng.setstate(state)
        pairs = [(_random_id(rng), _random_id(rng)) for _ in range(count)]
        gold = rng.randrange(count)
        key, value = pairs[gold]
        lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs]
        # The layout of json.dumps(..., indent=0), which the kv dev task shows the model.
        return _assemble(tokenizer, KV_INSTRUCTION + "\n\n{\n", lines, ",\n", "\n}\n\n",
                         f'What is the value of the key "{key}"? Answer with the value only.', value, [gold],
                         seed, 1, key)

    two = build(2)
    per_pair = max(1, (len(build(4).query_ids) - len(two.query_ids)) // 2)
    count = max(2, (context_tokens - len(two.query_ids)) // per_pair + 2)
    while True:
        probe = build(count)
        if len(probe.query_ids) <= context_tokens and len(probe.null_ids) <= context_tokens:
            return probe
        if count <= 2:
            raise _TooShort(max(len(probe.query_ids), len(probe.null_ids)))
        count = max(2, count - max(1, (len(probe.query_ids) - context_tokens) // per_pair))


# ----------------------------------------------------------------------------------------------
# Needle copy probes


def _filler_sentence(rng: random.Random) -> str:
    return (f"{rng.choice(_FILLER_SUBJECTS)} {rng.choice(_FILLER_VERBS)} {rng.choice(_FILLER_OBJECTS)} "
            f"{rng.choice(_FILLER_TAILS)}.")


def default_depths(n: int) -> list[float]:
    """Needle depths spread evenly over the haystack, one per probe, never at its very edges."""
    return [round(0.1 + 0.8 * (i + 0.5) / n, 4) for i in range(n)]


def make_needle_probes(
    tokenizer,
    n: int,
    context_tokens: int,
    seed: int = 0,
    *,
    depths: Sequence[float] | None = None,
    needle: str | None = None,
    key: str | None = None,
    question: str | None = None,
    filler: Sequence[str] | None = None,
    instruction: str = NEEDLE_INSTRUCTION,
    answer_prefix: str = "",
) -> list[NeedleProbe]:
    """`n` needle copy probes of at most `context_tokens` tokens, the needle at `depths` (fractions of the haystack).

    By default each probe invents its own needle ("The special magic number for <place> is <digits>.")
    and asks for it; `needle`/`key`/`question`/`filler` replace the invented parts (the same needle in
    every probe), for controlled experiments.
    """
    _check_request(n, context_tokens)
    depths = list(depths) if depths is not None else default_depths(n)
    if len(depths) != n:
        raise ValueError(f"got {len(depths)} depths for {n} probes; give one depth per probe")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"needle depths must lie in [0, 1], got {depths}")
    if (needle is None) != (key is None) or (needle is None) != (question is None):
        raise ValueError("give needle, key and question together (or none of them)")
    if needle is not None and key not in needle:
        raise ValueError(f"the key {key!r} must occur in the needle {needle!r}")
    probes, needed = [], 0
    for i, depth in enumerate(depths):
        rng = random.Random(f"needle-{seed}-{i}")
        if needle is None:
            place = _unique_names(rng, 1, (2, 3), set())[0]
            code = str(rng.randint(1_000_000, 9_999_999))
            this_needle = f"The special magic number for {place} is {code}."
            this_key, this_question = code, f"What is the special magic number for {place}?"
        else:
            this_needle, this_key, this_question = needle, key, question
        try:
            probes.append(_needle_probe(tokenizer, context_tokens, rng, seed, depth, this_needle, this_key,
                                        this_question, filler, instruction, answer_prefix))
        except _TooShort as short:
            needed = max(needed, short.tokens)  # every probe is measured, so the minimum given works for all
    if needed:
        raise ValueError(
            f"context of {context_tokens} tokens is too short for these probes: with this tokenizer it leaves no "
            f"room for filler around the needle; use at least {needed} tokens"
        )
    return probes


def _needle_probe(tokenizer, context_tokens, rng, seed, depth, needle, key, question, filler, instruction,
                  answer_prefix) -> NeedleProbe:
    ask = f"{question} Answer by repeating the sentence that states it."
    skeleton = render_prompt(tokenizer, f"{instruction}\n\n{needle}\n\n{ask}", answer_prefix)
    budget = context_tokens - _count_tokens(tokenizer, skeleton) - 4
    if budget < 8:
        raise _TooShort(context_tokens - budget + 8)
    pool = list(filler) if filler is not None else None
    sentences, used = [], 0
    while True:
        s = rng.choice(pool) if pool is not None else _filler_sentence(rng)
        cost = _count_tokens(tokenizer, " " + s)
        if used + cost > budget:
            break
        sentences.append(s)
        used += cost
    while True:
        cut = round(depth * len(sentences))
        haystack = " ".join([*sentences[:cut], needle, *sentences[cut:]])
        text = render_prompt(tokenizer, f"{instruction}\n\n{haystack}\n\n{ask}", answer_prefix)
        ids, offsets = _encode(tokenizer, text)
        if len(ids) <= context_tokens or not sentences:
            break
        sentences.pop()
    if len(ids) > context_tokens:
        raise ValueError(f"the needle prompt needs {len(ids)} tokens, more than the context of {context_tokens}")
    at = text.index(needle, text.index(instruction) + len(instruction))
    span = _token_span(offsets, at, at + len(needle))
    return NeedleProbe(prompt_ids=ids, needle_span=span, needle=needle, key=key, depth=depth, seed=seed,
                       max_new_tokens=span[1] - span[0] + 8)
