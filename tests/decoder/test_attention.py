"""decoder.attention: attaching, plans (bias, temperature, captures, ablation, stop) and the frozen cache."""

from __future__ import annotations

import pytest
import torch

from decoder.attention import AttentionPlan, UnsupportedModelError, attach, attention_layers, detach, use_plan
from decoder.tiny import ARCHITECTURES, tiny_model


def _batch(seed: int = 0, length: int = 20):
    """Two rows, the first left-padded by 5."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 500, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    return ids, mask


def _eager_twin(arch: str):
    """The same tiny model with transformers' eager attention, for attention weights to compare with."""
    model, _ = tiny_model(arch)
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attach_keeps_plain_forward_identical(arch):
    model, _ = tiny_model(arch)
    ids, mask = _batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        attach(model)
        attach(model)  # idempotent
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert attention_layers(model) == tuple(range(model.config.num_hidden_layers))
    detach(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_zero_bias_is_a_no_op_and_minus_inf_bias_equals_a_padding_mask(arch):
    model, _ = tiny_model(arch)
    attach(model)
    ids, mask = _batch()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with use_plan(model, AttentionPlan(logit_bias=torch.full((2, 20), 0.7))):  # constant shift: softmax-invariant
            shifted = model(input_ids=ids, attention_mask=mask).logits
        hidden = mask.clone()
        hidden[:, 8] = 0
        bias = torch.zeros(2, 20)
        bias[:, 8] = float("-inf")
        masked = model(input_ids=ids, attention_mask=hidden).logits
        with use_plan(model, AttentionPlan(logit_bias=bias)):
            biased = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool().clone()
    torch.testing.assert_close(shifted[real], plain[real], atol=1e-5, rtol=1e-5)
    real[:, 8] = False  # the hidden position's own query row sees itself only through the mask path
    torch.testing.assert_close(biased[real], masked[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_captured_probabilities_equal_eager_attention_weights(arch):
    model, _ = tiny_model(arch)
    attach(model)
    eager = _eager_twin(arch)
    ids, mask = _batch(seed=1)
    heads = torch.tensor([3, 0])
    rows = torch.tensor([7, 19])
    plan = AttentionPlan(capture_heads={0: heads, 2: heads}, capture_rows=rows)
    with torch.no_grad(), use_plan(model, plan):
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    for layer in (0, 2):
        expected = reference[layer][:, heads][:, :, rows].float()
        assert plan.captured[layer].dtype == torch.float32
        torch.testing.assert_close(plan.captured[layer], expected, atol=1e-5, rtol=1e-4)


def test_default_capture_row_is_the_last_query():
    model, _ = tiny_model("llama")
    attach(model)
    ids, mask = _batch()
    everything = AttentionPlan(capture_heads={1: torch.arange(4)}, capture_rows=slice(None))
    last = AttentionPlan(capture_heads={1: torch.arange(4)})
    with torch.no_grad():
        with use_plan(model, everything):
            model(input_ids=ids, attention_mask=mask)
        with use_plan(model, last):
            model(input_ids=ids, attention_mask=mask)
    assert last.captured[1].shape == (2, 4, 1, 20)
    torch.testing.assert_close(last.captured[1], everything.captured[1][:, :, -1:])


def test_temperature_sharpens_like_a_power_of_the_probabilities():
    # Layer 0's queries and keys do not depend on attention, so with T the probabilities are p^(1/T), renormalised.
    model, _ = tiny_model("qwen3")
    attach(model)
    ids, mask = _batch()
    heads = torch.arange(4)
    plain = AttentionPlan(capture_heads={0: heads})
    hot = AttentionPlan(capture_heads={0: heads}, temperature=2.0)
    with torch.no_grad():
        with use_plan(model, plain):
            model(input_ids=ids, attention_mask=mask)
        with use_plan(model, hot):
            model(input_ids=ids, attention_mask=mask)
    expected = plain.captured[0].sqrt()
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(hot.captured[0], expected, atol=1e-5, rtol=1e-4)


def test_ablated_heads_give_zero_attention_output():
    model, _ = tiny_model("llama")
    attach(model)
    ids, mask = _batch()
    seen = []
    handle = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        with use_plan(model, AttentionPlan(ablate_heads={1: torch.tensor([2])})):
            model(input_ids=ids, attention_mask=mask)
    handle.remove()
    plain, ablated = (x.view(2, 20, 4, 16) for x in seen)  # [batch, q_len, heads, head_dim]
    assert torch.all(ablated[:, :, 2] == 0)
    assert torch.equal(ablated[:, :, [0, 1, 3]], plain[:, :, [0, 1, 3]])
    assert plain[:, :, 2].abs().sum() > 0


def _cache_state(cache):
    state = []
    for layer in cache.layers:
        entry = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(layer).items()}
        state.append(entry)
    return state, cache.get_seq_length()


def _assert_same_cache(cache, saved):
    layers, length = saved
    assert cache.get_seq_length() == length
    assert len(cache.layers) == len(layers)
    for layer, before in zip(cache.layers, layers):
        after = vars(layer)
        assert after.keys() == before.keys()
        for name, value in before.items():
            if isinstance(value, torch.Tensor):
                assert after[name].dtype == value.dtype and after[name].shape == value.shape, name
                assert torch.equal(after[name].view(torch.uint8) if value.is_floating_point() else after[name],
                                   value.view(torch.uint8) if value.is_floating_point() else value), name
            else:
                assert after[name] == value, name


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_stopped_probe_leaves_the_cache_bit_identical(arch, cache_kind):
    from transformers import DynamicCache, StaticCache

    model, _ = tiny_model(arch)
    attach(model)
    ids, mask = _batch(length=14)  # longer than gemma's sliding window of 8
    if cache_kind == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=32)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=ids[:, :12], attention_mask=mask[:, :12], position_ids=position_ids[:, :12], cache=cache)
        saved = _cache_state(cache)
        step = dict(input_ids=ids[:, 12:13], attention_mask=mask[:, :13], position_ids=position_ids[:, 12:13])
        plan = AttentionPlan(capture_heads={0: torch.arange(4), 1: torch.arange(4), 3: torch.arange(4)},
                             stop_after_layer=1, kv_length=13)
        with use_plan(model, plan, frozen_cache=cache):
            model(**step, cache=cache)
            pytest.fail("the probe forward should have stopped after layer 1")
        _assert_same_cache(cache, saved)
        assert set(plan.captured) == {0, 1}  # layer 3 never ran
        # The next real forward sees the cache as if no probe had happened.
        after_probe = model(**step, cache=cache).logits
        fresh = DynamicCache(config=model.config)
        model(input_ids=ids[:, :12], attention_mask=mask[:, :12], position_ids=position_ids[:, :12], cache=fresh)
        expected = model(**step, cache=fresh).logits
    torch.testing.assert_close(after_probe, expected, atol=1e-5, rtol=1e-5)
    assert plan.captured[0].shape == (2, 4, 1, 13)
    torch.testing.assert_close(plan.captured[0].sum(-1), torch.ones(2, 4, 1))


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_sliding_layer_captures_and_bias_are_aligned_to_absolute_positions(cache_kind):
    """Gemma 3 layer 0 slides (window 8): a cached one-token step sees only the last keys."""
    from transformers import DynamicCache, StaticCache

    model, _ = tiny_model("gemma3_text")
    attach(model)
    eager = _eager_twin("gemma3_text")
    assert model.config.layer_types[0] == "sliding_attention"
    ids = torch.randint(5, 500, (1, 14), generator=torch.Generator().manual_seed(3))
    cache = DynamicCache(config=model.config) if cache_kind == "dynamic" else StaticCache(config=model.config, max_cache_len=20)
    bias = torch.zeros(1, 14)
    bias[0, 10] = 1.5  # inside the window of the last query (positions 6..13)
    bias[0, 2] = 50.0  # outside the window: must have no effect on the sliding layer
    plan = AttentionPlan(capture_heads={0: torch.arange(4), 1: torch.arange(4)}, logit_bias=bias, kv_length=14)
    with torch.no_grad():
        model(input_ids=ids[:, :13], cache=cache)
        with use_plan(model, plan):
            model(input_ids=ids[:, 13:], cache=cache)
        weights = eager(input_ids=ids, output_attentions=True).attentions
    # Reference: eager probabilities of the last row, re-weighted by exp(bias) within what each layer sees.
    expected = weights[0][:, :, -1:].float() * bias.exp()[:, None, None, :] * (weights[0][:, :, -1:] > 0)
    expected = expected / expected.sum(-1, keepdim=True)
    captured = plan.captured[0]
    assert captured.shape == (1, 4, 1, 14)
    assert torch.all(captured[..., :6] == 0) and torch.all(captured[..., 6:] > 0)  # window: 6..13
    torch.testing.assert_close(captured, expected, atol=1e-5, rtol=1e-4)
    assert captured[..., 2].abs().max() == 0
    assert plan.captured[1].shape == (1, 4, 1, 14)
    assert plan.captured[1][..., 2].min() > 0.5  # the full layer does feel the large bias at position 2


