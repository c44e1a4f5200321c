"""Fused replacements for the small per-layer operations of a decode step, swapped in only if proven equal.

At batch 1 a decode step is a long chain of tiny kernels: an RMSNorm is six elementwise kernels, the
rotary embedding ten, the gated MLP's activation two. Inside a CUDA graph each still costs a few
microseconds, which over 36 layers (and the probe's 25 more) adds milliseconds to a step whose memory
floor is 4–8 ms. These Triton kernels do each of them in one pass.

Nothing here is architecture-specific by assumption: `fused_modules(model)` tries each replacement on
random inputs against the module's own forward and keeps it only where the outputs agree (within
bf16 rounding); a Gemma-style RMSNorm (`1 + weight`) or a GELU MLP simply keeps its own code. The swap
lasts only inside the `with` block (the fast path's prefill and its graph captures).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections.abc import Iterator

import torch

from decoder.fast_kernels import HAVE_TRITON, triton_usable

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
    def _silu_mul_kernel(G, U, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty).to(tl.float32)  # silu rounds before the product
        tl.store(Y + offs, (act * u).to(Y.dtype.element_ty), mask=ok)

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
    n = gate.numel()
    _silu_mul_kernel[(triton.cdiv(n, 1024),)](gate, up, y, n, BLOCK=1024)
    return y


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


def _fused_rmsnorm_forward(self, hidden_states):
    return rmsnorm(self, hidden_states)


def _fused_mlp_forward(self, x):
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class _FusedProjection:
    """Linears fed the same input (q/k/v) as one GEMV: the first call computes all, the others take their slice.

    At batch 1 a 1024-row k or v projection reads its 8 MB at a quarter of the memory bandwidth (too few
    blocks); one 6144-row GEMV reads q, k and v near full speed. The concatenated weight is a copy
    (4% of the model's weights), kept only while the fused ops exist. Only small inputs (decode) take
    the fused path; the slices are views, so no kernel is added.
    """

    def __init__(self, linears: list[torch.nn.Linear]):
        self.linears = linears
        self.weight = torch.cat([lin.weight for lin in linears], 0)  # [sum of out_features, in_features]
        has_bias = [lin.bias is not None for lin in linears]
        self.bias = torch.cat([lin.bias for lin in linears], 0) if all(has_bias) else None
        self.sizes = [lin.out_features for lin in linears]
        self.stash: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None

    def first(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] > 16:  # prefill: leave it to the plain GEMMs
            self.stash = None
            return torch.nn.functional.linear(x, self.linears[0].weight, self.linears[0].bias)
        outs = torch.nn.functional.linear(x, self.weight, self.bias).split(self.sizes, -1)
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


def _projection_swaps(module: torch.nn.Module) -> list[tuple[object, str, object]]:
    names = ("q_proj", "k_proj", "v_proj")
    linears = [getattr(module, n, None) for n in names]
    if not all(isinstance(lin, torch.nn.Linear) for lin in linears):
        return []
    if len({lin.in_features for lin in linears}) != 1 or len({(lin.bias is None) for lin in linears}) != 1:
        return []
    if not triton_usable(linears[0].weight.device) or len({lin.weight.device for lin in linears}) != 1:
        return []
    fused = _FusedProjection(linears)
    forwards = [fused.first] + [functools.partial(fused.other, i) for i in range(1, len(linears))]
    w = linears[0].weight
    x = torch.randn(1, 1, w.shape[1], dtype=w.dtype, device=w.device)
    with torch.no_grad():
        ok = all(_close(fwd(x), lin(x)) for fwd, lin in zip(forwards, linears))
    fused.stash = None
    return [(lin, "forward", fwd) for lin, fwd in zip(linears, forwards)] if ok else []


def _plan_swaps(model: torch.nn.Module) -> list[tuple[object, str, object]]:
    """Every (object, attribute, replacement) whose replacement matched the original on random inputs."""
    swaps: list[tuple[object, str, object]] = []
    checked: dict[tuple, bool] = {}
    for module in model.modules():
        swaps += _projection_swaps(module)
        name = type(module).__name__
        weight = getattr(module, "weight", None)
        if "RMSNorm" in name and isinstance(weight, torch.Tensor) and weight.dim() == 1 and triton_usable(weight.device):
            key = (type(module), weight.shape[0])
            fused = types.MethodType(_fused_rmsnorm_forward, module)
            if key not in checked:
                x = torch.randn(3, weight.shape[0], dtype=weight.dtype, device=weight.device)
                with torch.no_grad():
                    checked[key] = _close(fused(x), module(x))
            if checked[key]:
                swaps.append((module, "forward", fused))
        elif all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            w = module.gate_proj.weight
            if not triton_usable(w.device):
                continue
            fused = types.MethodType(_fused_mlp_forward, module)
            key = (type(module), type(module.act_fn))
            if key not in checked:
                x = torch.randn(2, 1, w.shape[1], dtype=w.dtype, device=w.device)
                with torch.no_grad():
                    checked[key] = _close(fused(x), module(x))
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
    return swaps


def _guarded_rotary(original):
    def rotary(q, k, cos, sin, *args, **kwargs):
        try:
            return apply_rotary(q, k, cos, sin, *args, **kwargs)
        except _Unfit:
            return original(q, k, cos, sin, *args, **kwargs)

    return rotary


class FusedOps:
    """The checked swaps of one model, applied inside `with fused.applied():`."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True):
        self.swaps = _plan_swaps(model) if (enabled and HAVE_TRITON) else []

    def summary(self) -> dict[str, int]:
        """How many objects each replacement was swapped into."""
        out: dict[str, int] = {}
        for obj, attr, new in self.swaps:
            key = f"{type(obj).__name__}.{attr}" if attr == "forward" else attr
            if isinstance(new, functools.partial) or getattr(new, "__name__", "") == "first":
                key = "fused q/k/v projection"
            out[key] = out.get(key, 0) + 1
        return out

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        saved = []
        for obj, attr, new in self.swaps:
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


_MISSING = object()
