"""Planted heads: a hand-built model whose heads we know must be found first by each score.

The model is a 2-layer Llama with 4 heads per layer. Most heads get random query/key weights and a
zero output projection (they attend somewhere arbitrary but change nothing). The planted ones:

- layer 0 head 0, a previous-token head: constant query and key (attention biases) whose rotary
  phases peak at a distance of one position; it writes the previous token into the residual;
- layer 1 head 0, an induction (copy) head: its query is the current token, its keys are each
  position's previous token, so it attends just after an earlier occurrence of the current token
  and writes that token to the output — the model copies;
- layer 1 head 1, a token-matching head: attends from each token to earlier copies of itself, so
  from a question's entity names to the document about that entity.

Residual stream: [token | previous token | copied token], 256 dims each, tokens as random unit
vectors. Content lives in rotary pairs whose frequency is ~1e-4 (rope_theta 1e8), so rotation does
not disturb it over a few hundred positions; position lives in the fastest 16 pairs.
"""

from __future__ import annotations

import math

import pytest
import torch

from decoder.tiny import tiny_tokenizer
from headfinder.head_sets import top_k_heads
from headfinder.probes import make_kv_probes, make_needle_probes, make_qr_probes
from headfinder.scores import qr_scores, retrieval_scores

WIDTH = 256  # one residual block
HEAD_DIM = 512
CONTENT = torch.cat([torch.arange(128, 256), torch.arange(384, 512)])  # slow rotary pairs
POSITION_PAIRS = 16


def build_planted_model(*, copy_circuit: bool, token_match: bool, seed: int = 0):
    """The 2-layer hand-built Llama described in the module docstring, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=3 * WIDTH, intermediate_size=4, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=HEAD_DIM, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e8}, max_position_embeddings=4096,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randn(config.vocab_size, WIDTH, generator=gen)
    tokens /= tokens.norm(dim=1, keepdim=True)
    T, P, O = slice(0, WIDTH), slice(WIDTH, 2 * WIDTH), slice(2 * WIDTH, 3 * WIDTH)

    def head(h: int) -> slice:
        return slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, T] = tokens
        for norm in [model.model.norm] + [m for layer in model.model.layers
                                          for m in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.weight.fill_(1.0)
        for layer in model.model.layers:  # background heads: random attention, no output
            attn = layer.self_attn
            for h in range(4):
                attn.q_proj.weight[head(h)] = 0.05 * torch.randn(HEAD_DIM, 3 * WIDTH, generator=gen)
                attn.k_proj.weight[head(h)] = 0.05 * torch.randn(HEAD_DIM, 3 * WIDTH, generator=gen)
        rms0, rms1 = math.sqrt(3 * WIDTH), math.sqrt(3 * WIDTH / 2)  # RMSNorm gain at layer 0 / layer 1 inputs
        content_rows = lambda h: CONTENT + h * HEAD_DIM  # noqa: E731
        if copy_circuit:
            attn = model.model.layers[0].self_attn
            attn.q_proj.weight[head(0)] = 0
            attn.k_proj.weight[head(0)] = 0
            inv_freq = 1e8 ** (-torch.arange(POSITION_PAIRS, dtype=torch.float32) / (HEAD_DIM // 2))
            amplitude = 60.0
            attn.q_proj.bias[:POSITION_PAIRS] = amplitude
            # A key rotated back by one position's angle: q·k peaks where query − key = 1.
            attn.k_proj.bias[:POSITION_PAIRS] = amplitude * torch.cos(inv_freq)
            attn.k_proj.bias[HEAD_DIM // 2: HEAD_DIM // 2 + POSITION_PAIRS] = amplitude * torch.sin(inv_freq)
            attn.v_proj.weight[torch.arange(WIDTH), torch.arange(WIDTH)] = 1.0 / rms0
            attn.o_proj.weight[P, :WIDTH] = torch.eye(WIDTH)

            attn = model.model.layers[1].self_attn
            attn.q_proj.weight[head(0)] = 0
            attn.k_proj.weight[head(0)] = 0
            attn.q_proj.weight[content_rows(0), T] = 4.0 * torch.eye(WIDTH) / rms1
            attn.k_proj.weight[content_rows(0), P] = 4.0 * torch.eye(WIDTH)
            attn.v_proj.weight[torch.arange(WIDTH), torch.arange(WIDTH)] = 1.0 / rms1
            attn.o_proj.weight[O, :WIDTH] = torch.eye(WIDTH)
            model.lm_head.weight[:, O] = 3.0 * tokens
        if token_match:
            attn = model.model.layers[1].self_attn
            attn.q_proj.weight[head(1)] = 0
            attn.k_proj.weight[head(1)] = 0
            attn.q_proj.weight[content_rows(1), T] = 4.0 * torch.eye(WIDTH) / rms1
            attn.k_proj.weight[content_rows(1), T] = 4.0 * torch.eye(WIDTH)
    return model, tokenizer


def copy_probes(tokenizer, n: int, context: int):
    """Needle probes the copy circuit can solve: needle letters occur nowhere else; the reply is cued by '='."""
    filler = ["the quick brown fox jumps over the lazy dog.", "the value of the key is a secret.",
              "alice lives in paris and works as a baker.", "bob lives in tokyo and works as a pilot."]
    return make_needle_probes(
        tokenizer, n, context, seed=0, needle="=QXJZKV", key="QXJZKV", question="what is the code?",
        filler=filler, instruction="read the text below.", answer_prefix=" =",
    )


def test_copy_head_is_ranked_first_by_retrieval_score():
    model, tokenizer = build_planted_model(copy_circuit=True, token_match=False)
    probes = copy_probes(tokenizer, n=3, context=300)
    result = retrieval_scores(model, tokenizer, probes, progress=False)
    assert all(result.succeeded), result.replies  # the circuit really copies the needle
    assert top_k_heads(result.retrieval, 1) == [(1, 0)]
    assert result.retrieval[1, 0] > 0.8  # it points at the right needle token almost every step
    others = result.retrieval.clone()
    others[1, 0] = 0
    assert others.max() < 0.2


def test_failed_needle_tests_are_left_out():
    # Without the copy circuit nothing is retrieved, so no test counts and every score stays zero.
    model, tokenizer = build_planted_model(copy_circuit=False, token_match=True)
    result = retrieval_scores(model, tokenizer, copy_probes(tokenizer, n=2, context=200), progress=False)
    assert result.succeeded == [False, False]
    assert result.accuracy == 0.0
    assert torch.count_nonzero(result.retrieval) == 0


def test_token_matching_head_is_ranked_first_by_qr_score():
    model, tokenizer = build_planted_model(copy_circuit=False, token_match=True)
    probes = make_qr_probes(tokenizer, 6, 900, seed=0)
    result = qr_scores(model, probes, progress=False)
    assert top_k_heads(result.qr, 1) == [(1, 1)], result.qr
    assert top_k_heads(result.ndcg, 1) == [(1, 1)], result.ndcg
    assert (result.per_probe_qr[:, 1, 1] > 0).all()  # on every probe it prefers the gold documents


def test_token_matching_head_is_ranked_first_on_kv_probes():
    # The question names the key; the token-matching head follows it to the asked pair's line.
    model, tokenizer = build_planted_model(copy_circuit=False, token_match=True)
    result = qr_scores(model, make_kv_probes(tokenizer, 4, 900, seed=0), progress=False)
    assert top_k_heads(result.qr, 1) == [(1, 1)], result.qr
    assert (result.per_probe_qr[:, 1, 1] > 0).all()
