"""The fast path (decoder.fast) gives the exact path's results: same greedy tokens, logits within 1e-4.

On the CPU the fast path runs its PyTorch attention and no graphs; the Triton kernels are checked
against the PyTorch version under Triton's interpreter when Triton is installed (a subprocess, since
the interpreter is chosen when the kernels are defined). The GPU check on the real shape is in
benchmarks/decode_speed.py (it needs the H200).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from decoder.dysco import DyscoConfig
from decoder.fast import FastDecoder
from decoder.fast_kernels import LEVERS, decode_attention_torch
from decoder.generation import Decoder
from decoder.tiny import tiny_model

TOL = 1e-4  # float32 on the CPU: the two paths differ only in summation order

PROMPTS = [list(range(10, 40)), list(range(50, 62)), list(range(100, 103))]  # the last is shorter than the warmup

CASES = {
    "vanilla": ("vanilla", {}),
    "attnts": ("attnts", {"temperature": 0.7}),
    "dysco": ("dysco", {"dysco": DyscoConfig(head_set=[(1, 0), (2, 3), (3, 1)], top_k=5, top_p=0.9, context_warmup=4)}),
    "dysco_hard": ("dysco", {"dysco": DyscoConfig(head_set=[(1, 0), (3, 1)], strength=100.0, top_k=6, context_warmup=5)}),
    "dysco_static": ("dysco", {"dysco": DyscoConfig(head_set=[(1, 0), (3, 1)], selection="static", context_warmup=0)}),
    # Static after importance-only steps selects without a probe; intervention_warmup 2 instead of auto (9).
    "dysco_static_warm": ("dysco", {"dysco": DyscoConfig(head_set=[(1, 0), (3, 1)], selection="static", top_p=0.7,
                                                          context_warmup=6, intervention_warmup=2)}),
    "dysco_iw0": ("dysco", {"dysco": DyscoConfig(head_set=[(1, 0), (2, 3)], top_k=50, top_p=0.95, context_warmup=4,
                                                  intervention_warmup=0)}),
    # Lagged: no probe; plain and biased probabilities, soft and hard; the first step probes without importance.
    "dysco_lagged": ("dysco", {"dysco": DyscoConfig(head_set=[(1, 0), (2, 3), (3, 1)], top_k=5, top_p=0.9,
                                                     context_warmup=4, selection="lagged")}),
    "dysco_lagged_biased": ("dysco", {"dysco": DyscoConfig(head_set=[(1, 0), (2, 3), (3, 1)], top_k=5, top_p=0.9,
                                                            context_warmup=4, selection="lagged",
                                                            lagged_probs="biased", intervention_warmup=2)}),
    "dysco_lagged_hard": ("dysco", {"dysco": DyscoConfig(head_set=[(1, 0), (3, 1)], strength=100.0, top_k=6,
                                                          context_warmup=5, selection="lagged", lagged_probs="biased")}),
    "dysco_lagged_probe_first": ("dysco", {"dysco": DyscoConfig(head_set=[(1, 0), (3, 1)], context_warmup=0,
                                                                 selection="lagged", top_p=0.8)}),
}


def _compare(model, tok, method, kw, prompts, new=6, template_mask=None):
    exact = Decoder(model, tok, method, **kw).generate(prompts, max_new_tokens=new, return_logits=True, eos=[511],
                                                      template_mask=template_mask)
    fast = FastDecoder(model, tok, method, **kw).generate(prompts, max_new_tokens=new, return_logits=True, eos=[511],
                                                         template_mask=template_mask)
    assert fast.token_ids == exact.token_ids
    assert fast.finish_reasons == exact.finish_reasons
    for a, b in zip(exact.logits, fast.logits):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < TOL


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_matches_exact_qwen3(case, batch):
    model, tok = tiny_model("qwen3")
    method, kw = CASES[case]
    _compare(model, tok, method, kw, PROMPTS[:batch])


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "mistral", "phi3", "qwen2"])
@pytest.mark.parametrize("case", ["dysco", "dysco_lagged_biased"])
def test_fast_matches_exact_other_architectures(arch, case):
    """Gemma 3's sliding-window layers included (its window of 8 is shorter than the prompts)."""
    model, tok = tiny_model(arch)
    method, kw = CASES[case]
    _compare(model, tok, method, kw, PROMPTS)


