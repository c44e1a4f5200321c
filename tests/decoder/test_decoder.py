"""decoder.generation against transformers' own generate and against a slow, obviously-correct reference.

The reference recomputes the whole sequence at every step, without a cache, through an eager attention
written here. Position i's query row gets the bias that was in force when position i was fed (zero for
plain passes), which is exactly what the cached decoder's keys and values saw. Selection is a Python
walk down the sorted importances. Logit tolerance: 1e-4 absolute (float32 tiny models; the cached and
uncached paths sum in different orders).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from decoder.attention import UnsupportedModelError
from decoder.dysco import DyscoConfig
from decoder.generation import Decoder
from decoder.tiny import ARCHITECTURES, tiny_model

ATOL = 1e-4

# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------

_REFERENCE = {"bias": None, "capture": {}, "captured": {}, "plain": False}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention: logits + transformers' mask + the reference's per-row bias; records S's last row
    (with "plain", the probabilities of the same logits without the bias)."""
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)  # [1, heads, n, d]
    value = value.repeat_interleave(n_rep, dim=1)
    logits = query @ key.transpose(-1, -2) * scaling  # [1, heads, n, n]
    if kwargs.get("softcap") is not None:
        logits = torch.tanh(logits / kwargs["softcap"]) * kwargs["softcap"]
    masked = logits + attention_mask
    probs = torch.softmax((masked + _REFERENCE["bias"]).float(), dim=-1)
    heads = _REFERENCE["capture"].get(module.layer_idx)
    if heads is not None:
        read = torch.softmax(masked.float(), dim=-1) if _REFERENCE["plain"] else probs
        _REFERENCE["captured"][module.layer_idx] = read[0, heads, -1]  # [|S_l|, n]
    return (probs.to(value.dtype) @ value).transpose(1, 2).contiguous(), probs


def _reference_model(arch: str):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("test_reference", _reference_attention)
    AttentionMaskInterface.register("test_reference", eager_mask)
    model, _ = tiny_model(arch)
    model.set_attn_implementation("test_reference")
    return model


def _reference_select(importance: list[float], top_p: float, top_k: int) -> set[int]:
    """Walk down the sorted importances: keep a position while the mass so far, itself included, is <= top_p."""
    total = sum(importance)
    order = sorted(range(len(importance)), key=lambda j: -importance[j])  # stable: ties keep position order
    chosen, mass = [], 0.0
    for j in order:
        mass += importance[j] / total
        if chosen and mass > top_p:
            break
        chosen.append(j)
    return set(chosen[:top_k])


