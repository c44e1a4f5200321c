"""Tiny random models of several architectures, with a locally built tokenizer.

They check mechanics (hooks, caches, batching, masks), never quality. Nothing is downloaded:
the tokenizer is a byte-level BPE trained in well under a second on a fixed corpus, with a
ChatML chat template, so chat-template detection and left padding work as on real models.

    >>> model, tokenizer = tiny_model("llama")
    >>> model.config.num_hidden_layers, model.config.num_attention_heads
    (4, 4)
"""

from __future__ import annotations

import functools

import torch

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3")

_CORPUS = """
The quick brown fox jumps over the lazy dog. A key is a value; the value of key 17 is 42.
Alice lives in Paris and works as a baker. Bob lives in Tokyo and works as a pilot.
You can travel from Avon to Brill by bus. Avon is a lively city. Question: Answer: Document
The needle is hidden in the haystack. What is the secret number? The secret number is 7319.
Write a poem about tapirs. Write a short story about ferries. Prepend the hash to the reply.
0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'"()[]{}<>/-_=+*&%$#@
"""

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 512) with ChatML template and left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        padding_side="left",
    )
    tok.chat_template = _CHATML
    return tok


def tiny_config(arch: str, *, vocab_size: int = 512, layers: int = 4, heads: int = 4, kv_heads: int = 2):
    """A transformers config of the given architecture at toy size (hidden 64, head_dim 16)."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tiny_tokenizer().pad_token_id,
        eos_token_id=tiny_tokenizer().eos_token_id,
        bos_token_id=None,
    )
    if arch == "gemma3_text":
        # Sliding window smaller than the test prompts, so the sliding layers really slide.
        common.update(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, layer_types=None)
        common["layer_types"] = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    elif arch == "qwen3":
        common.update(head_dim=16)
    elif arch == "mistral":
        common.update(sliding_window=None, head_dim=16)
    elif arch == "phi3":
        common.update(pad_token_id=tiny_tokenizer().pad_token_id)
    return AutoConfig.for_model(arch, **common)


def tiny_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """A randomly initialised tiny causal LM of `arch` and the shared tiny tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model, tiny_tokenizer()