def test_fast_lagged_runs_no_probe():
    """A lagged generation probes only on the prompt's DySCO steps; each generated token is one (full) pass."""
    model, tok = tiny_model("qwen3")
    fast = FastDecoder(model, tok, "dysco", dysco=CASES["dysco_lagged"][1]["dysco"])
    kinds = []
    step = fast._step
    fast._step = lambda shape, kind, *rest: (kinds.append(kind), step(shape, kind, *rest))[1]
    probes = []
    probe = fast._forward_probe
    fast._forward_probe = lambda *a: (probes.append(1), probe(*a))[1]
    fast.generate([PROMPTS[0]], max_new_tokens=5, eos=[])
    prompt_steps = fast.intervention_warmup + 1  # the last of them gives the first token
    assert len(probes) == prompt_steps
    assert kinds == ["warmup"] * 3 + ["dysco"] * prompt_steps + ["lagged"] * 4


@pytest.mark.parametrize("case", ["dysco", "dysco_hard", "dysco_static_warm", "dysco_lagged", "dysco_lagged_hard"])
def test_fast_template_rule_matches_exact(case):
    """With a template mask the fast path still matches: soft leaves template columns out, hard keeps them."""
    model, tok = tiny_model("qwen3")
    method, kw = CASES[case]
    masks = [[i % 3 == 0 for i in range(len(p))] for p in PROMPTS]
    _compare(model, tok, method, kw, PROMPTS, template_mask=masks)


def test_fast_vanilla_equals_transformers_generate():
    model, tok = tiny_model("qwen3")
    ids = torch.tensor([PROMPTS[0]])
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    out = FastDecoder(model, tok, "vanilla").generate_ids(ids, max_new_tokens=8)
    assert out.tokens.tolist() == ref[:, ids.shape[1]:].tolist()


def test_fast_leaves_the_model_as_it_was():
    model, tok = tiny_model("qwen3")
    before = model.config._attn_implementation
    ids = torch.tensor([PROMPTS[0]])
    logits = model(ids).logits
    FastDecoder(model, tok, "dysco", dysco=CASES["dysco"][1]["dysco"]).generate_ids(ids, max_new_tokens=3)
    assert model.config._attn_implementation == before
    assert torch.equal(model(ids).logits, logits)