def reference_dysco(model, prompt: list[int], template: list[bool], config: DyscoConfig, steps: int,
                    intervention_warmup: int = 0):
    """Greedy tokens and logits of DySCO, the slow way (rules: ALGORITHMS.md, the authors' code)."""
    total = len(prompt) + steps
    bias_rows = torch.zeros(total, total)  # row i: the bias in force when position i was fed
    seq = list(prompt)

    def run(n: int, capture: bool, plain: bool = True) -> torch.Tensor:
        _REFERENCE["bias"] = bias_rows[:n, :n]
        _REFERENCE["plain"] = plain
        _REFERENCE["capture"] = {l: list(h) for l, h in config.heads_by_layer.items()} if capture else {}
        _REFERENCE["captured"] = {}
        with torch.no_grad():
            return model(input_ids=torch.tensor([seq[:n]]), use_cache=False).logits[0, -1].float()

    def cur() -> list[float]:
        rows = {(l, h): _REFERENCE["captured"][l][i] for l, heads in config.heads_by_layer.items() for i, h in enumerate(heads)}
        return torch.stack([rows[pair] for pair in config.head_set]).mean(0).tolist()

    importance: list[float] = []

    def update(c: list[float]) -> None:
        blended = [c[j] + (config.decay * importance[j] if j < len(importance) else 0.0) for j in range(len(c))]
        s = sum(blended)
        importance[:] = [b / s for b in blended]

    P = len(prompt)
    fed = min(config.context_warmup + intervention_warmup, P)  # fed one at a time, the rest prefilled
    intervene_from = max(P - fed, P - intervention_warmup - 1)
    for i in range(P - fed, intervene_from):  # importance only: plain, read importance
        run(i + 1, capture=True)
        update(cur())
    static: set[int] | None = None
    tokens, all_logits = [], []
    position = intervene_from
    logits = run(P, capture=False) if fed == 0 else None
    while len(tokens) < steps:
        if logits is None:  # a DySCO step at `position`
            lagged = False  # lagged: this step's full pass reads the importance for the next step
            if static is None:
                lag = config.selection == "lagged" and position >= P  # lagged probes on the prompt's steps
                if importance and (config.selection == "static" or lag):
                    chosen = _reference_select(importance, config.top_p, config.top_k)  # no probe: columns < position
                    lagged = lag
                else:
                    run(position + 1, capture=True)  # probe: the row of `position` has no bias yet
                    update(cur())
                    chosen = _reference_select(importance, config.top_p, config.top_k)
                if config.strength < 99:  # the hard variant keeps selected template positions
                    chosen = {j for j in chosen if not (j < P and template[j])}
                if config.selection == "static":
                    static = chosen
            else:
                chosen = set(static)
            chosen = chosen | {position}
            for j in range(position + 1):
                if config.strength >= 99:
                    bias_rows[position, j] = 0.0 if j in chosen else float("-inf")
                else:
                    bias_rows[position, j] = math.log(config.strength) if j in chosen else 0.0
            logits = run(position + 1, capture=lagged, plain=config.lagged_probs == "plain")
            if lagged:
                update(cur())
            position += 1
            if position < P:  # teacher-forced: the prompt's own next token, logits dropped
                logits = None
                continue
        token = int(logits.argmax())
        tokens.append(token)
        all_logits.append(logits)
        seq.append(token)
        logits = None  # every later token comes from a DySCO step
    return tokens, torch.stack(all_logits)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

