"""The tiny random models every mechanics test builds on: each architecture runs forward and generate."""

from __future__ import annotations

import pytest
import torch

from decoder.loading import model_identity
from decoder.tiny import ARCHITECTURES, tiny_model, tiny_tokenizer


def test_every_architecture_is_covered():
    assert {"llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3"} <= set(ARCHITECTURES)


def test_forward_gives_logits_over_the_vocabulary(tiny):
    model, tokenizer = tiny
    batch = tokenizer(["The needle is hidden.", "Alice lives in Paris and works as a baker."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits  # [batch, seq, vocab]
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all(), model.arch


def test_left_padding_does_not_change_the_last_token_logits(tiny):
    model, tokenizer = tiny
    short, long = "The key is 17.", "Bob lives in Tokyo and works as a pilot. The key is 17."
    batch = tokenizer([short, long], return_tensors="pt", padding=True)
    alone = tokenizer([short], return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0  # padding went on the left
    with torch.no_grad():
        batched = model(**batch).logits[0, -1]
        single = model(**alone).logits[0, -1]
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4, msg=f"{model.arch}: padding leaked into attention")


def test_greedy_generate_is_deterministic_and_batched(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the secret number?"}], add_generation_prompt=True, tokenize=False
    )
    batch = tokenizer([prompt, "Write a poem about tapirs."], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        first = model.generate(**batch, **kwargs)
        second = model.generate(**batch, **kwargs)
    assert first.shape == (2, batch["input_ids"].shape[1] + 6)
    assert torch.equal(first, second), model.arch
    assert torch.equal(first[:, : batch["input_ids"].shape[1]], batch["input_ids"])  # prompt kept, tokens appended


def test_tiny_models_are_seeded():
    same = [model_identity(tiny_model("qwen3", seed=3)[0], "q") for _ in range(2)]
    assert same[0] == same[1]
    assert model_identity(tiny_model("qwen3", seed=4)[0], "q") != same[0]


def test_tokenizer_has_chat_template_and_left_padding():
    tokenizer = tiny_tokenizer()
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gemma_tiny_model_really_slides():
    model, _ = tiny_model("gemma3_text")
    assert "sliding_attention" in model.config.layer_types and "full_attention" in model.config.layer_types
    assert model.config.sliding_window == 8


def test_unknown_tiny_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown tiny architecture 'gpt9'"):
        tiny_model("gpt9")