def test_decode_attention_torch_reference():
    """The PyTorch decode attention equals plain softmax attention over columns 0..t with the bias."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 16), torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    bias = torch.randn(2, 50)
    bias[1, :4] = float("-inf")
    t = torch.tensor([30])
    got = decode_attention_torch(q, k, v, bias, t, 0.25)
    kk, vv = k.repeat_interleave(4, 1)[:, :, :31], v.repeat_interleave(4, 1)[:, :, :31]
    logits = torch.einsum("bhd,bhtd->bht", q, kk) * 0.25 + bias[:, None, :31]
    want = torch.einsum("bht,bhtd->bhd", logits.softmax(-1), vv)
    assert torch.allclose(got, want, atol=1e-5)


def test_errors():
    model, tok = tiny_model("qwen3")
    with pytest.raises(ValueError, match="method"):
        FastDecoder(model, tok, "greedy")
    with pytest.raises(ValueError, match="DyscoConfig"):
        FastDecoder(model, tok, "dysco")
    fast = FastDecoder(model, tok, "vanilla")
    with pytest.raises(ValueError, match="left padding"):
        fast.generate_ids(torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="context"):
        fast.generate_ids(torch.ones(1, 4000, dtype=torch.long), max_new_tokens=200)


_INTERPRETED = textwrap.dedent("""
    import numpy as np, torch
    from triton.runtime import interpreter as _i
    # numpy >= 2.3 refuses int() of a 1-element array, which Triton 3.6's interpreter uses for range() bounds.
    _orig = _i._patch_lang_tensor
    def _patched(tensor, scope):
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
    _i._patch_lang_tensor = _patched
    from decoder.fast_kernels import (decode_attention_torch, decode_attention_triton, decode_scores_torch,
                                      decode_scores_triton)
    torch.manual_seed(0)
    for B, H, KV, D, T, t, win, per_sm in [(1, 4, 2, 16, 300, 250, None, 4), (3, 8, 2, 32, 200, 199, None, 4),
                                            (2, 4, 1, 16, 130, 40, 17, 4), (1, 8, 2, 32, 3000, 2900, None, 40)]:
        q, k, v = torch.randn(B, H, D), torch.randn(B, KV, T, D), torch.randn(B, KV, T, D)
        bias = torch.randn(B, T); bias[0, :5] = float("-inf")
        tt = torch.tensor([t])
        rows = torch.full((H,), -1, dtype=torch.int32); rows[1] = 0; rows[H - 1] = 1
        s1 = torch.full((B, 2, T), 7.0); s2 = s1.clone()
        o1 = decode_attention_triton(q, k, v, bias, tt, 0.3, win, (rows, s1), programs_per_sm=per_sm)
        o2 = decode_attention_torch(q, k, v, bias, tt, 0.3, win, (rows, s2))
        lo = 0 if win is None else t - win + 1
        assert (o1 - o2).abs().max() < 1e-4, (o1 - o2).abs().max()
        assert (s1 - s2)[..., lo:t + 1].abs().max() < 1e-4
        assert (s1[..., t + 1:] == 7.0).all()
        # kv_write: the kernel writes this step's K/V at column t itself (new_v strided as the model's are).
        new_k, new_v = torch.randn(B, KV, D), torch.randn(B, 1, KV, D).transpose(1, 2)[:, :, 0]
        k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
        s3 = torch.full((B, 2, T), 7.0); s4 = s3.clone()
        o3 = decode_attention_triton(q, k1, v1, bias, tt, 0.3, win, (rows, s3), (new_k, new_v), programs_per_sm=per_sm)
        o4 = decode_attention_torch(q, k2, v2, bias, tt, 0.3, win, (rows, s4), (new_k, new_v))
        assert torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(k1[:, :, t], new_k)
        assert torch.equal(k1[:, :, :t], k[:, :, :t]) and torch.equal(k1[:, :, t + 1:], k[:, :, t + 1:])
        assert (o3 - o4).abs().max() < 1e-4 and not torch.allclose(o3, o1)
        assert (s3 - s4)[..., lo:t + 1].abs().max() < 1e-4
        # probe_tail: the capture alone, K/V column written the same way.
        k5, v5 = k.clone(), v.clone()
        s5 = torch.full((B, 2, T), 7.0)
        decode_scores_triton(q, k5, v5, tt, 0.3, (rows, s5), (new_k, new_v), programs_per_sm=per_sm)
        assert torch.equal(k5, k1) and torch.equal(v5, v1)
        assert (s5 - s4)[..., lo:t + 1].abs().max() < 1e-4 and (s5[..., t + 1:] == 7.0).all()
        s6 = torch.full((B, 2, T), 7.0)
        decode_scores_torch(q, k.clone(), v.clone(), tt, 0.3, (rows, s6), (new_k, new_v))
        assert (s5 - s6)[..., :t + 1].abs().max() < 1e-4
    print("ok")