PROMPTS = [
    [{"role": "user", "content": "The value of key 17 is 42. Alice lives in Paris. What is the value of key 17?"}],
    [{"role": "user", "content": "Bob lives in Tokyo."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where does Alice live?"}],
]


def _heads(model) -> list[tuple[int, int]]:
    layers = model.config.num_hidden_layers
    return [(1, 0), (1, 3), (layers - 2, 1)]


SETTINGS = {
    "soft": dict(strength=3.0, top_p=0.6, top_k=12, decay=0.75, context_warmup=4),  # intervention_warmup auto
    "soft_iw0": dict(strength=3.0, top_p=0.9, top_k=40, decay=0.75, context_warmup=4, intervention_warmup=0),
    "hard": dict(strength=99.0, top_p=0.8, top_k=20, decay=0.5, context_warmup=3),
    "static": dict(strength=4.0, top_p=0.7, top_k=8, decay=0.75, context_warmup=5, selection="static"),
    "static_iw2": dict(strength=4.0, top_p=0.7, top_k=8, decay=0.75, context_warmup=5, selection="static",
                       intervention_warmup=2),
    "lagged_plain": dict(strength=3.0, top_p=0.7, top_k=8, decay=0.75, context_warmup=5, selection="lagged"),
    "lagged_biased": dict(strength=3.0, top_p=0.7, top_k=8, decay=0.75, context_warmup=5, selection="lagged",
                          lagged_probs="biased", intervention_warmup=2),
    "lagged_hard": dict(strength=99.0, top_p=0.8, top_k=20, decay=0.5, context_warmup=3, selection="lagged",
                        lagged_probs="biased"),
    "lagged_probe_first": dict(strength=3.0, top_p=0.7, top_k=8, context_warmup=1, selection="lagged",
                               intervention_warmup=0),
}


def _check_against_reference(model, tokenizer, arch, setting, rows, steps=5):
    config = DyscoConfig(head_set=_heads(model), **SETTINGS[setting])
    decoder = Decoder(model, tokenizer, method="dysco", dysco=config)
    prompts = [PROMPTS[r] for r in rows]
    result = decoder.generate(prompts, max_new_tokens=steps, return_logits=True, eos=[])
    reference = _reference_model(arch)
    ids, masks = decoder.encode(prompts)
    for i in range(len(rows)):
        tokens, logits = reference_dysco(reference, ids[i], masks[i], config, steps, decoder.intervention_warmup)
        assert result.token_ids[i] == tokens, f"{arch} {setting} row {i}"
        torch.testing.assert_close(result.logits[i], logits, atol=ATOL, rtol=0)
    return result


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_strength_one_equals_transformers_greedy_generate(arch):
    model, tokenizer = tiny_model(arch)
    prompts = [PROMPTS[0], PROMPTS[1]]
    config = DyscoConfig(head_set=_heads(model), strength=1.0, context_warmup=4)
    ours = Decoder(model, tokenizer, method="dysco", dysco=config).generate(prompts, max_new_tokens=6, return_logits=True, eos=[])
    encoded = tokenizer.pad({"input_ids": [tokenizer.apply_chat_template(p, add_generation_prompt=True)["input_ids"] for p in prompts]},
                            return_tensors="pt")
    theirs = model.generate(**encoded, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                            eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    width = encoded["input_ids"].shape[1]
    for i in range(2):
        assert ours.token_ids[i] == theirs.sequences[i, width:].tolist()
        torch.testing.assert_close(ours.logits[i], torch.stack([step[i] for step in theirs.logits]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_vanilla_and_attnts_at_one_equal_transformers_greedy_generate(arch):
    model, tokenizer = tiny_model(arch)
    prompts = [PROMPTS[2], PROMPTS[1]]
    encoded = tokenizer.pad({"input_ids": [tokenizer.apply_chat_template(p, add_generation_prompt=True)["input_ids"] for p in prompts]},
                            return_tensors="pt")
    theirs = model.generate(**encoded, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    width = encoded["input_ids"].shape[1]
    vanilla = Decoder(model, tokenizer, method="vanilla").generate(prompts, max_new_tokens=5, eos=[], return_logits=True)
    attnts = Decoder(model, tokenizer, method="attnts", temperature=1.0).generate(prompts, max_new_tokens=5, eos=[], return_logits=True)
    for i in range(2):
        assert vanilla.token_ids[i] == attnts.token_ids[i] == theirs[i, width:].tolist()
        assert torch.equal(vanilla.logits[i], attnts.logits[i])


def test_attnts_changes_decoding_and_matches_a_scaled_reference():
    """AttnTS at T divides every logit by T, prefill included: the same as scaling the model's attention."""
    model, tokenizer = tiny_model("llama")
    reference, _ = tiny_model("llama")
    for layer in reference.model.layers:
        layer.self_attn.scaling /= 1.7
    prompts = [PROMPTS[0]]
    ours = Decoder(model, tokenizer, method="attnts", temperature=1.7).generate(prompts, max_new_tokens=5, eos=[], return_logits=True)
    ids = tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, return_tensors="pt")["input_ids"]
    theirs = reference.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, eos_token_id=None)
    assert ours.token_ids[0] == theirs.sequences[0, ids.shape[1]:].tolist()
    torch.testing.assert_close(ours.logits[0], torch.cat(theirs.logits), atol=ATOL, rtol=0)
    plain = Decoder(model, tokenizer, method="vanilla").generate(prompts, max_new_tokens=5, eos=[], return_logits=True)
    assert (plain.logits[0] - ours.logits[0]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dysco_soft_matches_the_reference_batch_of_three(arch):
    model, tokenizer = tiny_model(arch)
    _check_against_reference(model, tokenizer, arch, "soft", rows=[0, 1, 2])


@pytest.mark.parametrize("setting", ["soft_iw0", "hard", "static", "static_iw2", "lagged_plain", "lagged_biased",
                                     "lagged_hard", "lagged_probe_first"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_dysco_hard_static_and_lagged_match_the_reference(arch, setting):
    model, tokenizer = tiny_model(arch)
    _check_against_reference(model, tokenizer, arch, setting, rows=[0])  # batch 1
    _check_against_reference(model, tokenizer, arch, setting, rows=[1, 0, 2])  # batch 3, unequal lengths


def test_warmup_longer_than_a_prompt_and_zero_warmup_match_the_reference():
    model, tokenizer = tiny_model("gemma3_text")
    reference = _reference_model("gemma3_text")
    prompts = [[5, 9, 33], list(range(40, 60))]  # token ids: 3 tokens (shorter than the warmup) and 20
    for warmup, intervention in ((0, 0), (8, 0), (0, 2), (8, 2), (2, "auto")):  # auto: 9 tokens here
        config = DyscoConfig(head_set=[(1, 2), (2, 0)], strength=5.0, top_p=0.5, top_k=6, context_warmup=warmup,
                             intervention_warmup=intervention)
        decoder = Decoder(model, tokenizer, dysco=config)
        result = decoder.generate(prompts, max_new_tokens=4, eos=[], return_logits=True)
        for i, prompt in enumerate(prompts):
            tokens, logits = reference_dysco(reference, prompt, [False] * len(prompt), config, 4, decoder.intervention_warmup)
            assert result.token_ids[i] == tokens, (warmup, intervention, i)
            torch.testing.assert_close(result.logits[i], logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi3"])
def test_batched_equals_rows_one_by_one(arch):
    model, tokenizer = tiny_model(arch)
    config = DyscoConfig(head_set=_heads(model), strength=3.0, top_p=0.8, top_k=10, context_warmup=5)
    decoder = Decoder(model, tokenizer, dysco=config)
    batched = decoder.generate(PROMPTS, max_new_tokens=5, eos=[], return_logits=True, return_diagnostics=True)
    for i, prompt in enumerate(PROMPTS):
        alone = decoder.generate([prompt], max_new_tokens=5, eos=[], return_logits=True, return_diagnostics=True)
        assert batched.token_ids[i] == alone.token_ids[0]
        torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=ATOL, rtol=0)
        assert [d["selected"] for d in batched.diagnostics[i]] == [d["selected"] for d in alone.diagnostics[0]]


def test_finished_rows_leave_the_batch_and_the_others_are_unaffected():
    model, tokenizer = tiny_model("llama")
    config = DyscoConfig(head_set=_heads(model), strength=3.0, top_p=0.8, top_k=10, context_warmup=4)
    decoder = Decoder(model, tokenizer, dysco=config)
    free = decoder.generate(PROMPTS, max_new_tokens=6, eos=[])
    stopper = free.token_ids[1][2]  # row 1's third token ends that row when used as EOS
    ended = decoder.generate(PROMPTS, max_new_tokens=6, eos=[stopper], return_diagnostics=True)
    assert ended.token_ids[1] == free.token_ids[1][: free.token_ids[1].index(stopper) + 1]
    assert ended.finish_reasons[1] == "eos"
    for i in (0, 2):
        cut = free.token_ids[i].index(stopper) + 1 if stopper in free.token_ids[i] else 6
        assert ended.token_ids[i] == free.token_ids[i][:cut]
    assert len(ended.diagnostics[1]) == len(ended.token_ids[1])
    for row in ended.diagnostics:
        for d in row:
            assert d["selected"] >= 1 and 0 < d["mass"] <= 1 + 1e-5


def test_prefill_state_is_reused_unchanged_across_knob_settings():
    model, tokenizer = tiny_model("qwen2")
    heads = _heads(model)
    base = Decoder(model, tokenizer, dysco=DyscoConfig(head_set=heads, context_warmup=6))
    state = base.prefill(PROMPTS, warmup=6 + base.intervention_warmup)  # context + intervention warmup (auto: 9)
    snapshot = [(layer.keys.clone(), layer.values.clone()) for layer in state.cache.layers]
    for knobs in (dict(strength=2.0, context_warmup=6), dict(strength=5.0, top_k=3, context_warmup=2),
                  dict(strength=99.0, context_warmup=5, intervention_warmup=3)):
        decoder = Decoder(model, tokenizer, dysco=DyscoConfig(head_set=heads, **knobs))
        reused = decoder.generate_from(state, max_new_tokens=4, eos=[], return_logits=True)
        fresh = decoder.generate(PROMPTS, max_new_tokens=4, eos=[], return_logits=True)
        assert reused.token_ids == fresh.token_ids
        for a, b in zip(reused.logits, fresh.logits):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    for layer, (keys, values) in zip(state.cache.layers, snapshot):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    vanilla = Decoder(model, tokenizer, method="vanilla")
    assert vanilla.generate_from(state, max_new_tokens=3, eos=[]).token_ids == vanilla.generate(PROMPTS, max_new_tokens=3, eos=[]).token_ids
    with pytest.raises(ValueError, match="warmup >= 19"):
        Decoder(model, tokenizer, dysco=DyscoConfig(head_set=heads, context_warmup=10)).generate_from(state, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention temperature"):
        Decoder(model, tokenizer, method="attnts", temperature=2.0).generate_from(state, max_new_tokens=2)


def test_transformers_generate_with_custom_generate():
    model, tokenizer = tiny_model("mistral")
    config = DyscoConfig(head_set=_heads(model), strength=3.0, top_p=0.8, top_k=10, context_warmup=4)
    decoder = Decoder(model, tokenizer, dysco=config)
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True)["input_ids"] for p in PROMPTS[:2]]
    encoded = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    sequences = model.generate(**encoded, custom_generate=decoder.custom_generate, max_new_tokens=5, eos_token_id=None,
                               pad_token_id=tokenizer.pad_token_id)
    direct = decoder.generate(ids, max_new_tokens=5, eos=[])
    width = encoded["input_ids"].shape[1]
    assert torch.equal(sequences[:, :width], encoded["input_ids"])
    for i in range(2):
        assert sequences[i, width:].tolist() == direct.token_ids[i]


def test_sampling_is_seeded_and_stop_strings_cut_the_text():
    model, tokenizer = tiny_model("llama")
    decoder = Decoder(model, tokenizer, dysco=DyscoConfig(head_set=_heads(model)))
    a = decoder.generate(PROMPTS[:2], max_new_tokens=6, do_sample=True, temperature=1.3, top_p=0.9, seed=7, eos=[])
    b = decoder.generate(PROMPTS[:2], max_new_tokens=6, do_sample=True, temperature=1.3, top_p=0.9, seed=7, eos=[])
    assert a.token_ids == b.token_ids
    greedy = decoder.generate(PROMPTS[0], max_new_tokens=8, eos=[])
    text = greedy.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    seen = []
    stopped = decoder.generate(PROMPTS[0], max_new_tokens=8, eos=[], stop_strings=[stop], callback=seen.append)
    assert stopped.finish_reasons == ["stop_string"]
    assert stopped.text == text[: text.find(stop)]
    assert [e.step for e in seen] == list(range(len(stopped.token_ids[0])))
    assert stopped.token_ids[0] == greedy.token_ids[0][: len(stopped.token_ids[0])]


def test_bad_input_gives_clear_errors():
    model, tokenizer = tiny_model("llama")
    with pytest.raises(ValueError, match=r"4 layers × 4 heads"):
        Decoder(model, tokenizer, dysco=DyscoConfig(head_set=[(4, 0)]))
    with pytest.raises(ValueError, match=r"4 layers × 4 heads"):
        Decoder(model, tokenizer, dysco=DyscoConfig(head_set=[(1, 9)]))
    with pytest.raises(ValueError, match="needs a DyscoConfig"):
        Decoder(model, tokenizer, method="dysco")
    with pytest.raises(ValueError, match="unknown decoding method"):
        Decoder(model, tokenizer, method="beam")
    with pytest.raises(ValueError, match="use method='attnts'"):
        Decoder(model, tokenizer, method="vanilla", temperature=2.0)
    decoder = Decoder(model, tokenizer, dysco=DyscoConfig(head_set=[(1, 0)]))
    with pytest.raises(ValueError, match="empty"):
        decoder.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty string"):
        decoder.generate("", max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        decoder.generate([[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="conversation is empty|empty"):
        decoder.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="longer than the model's context of 4096"):
        decoder.generate([[7] * 4100], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceed the model's context"):
        decoder.generate([[7] * 4090], max_new_tokens=10)
    with pytest.raises(ValueError, match="outside the vocabulary of 512"):
        decoder.generate([[7, 600]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        decoder.generate("hello", max_new_tokens=0)


def test_a_model_not_using_the_interface_is_refused_by_class_name():
    from transformers import LlamaForCausalLM

    class HandRolledAttention(torch.nn.Module):  # never calls transformers' AttentionInterface
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden_states, attention_mask=None, **kwargs):
            return self.inner.o_proj(self.inner.q_proj(hidden_states)), None

    class HandRolledLlama(LlamaForCausalLM):
        pass

    reference, tokenizer = tiny_model("llama")
    model = HandRolledLlama(reference.config)
    for layer in model.model.layers:
        layer.self_attn = HandRolledAttention(layer.self_attn)
    with pytest.raises(UnsupportedModelError, match="HandRolledLlama"):
        Decoder(model, tokenizer, method="vanilla")


@pytest.mark.embedded
def test_smollm2_dysco_matches_the_reference_and_strength_one_matches_generate(smollm2):
    model, tokenizer = smollm2
    prompts = [
        [{"role": "user", "content": "The secret number is 7319. Alice lives in Paris. What is the secret number?"}],
        [{"role": "user", "content": "Say hello."}],
    ]
    heads = [(8, 2), (15, 4), (20, 1), (21, 7)]
    config = DyscoConfig(head_set=heads, strength=2.0, top_p=0.9, top_k=64, context_warmup=6)
    decoder = Decoder(model, tokenizer, dysco=config)
    assert decoder.intervention_warmup == 4  # auto: "<|im_start|>", "ass", "istant", "\n"
    result = decoder.generate(prompts, max_new_tokens=4, eos=[], return_logits=True)
    ids, masks = decoder.encode(prompts)
    previous = model.config._attn_implementation
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("test_reference", _reference_attention)
    AttentionMaskInterface.register("test_reference", eager_mask)
    model.set_attn_implementation("test_reference")
    try:
        for i in (1, 0):  # the short prompt always; the longer one too
            tokens, logits = reference_dysco(model, ids[i], masks[i], config, 4, decoder.intervention_warmup)
            assert result.token_ids[i] == tokens
            torch.testing.assert_close(result.logits[i], logits, atol=5e-4, rtol=0)
    finally:
        model.set_attn_implementation(previous)
    # strength 1: the same as transformers' greedy generate
    plain = Decoder(model, tokenizer, dysco=config.replace(strength=1.0)).generate(prompts, max_new_tokens=4, eos=[], return_logits=True)
    encoded = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    theirs = model.generate(**encoded, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                            eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    for i in range(2):
        assert plain.token_ids[i] == theirs.sequences[i, encoded["input_ids"].shape[1]:].tolist()
        torch.testing.assert_close(plain.logits[i], torch.stack([s[i] for s in theirs.logits]), atol=5e-4, rtol=0)


def test_decoder_from_a_registry_profile_is_checked_against_the_model():
    from registry import Knobs, ModelIdentity, Profile, ProfileMismatchError

    from decoder.loading import model_identity

    model, tokenizer = tiny_model("llama")
    identity = ModelIdentity(**model_identity(model, "tiny-llama"))
    profile = Profile(model=identity, head_set=[(1, 0), (2, 3)],
                      knobs=Knobs(strength=3.0, top_k=7, top_p=0.9, context_warmup=4, selection="static"))
    decoder = Decoder.from_profile(model, tokenizer, profile)
    assert decoder.method == "dysco"
    assert decoder.dysco == DyscoConfig(head_set=[(1, 0), (2, 3)], strength=3.0, top_k=7, top_p=0.9, context_warmup=4,
                                        selection="static")
    direct = Decoder(model, tokenizer, dysco=decoder.dysco).generate(PROMPTS[0], max_new_tokens=3, eos=[])
    assert decoder.generate(PROMPTS[0], max_new_tokens=3, eos=[]).token_ids == direct.token_ids

    other, _ = tiny_model("llama", seed=1)  # same shape, other weights
    with pytest.raises(ProfileMismatchError, match="weights fingerprint"):
        Decoder.from_profile(other, tokenizer, profile)
    with pytest.warns(UserWarning, match="forced"):
        assert Decoder.from_profile(other, tokenizer, profile, force=True).dysco.top_k == 7

    attnts = Profile(model=identity, head_set=[(1, 0)], knobs=Knobs(attnts_temperature=1.5))
    decoder = Decoder.from_profile(model, tokenizer, attnts)
    assert decoder.method == "attnts" and decoder.temperature == 1.5


def _feed_log(decoder: Decoder, prompt, steps: int = 2) -> list[tuple[str, int]]:
    """(what ran, column) for every forward of one generation: prefill / importance / probe / biased."""
    log = []
    forward = decoder._forward

    def recording(state, cache, start, end, plan, **kwargs):
        if plan is None or (plan.logit_bias is None and not plan.capture_heads):
            kind = "prefill" if end - start > 1 else "plain"
        elif plan.stop_after_layer is not None:
            kind = "probe"
        elif plan.logit_bias is not None:
            kind = "biased"
        else:
            kind = "importance"
        log.append((kind, start) if end - start == 1 else (kind, (start, end)))
        return forward(state, cache, start, end, plan, **kwargs)

    decoder._forward = recording
    decoder.generate([prompt], max_new_tokens=steps, eos=[])
    return log


@pytest.mark.parametrize("chat_template", [True, False])
@pytest.mark.parametrize("intervention", ["auto", 0, 2])
def test_feed_schedule_runs_probe_and_bias_on_the_published_columns(chat_template, intervention):
    """cw - 1 importance-only columns, then the last iw + 1 prompt columns and every generated one intervene."""
    model, tokenizer = tiny_model("llama")
    if not chat_template:
        tokenizer = copy.deepcopy(tokenizer)  # tiny_tokenizer() is shared: never change it in place
        tokenizer.chat_template = None
    config = DyscoConfig(head_set=_heads(model), context_warmup=4, intervention_warmup=intervention)
    decoder = Decoder(model, tokenizer, dysco=config)
    iw = {"auto": 9 if chat_template else 0}.get(intervention, intervention)  # the tiny ChatML prompt: 9 tokens
    assert decoder.intervention_warmup == iw
    P = 30
    log = _feed_log(decoder, list(range(10, 10 + P)), steps=2)
    fed = 4 + iw
    expected = [("prefill", (0, P - fed))]
    expected += [("importance", c) for c in range(P - fed, P - iw - 1)]  # context_warmup - 1 = 3 of them
    for c in list(range(P - iw - 1, P)) + [P]:  # the last iw + 1 prompt columns, then the first generated token
        expected += [("probe", c), ("biased", c)]
    assert log == expected


def test_lagged_runs_no_probe_and_reads_importance_from_its_full_passes():
    """Lagged: the importance-only columns as before, dynamic steps (probe + biased pass) on the prompt's
    DySCO columns, then one biased pass per generated token (capturing S), never a probe."""
    model, tokenizer = tiny_model("llama")
    config = DyscoConfig(head_set=_heads(model), context_warmup=4, intervention_warmup=2, selection="lagged")
    decoder = Decoder(model, tokenizer, dysco=config)
    P = 30
    log = _feed_log(decoder, list(range(10, 10 + P)), steps=3)
    expected = [("prefill", (0, P - 6))] + [("importance", c) for c in range(P - 6, P - 3)]
    expected += [step for c in range(P - 3, P) for step in (("probe", c), ("biased", c))]
    expected += [("biased", c) for c in range(P, P + 2)]
    assert log == expected
    # With no importance-only step the first DySCO step probes (a dynamic step), and only that one.
    decoder = Decoder(model, tokenizer, dysco=config.replace(context_warmup=0, intervention_warmup=0))
    log = _feed_log(decoder, list(range(10, 10 + P)), steps=3)
    assert log == [("prefill", (0, P)), ("probe", P), ("biased", P), ("biased", P + 1)]


@pytest.mark.parametrize("lagged_probs", ["plain", "biased"])
def test_lagged_degenerates_to_known_decoders(lagged_probs):
    """Strength 1 (no bias): lagged = dynamic = vanilla. Its prompt steps are dynamic steps, so the first token
    and its logits are dynamic DySCO's, bit for bit; the lag shows from the second token on."""
    model, tokenizer = tiny_model("qwen2")
    lagged = DyscoConfig(head_set=_heads(model), strength=3.0, top_p=0.6, top_k=6, context_warmup=5,
                         intervention_warmup=0, selection="lagged", lagged_probs=lagged_probs)
    got = Decoder(model, tokenizer, dysco=lagged).generate(PROMPTS, max_new_tokens=2, eos=[], return_logits=True)
    dynamic = Decoder(model, tokenizer, dysco=lagged.replace(selection="dynamic")).generate(
        PROMPTS, max_new_tokens=2, eos=[], return_logits=True)
    assert [ids[0] for ids in got.token_ids] == [ids[0] for ids in dynamic.token_ids]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got.logits, dynamic.logits))
    assert any((a[1] - b[1]).abs().max() > 1e-3 for a, b in zip(got.logits, dynamic.logits))  # the lag shows
    one = lagged.replace(strength=1.0, intervention_warmup="auto")
    vanilla = Decoder(model, tokenizer, method="vanilla").generate(PROMPTS, max_new_tokens=5, eos=[], return_logits=True)
    for config in (one, one.replace(selection="dynamic")):
        got = Decoder(model, tokenizer, dysco=config).generate(PROMPTS, max_new_tokens=5, eos=[], return_logits=True)
        assert got.token_ids == vanilla.token_ids
        for a, b in zip(got.logits, vanilla.logits):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_lagged_profile_round_trips_into_the_decoder(tmp_path):
    from registry import Knobs, ModelIdentity, Profile, Registry

    from decoder.loading import model_identity

    model, tokenizer = tiny_model("llama")
    identity = ModelIdentity(**model_identity(model, "tiny-llama"))
    knobs = Knobs(strength=3.0, top_k=7, context_warmup=4, selection="lagged", lagged_probs="biased")
    registry = Registry(tmp_path)
    ref = registry.register(Profile(model=identity, head_set=[(1, 0), (2, 3)], knobs=knobs))
    decoder = Decoder.from_profile(model, tokenizer, registry.load(ref))
    assert decoder.dysco == DyscoConfig(head_set=[(1, 0), (2, 3)], strength=3.0, top_k=7, context_warmup=4,
                                        selection="lagged", lagged_probs="biased")


def test_selection_recall_diagnostics_follow_the_evidence_through_padding():
    """evidence_* diagnostics: the same for a row alone and inside a left-padded batch; recall 1 when all is kept."""
    model, tokenizer = tiny_model("llama")
    short, long = list(range(50, 64)), list(range(10, 40))
    config = DyscoConfig(head_set=_heads(model), top_p=0.5, top_k=6, context_warmup=4, intervention_warmup=1)
    decoder = Decoder(model, tokenizer, dysco=config)
    alone = decoder.generate([short], max_new_tokens=3, eos=[], return_diagnostics=True, evidence=[[2, 3, 4]])
    batch = decoder.generate([long, short], max_new_tokens=3, eos=[], return_diagnostics=True, evidence=[[], [2, 3, 4]])
    for a, b in zip(alone.diagnostics[0], batch.diagnostics[1]):
        assert a.keys() == b.keys() and a["selected"] == b["selected"]
        for key in ("mass", "evidence_recall", "evidence_share", "evidence_importance"):
            assert a[key] == pytest.approx(b[key], abs=1e-5)
        assert 0.0 <= a["evidence_recall"] <= 1.0 and 0.0 <= a["evidence_share"] <= 1.0
    assert all(step["evidence_recall"] is None for step in batch.diagnostics[0])  # no evidence given
    everything = Decoder(model, tokenizer, dysco=config.replace(top_p=1.0, top_k=10_000))
    kept = everything.generate([short], max_new_tokens=2, eos=[], return_diagnostics=True, evidence=[[2, 3, 4]])
    for step in kept.diagnostics[0]:
        assert step["evidence_recall"] == 1.0
        assert step["evidence_share"] == pytest.approx(step["evidence_importance"] / step["mass"], rel=1e-5)
    with pytest.raises(ValueError, match="outside its prompt"):
        decoder.generate([short], max_new_tokens=1, evidence=[[99]])