def test_plans_do_not_nest_and_need_an_attached_model():
    model, _ = tiny_model("llama")
    with pytest.raises(RuntimeError, match="attach"):
        with use_plan(model, AttentionPlan()):
            pass
    attach(model)
    with pytest.raises(RuntimeError, match="nest"):
        with use_plan(model, AttentionPlan()):
            with use_plan(model, AttentionPlan()):
                pass
    with pytest.raises(ValueError, match="temperature"):
        with use_plan(model, AttentionPlan(temperature=0.0)):
            pass


class _HandRolledAttention(torch.nn.Module):
    """Attention that never calls transformers' AttentionInterface."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        inner = self.inner
        shape = (*hidden_states.shape[:-1], -1, inner.head_dim)
        q = inner.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = inner.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = inner.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return inner.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None


def test_model_whose_attention_bypasses_the_interface_is_refused_by_class_name():
    from transformers import LlamaForCausalLM

    class HandRolledLlama(LlamaForCausalLM):
        pass

    reference, _ = tiny_model("llama")
    model = HandRolledLlama(reference.config)
    for layer in model.model.layers:
        layer.self_attn = _HandRolledAttention(layer.self_attn)
    with pytest.raises(UnsupportedModelError, match="HandRolledLlama"):
        attach(model)
    assert model.config._attn_implementation == "sdpa"  # left as it was