""")


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[2])  # the repository root
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.embedded
@pytest.mark.parametrize("lagged_probs", ["plain", "biased"])
def test_fast_lagged_matches_exact_on_smollm2(smollm2, lagged_probs):
    """Real weights, a chat prompt (auto intervention warmup = 4) and a batch with padding: same tokens, close logits."""
    model, tok = smollm2
    prompts = [
        [{"role": "user", "content": "The secret number is 7319. Alice lives in Paris, Bob in Rome. What is the secret number?"}],
        [{"role": "user", "content": "Say hello."}],
    ]
    config = DyscoConfig(head_set=[(8, 2), (15, 4), (20, 1), (21, 7)], selection="lagged", lagged_probs=lagged_probs)
    exact = Decoder(model, tok, "dysco", dysco=config).generate(prompts, max_new_tokens=6, return_logits=True, eos=[])
    fast = FastDecoder(model, tok, "dysco", dysco=config).generate(prompts, max_new_tokens=6, return_logits=True, eos=[])
    assert fast.token_ids == exact.token_ids
    for a, b in zip(exact.logits, fast.logits):
        assert (a - b).abs().max().item() < 5e-4


def test_levers_unknown_name():
    model, tok = tiny_model("qwen3")
    with pytest.raises(ValueError, match="unknown levers.*kv_write"):
        FastDecoder(model, tok, "vanilla", levers={"kv_write", "warp_drive"})


def test_levers_from_the_environment(monkeypatch):
    """$DYSCO_FAST_LEVERS picks the default levers (a CLI run can drop one); a typo is named."""
    from decoder.fast_kernels import LEVERS

    model, tok = tiny_model("qwen3")
    monkeypatch.delenv("DYSCO_FAST_LEVERS", raising=False)
    assert FastDecoder(model, tok, "vanilla").run.levers == set(LEVERS) - {"kv_write"}  # measured slower on the H200
    monkeypatch.setenv("DYSCO_FAST_LEVERS", "all")
    assert FastDecoder(model, tok, "vanilla").run.levers == set(LEVERS)
    monkeypatch.setenv("DYSCO_FAST_LEVERS", "probe_tail, kv_write")
    assert FastDecoder(model, tok, "vanilla").run.levers == {"probe_tail", "kv_write"}
    monkeypatch.setenv("DYSCO_FAST_LEVERS", "none")
    assert FastDecoder(model, tok, "vanilla").run.levers == set()
    monkeypatch.setenv("DYSCO_FAST_LEVERS", "kv_writes")
    with pytest.raises(ValueError, match=r"DYSCO_FAST_LEVERS.*kv_writes"):
        FastDecoder(model, tok, "vanilla")


@pytest.mark.parametrize("levers", [(), ("kv_write",), ("probe_tail",)])
def test_fast_levers_off_matches_exact(levers):
    """With the K/V write and the probe tail each off (the PyTorch paths on the CPU), still the exact tokens."""
    model, tok = tiny_model("qwen3")
    method, kw = CASES["dysco"]
    exact = Decoder(model, tok, method, **kw).generate(PROMPTS, max_new_tokens=5, return_logits=True, eos=[])
    fast = FastDecoder(model, tok, method, levers=levers, **kw).generate(PROMPTS, max_new_tokens=5, return_logits=True,
                                                                          eos=[])
    assert fast.token_ids == exact.token_ids
    for a, b in zip(exact.logits, fast.logits):
        assert (a - b).abs().max().item() < TOL


@pytest.mark.parametrize("probe_tail", [True, False])
def test_probe_tail_skips_the_deepest_mlp(probe_tail):
    """probe_tail: the probe stops at the deepest layer's attention, so that layer's MLP runs in full passes only."""
    model, tok = tiny_model("qwen3")
    config = CASES["dysco"][1]["dysco"]
    levers = set(LEVERS) if probe_tail else set(LEVERS) - {"probe_tail"}
    fast = FastDecoder(model, tok, "dysco", dysco=config, levers=levers)
    calls = {"mlp": 0, "full": 0, "probe": 0}
    hook = model.model.layers[config.deepest_layer].mlp.register_forward_hook(
        lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1))
    for name in ("full", "probe"):
        method = getattr(fast, f"_forward_{name}")
        setattr(fast, f"_forward_{name}", lambda *a, m=method, n=name: (calls.__setitem__(n, calls[n] + 1), m(*a))[1])
    try:
        fast.generate_ids(torch.tensor([PROMPTS[0]]), max_new_tokens=4)
    finally:
        hook.remove()
    assert calls["probe"] > 0
    # The prefill runs the MLP once too.
    assert calls["mlp"] == 1 + calls["full"] + (0 if probe_tail else calls["probe"])


_INTERPRETED_FUSED = textwrap.dedent("""
    import torch
    from decoder.dysco import DyscoConfig
    from decoder.fast import FastDecoder
    from decoder.fast_fused import add_rmsnorm, gemv, silu_mul_halves
    from decoder.generation import Decoder
    from decoder.tiny import tiny_model
    torch.manual_seed(0)
    # splitk_gemv: split 1 writes directly, more splits reduce their partial sums; a K not divisible by the tile.
    for m, n, k, split, bias in [(1, 96, 64, 2, False), (3, 100, 300, 3, True), (16, 48, 64, 1, True)]:
        x, w, b = torch.randn(m, k), torch.randn(n, k), (torch.randn(n) if bias else None)
        got = gemv(x, w, b, split_k=split, block_k=64, block_n=32)
        assert (got - torch.nn.functional.linear(x, w, b)).abs().max() < 1e-4, (m, n, k, split)
    model, tok = tiny_model("qwen3")
    norm = model.model.layers[0].post_attention_layernorm
    norm.weight.data.uniform_(0.5, 1.5)
    x, r = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    total, normed = add_rmsnorm(x, r, norm)
    assert torch.equal(total, r + x) and (normed - norm(r + x)).abs().max() < 1e-5
    gu = torch.randn(2, 1, 256)
    want = torch.nn.functional.silu(gu[..., :128]) * gu[..., 128:]
    assert (silu_mul_halves(gu) - want).abs().max() < 1e-5
    # Every lever on, the fused ops included: the exact path's tokens and logits, padding rows included.
    prompts = [list(range(10, 30)), list(range(50, 58)), list(range(100, 103))]
    config = DyscoConfig(head_set=[(1, 0), (2, 3), (3, 1)], top_k=5, top_p=0.9, context_warmup=4)
    exact = Decoder(model, tok, "dysco", dysco=config).generate(prompts, max_new_tokens=4, return_logits=True, eos=[])
    before = model(torch.tensor([prompts[0]])).logits
    fast = FastDecoder(model, tok, "dysco", dysco=config, fuse=True)
    summary = fast.run.fused.summary()
    for label in ("gate/up GEMV (gate_up)", "Triton GEMV (splitk_gemv)", "decoder layer with add+norm (add_norm)",
                  "final norm from the last add (add_norm)"):
        assert summary.get(label), (label, summary)
    out = fast.generate(prompts, max_new_tokens=4, return_logits=True, eos=[])
    assert out.token_ids == exact.token_ids
    assert max((a - b).abs().max().item() for a, b in zip(exact.logits, out.logits)) < 1e-4
    # gate_up shares one tensor between gate and up instead of copying them: the model is unchanged.
    mlp = model.model.layers[0].mlp
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_proj.weight.data_ptr() + mlp.gate_proj.weight.numel() * 4
    assert torch.equal(model(torch.tensor([prompts[0]])).logits, before)
    print("ok")
