"""Fused replacements for the small per-layer operations of a decode step, swapped in only if proven equal.

At batch 1 a decode step is a long chain of tiny kernels: an RMSNorm is six elementwise kernels, the
rotary embedding ten, the gated MLP's activation two. Inside a CUDA graph each still costs a few
microseconds, which over 36 layers (and the probe's 25 more) adds milliseconds to a step whose memory
floor is 4–8 ms. These Triton kernels do each of them in one pass.

Nothing here is architecture-specific by assumption: `fused_modules(model)` tries each replacement on
random inputs against the module's own forward and keeps it only where the outputs agree (within
bf16 rounding); a Gemma-style RMSNorm (`1 + weight`) or a GELU MLP simply keeps its own code. The swap
lasts only inside the `with` block (the fast path's prefill and its graph captures).

Some of them are levers (`decoder.fast_kernels.LEVERS`), each on unless `FusedOps(levers=...)` leaves
it out: `gate_up` (gate and up as one GEMV; their weights become the two halves of one tensor, same
values, no extra memory), `add_norm` (residual add + the following RMSNorm in one kernel, by a swapped
decoder-layer forward for the Llama/Qwen2/Qwen3/Mistral layer, the one layout it is written for) and
`splitk_gemv` (a Triton GEMV for the decode-time q/k/v and o projections, tiles in `GEMV_CONFIG`).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections.abc import Iterator

import torch

from decoder.fast_kernels import HAVE_TRITON, LEVERS, triton_usable

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_kernel(X, W, Y, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        var = tl.sum(x * x, 0) / n_cols
        normed = (x * tl.rsqrt(var + eps)).to(Y.dtype.element_ty)  # cast before the weight, as transformers does
        w = tl.load(W + cols, mask=ok, other=0.0)
        tl.store(Y + row * stride_y + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _add_rmsnorm_kernel(X, R, W, S, Y, stride_x, stride_r, stride_s, stride_y, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        total = (x + r).to(S.dtype.element_ty)  # the residual stream is rounded to the model dtype, as `a + b` is
        tl.store(S + row * stride_s + cols, total, mask=ok)
        t = total.to(tl.float32)
        var = tl.sum(t * t, 0) / n_cols
        normed = (t * tl.rsqrt(var + eps)).to(Y.dtype.element_ty)
        w = tl.load(W + cols, mask=ok, other=0.0)
        tl.store(Y + row * stride_y + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_kernel(G, U, Y, n_cols, stride_g, stride_u, stride_y, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # a long prefill has > 2**31 elements: 64-bit row offsets
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n_cols
        g = tl.load(G + row * stride_g + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + offs, mask=ok, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)  # silu rounds before the product
        tl.store(Y + row * stride_y + offs, (act * u).to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _gemv_kernel(X, W, Bias, Y, Part, M, N, K, stride_xm, stride_wn, stride_ym, k_chunk,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
        # Program (n-block, split): rows n of W over the K range of its split; M (<= 16 rows of x) rides along.
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        offs_m = tl.arange(0, M_PAD)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
        k_lo = split * k_chunk
        k_hi = tl.minimum(k_lo + k_chunk, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_hi
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)  # [M_PAD, BLOCK_N]
        ok = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=ok)
        else:
            tl.store(Part + split * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=ok)

    @triton.jit
    def _gemv_reduce_kernel(Part, Bias, Y, M, N, stride_ym, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < M * N
        acc = tl.zeros([BLOCK], tl.float32)
        for s in range(SPLIT_K):  # a fixed order: the result does not depend on scheduling
            acc += tl.load(Part + s * M * N + offs, mask=ok, other=0.0)
        n = offs % N
        if HAS_BIAS:
            acc += tl.load(Bias + n, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + (offs // N) * stride_ym + n, acc.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_kernel(X, C, S, Y, n_heads, stride_xb, stride_xh, stride_xt, stride_cb, stride_ct,
                     stride_yb, stride_yh, stride_yt, n_tokens, HALF: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)  # one (batch, head, token) row
        tok = pid % n_tokens
        h = (pid // n_tokens) % n_heads
        b = pid // (n_tokens * n_heads)
        d = tl.arange(0, BLOCK)
        ok = d < HALF
        x_ptr = X + b * stride_xb + h * stride_xh + tok * stride_xt
        c_ptr = C + b * stride_cb + tok * stride_ct
        s_ptr = S + b * stride_cb + tok * stride_ct
        x1 = tl.load(x_ptr + d, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF + d, mask=ok, other=0.0).to(tl.float32)
        c1 = tl.load(c_ptr + d, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(c_ptr + HALF + d, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(s_ptr + d, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(s_ptr + HALF + d, mask=ok, other=0.0).to(tl.float32)
        y_ptr = Y + b * stride_yb + h * stride_yh + tok * stride_yt
        tl.store(y_ptr + d, (x1 * c1 - x2 * s1).to(Y.dtype.element_ty), mask=ok)
        tl.store(y_ptr + HALF + d, (x2 * c2 + x1 * s2).to(Y.dtype.element_ty), mask=ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rmsnorm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Llama-style RMSNorm (`weight * normalise(x).to(dtype)`) in one kernel."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    _rmsnorm_kernel[(x2.shape[0],)](x2, module.weight, y, x2.stride(0), y.stride(0), shape[-1], float(eps),
                                    BLOCK=_next_pow2(shape[-1]), num_warps=4 if shape[-1] <= 4096 else 8)
    return y.view(shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` in one kernel."""
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = gate.shape[-1]
    rows = gate.numel() // n  # rows on the grid's first axis (2**31 - 1 programs), columns on the second (65535)
    _silu_mul_kernel[(rows, triton.cdiv(n, 1024))](gate, up, y, n, n, n, n, BLOCK=1024)
    return y


