"""Decode attention for one query token over a preallocated KV cache, with an additive bias.

One function, `decode_attention`, two implementations with the same contract:

- on CUDA, a Triton split-KV kernel ("flash decoding"): each program takes one KV head of one batch
  row and one chunk of the cache, computes the scores of all the query heads that share that KV head
  (GQA packing: K and V are read once, never repeated per query head), keeps a running max and sum,
  and writes a partial result; a second small kernel merges the chunks. Decode attention is bound by
  reading K and V, so the split keeps every SM busy even at batch 1;
- elsewhere, a plain PyTorch version (matmul, softmax, matmul) that the tests use as the reference.

Contract, for every implementation:

    q       [batch, heads, head_dim]                 the current token's queries (after RoPE)
    k, v    [batch, kv_heads, max_len, head_dim]     the cache buffers; columns 0..t are valid
    bias    [batch, max_len] float32 or None         added to every head's logits (-inf masks a column)
    t       int64 tensor [1]                         the current column (its key is already written)
    scale   float                                    logit scale (1/sqrt(d) / temperature)
    window  int or None                              sliding window: columns <= t - window are masked
    capture optional (head_to_row [heads] int32, scores [batch, rows, max_len] float32): the raw
            scaled logits q.k*scale (no bias) of the heads with head_to_row >= 0 are written to
            scores[:, head_to_row[h], :t+1]; columns past t are left as they were.
    new_kv  optional (k_new, v_new) [batch, kv_heads, head_dim]: this step's key and value, written to
            column t by the call itself (the Triton kernel stores them from the program that reads column
            t, so no separate copy kernel runs); without it column t must already hold them.

Returns the attention output [batch, heads, head_dim] in q's dtype.

`decode_scores` is the capture alone (the probe's deepest layer needs nothing else): it reads K only,
only for the KV heads that feed a captured head, and returns nothing.

The fast path's optional speed-ups ("levers") are named once here, in `LEVERS`; `FastDecoder(levers=...)`
picks a subset and `benchmarks/levers.py` measures each one's share.
"""

from __future__ import annotations

import math

import torch

try:  # Triton is optional: CPU installs run the PyTorch version.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

__all__ = ["decode_attention", "decode_attention_torch", "decode_scores", "decode_scores_torch", "HAVE_TRITON",
           "LEVERS", "LEVERS_ENV", "DEFAULT_LEVERS", "default_levers", "triton_usable"]

_LOG2E = 1.4426950408889634

LEVERS = {
    "gate_up": "gate and up projections as one GEMV over a shared weight, SiLU*mul reading its halves",
    "kv_write": "the step's K/V column written inside the decode attention kernel (no index_copy_ per layer)",
    "probe_tail": "the probe stops at the deepest layer's captured logits (no V read, o_proj, MLP or final norm)",
    "add_norm": "residual add + the next RMSNorm in one kernel (Llama/Qwen2/Qwen3/Mistral decoder layers)",
    "splitk_gemv": "a split-K Triton GEMV for the decode-time q/k/v and o projections",
}
"""Every optional speed-up of the fast path, name -> what it does; each is exact (same function)."""

LEVERS_ENV = "DYSCO_FAST_LEVERS"

# On by default: every lever but kv_write, which made a 128K DySCO step 2.97 ms slower on the H200
# (docs/gpu_notes.md, "Levers": storing the new column from inside the split kernel costs more than the
# two index_copy_ it saves).
DEFAULT_LEVERS = frozenset(LEVERS) - {"kv_write"}