""")


def test_fused_levers_under_interpreter():
    """The fused-op levers (gate_up, add_norm, splitk_gemv) on a whole generation, kernels interpreted."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _INTERPRETED_FUSED], env=env, capture_output=True, text=True,
                            timeout=900, cwd=Path(__file__).resolve().parents[2])  # the repository root
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]

# --------------------------------------------------------------------------------------------------
# The batched (masked) prefill of a left-padded batch
# --------------------------------------------------------------------------------------------------


def _padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_padded_prefill_writes_what_each_row_alone_writes(arch):
    """One masked forward for the batch = each row prefilled alone (positions from 0 at its first real
    token): the same K/V in its real columns, zeros in its padding, the same last logits; no NaN."""
    model, tok = tiny_model(arch)  # gemma3_text: sliding window 8, shorter than the longest prompt
    prompts = [list(range(10, 40)), list(range(50, 62)), list(range(100, 103))]
    ids, mask = _padded(prompts)
    fast = FastDecoder(model, tok, "vanilla")
    batch = fast.prefill_ids(ids, mask, warmup=0)
    for row, prompt in enumerate(prompts):
        alone = fast.prefill_ids(torch.tensor([prompt]), warmup=0)
        pad = ids.shape[1] - len(prompt)
        for layer in batch.k:
            for got, want in ((batch.k[layer], alone.k[layer]), (batch.v[layer], alone.v[layer])):
                assert torch.isfinite(got).all()
                assert (got[row, :, :pad] == 0).all()
                assert (got[row, :, pad:] - want[0]).abs().max().item() < 1e-5
        assert (batch.last_logits[row] - alone.last_logits[0]).abs().max().item() < TOL


def test_padded_prefill_in_query_blocks(monkeypatch):
    """A mask too big for one SDPA call runs in query blocks: same tokens and logits as the exact path."""
    import decoder.fast as fast_module

    monkeypatch.setattr(fast_module, "_MASK_BUDGET", 3 * 30 * 7)  # blocks of 7 query rows for 3 rows × 30 columns
    model, tok = tiny_model("gemma3_text")
    for case in ("vanilla", "dysco"):
        method, kw = CASES[case]
        _compare(model, tok, method, kw, PROMPTS)


def test_padded_prefill_runs_one_forward():
    """A padded batch is prefilled by one model forward, not one per row."""
    model, tok = tiny_model("qwen3")
    fast = FastDecoder(model, tok, "vanilla")
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        fast.prefill_ids(*_padded(PROMPTS), warmup=0)
    finally:
        handle.remove()
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------------
# Prefill once, generate many times (calibration trials)
# --------------------------------------------------------------------------------------------------

SHARED_WARMUP = 16  # at least every case's context + intervention warmup below (auto = 9 on the tiny template)


@pytest.mark.parametrize("case", ["vanilla", "dysco", "dysco_hard", "dysco_static", "dysco_static_warm", "dysco_iw0",
                                  "dysco_lagged", "dysco_lagged_probe_first"])
