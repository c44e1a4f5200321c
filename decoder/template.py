"""Chat-template positions of a prompt, found from the tokenizer's own chat template.

DySCO never up-weights the tokens a chat template adds around the messages (role headers, begin and
end markers, the generation prompt). They are found without any per-model token list:

1. render the conversation once with every message's content replaced by a unique sentinel; the text
   between sentinels is the template's own text (its *skeleton*);
2. render the real conversation and find the skeleton pieces in it, in order; everything between
   them is message content;
3. tokenise the real rendering with character offsets; a token is a template token when its
   characters lie entirely in the skeleton (a token that touches content counts as content).

When the skeleton cannot be matched (a template that rewrites content), each message's content is
searched for directly instead. Tokenizers without a chat template have no template positions.

    ids, template = encode_chat(tokenizer, [{"role": "user", "content": "Hi"}])
    [tokenizer.decode(i) for i, t in zip(ids, template) if not t]   # → ['Hi']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from registry.profile import AUTO, parse_intervention_warmup

__all__ = ["encode_chat", "generation_prompt_length", "resolve_intervention_warmup", "template_mask"]

_SENTINEL = "\ue000dysco-content-{}\ue001"  # private-use characters: never in a real template


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer renders chat messages itself (base models such as Gemma 3 270M do not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_chat(
    tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, aligned to them, True where the chat template put the token."""
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template, so chat messages cannot be rendered; pass the prompt "
            "as a plain string or as token ids instead"
        )
    messages = _checked_messages(messages)
    text = _render(tokenizer, messages, add_generation_prompt)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    if not ids:
        raise ValueError("the rendered conversation has no tokens")
    spans = _content_spans(tokenizer, messages, text, add_generation_prompt)
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # [tokens, 2] char start, end
    content = np.asarray(spans, dtype=np.int64).reshape(-1, 2)  # [messages, 2]
    # One vectorised overlap test of every token against every content span (long prompts have
    # 100K+ tokens and few messages): a token touching any content character is content.
    touches = (offsets[:, :1] < content[None, :, 1]) & (offsets[:, 1:] > content[None, :, 0])  # [tokens, messages]
    # Zero-width tokens (some special tokens) sit at a boundary: treat them as template.
    template = ~touches.any(axis=1) | (offsets[:, 0] == offsets[:, 1])
    return ids, template.tolist()


def template_mask(tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> list[bool]:
    """Just the template mask of `encode_chat` (True = chat-template token)."""
    return encode_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)[1]


def _checked_messages(messages) -> list[dict]:
    if isinstance(messages, Mapping) or isinstance(messages, str) or not isinstance(messages, Sequence):
        raise ValueError("a conversation must be a list of {'role': ..., 'content': ...} messages")
    if not messages:
        raise ValueError("the conversation is empty; give at least one message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {message!r}")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i}: only text content is supported, got {type(message['content']).__name__}")
        checked.append(dict(message))
    return checked


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _content_spans(tokenizer, messages, text: str, add_generation_prompt: bool) -> list[tuple[int, int]]:
    """Character spans of message content in `text` (the real rendering)."""
    placeholders = [_SENTINEL.format(i) for i in range(len(messages))]
    skeleton_text = _render(
        tokenizer, [{**m, "content": p} for m, p in zip(messages, placeholders)], add_generation_prompt
    )
    spans = _spans_from_skeleton(skeleton_text, placeholders, text)
    if spans is None:
        spans = _spans_by_search(messages, text)
    return spans


def _spans_from_skeleton(skeleton_text: str, placeholders: list[str], text: str) -> list[tuple[int, int]] | None:
    pieces, rest = [], skeleton_text
    for placeholder in placeholders:
        before, found, after = rest.partition(placeholder)
        if not found:
            return None  # the template dropped or rewrote a message: fall back to searching content
        pieces.append(before)
        rest = after
    pieces.append(rest)
    if not text.startswith(pieces[0]) or not text.endswith(pieces[-1]):
        return None
    spans, cursor = [], len(pieces[0])
    end_of_contents = len(text) - len(pieces[-1])
    for piece in pieces[1:-1]:
        found = text.find(piece, cursor, end_of_contents) if piece else cursor
        if found < 0:
            return None
        spans.append((cursor, found))
        cursor = found + len(piece)
    spans.append((cursor, end_of_contents))
    return spans


def _spans_by_search(messages, text: str) -> list[tuple[int, int]]:
    spans, cursor = [], 0
    for message in messages:
        for candidate in (message["content"], message["content"].strip()):
            found = text.find(candidate, cursor) if candidate else -1
            if found >= 0:
                spans.append((found, found + len(candidate)))
                cursor = found + len(candidate)
                break
    return spans


def generation_prompt_length(tokenizer) -> int:
    """Tokens the chat template appends as its generation prompt (0 without a chat template).

    Measured as the published code does: a one-message conversation ("Hi") rendered with and without
    the generation prompt; the difference in token count.
    """
    if not has_chat_template(tokenizer):
        return 0
    hi = [{"role": "user", "content": "Hi"}]
    lengths = [
        len(tokenizer(_render(tokenizer, hi, add), add_special_tokens=False)["input_ids"]) for add in (True, False)
    ]
    return max(0, lengths[0] - lengths[1])


def resolve_intervention_warmup(value, tokenizer) -> int:
    """DySCO's `intervention_warmup` as a number of tokens: "auto" is `generation_prompt_length(tokenizer)`."""
    value = parse_intervention_warmup(value, "intervention_warmup")
    return generation_prompt_length(tokenizer) if value == AUTO else value