def default_levers() -> frozenset[str]:
    """The levers a FastDecoder uses when none are given: DEFAULT_LEVERS, or the comma list in
    $DYSCO_FAST_LEVERS ("none" for none, "all" for all), so a CLI or benchmark run can switch one."""
    import os

    text = os.environ.get(LEVERS_ENV)
    if text is None:
        return DEFAULT_LEVERS
    if text.strip() == "all":
        return frozenset(LEVERS)
    names = frozenset(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none")
    if not names <= LEVERS.keys():
        raise ValueError(f"${LEVERS_ENV}: unknown levers {sorted(names - LEVERS.keys())}; the levers are "
                         f"{', '.join(LEVERS)} (or 'none')")
    return names


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernel can run on `device` (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    import os

    if not HAVE_TRITON:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _write_column(k, v, t, new_kv) -> None:
    if new_kv is not None:
        k.index_copy_(2, t, new_kv[0][:, :, None])
        v.index_copy_(2, t, new_kv[1][:, :, None])


def _logits_torch(q, k, scale) -> torch.Tensor:
    """Raw scaled logits [batch, kv_heads, group, max_len] (float32), one matmul per KV head group."""
    batch, heads, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.view(batch, kv_heads, heads // kv_heads, dim)
    return torch.matmul(qg, k.transpose(-1, -2)).float() * scale


def _capture_torch(logits, t, capture) -> None:
    head_to_row, scores = capture
    batch, max_len = logits.shape[0], logits.shape[-1]
    rows = head_to_row.view(-1).long()
    picked = (rows >= 0).nonzero().flatten()
    flat = logits.view(batch, rows.shape[0], max_len)
    cols = torch.arange(max_len, device=logits.device) <= t
    new = flat.index_select(1, picked)
    old = scores.index_select(1, rows[picked])
    scores.index_copy_(1, rows[picked], torch.where(cols, new, old))


def decode_scores_torch(q, k, v, t, scale, capture, new_kv=None) -> None:
    """Reference `decode_scores` in plain PyTorch."""
    _write_column(k, v, t, new_kv)
    _capture_torch(_logits_torch(q, k, scale), t, capture)


def decode_attention_torch(q, k, v, bias, t, scale, window=None, capture=None, new_kv=None) -> torch.Tensor:
    """Reference decode attention in plain PyTorch (same contract as `decode_attention`)."""
    _write_column(k, v, t, new_kv)
    batch, heads, dim = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    logits = _logits_torch(q, k, scale)  # [batch, kv_heads, group, max_len]
    columns = torch.arange(max_len, device=q.device)
    if capture is not None:
        _capture_torch(logits, t, capture)
    visible = columns <= t
    if window is not None:
        visible = visible & (columns > t - window)
    if bias is not None:
        # The current column is never masked: a padding row's query then sees itself only.
        bias = torch.where((columns == t) & torch.isneginf(bias), 0.0, bias)
        logits = logits + bias[:, None, None, :]
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [batch, kv_heads, group, dim]
    return out.reshape(batch, heads, dim)


if HAVE_TRITON:

    @triton.jit
    def _split_kernel(
        Q, K, V, Bias, Tcur, Acc, M, L, HeadRow, Scores, Knew, Vnew,
        stride_qb, stride_qh,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_bb, stride_sb, stride_sr,
        stride_ab, stride_ah, stride_as,
        stride_mb, stride_mh,
        stride_nkb, stride_nkh, stride_nvb, stride_nvh,
        scale, window, chunk,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
        DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CAPTURE: tl.constexpr,
        WRITE_KV: tl.constexpr, PRECISION: tl.constexpr,
    ):
        EVEN_D: tl.constexpr = DIM == D_PAD
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // KV_HEADS
        kvh = pid % KV_HEADS
        t = tl.load(Tcur).to(tl.int32)
        start = split * chunk
        end = tl.minimum(start + chunk, t + 1)
        lo = start
        if HAS_WINDOW:
            first = t - window + 1
            lo = tl.maximum(start, (first // BLOCK_N) * BLOCK_N)
        else:
            first = 0

        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        heads = kvh * GROUP + offs_g  # [G_PAD] query heads sharing this KV head
        g_ok = offs_g < GROUP
        if EVEN_D:
            d_ok = tl.full([D_PAD], 1, tl.int1)
        else:
            d_ok = offs_d < DIM
        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [G_PAD, D_PAD]
        if HAS_CAPTURE:
            rows = tl.load(HeadRow + heads, mask=g_ok, other=-1)  # [G_PAD]

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        if WRITE_KV:
            # The program whose chunk holds column t stores this step's K/V there; every tile uses the new
            # values at t straight from registers, so no load depends on that store.
            k_new = tl.load(Knew + b * stride_nkb + kvh * stride_nkh + offs_d, mask=d_ok, other=0.0)  # [D_PAD]
            v_new = tl.load(Vnew + b * stride_nvb + kvh * stride_nvh + offs_d, mask=d_ok, other=0.0)
            at_t = offs_d * 0 + t  # [D_PAD]: a vector, so that the store's mask is one too
            owner = d_ok & (at_t >= start) & (at_t < start + chunk)
            tl.store(k_base + t * stride_kt + offs_d, k_new, mask=owner)
            tl.store(v_base + t * stride_vt + offs_d, v_new, mask=owner)
        for n0 in range(lo, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            if HAS_WINDOW:
                valid = (offs_n < end) & (offs_n >= first)
            else:
                valid = offs_n < end
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :],
                        mask=valid[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, D_PAD]
            if WRITE_KV:
                k = tl.where((offs_n == t)[:, None], k_new[None, :], k)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G_PAD, BLOCK_N] natural-log logits
            if HAS_CAPTURE:
                tl.store(Scores + b * stride_sb + rows[:, None] * stride_sr + offs_n[None, :], qk,
                         mask=(rows[:, None] >= 0) & (offs_n[None, :] < end))
            s = qk
            if HAS_BIAS:
                bias = tl.load(Bias + b * stride_bb + offs_n, mask=valid, other=0.0)
                # The current column is never masked: a padding row's query then sees itself only.
                bias = tl.where((offs_n == t) & (bias == float("-inf")), 0.0, bias)
                s = s + bias[None, :]
            s = tl.where(valid[None, :], s * 1.4426950408889634, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A block whose every column is masked leaves m at -inf: shift by 0 there, never by -inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :],
                        mask=valid[:, None] & d_ok[None, :], other=0.0)
            if WRITE_KV:
                v = tl.where((offs_n == t)[:, None], v_new[None, :], v)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        a_ptr = Acc + b * stride_ab + heads[:, None] * stride_ah + split * stride_as + offs_d[None, :]
        tl.store(a_ptr, acc, mask=g_ok[:, None] & d_ok[None, :])
        ml_off = b * stride_mb + heads * stride_mh + split
        tl.store(M + ml_off, m_i, mask=g_ok)
        tl.store(L + ml_off, l_i, mask=g_ok)

    @triton.jit
    def _merge_kernel(
        Acc, M, L, Out,
        stride_ab, stride_ah, stride_as,
        stride_mb, stride_mh,
        stride_ob, stride_oh,
        HEADS: tl.constexpr, SPLITS: tl.constexpr, S_PAD: tl.constexpr, S_BLOCK: tl.constexpr,
        DIM: tl.constexpr, D_PAD: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // HEADS
        h = pid % HEADS
        offs_all = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < DIM
        ml = M + b * stride_mb + h * stride_mh
        m_max = tl.max(tl.load(ml + offs_all, mask=offs_all < SPLITS, other=float("-inf")), 0)
        acc = tl.zeros([D_PAD], tl.float32)
        total = 0.0
        for s0 in range(0, SPLITS, S_BLOCK):  # a few splits at a time: no register spills at 100+ splits
            offs_s = s0 + tl.arange(0, S_BLOCK)
            s_ok = offs_s < SPLITS
            m = tl.load(ml + offs_s, mask=s_ok, other=float("-inf"))
            l = tl.load(L + b * stride_mb + h * stride_mh + offs_s, mask=s_ok, other=0.0)
            w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))  # [S_BLOCK]
            part = tl.load(Acc + b * stride_ab + h * stride_ah + offs_s[:, None] * stride_as + offs_d[None, :],
                           mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.sum(part * w[:, None], 0)
            total += tl.sum(l * w, 0)
        tl.store(Out + b * stride_ob + h * stride_oh + offs_d, (acc / total).to(Out.dtype.element_ty), mask=d_ok)


    @triton.jit
    def _scores_kernel(
        Q, K, V, Tcur, HeadRow, Scores, Knew, Vnew,
        stride_qb, stride_qh,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_sb, stride_sr,
        stride_nkb, stride_nkh, stride_nvb, stride_nvh,
        scale, chunk,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
        DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        WRITE_KV: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // KV_HEADS
        kvh = pid % KV_HEADS
        t = tl.load(Tcur).to(tl.int32)
        start = split * chunk
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        heads = kvh * GROUP + offs_g
        g_ok = offs_g < GROUP
        d_ok = offs_d < DIM
        rows = tl.load(HeadRow + heads, mask=g_ok, other=-1)  # [G_PAD]
        # A KV head that feeds no captured head reads nothing: its loop is empty.
        end = tl.where(tl.max(rows, 0) >= 0, tl.minimum(start + chunk, t + 1), start)
        k_base = K + b * stride_kb + kvh * stride_kh
        if WRITE_KV:
            k_new = tl.load(Knew + b * stride_nkb + kvh * stride_nkh + offs_d, mask=d_ok, other=0.0)
            v_new = tl.load(Vnew + b * stride_nvb + kvh * stride_nvh + offs_d, mask=d_ok, other=0.0)
            at_t = offs_d * 0 + t  # [D_PAD]: a vector, so that the store's mask is one too
            owner = d_ok & (at_t >= start) & (at_t < start + chunk)
            tl.store(k_base + t * stride_kt + offs_d, k_new, mask=owner)
            tl.store(V + b * stride_vb + kvh * stride_vh + t * stride_vt + offs_d, v_new, mask=owner)
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [G_PAD, D_PAD]
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :],
                        mask=valid[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, D_PAD]
            if WRITE_KV:
                k = tl.where((offs_n == t)[:, None], k_new[None, :], k)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G_PAD, BLOCK_N]
            tl.store(Scores + b * stride_sb + rows[:, None] * stride_sr + offs_n[None, :], qk,
                     mask=(rows[:, None] >= 0) & valid[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SM_COUNT: dict[int, int] = {}


# Tile and launch shape of the split kernel; benchmarks/decode_speed.py --kernels sweeps the choices.
# Measured on an H200 (docs/gpu_notes.md): 128-column tiles, 4 warps, ~4 programs per SM; a third
# pipeline stage pays on long chunks (128K: 133 vs 147 µs a layer) and costs on short ones (16K: 30 vs 26).
CONFIG = {"block_n": 128, "num_warps": 4, "num_stages": None, "programs_per_sm": 4}
LONG_CACHE = 49152  # from this many columns on, three stages


def _splits(batch: int, kv_heads: int, max_len: int, block_n: int, device: torch.device,
            programs_per_sm: int = 4) -> tuple[int, int]:
    """How many chunks to cut the cache into, and the chunk length (a multiple of block_n)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        target = programs_per_sm * _SM_COUNT[index]  # a few programs per SM hide the memory latency
    else:
        target = 2 * programs_per_sm  # the interpreter: a few programs, enough to test the merge
    blocks = math.ceil(max_len / block_n)
    splits = max(1, min(blocks, 256, math.ceil(target / (batch * kv_heads))))
    chunk = math.ceil(blocks / splits) * block_n
    splits = math.ceil(max_len / chunk)
    return splits, chunk


class _Scratch:
    """Partial results of the split kernel, reused across calls of the same shape (graph-safe)."""

    def __init__(self):
        self.buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def get(self, batch, heads, splits, dim, device):
        key = (batch, heads, splits, dim, device)
        if key not in self.buffers:
            acc = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=device)
            m = torch.empty(batch, heads, splits, dtype=torch.float32, device=device)
            l = torch.empty(batch, heads, splits, dtype=torch.float32, device=device)
            self.buffers[key] = (acc, m, l)
        return self.buffers[key]


_SCRATCH = _Scratch()


def _new_kv_args(new_kv, dummy) -> tuple:
    """(k_new, v_new, their batch and head strides) for the kernels; dummies when there is none."""
    if new_kv is None:
        return dummy, dummy, 0, 0, 0, 0
    k_new, v_new = (x if x.stride(-1) == 1 else x.contiguous() for x in new_kv)
    return k_new, v_new, k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1)


def decode_attention_triton(q, k, v, bias, t, scale, window=None, capture=None, new_kv=None, *,
                            block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                            programs_per_sm: int | None = None) -> torch.Tensor:
    """Split-KV Triton decode attention (same contract as `decode_attention`); tiles default to CONFIG."""
    block_n = block_n or CONFIG["block_n"]
    num_warps = num_warps or CONFIG["num_warps"]
    num_stages = num_stages or CONFIG["num_stages"] or (3 if k.shape[2] >= LONG_CACHE else 2)
    programs_per_sm = programs_per_sm or CONFIG["programs_per_sm"]
    batch, heads, dim = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and q.stride(-1) == 1
    splits, chunk = _splits(batch, kv_heads, max_len, block_n, q.device, programs_per_sm)
    # Scratch is shared by every layer: a layer's merge reads it before the next layer's split writes.
    acc, m, l = _SCRATCH.get(batch, heads, splits, dim, q.device)
    out = torch.empty(batch, heads, dim, dtype=q.dtype, device=q.device)
    if bias is not None:
        assert bias.dtype == torch.float32 and bias.stride(-1) == 1
    dummy = m
    head_row, scores = capture if capture is not None else (dummy, dummy)
    k_new, v_new, *new_strides = _new_kv_args(new_kv, dummy)
    _split_kernel[(batch * kv_heads, splits)](
        q, k, v, bias if bias is not None else dummy, t, acc, m, l, head_row, scores, k_new, v_new,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        bias.stride(0) if bias is not None else 0,
        scores.stride(0) if capture is not None else 0, scores.stride(1) if capture is not None else 0,
        acc.stride(0), acc.stride(1), acc.stride(2),
        m.stride(0), m.stride(1),
        *new_strides,
        float(scale), int(window) if window is not None else 0, chunk,
        KV_HEADS=kv_heads, GROUP=group, G_PAD=max(16, _next_pow2(group)),
        DIM=dim, D_PAD=max(16, _next_pow2(dim)), BLOCK_N=block_n,
        HAS_BIAS=bias is not None, HAS_WINDOW=window is not None, HAS_CAPTURE=capture is not None,
        WRITE_KV=new_kv is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 models get float32 products
        num_warps=num_warps, num_stages=num_stages,
    )
    _merge_kernel[(batch * heads,)](
        acc, m, l, out,
        acc.stride(0), acc.stride(1), acc.stride(2),
        m.stride(0), m.stride(1),
        out.stride(0), out.stride(1),
        HEADS=heads, SPLITS=splits, S_PAD=max(2, _next_pow2(splits)), S_BLOCK=min(16, max(2, _next_pow2(splits))),
        DIM=dim, D_PAD=max(16, _next_pow2(dim)),
        num_warps=4,
    )
    return out


def decode_scores_triton(q, k, v, t, scale, capture, new_kv=None, *, block_n: int | None = None,
                         programs_per_sm: int | None = None) -> None:
    """The capture of `decode_attention_triton` alone: raw logits of the captured heads, K read once."""
    block_n = block_n or CONFIG["block_n"]
    programs_per_sm = programs_per_sm or CONFIG["programs_per_sm"]
    batch, heads, dim = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and q.stride(-1) == 1
    head_row, scores = capture
    # The split of the full kernel: the capture's KV heads are few, so each needs many programs.
    splits, chunk = _splits(batch, kv_heads, max_len, block_n, q.device, programs_per_sm)
    k_new, v_new, *new_strides = _new_kv_args(new_kv, scores)
    _scores_kernel[(batch * kv_heads, splits)](
        q, k, v, t, head_row, scores, k_new, v_new,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        scores.stride(0), scores.stride(1),
        *new_strides,
        float(scale), chunk,
        KV_HEADS=kv_heads, GROUP=group, G_PAD=max(16, _next_pow2(group)),
        DIM=dim, D_PAD=max(16, _next_pow2(dim)), BLOCK_N=block_n,
        WRITE_KV=new_kv is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=CONFIG["num_warps"], num_stages=2,
    )


def decode_attention(q, k, v, bias, t, scale, window=None, capture=None, new_kv=None) -> torch.Tensor:
    """Decode attention of one query token over cache columns 0..t, plus `bias` (see the module doc)."""
    if triton_usable(q.device):
        return decode_attention_triton(q, k, v, bias, t, scale, window, capture, new_kv)
    return decode_attention_torch(q, k, v, bias, t, scale, window, capture, new_kv)


def decode_scores(q, k, v, t, scale, capture, new_kv=None) -> None:
    """Only the capture of `decode_attention` (same q, k, t, scale, capture and new_kv): scores[:, row, :t+1]."""
    if triton_usable(q.device):
        return decode_scores_triton(q, k, v, t, scale, capture, new_kv)
    return decode_scores_torch(q, k, v, t, scale, capture, new_kv)