def test_generate_from_shared_prefill_matches_from_scratch(case):
    """One plain prefill up to the longest warmup, then any method from it: the tokens of a generation
    from scratch (fast and exact) and logits within tolerance; the state is left as it was."""
    model, tok = tiny_model("qwen3")
    method, kw = CASES[case]
    state = FastDecoder(model, tok, "vanilla").prefill(PROMPTS, warmup=SHARED_WARMUP, max_new_tokens=6)
    before = {layer: k.clone() for layer, k in state.k.items()}
    fast = FastDecoder(model, tok, method, **kw)
    got = fast.generate_from(state, max_new_tokens=6, return_logits=True, eos=[511])
    scratch = fast.generate(PROMPTS, max_new_tokens=6, return_logits=True, eos=[511])
    exact = Decoder(model, tok, method, **kw).generate(PROMPTS, max_new_tokens=6, return_logits=True, eos=[511])
    assert got.token_ids == scratch.token_ids == exact.token_ids
    assert got.prompt_ids == exact.prompt_ids
    for a, b in zip(exact.logits, got.logits):
        assert (a - b).abs().max().item() < TOL
    assert all(torch.equal(state.k[layer], k) for layer, k in before.items())


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen2"])
def test_generate_from_shared_prefill_other_architectures(arch):
    """The columns between the shared prefill and a decoder's own warmup are prefilled over the restored
    prefix (sliding-window layers keep their window): from-scratch tokens, exact-path logits."""
    model, tok = tiny_model(arch)
    state = FastDecoder(model, tok, "vanilla").prefill(PROMPTS, warmup=SHARED_WARMUP, max_new_tokens=6)
    for case in ("vanilla", "dysco_lagged_biased"):
        method, kw = CASES[case]
        got = FastDecoder(model, tok, method, **kw).generate_from(state, max_new_tokens=6, return_logits=True, eos=[])
        exact = Decoder(model, tok, method, **kw).generate(PROMPTS, max_new_tokens=6, return_logits=True, eos=[])
        assert got.token_ids == exact.token_ids
        for a, b in zip(exact.logits, got.logits):
            assert (a - b).abs().max().item() < TOL


def test_generate_from_one_state_many_trials():
    """Trials in a row from one state (different knobs, different decoders) each give their own from-scratch tokens."""
    model, tok = tiny_model("qwen3")
    state = FastDecoder(model, tok, "vanilla").prefill(PROMPTS, warmup=SHARED_WARMUP, max_new_tokens=5)
    for strength, top_p in [(2.0, 0.9), (100.0, 0.5), (1.5, 0.99), (2.0, 0.9)]:
        config = DyscoConfig(head_set=[(1, 0), (2, 3)], strength=strength, top_p=top_p, context_warmup=4)
        fast = FastDecoder(model, tok, "dysco", dysco=config)
        assert fast.generate_from(state, max_new_tokens=5).token_ids == fast.generate(PROMPTS, max_new_tokens=5).token_ids
    vanilla = FastDecoder(model, tok, "vanilla")
    assert vanilla.generate_from(state, max_new_tokens=5).token_ids == vanilla.generate(PROMPTS, max_new_tokens=5).token_ids


def test_generate_from_refuses_what_the_state_cannot_continue():
    model, tok = tiny_model("qwen3")
    state = FastDecoder(model, tok, "vanilla").prefill(PROMPTS, warmup=2)
    with pytest.raises(ValueError, match="warmup >= 13"):  # context 4 + auto 9
        FastDecoder(model, tok, "dysco", dysco=CASES["dysco"][1]["dysco"]).generate_from(state)
    with pytest.raises(ValueError, match="AttnTS changes the prefill"):
        FastDecoder(model, tok, "attnts", temperature=0.7).generate_from(state)
    attnts = FastDecoder(model, tok, "attnts", temperature=0.7)
    hot = attnts.prefill(PROMPTS, max_new_tokens=4)
    assert attnts.generate_from(hot, max_new_tokens=4).token_ids == attnts.generate(PROMPTS, max_new_tokens=4).token_ids
    other, other_tok = tiny_model("llama")
    with pytest.raises(ValueError, match="another model"):
        FastDecoder(other, other_tok, "vanilla").generate_from(state)


# --------------------------------------------------------------------------- selection diagnostics

EVIDENCE = [[3, 4, 5, 20], [], [0, 2]]  # per prompt of PROMPTS: the middle row has none (its fields are None)