def silu_mul_halves(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` where gate and up are the two halves of the last dim of `gate_up` [..., 2 * n]."""
    shape = gate_up.shape
    n = shape[-1] // 2
    x = gate_up.reshape(-1, shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    _silu_mul_kernel[(x.shape[0], triton.cdiv(n, 1024))](x, x[:, n:], y, n, x.stride(0), x.stride(0), y.stride(0),
                                                          BLOCK=1024)
    return y.view(*shape[:-1], n)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, norm(residual + x)) for a Llama-style RMSNorm, in one kernel."""
    shape = x.shape
    x2, r2 = x.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    total = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    _add_rmsnorm_kernel[(x2.shape[0],)](x2, r2, norm.weight, total, y, x2.stride(0), r2.stride(0), total.stride(0),
                                        y.stride(0), shape[-1], float(eps), BLOCK=_next_pow2(shape[-1]),
                                        num_warps=4 if shape[-1] <= 4096 else 8)
    return total.view(shape), y.view(shape)


# Tiles of the Triton GEMV (splitk_gemv); benchmarks/levers.py --gemv sweeps them on the GPU and sets the best.
GEMV_CONFIG = {"block_n": 32, "block_k": 256, "split_k": 2, "num_warps": 4, "num_stages": 3}
_GEMV_ROWS = 16  # at most this many input rows (decode batches) take the GEMV; more go to the GEMM


class _Workspace:
    """fp32 partial sums of split-K GEMVs, one buffer per (split, rows, out_features, device), reused (graph-safe)."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, split_k: int, m: int, n: int, device: torch.device) -> torch.Tensor:
        key = (split_k, m, n, device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(split_k, m, n, dtype=torch.float32, device=device)
        return self.buffers[key]


_WORKSPACE = _Workspace()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, block_n: int | None = None,
         block_k: int | None = None, split_k: int | None = None, num_warps: int | None = None,
         num_stages: int | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a few rows of x (<= 16): a Triton GEMV, K split across programs."""
    cfg = GEMV_CONFIG
    block_n, block_k = block_n or cfg["block_n"], block_k or cfg["block_k"]
    split_k = split_k or cfg["split_k"]
    shape = x.shape
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    assert m <= _GEMV_ROWS and weight.stride(-1) == 1
    k_chunk = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_chunk)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = _WORKSPACE.get(split_k, m, n, x.device) if split_k > 1 else y
    _gemv_kernel[(triton.cdiv(n, block_n), split_k)](
        x2, weight, bias if bias is not None else y, y, part, m, n, k, x2.stride(0), weight.stride(0), y.stride(0),
        k_chunk, M_PAD=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    if split_k > 1:
        _gemv_reduce_kernel[(triton.cdiv(m * n, 1024),)](part, bias if bias is not None else y, y, m, n, y.stride(0),
                                                           SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=1024)
    return y.view(*shape[:-1], n)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_gemv: bool) -> torch.Tensor:
    """The GEMV for decode-sized inputs when `use_gemv`, else (and for prefill) the plain GEMM."""
    if use_gemv and x.numel() // x.shape[-1] <= _GEMV_ROWS:
        return gemv(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, tokens, dim] (any strides but the last), cos/sin [batch, tokens, dim]."""
    batch, heads, tokens, dim = x.shape
    y = torch.empty(batch, tokens, heads, dim, dtype=x.dtype, device=x.device).transpose(1, 2)
    cos = cos.expand(batch, tokens, dim)
    sin = sin.expand(batch, tokens, dim)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    _rope_kernel[(batch * heads * tokens,)](
        x, cos, sin, y, heads, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
        y.stride(0), y.stride(1), y.stride(2), tokens, HALF=dim // 2, BLOCK=_next_pow2(dim // 2), num_warps=1,
    )
    return y


def apply_rotary(q, k, cos, sin, position_ids=None, unsqueeze_dim: int = 1):
    """Drop-in for transformers' `apply_rotary_pos_emb` (rotate-half convention) in two kernels."""
    if unsqueeze_dim != 1 or q.stride(-1) != 1 or k.stride(-1) != 1 or cos.dim() != 3:
        raise _Unfit()
    return _rope_one(q, cos, sin), _rope_one(k, cos, sin)


class _Unfit(Exception):
    """The fused function does not handle this call; the original one is used."""


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    return bool(torch.isfinite(a).all()) and ((a - b).norm() <= 1e-2 * b.norm() + 1e-6)


def _same(fused, original, *args) -> bool:
    """Whether `fused(*args)` reproduces `original(*args)`; a kernel that fails to build or run does not."""
    try:
        with torch.no_grad():
            return _close(fused(*args), original(*args))
    except Exception:  # noqa: BLE001 - a kernel this device or layout cannot run: keep the original
        return False


def _fused_rmsnorm_forward(self, hidden_states):
    return rmsnorm(self, hidden_states)


def _fused_mlp_forward(self, x):
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class _GateUp:
    """A gated MLP whose gate and up projections are one GEMV at decode time (lever `gate_up`).

    The weights are not copied: gate's and up's parameters are re-pointed at the two halves of one
    [2 * intermediate, hidden] tensor (same values; the model keeps working, and later writes to either
    parameter land in the shared tensor). SiLU*mul then reads the two halves of the GEMV's output.
    """

    def __init__(self, mlp: torch.nn.Module):
        self.mlp = mlp
        gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
        if _adjacent(gate, up):  # already shared (an earlier FastDecoder on this model)
            self.weight = torch.as_strided(gate.detach(), (gate.shape[0] + up.shape[0], gate.shape[1]), gate.stride())
        else:
            self.weight = torch.cat([gate.detach(), up.detach()], 0)  # [2 * intermediate, hidden]
            gate.data, up.data = self.weight[: gate.shape[0]], self.weight[gate.shape[0]:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        if x.numel() // x.shape[-1] > _GEMV_ROWS:  # prefill: two GEMMs, no [tokens, 2 * intermediate] buffer
            return mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
        return mlp.down_proj(silu_mul_halves(torch.nn.functional.linear(x, self.weight)))


def _adjacent(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether b starts where a ends in one storage, both contiguous: [a; b] is a view."""
    return (a.is_contiguous() and b.is_contiguous() and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.storage_offset() == a.storage_offset() + a.numel())


def _gate_up_swaps(mlp: torch.nn.Module) -> list[tuple[object, str, object]]:
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    if not (isinstance(gate, torch.nn.Linear) and isinstance(up, torch.nn.Linear)):
        return []
    if gate.bias is not None or up.bias is not None or gate.weight.shape != up.weight.shape:
        return []
    if gate.weight.dtype != up.weight.dtype or gate.weight.device != up.weight.device:
        return []
    if "SiLU" not in type(getattr(mlp, "act_fn", None)).__name__:  # the kernel is SiLU*mul; others keep theirs
        return []
    w = gate.weight
    x = torch.randn(2, 1, w.shape[1], dtype=w.dtype, device=w.device)
    with torch.no_grad():
        want = mlp(x)
    fused = _GateUp(mlp)
    return [(mlp, "forward", fused.forward)] if _same(fused.forward, lambda _: want, x) else []


def _gemv_swap(linear: torch.nn.Module) -> list[tuple[object, str, object]]:
    """A decode-time Triton GEMV for one projection (lever `splitk_gemv`), if it matches the Linear."""
    if not isinstance(linear, torch.nn.Linear) or not triton_usable(linear.weight.device):
        return []
    forward = functools.partial(_gemv_forward, linear)
    w = linear.weight
    x = torch.randn(2, 1, w.shape[1], dtype=w.dtype, device=w.device)
    return [(linear, "forward", forward)] if _same(forward, linear, x) else []


def _gemv_forward(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _linear(x, linear.weight, linear.bias, True)


class _FusedProjection:
    """Linears fed the same input (q/k/v) as one GEMV: the first call computes all, the others take their slice.

    At batch 1 a 1024-row k or v projection reads its 8 MB at a quarter of the memory bandwidth (too few
    blocks); one 6144-row GEMV reads q, k and v near full speed. The concatenated weight is a copy
    (4% of the model's weights), kept only while the fused ops exist. Only small inputs (decode) take
    the fused path; the slices are views, so no kernel is added.
    """

    def __init__(self, linears: list[torch.nn.Linear], use_gemv: bool = False):
        self.linears, self.use_gemv = linears, use_gemv
        self.weight = torch.cat([lin.weight for lin in linears], 0)  # [sum of out_features, in_features]
        has_bias = [lin.bias is not None for lin in linears]
        self.bias = torch.cat([lin.bias for lin in linears], 0) if all(has_bias) else None
        self.sizes = [lin.out_features for lin in linears]
        self.stash: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None

    def first(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] > 16:  # prefill: leave it to the plain GEMMs
            self.stash = None
            return torch.nn.functional.linear(x, self.linears[0].weight, self.linears[0].bias)
        outs = _linear(x, self.weight, self.bias, self.use_gemv).split(self.sizes, -1)
        self.stash = (x, outs)
        return outs[0]

    def other(self, index: int, x: torch.Tensor) -> torch.Tensor:
        stash = self.stash
        if stash is not None and stash[0] is x:
            if index == len(self.sizes) - 1:
                self.stash = None
            return stash[1][index]
        lin = self.linears[index]
        return torch.nn.functional.linear(x, lin.weight, lin.bias)


def _projection_swaps(module: torch.nn.Module, use_gemv: bool) -> list[tuple[object, str, object]]:
    names = ("q_proj", "k_proj", "v_proj")
    linears = [getattr(module, n, None) for n in names]
    if not all(isinstance(lin, torch.nn.Linear) for lin in linears):
        return []
    if len({lin.in_features for lin in linears}) != 1 or len({(lin.bias is None) for lin in linears}) != 1:
        return []
    if not triton_usable(linears[0].weight.device) or len({lin.weight.device for lin in linears}) != 1:
        return []
    fused = _FusedProjection(linears, use_gemv)
    forwards = [fused.first] + [functools.partial(fused.other, i) for i in range(1, len(linears))]
    w = linears[0].weight
    x = torch.randn(1, 1, w.shape[1], dtype=w.dtype, device=w.device)
    ok = all(_same(fwd, lin, x) for fwd, lin in zip(forwards, linears))  # in order: the first fills the stash
    fused.stash = None
    return [(lin, "forward", fwd) for lin, fwd in zip(linears, forwards)] if ok else []


# Decoder layers laid out as `_AddNorm.layer_forward` assumes (pre-norm attention, then pre-norm MLP, two
# residual adds); the swap is also checked on random tokens through the whole decoder.
_ADD_NORM_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer")


class _AddNorm:
    """Residual add + the RMSNorm that follows it in one kernel (lever `add_norm`).

    Inside a layer: `h = residual + attn` and `post_attention_layernorm(h)`. Across layers: the layer's
    output `residual + mlp` and the next layer's `input_layernorm` (the decoder's final norm after the
    last layer); the normed tensor waits in `stash` until the next norm is called with that very output.
    """

    def __init__(self, layers, final_norm: torch.nn.Module):
        self.stash: tuple[torch.Tensor, torch.nn.Module, torch.Tensor] | None = None
        self.next_norm = {id(layer): nxt.input_layernorm for layer, nxt in zip(layers, list(layers)[1:])}
        self.next_norm[id(layers[-1])] = final_norm

    def norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        stash = self.stash
        if stash is not None and stash[0] is x and stash[1] is module:
            self.stash = None
            return stash[2]
        return rmsnorm(module, x)

    def layer_forward(self, layer: torch.nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        h = self.norm(layer.input_layernorm, hidden_states)
        h, _ = layer.self_attn(hidden_states=h, **kwargs)
        residual, h = add_rmsnorm(h, hidden_states, layer.post_attention_layernorm)
        h = layer.mlp(h)
        out, normed = add_rmsnorm(h, residual, self.next_norm[id(layer)])
        self.stash = (out, self.next_norm[id(layer)], normed)
        return out


def _add_norm_swaps(model: torch.nn.Module, norm_ok) -> list[tuple[object, str, object]]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    final = getattr(decoder, "norm", None)
    if not layers or final is None or any(type(layer).__name__ not in _ADD_NORM_LAYERS for layer in layers):
        return []
    norms = [final] + [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    if not all(norm_ok(n) for n in norms):
        return []
    devices = {p.device for p in decoder.parameters()}
    if len(devices) != 1 or not triton_usable(next(iter(devices))):
        return []
    fused = _AddNorm(layers, final)
    swaps = [(layer, "forward", functools.partial(fused.layer_forward, layer)) for layer in layers]
    swaps.append((final, "forward", functools.partial(fused.norm, final)))
    embed = model.get_input_embeddings()
    ids = torch.randint(0, embed.weight.shape[0], (1, 3), device=embed.weight.device)

    def run_swapped(ids):
        with _swapped(swaps):
            return decoder(input_ids=ids, use_cache=False).last_hidden_state

    ok = _same(run_swapped, lambda ids: decoder(input_ids=ids, use_cache=False).last_hidden_state, ids)
    fused.stash = None
    return swaps if ok else []


def _plan_swaps(model: torch.nn.Module, levers: frozenset[str] = frozenset(LEVERS)) -> list[tuple[object, str, object]]:
    """Every (object, attribute, replacement) whose replacement matched the original on random inputs."""
    swaps: list[tuple[object, str, object]] = []
    checked: dict[tuple, bool] = {}
    use_gemv = "splitk_gemv" in levers
    norm_ok: dict[tuple, bool] = {}

    def llama_norm(module) -> bool:
        weight = getattr(module, "weight", None)
        if not (isinstance(weight, torch.Tensor) and weight.dim() == 1 and triton_usable(weight.device)):
            return False
        key = (type(module), weight.shape[0], weight.dtype)
        if key not in norm_ok:
            x = torch.randn(3, weight.shape[0], dtype=weight.dtype, device=weight.device)
            norm_ok[key] = _same(types.MethodType(_fused_rmsnorm_forward, module), module, x)
        return norm_ok[key]

    for module in model.modules():
        swaps += _projection_swaps(module, use_gemv)
        if use_gemv:
            for attr in ("o_proj", "qkv_proj"):  # qkv_proj: architectures whose q/k/v is one Linear already
                swaps += _gemv_swap(getattr(module, attr, None))
        name = type(module).__name__
        weight = getattr(module, "weight", None)
        if "RMSNorm" in name and llama_norm(module):
            swaps.append((module, "forward", types.MethodType(_fused_rmsnorm_forward, module)))
        elif all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            w = module.gate_proj.weight
            if not triton_usable(w.device):
                continue
            if "gate_up" in levers:
                gate_up = _gate_up_swaps(module)
                if gate_up:
                    swaps += gate_up
                    continue
            fused = types.MethodType(_fused_mlp_forward, module)
            key = (type(module), type(module.act_fn))
            if key not in checked:
                x = torch.randn(2, 1, w.shape[1], dtype=w.dtype, device=w.device)
                checked[key] = _same(fused, module, x)
            if checked[key]:
                swaps.append((module, "forward", fused))
    # The rotary embedding is a function of each modelling file, looked up at call time.
    seen = set()
    for module in model.modules():
        if not hasattr(module, "layer_idx"):
            continue
        modelling = sys.modules.get(type(module).__module__)
        original = getattr(modelling, "apply_rotary_pos_emb", None)
        if original is None or modelling in seen:
            continue
        seen.add(modelling)
        device = next(module.parameters()).device
        if not triton_usable(device):
            continue
        dtype = next(module.parameters()).dtype
        q = torch.randn(2, 4, 3, 64, dtype=dtype, device=device).transpose(1, 2)  # [batch, heads, tokens, dim], strided like real q
        k = torch.randn(2, 4, 2, 64, dtype=dtype, device=device).transpose(1, 2)
        angle = torch.randn(2, 4, 32, device=device)
        cos = torch.cat([angle.cos(), angle.cos()], -1).to(dtype)
        sin = torch.cat([angle.sin(), angle.sin()], -1).to(dtype)
        try:
            ref = original(q, k, cos, sin)
            got = apply_rotary(q, k, cos, sin)
            ok = _close(got[0], ref[0]) and _close(got[1], ref[1])
        except Exception:  # noqa: BLE001 - any mismatch of signature or layout: keep the original
            ok = False
        if ok:
            swaps.append((modelling, "apply_rotary_pos_emb", _guarded_rotary(original)))
    if "add_norm" in levers:
        # Checked with every swap above in place: the layer forward calls the fused attention and MLP.
        with _swapped(swaps):
            swaps += _add_norm_swaps(model, llama_norm)
    return swaps


def _guarded_rotary(original):
    def rotary(q, k, cos, sin, *args, **kwargs):
        try:
            return apply_rotary(q, k, cos, sin, *args, **kwargs)
        except _Unfit:
            return original(q, k, cos, sin, *args, **kwargs)

    return rotary


@contextlib.contextmanager
def _swapped(swaps: list[tuple[object, str, object]]) -> Iterator[None]:
    """Set each (object, attribute) to its replacement for the block; put the originals back after."""
    saved = []
    for obj, attr, new in swaps:
        saved.append((obj, attr, obj.__dict__.get(attr, _MISSING) if hasattr(obj, "__dict__") else _MISSING))
        setattr(obj, attr, new)
    try:
        yield
    finally:
        for obj, attr, old in reversed(saved):
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


class FusedOps:
    """The checked swaps of one model, applied inside `with fused.applied():`; `levers` picks the optional ones."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True, levers=frozenset(LEVERS)):
        self.swaps = _plan_swaps(model, frozenset(levers)) if (enabled and HAVE_TRITON) else []

    def summary(self) -> dict[str, int]:
        """How many objects each replacement was swapped into."""
        out: dict[str, int] = {}
        for obj, attr, new in self.swaps:
            func = new.func if isinstance(new, functools.partial) else new
            key = _LABELS.get(getattr(func, "__qualname__", ""))
            if key is None:
                key = f"{type(obj).__name__}.{attr}" if attr == "forward" else attr
            out[key] = out.get(key, 0) + 1
        return out

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        with _swapped(self.swaps):
            yield


_MISSING = object()
_LABELS = {
    "_FusedProjection.first": "fused q/k/v projection", "_FusedProjection.other": "fused q/k/v projection",
    "_GateUp.forward": "gate/up GEMV (gate_up)", "_gemv_forward": "Triton GEMV (splitk_gemv)",
    "_AddNorm.layer_forward": "decoder layer with add+norm (add_norm)",
    "_AddNorm.norm": "final norm from the last add (add_norm)",
}
