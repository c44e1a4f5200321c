"""decoder.template: chat-template positions found from the tokenizer's own chat template."""

from __future__ import annotations

import copy

import pytest

from decoder.template import encode_chat
from decoder.tiny import tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a baker."},
    {"role": "user", "content": "  The key is 42. What is the key?  "},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "Again?"},
]

GEMMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
LLAMA3_LIKE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _with_template(template: str):
    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.chat_template = template
    if tokenizer.bos_token is None:
        tokenizer.bos_token = "<|endoftext|>"
    return tokenizer


def _split(tokenizer, ids, template):
    content = tokenizer.decode([i for i, t in zip(ids, template) if not t])
    skeleton = tokenizer.decode([i for i, t in zip(ids, template) if t])
    return content, skeleton


def test_chatml_marks_role_headers_and_markers_only():
    tokenizer = tiny_tokenizer()
    ids, template = encode_chat(tokenizer, CONVERSATION)
    expected = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    assert ids == list(expected) and len(template) == len(ids)
    content, skeleton = _split(tokenizer, ids, template)
    assert content == "You are a baker.  The key is 42. What is the key?  42Again?"
    assert skeleton == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
                        "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n")
    assert template[-1]  # the generation prompt is template


@pytest.mark.parametrize("template_text", [GEMMA_LIKE, LLAMA3_LIKE], ids=["gemma-like", "llama3-like"])
def test_other_templates_including_ones_that_trim_content(template_text):
    tokenizer = _with_template(template_text)
    ids, template = encode_chat(tokenizer, CONVERSATION)
    content, skeleton = _split(tokenizer, ids, template)
    assert content == "You are a baker.The key is 42. What is the key?42Again?"
    marker = "<start_of_turn>" if template_text is GEMMA_LIKE else "<|start_header_id|>"
    assert skeleton.count(marker) == 5  # four messages and the generation prompt
    assert "key" not in skeleton and "baker" not in skeleton


def test_without_generation_prompt_and_single_message():
    tokenizer = tiny_tokenizer()
    ids, template = encode_chat(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert tokenizer.decode([i for i, t in zip(ids, template) if not t]) == "Hi"
    assert tokenizer.decode(ids).endswith("<|im_end|>\n")


def test_bad_conversations_and_tokenizers_without_template():
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="conversation is empty"):
        encode_chat(tokenizer, [])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        encode_chat(tokenizer, [{"content": "x"}])
    with pytest.raises(ValueError, match="only text content"):
        encode_chat(tokenizer, [{"role": "user", "content": ["image"]}])
    bare = _with_template("")
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_chat(bare, [{"role": "user", "content": "x"}])


def test_strings_and_token_ids_have_no_template_positions_and_the_mask_can_be_overridden():
    from decoder.generation import Decoder
    from decoder.tiny import tiny_model

    model, tokenizer = tiny_model("llama")
    decoder = Decoder(model, tokenizer, method="vanilla")
    ids, masks = decoder.encode(["The key is 42.", [5, 6, 7]])
    assert not any(masks[0]) and masks[1] == [False] * 3
    ids, masks = decoder.encode([[5, 6, 7]], template_mask=[[True, False, False]])
    assert masks == [[True, False, False]]
    with pytest.raises(ValueError, match="template_mask row 0 has 2 entries for a prompt of 3 tokens"):
        decoder.encode([[5, 6, 7]], template_mask=[[True, False]])


@pytest.mark.embedded
def test_smollm2_template(smollm2):
    _, tokenizer = smollm2
    conversation = [{"role": "user", "content": "Where does Alice live?"}]
    ids, template = encode_chat(tokenizer, conversation)
    content, skeleton = _split(tokenizer, ids, template)
    assert "Where does Alice live?" in content
    assert "<|im_start|>" in skeleton and "<|im_end|>" in skeleton and "Alice" not in skeleton