DIAGNOSTIC_CASES = {
    **{name: case for name, case in CASES.items() if case[0] == "dysco"},
    # No fed span: the first token comes from the plain prefill, so it has no diagnostics (one fewer than tokens).
    "dysco_plain_first": ("dysco", {"dysco": DyscoConfig(head_set=[(1, 0), (2, 3)], top_p=0.8, context_warmup=0,
                                                          intervention_warmup=0)}),
}


def _same_diagnostics(exact, fast, tol=TOL):
    """Same tokens; per row the same number of diagnosed steps, the same `selected`, the floats within `tol`."""
    assert fast.token_ids == exact.token_ids
    assert len(fast.diagnostics) == len(exact.diagnostics)
    for a, b in zip(exact.diagnostics, fast.diagnostics):
        assert len(b) == len(a)
        for x, y in zip(a, b):
            assert y.keys() == x.keys()
            assert y["selected"] == x["selected"]
            for name, value in x.items():
                assert (y[name] is None) == (value is None), name
                if value is not None:
                    assert abs(y[name] - value) < tol, (name, value, y[name])


@pytest.mark.parametrize("case", list(DIAGNOSTIC_CASES))
def test_fast_selection_diagnostics_match_exact(case):
    """`return_diagnostics=True, evidence=…`: per row, per DySCO step, the exact path's diagnostics (dynamic,
    lagged, static, hard; a padded batch with a template mask; a row that stops at EOS keeps its own steps)."""
    model, tok = tiny_model("qwen3")
    method, kw = DIAGNOSTIC_CASES[case]
    masks = [[i % 3 == 0 for i in range(len(p))] for p in PROMPTS]
    run = dict(max_new_tokens=6, return_diagnostics=True, template_mask=masks)
    # The short row's second token as EOS: that row stops after at most two tokens, before the others.
    stop = Decoder(model, tok, method, **kw).generate(PROMPTS, eos=[], **run).token_ids[2][1]
    run["eos"] = [stop]
    exact = Decoder(model, tok, method, **kw).generate(PROMPTS, evidence=EVIDENCE, **run)
    fast = FastDecoder(model, tok, method, **kw)
    _same_diagnostics(exact, fast.generate(PROMPTS, evidence=EVIDENCE, **run))
    # Without evidence: only `selected` and `mass`, as on the exact path.
    plain = fast.generate(PROMPTS, **run)
    _same_diagnostics(Decoder(model, tok, method, **kw).generate(PROMPTS, **run), plain)
    assert all(set(step) == {"selected", "mass"} for row in plain.diagnostics for step in row)
    lengths = [len(row) for row in exact.token_ids]
    assert lengths[2] <= 2 < max(lengths)  # a row did stop early
    first_plain = case == "dysco_plain_first"
    assert [len(row) for row in exact.diagnostics] == [n - first_plain for n in lengths]


def test_fast_selection_diagnostics_from_a_shared_prefill():
    """`generate_from` a plain prefill kept for many trials: each trial's diagnostics are the exact path's."""
    model, tok = tiny_model("qwen3")
    state = FastDecoder(model, tok, "vanilla").prefill(PROMPTS, warmup=SHARED_WARMUP, max_new_tokens=5)
    for case in ("dysco", "dysco_static_warm", "dysco_lagged"):
        method, kw = CASES[case]
        exact = Decoder(model, tok, method, **kw).generate(PROMPTS, max_new_tokens=5, eos=[], return_diagnostics=True,
                                                          evidence=EVIDENCE)
        fast = FastDecoder(model, tok, method, **kw).generate_from(state, max_new_tokens=5, eos=[],
                                                                  return_diagnostics=True, evidence=EVIDENCE)
        _same_diagnostics(exact, fast)


def test_fast_selection_diagnostics_other_methods_and_bad_evidence(monkeypatch):
    """Vanilla and AttnTS have no diagnostics (None, as on the exact path); bad evidence is refused before any forward."""
    model, tok = tiny_model("qwen3")
    for method, kw in (CASES["vanilla"], CASES["attnts"]):
        assert FastDecoder(model, tok, method, **kw).generate(PROMPTS, max_new_tokens=2, return_diagnostics=True,
                                                              evidence=EVIDENCE).diagnostics is None
    fast = FastDecoder(model, tok, "dysco", dysco=CASES["dysco"][1]["dysco"])
    assert fast.generate(PROMPTS, max_new_tokens=2).diagnostics is None  # not asked for
    monkeypatch.setattr(fast, "_prefill", lambda *a, **k: pytest.fail("prefilled before checking the evidence"))
    with pytest.raises(ValueError, match="evidence row 2 has position 3 outside its prompt of 3 tokens"):
        fast.generate(PROMPTS, evidence=[[0], [1], [3]], return_diagnostics=True)
    with pytest.raises(ValueError, match="evidence has 2 rows for a batch of 3 prompts"):
        fast.generate(PROMPTS, evidence=[[0], [1]], return_diagnostics=True)
    with pytest.raises(ValueError, match=r"evidence must be a bool mask shaped like input_ids \(1, 30\)"):
        fast.generate_ids(torch.tensor([PROMPTS[0]]), evidence=torch.ones(1, 29, dtype=torch.bool))


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every ATen op run inside it."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["dysco_lagged", "dysco_static_warm"])
def test_fast_default_path_does_no_diagnostic_work(case):
    """Diagnostics off, a generation runs the same ops (what a CUDA graph of each step captures) whether or not
    this decoder ever made diagnostics; with them on it runs more (so the trace does see them)."""
    model, tok = tiny_model("qwen3")
    fast = FastDecoder(model, tok, "dysco", dysco=CASES[case][1]["dysco"])
    ids = torch.tensor([PROMPTS[0], PROMPTS[0]])
    fast.generate_ids(ids, max_new_tokens=4)  # buffers allocated: the traces below are generations alone
    traces = {}
    for name, kw in (("before", {}), ("on", {"return_diagnostics": True}), ("after", {})):
        with _Ops() as ops:
            fast.generate_ids(ids, max_new_tokens=4, **kw)
        traces[name] = ops.ops
    assert traces["after"] == traces["before"]
    assert len(traces["on"]) > len(traces["before"]) and "aten.index_copy_.default" in set(traces["on"])


@pytest.mark.embedded
@pytest.mark.parametrize("selection", ["dynamic", "lagged", "static"])
def test_fast_selection_diagnostics_match_exact_on_smollm2(smollm2, selection):
    """Real weights, chat prompts (auto intervention warmup = 4) in a padded batch, the evidence on a sentence."""
    model, tok = smollm2
    prompts = [
        [{"role": "user", "content": "The secret number is 7319. Alice lives in Paris, Bob in Rome. What is the secret number?"}],
        [{"role": "user", "content": "Bob lives in Rome. Where does Bob live?"}],
    ]
    evidence = [list(range(24, 34)), list(range(24, 29))]  # "The secret number is 7319.", "Bob lives in Rome."
    config = DyscoConfig(head_set=[(8, 2), (15, 4), (20, 1), (21, 7)], selection=selection, top_p=0.9)
    run = dict(max_new_tokens=5, eos=[], return_diagnostics=True, evidence=evidence)
    exact = Decoder(model, tok, "dysco", dysco=config).generate(prompts, **run)
    fast = FastDecoder(model, tok, "dysco", dysco=config).generate(prompts, **run)
    _same_diagnostics(exact, fast, tol=5e-4)
    assert all(step["evidence_importance"] > 0 for row in fast.diagnostics for step in row)


@pytest.mark.gpu
def test_fast_selection_diagnostics_under_cuda_graphs():
    """On a GPU: the diagnostics replayed from their own graphs equal the eager fast path's, the default graphs
    stay the ones captured before, and the tokens do not change."""
    model, tok = tiny_model("qwen3")
    model = model.to("cuda")
    config = CASES["dysco_lagged"][1]["dysco"]
    graphs = FastDecoder(model, tok, "dysco", dysco=config, cuda_graphs=True)
    eager = FastDecoder(model, tok, "dysco", dysco=config, cuda_graphs=False)
    plain = graphs.generate(PROMPTS, max_new_tokens=6, eos=[])
    default = dict(graphs._shape.graphs)
    assert set(default) == {(kind, False) for kind in graphs._step_kinds()}
    run = dict(max_new_tokens=6, eos=[], return_diagnostics=True, evidence=EVIDENCE)
    got = graphs.generate(PROMPTS, **run)
    assert got.token_ids == plain.token_ids
    assert all(graphs._shape.graphs[key] is graph for key, graph in default.items())
    assert {key for key in graphs._shape.graphs if key[1]} == {("dysco", True), ("lagged", True)}
    _same_diagnostics(eager.generate(PROMPTS, **run), got)
    assert graphs.generate(PROMPTS, max_new_tokens=6, eos=[]).token_ids == plain.token_ids
