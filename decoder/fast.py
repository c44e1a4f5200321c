"""The fast decoding path: static KV buffers, a fused biased decode kernel, a GPU-resident DySCO step.

It computes what `decoder.generation` (the exact path) computes, in the same order, and differs only
in how the work is laid out:

- **Static KV buffers.** Each attention layer gets `k, v [batch, kv_heads, max_len, head_dim]` once,
  on that layer's device. Prefill writes them; each decode step writes one column (`index_copy_` at a
  device-side column index `t`). No per-step concatenation, no O(context) copy.
- **One attention function** registered in transformers' `AttentionInterface` (`dysco_fast`) and no
  mask function, so transformers builds no masks: prefill runs SDPA on the prompt, unchanged by
  DySCO — plain causal (flash where available) when no row is padded, else one forward for the
  whole left-padded batch with a boolean mask (padding keys hidden, each row's positions from 0 at
  its first real token; built once per forward, in query blocks when it would be large); decode
  runs `decode_attention` (a split-KV Triton kernel on CUDA) over the buffers with one additive bias
  `[batch, max_len]` shared by every head of every layer: padding (-inf) plus, for DySCO,
  log(strength) on the up-weighted columns.
- **The probe** runs the model's own decoder with its layer list cut after the deepest layer of S
  and plain attention. The decode kernel also writes the raw logits of the heads in S (no second pass
  over K); softmax over them gives `cur`. The probe writes column `t` of the layers it runs; the full
  pass then writes column `t` of every layer again, so nothing the probe leaves survives the step.
- **Lagged selection** (`selection="lagged"`) runs no probe: the full pass writes the raw logits of
  the heads in S (the same capture), and `cur` for the next step is their softmax with the step's bias
  ("biased") or with the padding mask only ("plain"). One pass per token, as vanilla.
- **Selection on the GPU.** Importance, selection and bias are `decoder.dysco`'s own functions, run on
  `[batch, max_len]` tensors (columns past `t` hold zero importance and are never selected), so a
  decode step never waits for the host.
- **CUDA graphs.** On a single CUDA device (by default; see tensor parallelism below), each kind of
  step (warmup, DySCO, lagged, static, plain) is captured once per (batch, max_len) and replayed; the
  step reads its input token from a device-side token buffer and writes the next one back, so the
  host only launches replays. The host syncs every `sync_every` steps to check EOS.
- **Prefill once, decode many times.** `prefill` keeps a batch's K/V prefix up to a warmup
  (`FastPrefill`); `generate_from` on any FastDecoder of the model (vanilla, DySCO with any knobs
  within that warmup) copies it back into the buffers and decodes, as `Decoder.prefill` /
  `generate_from` do on the exact path (calibration trials share one prefill per batch).
- **device_map.** A model spread over several devices keeps working (eager, no graphs): buffers, the
  bias and the column index live on each layer's device.
- **Tensor parallelism.** A model loaded with transformers' `tp_plan` (one process per GPU under
  `torchrun`; every rank makes the same FastDecoder calls) runs through its own sharded modules:
  q/k/v and gate/up are this rank's column shards, so the attention function sees this rank's query
  and KV heads only (the buffers hold its KV heads) and transformers all-reduces after o_proj and
  down_proj. The capture writes the rows of the heads of S this rank holds (global head = the layer's
  `first` + local index; the other rows stay zero), and before each importance update one all_reduce
  of every layer's rows (`decoder.tensor_parallel.gather_captured`, the exact path's rule) gives every
  rank all of them; importance, selection and the bias (one value per position, added in every
  rank's heads) are then identical on every rank, and so are the logits and the greedy token.
  Under TP the fused ops are refused (they replace the forwards transformers wraps with its
  all-reduce) and CUDA graphs are off unless `cuda_graphs=True` (NCCL groups only: the collectives are
  captured in the graphs; checked by the two-GPU `gpu` test, not on this CPU).
- **Selection diagnostics** (`return_diagnostics=True`, optional `evidence`): each DySCO step also
  writes `decoder.dysco.selection_statistics` of the importance it selected from and the set it
  up-weighted into column t of a `[batch, max_len, 5]` buffer, inside the step (graph-safe: a
  device-side index, no host sync), read once at the end: `Generation.diagnostics` in the exact
  path's format, one entry per generated token that a DySCO step produced. These steps are graphs
  of their own, captured on the first generation that asks; the default ones do no diagnostic work.
- **Fused small ops** (`decoder.fast_fused`, CUDA only): RMSNorm, rotary, SiLU·mul and the q/k/v
  projections as one GEMV, each swapped in only where it reproduces the module on random inputs, and
  only while the fast path runs.
- **Levers** (`levers=`, default all of `decoder.fast_kernels.LEVERS`): exact speed-ups that can each be
  turned off, so `benchmarks/levers.py` can measure every one's share. Two live here: `kv_write` (the
  decode kernel writes the step's K/V column itself) and `probe_tail` (the probe's deepest layer runs
  the capture alone, then `_ProbeDone` ends the forward: that layer's V read, o_proj and MLP and the
  final norm are never used); the others are fused ops (`decoder.fast_fused`).

Measured on an H200 (docs/benchmarks.md, docs/gpu_notes.md): Qwen3-8B shape at 128K, batch 1, vanilla
10.3 ms/token (1.26× the bandwidth floor), DySCO 17.7 ms/token; transformers' generate 75 ms.
Greedy decoding only (sampling, step callbacks and streamers stay with the exact `Decoder`).

    fast = FastDecoder(model, method="dysco", dysco=DyscoConfig(head_set=[(2, 1), (3, 0)]))
    out = fast.generate_ids(input_ids, attention_mask, max_new_tokens=16)
    out.tokens.shape   # → torch.Size([batch, 16])
    state = FastDecoder(model, tokenizer, "vanilla").prefill(prompts, warmup=16, max_new_tokens=16)
    for config in trials:   # each continues the same prefill, which stays as it was
        FastDecoder(model, tokenizer, "dysco", dysco=config).generate_from(state, max_new_tokens=16)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from decoder import METHODS
from decoder.dysco import (
    SELECTION_FIELDS, DyscoConfig, dysco_bias, evidence_mask, feed_schedule, select_positions, selection_row,
    selection_statistics, update_importance, upweighted_positions,
)
from decoder.fast_kernels import LEVERS, decode_attention, decode_scores, default_levers
from decoder.loading import context_limit, text_config
from decoder.tensor_parallel import check_head_counts, gather_captured, head_shards, is_sharded

__all__ = ["FastDecoder", "FastOutput", "FastPrefill", "FAST_IMPLEMENTATION"]

FAST_IMPLEMENTATION = "dysco_fast"


# --------------------------------------------------------------------------------------------------
# The state one generation shares with the attention function
# --------------------------------------------------------------------------------------------------


@dataclass
class _LayerInfo:
    device: torch.device
    dtype: torch.dtype
    heads: int  # query heads this rank computes (all of them unless tensor parallelism split the layer)
    kv_heads: int
    head_dim: int
    window: int | None = None  # sliding window of this layer, if any
    first: int = 0  # global index of the first of them (tensor parallelism: this rank's first head)


@dataclass
class _Run:
    """Everything the attention function needs; built per (batch, max_len), reused across generations."""

    mode: str = "discover"  # discover | prefill | decode
    temperature: float = 1.0
    layers: dict[int, _LayerInfo] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [batch, kv_heads, max_len, head_dim]
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    # prefill: the first column this forward writes (> 0: continuing a kept prefill), per device each
    # row's padding length [batch] (None: no padding and offset 0, the plain causal call), and the
    # masks built from them, once per forward and shared by its layers: (device, window) -> mask
    offset: int = 0
    pads: dict[torch.device, torch.Tensor] | None = None
    masks: dict[tuple[torch.device, int | None], torch.Tensor] = field(default_factory=dict)
    # decode: per device, the current column [1] int64 and the bias [batch, max_len] float32 (or None)
    t: dict[torch.device, torch.Tensor] = field(default_factory=dict)
    bias: dict[torch.device, torch.Tensor | None] = field(default_factory=dict)
    capture: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # layer -> (head_to_row, scores)
    fused: object | None = None  # decoder.fast_fused.FusedOps swapped in while active
    levers: frozenset[str] = frozenset(LEVERS)  # decoder.fast_kernels.LEVERS in use
    probe_last: int | None = None  # probe_tail: the layer whose captured logits end the probe


# The step kinds that select nothing (and so have no selection diagnostics); every other kind selects.
_NOT_SELECTING = ("plain", "warmup")


class _ProbeDone(Exception):
    """Raised by the probe's deepest layer once its logits are captured: nothing after them is used."""


_ACTIVE: _Run | None = None


def _fast_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, heads, q_len, head_dim]
    key: torch.Tensor,  # [batch, kv_heads, q_len, head_dim] (no cache: this forward's tokens only)
    value: torch.Tensor,  # [batch, kv_heads, q_len, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    run = _ACTIVE
    if run is None:
        raise RuntimeError(f"the {FAST_IMPLEMENTATION} attention runs only inside FastDecoder")
    if softcap is not None:
        raise NotImplementedError("the fast path does not support attention logit soft-capping; use the exact Decoder")
    layer = module.layer_idx
    scale = (scaling if scaling is not None else query.shape[-1] ** -0.5) / run.temperature
    window = sliding_window if sliding_window else None

    if run.mode == "discover":
        run.layers[layer] = _LayerInfo(query.device, key.dtype, query.shape[1], key.shape[1], key.shape[-1], window)
        return _prefill_attention(query, key, value, scale, window), None

    if run.mode == "prefill":
        start, end = run.offset, run.offset + key.shape[-2]
        if run.pads is None:
            run.k[layer][:, :, :end] = key
            run.v[layer][:, :, :end] = value
            return _prefill_attention(query, key, value, scale, window), None
        pads = run.pads[query.device]
        real = torch.arange(start, end, device=query.device)[None, :] >= pads[:, None]  # [batch, q_len]
        # Padding columns stay zero in the buffers, as if never written (decode masks them anyway).
        run.k[layer][:, :, start:end] = key.masked_fill(~real[:, None, :, None], 0.0)
        run.v[layer][:, :, start:end] = value.masked_fill(~real[:, None, :, None], 0.0)
        return _padded_prefill_attention(query, run.k[layer][:, :, :end], run.v[layer][:, :, :end], scale, window,
                                         pads, start, run.masks), None

    # decode: one token per row, written at column t, attended over columns 0..t
    t = run.t[query.device]
    k_buf, v_buf = run.k[layer], run.v[layer]
    new_kv = (key[:, :, 0], value[:, :, 0])  # [batch, kv_heads, head_dim]: the kernel writes them at t
    if "kv_write" not in run.levers:
        k_buf.index_copy_(2, t, key)
        v_buf.index_copy_(2, t, value)
        new_kv = None
    capture = run.capture.get(layer) if run.capture is not None else None
    if layer == run.probe_last:
        decode_scores(query[:, :, 0], k_buf, v_buf, t, scale, capture, new_kv)
        raise _ProbeDone
    out = decode_attention(query[:, :, 0], k_buf, v_buf, run.bias[query.device], t, scale, window, capture, new_kv)
    return out.unsqueeze(1), None  # [batch, 1, heads, head_dim]


def _prefill_attention(query, key, value, scale: float, window: int | None) -> torch.Tensor:
    """Causal attention over this forward's tokens (SDPA; flash on CUDA): [batch, q_len, heads, head_dim]."""
    q_len = query.shape[-2]
    mask, causal = None, True
    if window is not None and q_len > window:
        i = torch.arange(q_len, device=query.device)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)  # [q_len, q_len]
        causal = False
    try:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scale,
                                             enable_gqa=True)
    except (RuntimeError, TypeError):  # a kernel without GQA: repeat the KV heads (prefill only, once)
        n_rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scale)
    return out.transpose(1, 2).contiguous()


# Mask elements ([batch, query block, keys]) one SDPA call may take: a padded 16K prefill at batch 8
# runs in query blocks of 1024 (SDPA turns a boolean mask into an additive one of the query's dtype).
_MASK_BUDGET = 1 << 27


def _padded_prefill_attention(query, key, value, scale: float, window: int | None, pads: torch.Tensor, offset: int,
                              masks: dict) -> torch.Tensor:
    """Causal attention of a left-padded batch, one SDPA call per query block: [batch, q_len, heads, head_dim].

    query [batch, heads, q_len, head_dim] holds columns offset..offset+q_len; key and value hold
    columns 0..offset+q_len. Row b's real tokens start at column pads[b]; a query sees the real keys
    at or before it (and within the window). A padding query sees only itself (a zero key and
    value), so no row of the softmax is empty and nothing is NaN; no real token reads its output.
    """
    batch, heads, q_len, head_dim = query.shape
    n_keys = key.shape[-2]
    if key.shape[1] != heads:  # SDPA's masked kernels take no GQA: repeat the KV heads (prefill only)
        n_rep = heads // key.shape[1]
        key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    block = max(1, min(q_len, _MASK_BUDGET // max(1, batch * n_keys)))
    out = torch.empty_like(query)  # [batch, heads, q_len, head_dim]
    for start in range(0, q_len, block):
        end = min(q_len, start + block)
        mask = masks.get((query.device, window)) if block == q_len else None
        if mask is None:
            mask = _padding_mask(pads, offset + start, offset + end, window, query.device)
            if block == q_len:  # the whole mask fits: build it once per forward, share it across layers
                masks[(query.device, window)] = mask
        # Keys past the block's last query are masked for all of its rows: leave them out.
        out[:, :, start:end] = F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, : offset + end], value[:, :, : offset + end], attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous()


def _padding_mask(pads: torch.Tensor, start: int, end: int, window: int | None, device) -> torch.Tensor:
    """bool [batch, 1, end - start, end]: whether the query at column i (start..end) may attend to key j (0..end)."""
    i = torch.arange(start, end, device=device)[:, None]  # [q, 1]
    j = torch.arange(end, device=device)[None, :]  # [1, k]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    allowed = allowed[None] & (j >= pads[:, None, None])  # [batch, q, k]
    allowed = allowed | (i == j)[None]  # a padding query sees itself
    return allowed[:, None]


def _register() -> None:
    from transformers import AttentionInterface

    # Attention only, no mask function: transformers then builds no mask at all (the bias is ours).
    AttentionInterface.register(FAST_IMPLEMENTATION, _fast_attention)


@contextlib.contextmanager
def _activated(model: torch.nn.Module, run: _Run) -> Iterator[None]:
    """Route the model's attention through `_fast_attention` with `run` as its state (and swap in fused ops)."""
    global _ACTIVE
    if _ACTIVE is run:  # already routed (an eager generation activates once for all its steps)
        yield
        return
    if _ACTIVE is not None:
        raise RuntimeError("a FastDecoder generation is already running; they do not nest")
    previous = model.config._attn_implementation
    _register()
    model.set_attn_implementation(FAST_IMPLEMENTATION)
    _ACTIVE = run
    try:
        with run.fused.applied() if run.fused is not None else contextlib.nullcontext():
            yield
    finally:
        _ACTIVE = None
        model.set_attn_implementation(previous)


def _backend(group) -> str:
    import torch.distributed as dist

    return str(dist.get_backend(group))


@contextlib.contextmanager
def _truncated(decoder: torch.nn.Module, n_layers: int) -> Iterator[None]:
    """Run the model's decoder with only its first `n_layers` layers (the probe)."""
    layers = decoder.layers
    decoder.layers = layers[:n_layers]
    try:
        yield
    finally:
        decoder.layers = layers


# --------------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------------


@dataclass
class FastOutput:
    """Generated tokens [batch, n] (pad after EOS), optional per-step logits, and timings in seconds."""

    tokens: torch.Tensor
    logits: torch.Tensor | None = None  # float32 [batch, n, vocab] when asked for
    timings: dict[str, float] = field(default_factory=dict)
    # With return_diagnostics (DySCO): float32 [batch, n, 5], per generated token the `selection_statistics`
    # (`decoder.dysco.SELECTION_FIELDS`) of the DySCO step that produced it; all NaN for a token that no
    # DySCO step produced (the plain prefill's, with context_warmup = intervention_warmup = 0).
    selection: torch.Tensor | None = None


@dataclass
class FastPrefill:
    """A left-padded batch prefilled once up to column `prefilled` (`FastDecoder.prefill`); generations
    continue from it with any method whose warmup it leaves, and never change it."""

    model: torch.nn.Module = field(repr=False)  # the model whose K/V these are
    input_ids: torch.Tensor  # [batch, P] on the decoder's device
    attention_mask: torch.Tensor  # bool [batch, P], True = real token
    template: torch.Tensor | None  # bool [batch, P] chat-template positions, or None
    prefilled: int  # columns [0, prefilled) are in k and v
    temperature: float  # attention temperature of the prefill (AttnTS), 1.0 otherwise
    k: dict[int, torch.Tensor]  # layer -> [batch, kv_heads, prefilled, head_dim], on that layer's device
    v: dict[int, torch.Tensor]
    last_logits: torch.Tensor | None  # float32 [batch, vocab] when the whole prompt is prefilled
    prompt_ids: list[list[int]] | None = None  # per row, unpadded (set by `prefill`)


class _Shape:
    """Buffers and captured graphs for one (batch, max_len)."""

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.graphs: dict[tuple[str, bool], torch.cuda.CUDAGraph] = {}  # (step kind, diagnose) -> graph
        self.pool = None
        # Selection diagnostics (allocated on the first generation that asks for them, see `_prepare_selection`).
        self.evidence: torch.Tensor | None = None  # bool [batch, max_len]: the answer's positions
        self.selection: torch.Tensor | None = None  # float32 [batch, max_len, 5]: column t = the DySCO step at t
        self.width: torch.Tensor | None = None  # [1] int64: columns of the importance the last step selected from


class FastDecoder:
    """Vanilla, AttnTS and DySCO decoding with static buffers, a fused biased kernel and CUDA graphs."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        method: str = "dysco",
        dysco: DyscoConfig | None = None,
        temperature: float = 1.0,
        *,
        cuda_graphs: bool | None = None,
        fuse: bool | None = None,
        levers: Collection[str] | None = None,
        sync_every: int = 16,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if method == "dysco" and dysco is None:
            raise ValueError("method 'dysco' needs a DyscoConfig (its head set and knobs)")
        if temperature <= 0:
            raise ValueError(f"attention temperature must be > 0, got {temperature}")
        levers = default_levers() if levers is None else frozenset(levers)
        if not levers <= LEVERS.keys():
            raise ValueError(f"unknown levers {sorted(levers - LEVERS.keys())}; the levers are {', '.join(LEVERS)}")
        self.model, self.tokenizer, self.method = model, tokenizer, method
        self.dysco = dysco if method == "dysco" else None
        if self.dysco is not None:
            from decoder.template import resolve_intervention_warmup

            # "auto" needs the tokenizer's chat template; without a tokenizer there is none: 0.
            self.intervention_warmup = resolve_intervention_warmup(self.dysco.intervention_warmup, tokenizer)
        else:
            self.intervention_warmup = 0
        self.temperature = temperature if method == "attnts" else 1.0
        self.sync_every = sync_every
        self.decoder = model.get_decoder()
        if not hasattr(self.decoder, "layers"):
            raise TypeError(f"{type(self.decoder).__name__} has no `layers` list; the fast path cannot cut the probe")
        self.tensor_parallel = is_sharded(model)
        if fuse and self.tensor_parallel:
            raise ValueError(
                "the fused ops (fuse=True) replace module forwards that transformers' tensor parallelism wraps with its "
                "all-reduce (o_proj, down_proj) and read DTensor weights; a tensor-parallel model runs unfused: pass "
                "fuse=False or leave it unset"
            )
        config = text_config(model.config)
        try:  # which query heads this rank holds (all of them without a tp_plan), and the group to gather over
            self.shards, self.tp_group = head_shards(model.modules(), config)
        except ValueError as err:
            raise ValueError(f"{type(model).__name__}: {err}") from None
        self.run = _Run(temperature=self.temperature, levers=levers)
        self._discover()
        if self.tensor_parallel:
            try:
                check_head_counts({layer: info.heads for layer, info in self.run.layers.items()}, self.shards,
                                  config.num_attention_heads)
            except ValueError as err:
                raise ValueError(f"{type(model).__name__}: {err}") from None
            for layer, shard in self.shards.items():
                self.run.layers[layer].first = shard.first
        devices = {info.device for info in self.run.layers.values()}
        self.device = model.get_input_embeddings().weight.device
        self.single_device = devices == {self.device}
        if cuda_graphs is None:  # under tensor parallelism: opt-in (see the module docstring)
            cuda_graphs = self.single_device and self.device.type == "cuda" and not self.tensor_parallel
        if cuda_graphs and not (self.single_device and self.device.type == "cuda"):
            raise ValueError("CUDA graphs need the whole model on one CUDA device")
        if cuda_graphs and self.tensor_parallel and _backend(self.tp_group) != "nccl":
            raise ValueError(f"CUDA graphs of a tensor-parallel model need an NCCL process group, not "
                             f"{_backend(self.tp_group)}; pass cuda_graphs=False")
        self.cuda_graphs = cuda_graphs
        if fuse is None:
            fuse = self.device.type == "cuda" and not self.tensor_parallel
        if fuse:
            from decoder.fast_fused import FusedOps

            self.run.fused = FusedOps(model, levers=levers)
        if self.dysco is not None:
            heads = model.config.num_attention_heads
            self.dysco.check_model(model.config.num_hidden_layers, heads, self.run.layers.keys())
        self._shape: _Shape | None = None

    # ---------------------------------------------------------------- setup

    def _discover(self) -> None:
        """A two-token forward records each attention layer's device, dtype and head counts."""
        device = self.model.get_input_embeddings().weight.device
        with torch.no_grad(), _activated(self.model, self.run):
            self.model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
        if not self.run.layers:
            raise TypeError(f"{type(self.model).__name__}: no attention layer goes through transformers' AttentionInterface")
        self.run.mode = "prefill"

    def prepare(self, batch: int, max_len: int, *, diagnostics: bool = False) -> None:
        """Allocate the buffers for (batch, max_len) and, with CUDA graphs, capture the decode steps;
        `diagnostics` (DySCO): also the selection diagnostics' buffers and their own graphs, once."""
        if self._shape is None or (self._shape.batch, self._shape.max_len) != (batch, max_len):
            self._allocate(batch, max_len)
        if diagnostics and self.dysco is not None and self._shape.selection is None:
            self._prepare_selection(self._shape)

    def _allocate(self, batch: int, max_len: int) -> None:
        self._shape = None
        run = self.run
        run.k.clear(), run.v.clear(), run.t.clear(), run.bias.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for layer, info in self.run.layers.items():
            shape = (batch, info.kv_heads, max_len, info.head_dim)
            # Zeros, not empty: never-written columns (padding) must hold finite values.
            run.k[layer] = torch.zeros(shape, dtype=info.dtype, device=info.device)
            run.v[layer] = torch.zeros(shape, dtype=info.dtype, device=info.device)
        devices = {info.device for info in self.run.layers.values()} | {self.device}
        for device in devices:
            run.t[device] = torch.zeros(1, dtype=torch.long, device=device)
            run.bias[device] = torch.zeros(batch, max_len, dtype=torch.float32, device=device)
        shape = _Shape(batch, max_len)
        dev = self.device
        # Per-row state, all on the embedding device.
        shape.tokens = torch.zeros(batch, max_len + 1, dtype=torch.long, device=dev)  # prompt, then generated
        shape.prompt_len = torch.zeros(1, dtype=torch.long, device=dev)  # P (columns < P are prompt)
        shape.pad = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # left padding per row
        shape.real = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)  # not padding
        shape.template = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)
        shape.pad_bias = torch.zeros(batch, max_len, dtype=torch.float32, device=dev)  # -inf on padding
        shape.importance = torch.zeros(batch, max_len, dtype=torch.float32, device=dev)
        shape.static_selected = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)
        shape.columns = torch.arange(max_len, device=dev)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        shape.logits = torch.zeros(batch, vocab, dtype=torch.float32, device=dev)
        if self.dysco is not None:
            self._prepare_capture(shape)
        self._shape = shape
        if self.cuda_graphs:
            self._capture_graphs(shape)

    def _prepare_capture(self, shape: _Shape) -> None:
        """Per layer of S: which query heads to record (head -> row) and a scores buffer for their logits."""
        shape.capture = {}
        for layer, heads in self.dysco.heads_by_layer.items():
            info = self.run.layers[layer]
            head_to_row = torch.full((info.heads,), -1, dtype=torch.int32, device=info.device)
            for row, head in enumerate(heads):  # global head -> this rank's slot; heads held elsewhere: no slot
                if 0 <= head - info.first < info.heads:
                    head_to_row[head - info.first] = row
            # Zeros: under tensor parallelism the rows of heads held elsewhere stay zero (the gather sums them).
            scores = torch.zeros(shape.batch, len(heads), shape.max_len, dtype=torch.float32, device=info.device)
            shape.capture[layer] = (head_to_row, scores)

    def _prepare_selection(self, shape: _Shape) -> None:
        """Buffers for the selection diagnostics and, with CUDA graphs, the DySCO steps captured again
        with them (separate graphs: the default ones stay as they were, doing no diagnostic work)."""
        dev = self.device
        shape.evidence = torch.zeros(shape.batch, shape.max_len, dtype=torch.bool, device=dev)
        shape.selection = torch.full((shape.batch, shape.max_len, len(SELECTION_FIELDS)), math.nan, device=dev)
        shape.width = torch.zeros(1, dtype=torch.long, device=dev)
        if self.cuda_graphs:
            self._capture_graphs(shape, diagnose=True)

    # ---------------------------------------------------------------- one decode step (graph body)

    def _sync_devices(self) -> None:
        """Copy the column index and the bias from the main device to the other layers' devices."""
        if self.single_device:
            return
        main_t, main_bias = self.run.t[self.device], self.run.bias[self.device]
        for device in self.run.t:
            if device != self.device:
                self.run.t[device].copy_(main_t)
                self.run.bias[device].copy_(main_bias)

    def _input(self, shape: _Shape):
        t = self.run.t[self.device]
        ids = shape.tokens.index_select(1, t)  # [batch, 1]
        positions = (t - shape.pad).clamp_min(0)  # [batch, 1]
        return t, ids, positions

    def _current_row(self, shape: _Shape, t: torch.Tensor) -> torch.Tensor:
        return shape.columns == t  # [max_len]

    def _cur_importance(self, shape: _Shape, t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Mean over S of the recorded heads' attention probabilities at the current query, with `bias`
        [batch, max_len] added to their logits as the kernel adds it: [batch, max_len]."""
        # The current column is never masked (the kernel's rule): a padding row's query sees itself only.
        bias = torch.where(self._current_row(shape, t) & torch.isneginf(bias), 0.0, bias)  # [batch, max_len]
        total = None
        for layer, scores in self._captured_scores(shape).items():
            visible = shape.columns.to(scores.device) <= t.to(scores.device)  # [max_len]
            window = self.run.layers[layer].window
            if window is not None:
                visible = visible & (shape.columns.to(scores.device) > t.to(scores.device) - window)
            logits = scores + bias.to(scores.device)[:, None, :]  # [batch, n_heads, max_len]
            logits = logits.masked_fill(~visible, float("-inf"))
            probs = torch.softmax(logits, dim=-1).sum(1).to(self.device)  # [batch, max_len]
            total = probs if total is None else total + probs
        return total / len(self.dysco.head_set)

    def _captured_scores(self, shape: _Shape) -> dict[int, torch.Tensor]:
        """layer -> the raw logits of its heads of S [batch, n_heads, max_len], every head's on every rank.

        Under tensor parallelism each rank wrote only the rows of the heads it holds (the others are
        zero), so one all_reduce of every layer's buffer (`gather_captured`, the exact path's rule)
        gives each rank all of them, bit for bit; the buffers themselves keep only this rank's rows."""
        scores = {layer: buffer for layer, (_, buffer) in shape.capture.items()}
        if self.tp_group is not None:
            gather_captured(scores, self.tp_group)
        return scores

    def _update_importance(self, shape: _Shape, t: torch.Tensor, bias: torch.Tensor) -> None:
        """Blend this step's `cur` (the captured scores with `bias`) into the importance; padding rows keep theirs."""
        cur = self._cur_importance(shape, t, bias)
        updated = update_importance(shape.importance, cur, self.dysco.decay)
        padding_now = ~shape.real.index_select(1, t)  # [batch, 1]: this row's token at t is padding
        shape.importance.copy_(torch.where(padding_now, shape.importance, updated))

    def _forward_full(self, shape: _Shape, ids, positions) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1].float()  # [batch, vocab]

    def _forward_probe(self, shape: _Shape, ids, positions) -> None:
        with _truncated(self.decoder, self.dysco.deepest_layer + 1):
            # probe_tail: the deepest layer's attention captures its logits and ends the forward there.
            self.run.probe_last = self.dysco.deepest_layer if "probe_tail" in self.run.levers else None
            try:
                self.decoder(input_ids=ids, position_ids=positions, use_cache=False)
            except _ProbeDone:
                pass
            finally:
                self.run.probe_last = None

    def _set_bias(self, bias: torch.Tensor) -> None:
        self.run.bias[self.device].copy_(bias)
        self._sync_devices()

    def _upweighted(self, shape: _Shape, selected: torch.Tensor) -> torch.Tensor:
        """`upweighted_positions` without the current column (the static set): bool [batch, max_len]."""
        return upweighted_positions(selected, shape.template, shape.real, hard=self.dysco.hard, current=False)

    def _advance(self, shape: _Shape, t: torch.Tensor, logits: torch.Tensor) -> None:
        """Greedy next token into the token buffer (past the prompt only); t += 1."""
        shape.logits.copy_(logits)
        next_token = logits.argmax(-1, keepdim=True).to(self.device)  # [batch, 1]
        nxt = t + 1
        keep = shape.tokens.index_select(1, nxt)
        shape.tokens.index_copy_(1, nxt, torch.where(nxt >= shape.prompt_len, next_token, keep))
        t.add_(1)
        self._sync_devices()

    def _record_selection(self, shape: _Shape, t: torch.Tensor, up: torch.Tensor, width: torch.Tensor | None) -> None:
        """This DySCO step's `selection_statistics` into column t of `shape.selection` (device-side index,
        no host sync: graph-safe). `width`: the columns of the importance the step selects from as the
        exact path holds it (t + 1 after a probe, t without one); None keeps the last step's (static)."""
        if width is not None:
            shape.width.copy_(width)
        inside = shape.columns < shape.width  # [max_len]: the exact path's importance columns
        stats = selection_statistics(shape.importance, up & inside, shape.evidence & inside)  # [batch, 5]
        shape.selection.index_copy_(1, t, stats[:, None, :])

    def _step(self, shape: _Shape, kind: str, diagnose: bool = False) -> None:
        """One decode step of `kind`: plain | warmup | dysco | lagged | static_first | static_probe_first | static.

        `diagnose` (DySCO kinds): also record the step's selection diagnostics (`_record_selection`)."""
        run = self.run
        t, ids, positions = self._input(shape)
        if kind == "plain":
            self._set_bias(shape.pad_bias)
            logits = self._forward_full(shape, ids, positions)
            self._advance(shape, t, logits)
            return
        if kind == "warmup":
            # Plain attention; the heads of S are read from this very pass (it is identical to a probe).
            self._set_bias(shape.pad_bias)
            run.capture = shape.capture
            try:
                logits = self._forward_full(shape, ids, positions)
            finally:
                run.capture = None
            self._update_importance(shape, t, shape.pad_bias)
            self._advance(shape, t, logits)
            return
        current = self._current_row(shape, t)[None, :]  # [1, max_len]
        if kind == "lagged":
            # No probe: select from the importance of the columns before t, then read the heads of S
            # from this step's own full pass for the next step (rule 9 of decoder.dysco).
            valid = shape.real & (shape.columns < t)[None, :]
            selected = select_positions(shape.importance, self.dysco.top_p, self.dysco.top_k, valid=valid)
            up = self._upweighted(shape, selected) | current
            if diagnose:  # before this pass updates the importance
                self._record_selection(shape, t, up, t)
            bias = dysco_bias(up, self.dysco.strength) + shape.pad_bias
            self._set_bias(bias)
            run.capture = shape.capture
            try:
                logits = self._forward_full(shape, ids, positions)
            finally:
                run.capture = None
            self._update_importance(shape, t, bias if self.dysco.lagged_probs == "biased" else shape.pad_bias)
            self._advance(shape, t, logits)
            return
        if kind == "static_first":
            # Static selects once, without a probe, from the importance of the columns before t.
            valid = shape.real & (shape.columns < t)[None, :]
            selected = select_positions(shape.importance, self.dysco.top_p, self.dysco.top_k, valid=valid)
            shape.static_selected.copy_(self._upweighted(shape, selected))
            up = shape.static_selected | current
            width = t
        elif kind in ("dysco", "static_probe_first"):
            self._set_bias(shape.pad_bias)
            run.capture = shape.capture
            try:
                self._forward_probe(shape, ids, positions)
            finally:
                run.capture = None
            self._update_importance(shape, t, shape.pad_bias)
            valid = shape.real & (shape.columns <= t)[None, :]
            selected = select_positions(shape.importance, self.dysco.top_p, self.dysco.top_k, valid=valid)
            chosen = self._upweighted(shape, selected)
            if kind == "static_probe_first":
                shape.static_selected.copy_(chosen)
            up = chosen | current
            width = t + 1
        else:  # static: the set chosen at the first DySCO step plus the current column, no probe
            up = shape.static_selected | current
            width = None  # the importance stays the one the first step selected from
        if diagnose:
            self._record_selection(shape, t, up, width)
        # Padding is masked by pad_bias (and never in `up`); the current column is always up-weighted.
        self._set_bias(dysco_bias(up, self.dysco.strength) + shape.pad_bias)
        logits = self._forward_full(shape, ids, positions)
        self._advance(shape, t, logits)

    # ---------------------------------------------------------------- graphs

    def _step_kinds(self) -> list[str]:
        if self.dysco is None:
            return ["plain"]
        if self.dysco.selection == "static":
            return ["warmup", "static_first", "static_probe_first", "static"]
        if self.dysco.lagged:  # "dysco": the prompt's steps (and the first one when no importance-only step ran)
            return ["warmup", "lagged", "dysco"]
        return ["warmup", "dysco"]

    def _capture_graphs(self, shape: _Shape, diagnose: bool = False) -> None:
        """Warm each step kind up eagerly (Triton compiles, workspaces settle), then capture it; `diagnose`:
        the DySCO kinds with their selection diagnostics, as graphs of their own."""
        kinds = [kind for kind in self._step_kinds() if not diagnose or kind not in _NOT_SELECTING]
        saved = self._save_state(shape)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), _activated(self.model, self.run):
            self.run.mode = "decode"
            with torch.cuda.stream(stream):
                for kind in kinds:
                    for _ in range(2):
                        self._step(shape, kind, diagnose)
                        self._restore_state(shape, saved)
            torch.cuda.current_stream().wait_stream(stream)
            # Tensor parallelism: NCCL's watchdog thread polls the events of the warm-up steps' collectives;
            # in the default ("global") capture mode such a poll from another thread invalidates the capture.
            mode = "global"
            if self.tensor_parallel:
                torch.cuda.synchronize()
                mode = "thread_local"
            for kind in kinds:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=shape.pool, capture_error_mode=mode):
                    self._step(shape, kind, diagnose)
                shape.pool = graph.pool()
                shape.graphs[(kind, diagnose)] = graph
            self.run.mode = "prefill"
        self._restore_state(shape, saved)

    def _save_state(self, shape: _Shape) -> dict[str, torch.Tensor]:
        state = {"t": self.run.t[self.device], "tokens": shape.tokens, "importance": shape.importance,
                 "static_selected": shape.static_selected}
        return {name: value.clone() for name, value in state.items()}

    def _restore_state(self, shape: _Shape, saved: dict[str, torch.Tensor]) -> None:
        self.run.t[self.device].copy_(saved["t"])
        shape.tokens.copy_(saved["tokens"])
        shape.importance.copy_(saved["importance"])
        shape.static_selected.copy_(saved["static_selected"])
        self._sync_devices()

    def _run_step(self, shape: _Shape, kind: str, diagnose: bool = False) -> None:
        diagnose = diagnose and kind not in _NOT_SELECTING
        if self.cuda_graphs:
            shape.graphs[(kind, diagnose)].replay()
            return
        with _activated(self.model, self.run):
            self.run.mode = "decode"
            try:
                self._step(shape, kind, diagnose)
            finally:
                self.run.mode = "prefill"

    # ---------------------------------------------------------------- generation

    @staticmethod
    def bucket(length: int, granule: int = 4096) -> int:
        """Round a buffer length up so that nearby prompt lengths share buffers and graphs."""
        granule = min(granule, max(64, 1 << max(0, (length - 1).bit_length() - 3)))
        return math.ceil(length / granule) * granule

    def _exact(self):
        """The exact `Decoder` for this model and method: prompt encoding, EOS ids and the fallback."""
        if getattr(self, "_exact_decoder", None) is None:
            from decoder.generation import Decoder

            method_temperature = self.temperature if self.method == "attnts" else 1.0
            self._exact_decoder = Decoder(self.model, self.tokenizer, self.method, self.dysco, method_temperature)
        return self._exact_decoder

    def _encode(self, prompts, template_mask):
        """Prompts (the forms `Decoder.generate` takes) as left-padded tensors, with their unpadded ids."""
        from decoder.generation import left_pad

        ids, masks = self._exact().encode(prompts, template_mask)
        input_ids, real, template = left_pad(ids, masks, self._exact().pad_id)
        return ids, input_ids, real, template

    def generate(
        self,
        prompts,
        *,
        max_new_tokens: int = 64,
        eos: int | Sequence[int] | None = None,
        stop_strings: Sequence[str] | str | None = None,
        return_logits: bool = False,
        template_mask: Sequence[Sequence[bool]] | None = None,
        return_diagnostics: bool = False,
        evidence: Sequence[Sequence[int]] | None = None,
    ):
        """Greedy generation for a batch of prompts (the forms `Decoder.generate` takes): a `Generation`.

        `return_diagnostics` and `evidence` (per prompt, the token positions that hold the answer) as in
        `Decoder.generate`: `Generation.diagnostics` per row, per DySCO step, in the exact path's format.
        """
        ids, input_ids, real, template = self._encode(prompts, template_mask)
        width = input_ids.shape[1]
        mask = evidence_mask(evidence, [len(row) for row in ids], width, width) if evidence is not None else None
        eos_ids = sorted(self._exact()._eos_ids(eos))
        out = self.generate_ids(input_ids, real, max_new_tokens=max_new_tokens, template=template,
                                eos_token_id=eos_ids or None, return_logits=return_logits,
                                return_diagnostics=return_diagnostics, evidence=mask)
        return self._generation(out, ids, eos_ids, stop_strings, return_logits, evidence is not None)

    def prefill(
        self,
        prompts,
        *,
        template_mask: Sequence[Sequence[bool]] | None = None,
        warmup: int | None = None,
        max_new_tokens: int = 1,
    ) -> FastPrefill:
        """Prefill all but the last `warmup` prompt columns once (`Decoder.prefill`'s contract): a `FastPrefill`.

        Default warmup: this decoder's own. `max_new_tokens` sizes the buffers as the later
        generations will (same bucket, so this decoder's buffers are reused).
        """
        ids, input_ids, real, template = self._encode(prompts, template_mask)
        state = self.prefill_ids(input_ids, real, template=template, warmup=warmup, max_new_tokens=max_new_tokens)
        state.prompt_ids = [list(row) for row in ids]
        return state

    def generate_from(
        self,
        state: FastPrefill,
        *,
        max_new_tokens: int = 64,
        eos: int | Sequence[int] | None = None,
        stop_strings: Sequence[str] | str | None = None,
        return_logits: bool = False,
        return_diagnostics: bool = False,
        evidence: Sequence[Sequence[int]] | None = None,
    ):
        """Greedy generation continuing a `prefill` state (left unchanged) with this decoder's method: a `Generation`.

        `return_diagnostics` and `evidence` (positions in each unpadded prompt) as in `generate`."""
        prompt_ids = state.prompt_ids
        if prompt_ids is None:  # a state made by prefill_ids: its rows without their padding
            prompt_ids = [row[mask].tolist() for row, mask in zip(state.input_ids, state.attention_mask)]
        width = state.input_ids.shape[1]
        mask = evidence_mask(evidence, [len(row) for row in prompt_ids], width, width) if evidence is not None else None
        eos_ids = sorted(self._exact()._eos_ids(eos))
        out = self.generate_ids_from(state, max_new_tokens=max_new_tokens, eos_token_id=eos_ids or None,
                                     return_logits=return_logits, return_diagnostics=return_diagnostics, evidence=mask)
        return self._generation(out, prompt_ids, eos_ids, stop_strings, return_logits, evidence is not None)

    def _generation(self, out: FastOutput, prompt_ids, eos_ids, stop_strings, return_logits: bool,
                    evidence: bool = False):
        """`FastOutput` → `decoder.generation.Generation`: cut at EOS or a stop string, decode the text;
        per row, the selection diagnostics of its kept tokens' DySCO steps (with the evidence fields when
        `evidence` was given), as the exact path lists them."""
        from decoder.generation import Generation

        exact = self._exact()
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        stop_strings = [s for s in (stop_strings or []) if s]
        texts, token_ids, reasons, logits = [], [], [], []
        selection = out.selection.tolist() if out.selection is not None else None  # one host read
        diagnostics = []
        for row, tokens in enumerate(out.tokens.tolist()):
            reason, kept = "length", tokens
            for n in range(1, len(tokens) + 1):
                if tokens[n - 1] in eos_ids:
                    reason, kept = "eos", tokens[:n]
                    break
                if stop_strings and any(s in exact._decode(tokens[:n]) for s in stop_strings):
                    reason, kept = "stop_string", tokens[:n]
                    break
            text = exact._decode(kept[:-1] if reason == "eos" else kept)
            if reason == "stop_string":
                text = text[: min(text.find(s) for s in stop_strings if s in text)]
            texts.append(text)
            token_ids.append(kept)
            reasons.append(reason)
            if return_logits:
                logits.append(out.logits[row, : len(kept)].cpu())
            if selection is not None:  # tokens no DySCO step produced (all NaN) have none, as on the exact path
                diagnostics.append([selection_row(values, evidence) for values in selection[row][: len(kept)]
                                    if not math.isnan(values[0])])
        return Generation(texts=texts, token_ids=token_ids, prompt_ids=[list(p) for p in prompt_ids],
                          finish_reasons=reasons, diagnostics=diagnostics if selection is not None else None,
                          logits=logits if return_logits else None, timings=out.timings)

    def _check_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                   max_len: int | None) -> tuple[torch.Tensor, int]:
        """Refuse what the fast path cannot run; returns the bool mask on the device and the buffer length."""
        if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device).bool()
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
        if not attention_mask.any(-1).all():
            raise ValueError("every row needs at least one real token")
        if (attention_mask.long().diff(dim=-1) < 0).any():
            raise ValueError("the fast path needs left padding (padding first, then the prompt)")
        need = prompt + max_new_tokens
        max_len = max_len or self.bucket(need)
        if max_len < need:
            raise ValueError(f"max_len {max_len} < prompt + max_new_tokens = {need}")
        limit = context_limit(self.model.config)  # the text config of a multimodal model too
        if limit is not None and need > limit:
            raise ValueError(f"prompt ({prompt}) + max_new_tokens ({max_new_tokens}) exceeds the model's context {limit}")
        return attention_mask, max_len

    def _n_prefill(self, prompt: int) -> int:
        """Prompt columns this decoder prefills at once: all but its feed schedule's one-at-a-time columns."""
        if self.dysco is None:
            return prompt
        return feed_schedule(prompt, self.dysco.context_warmup, self.intervention_warmup).prefill_end

    @torch.no_grad()
    def generate_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        template: torch.Tensor | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        return_logits: bool = False,
        max_len: int | None = None,
        return_diagnostics: bool = False,
        evidence: torch.Tensor | None = None,
    ) -> FastOutput:
        """Greedy generation from left-padded `input_ids` [batch, P] (mask: 1 = real token).

        `return_diagnostics` (DySCO): `FastOutput.selection`, each generated token's selection
        diagnostics; `evidence` (bool [batch, P], aligned with `input_ids`) adds the selection recall.
        """
        attention_mask, max_len = self._check_ids(input_ids, attention_mask, max_new_tokens, max_len)
        evidence = self._check_evidence(evidence, input_ids.shape)
        batch, prompt = input_ids.shape
        dev = self.device
        diagnose = return_diagnostics and self.dysco is not None
        timer = _Timer(dev)
        timer.mark("start")
        self.prepare(batch, max_len, diagnostics=diagnose)
        timer.mark("prepared")
        shape = self._shape
        pads = (~attention_mask).sum(-1)  # [batch]
        self._load_prompt(shape, input_ids.to(dev), attention_mask, pads, template, evidence, diagnose)
        n_prefill = self._n_prefill(prompt)
        first_logits = self._prefill(shape, input_ids.to(dev), pads, n_prefill)
        return self._continue(shape, prompt, n_prefill, first_logits, max_new_tokens, eos_token_id, pad_token_id,
                              return_logits, timer, diagnose)

    @torch.no_grad()
    def prefill_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        template: torch.Tensor | None = None,
        warmup: int | None = None,
        max_new_tokens: int = 1,
        max_len: int | None = None,
    ) -> FastPrefill:
        """Prefill columns [0, P - warmup) of left-padded `input_ids` once and keep them (a `FastPrefill`).

        The prefill is plain attention (AttnTS's temperature when this decoder is AttnTS); a later
        `generate_ids_from` by any FastDecoder of this model whose own warmup is at most `warmup`
        (and whose temperature is the same) continues from it. The K/V prefix is copied out of
        the static buffers, so those stay free for other batches.
        """
        attention_mask, max_len = self._check_ids(input_ids, attention_mask, max_new_tokens, max_len)
        batch, prompt = input_ids.shape
        warmup = prompt - self._n_prefill(prompt) if warmup is None else int(warmup)
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        n_prefill = prompt - min(warmup, prompt)
        dev = self.device
        self.prepare(batch, max_len)
        shape = self._shape
        input_ids = input_ids.to(dev)
        pads = (~attention_mask).sum(-1)
        template = template.to(dev).bool() if template is not None else None
        self._load_prompt(shape, input_ids, attention_mask, pads, template)
        last_logits = self._prefill(shape, input_ids, pads, n_prefill)
        k = {layer: buf[:, :, :n_prefill].clone() for layer, buf in self.run.k.items()}
        v = {layer: buf[:, :, :n_prefill].clone() for layer, buf in self.run.v.items()}
        return FastPrefill(model=self.model, input_ids=input_ids, attention_mask=attention_mask, template=template,
                           prefilled=n_prefill, temperature=self.temperature, k=k, v=v, last_logits=last_logits)

    @torch.no_grad()
    def generate_ids_from(
        self,
        state: FastPrefill,
        *,
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        return_logits: bool = False,
        max_len: int | None = None,
        return_diagnostics: bool = False,
        evidence: torch.Tensor | None = None,
    ) -> FastOutput:
        """`generate_ids` continuing a `prefill_ids` state: its K/V prefix is copied back into the buffers.

        Columns between the state's prefill and this decoder's own (a state prefilled for a longer
        warmup) are prefilled in one more forward over them, attending to the restored prefix.
        """
        batch, prompt = state.input_ids.shape
        if state.temperature != self.temperature:
            raise ValueError(
                f"this state was prefilled with attention temperature {state.temperature}, but this decoder uses "
                f"{self.temperature}; AttnTS changes the prefill, so prefill again with this decoder"
            )
        n_prefill = self._n_prefill(prompt)
        if state.prefilled > n_prefill:
            raise ValueError(
                f"this state was prefilled up to column {state.prefilled} of {prompt}, past this decoder's warmup start "
                f"({n_prefill}); prefill with warmup >= {prompt - n_prefill}"
            )
        if state.model is not self.model:
            raise ValueError("this state was prefilled by a FastDecoder of another model; prefill with this one's model")
        _, max_len = self._check_ids(state.input_ids, state.attention_mask, max_new_tokens, max_len)
        evidence = self._check_evidence(evidence, state.input_ids.shape)
        dev = self.device
        diagnose = return_diagnostics and self.dysco is not None
        timer = _Timer(dev)
        timer.mark("start")
        self.prepare(batch, max_len, diagnostics=diagnose)
        timer.mark("prepared")
        shape = self._shape
        pads = (~state.attention_mask).sum(-1)
        self._load_prompt(shape, state.input_ids, state.attention_mask, pads, state.template, evidence, diagnose)
        for layer, prefix in state.k.items():
            self.run.k[layer][:, :, : state.prefilled].copy_(prefix)
            self.run.v[layer][:, :, : state.prefilled].copy_(state.v[layer])
        first_logits = state.last_logits
        if n_prefill > state.prefilled:  # the columns the state left before this decoder's warmup
            first_logits = self._prefill(shape, state.input_ids, pads, n_prefill, start=state.prefilled)
        return self._continue(shape, prompt, n_prefill, first_logits, max_new_tokens, eos_token_id, pad_token_id,
                              return_logits, timer, diagnose)

    def _check_evidence(self, evidence: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
        """`evidence` as a bool mask on the decoder's device, refused unless it has the prompt's [batch, P] shape."""
        if evidence is None:
            return None
        if not isinstance(evidence, torch.Tensor) or tuple(evidence.shape) != tuple(shape):
            got = tuple(evidence.shape) if isinstance(evidence, torch.Tensor) else type(evidence).__name__
            raise ValueError(f"evidence must be a bool mask shaped like input_ids {tuple(shape)}, got {got}")
        return evidence.to(self.device).bool()

    def _continue(self, shape: _Shape, prompt: int, prefilled: int, first_logits, max_new_tokens: int, eos_token_id,
                  pad_token_id, return_logits: bool, timer: _Timer, diagnose: bool = False) -> FastOutput:
        """Decode from column `prefilled` (this decoder's prefill end; the buffers hold the columns before it)."""
        dev = self.device
        self.run.t[dev].fill_(prefilled)
        self._sync_devices()
        timer.mark("prefill")

        # (kind, produces a token): importance-only and teacher-forced DySCO steps on the prompt produce none.
        steps: list[tuple[str, bool]] = []
        if self.dysco is None:
            steps = [("plain", True)] * (max_new_tokens - 1)
        else:
            schedule = feed_schedule(prompt, self.dysco.context_warmup, self.intervention_warmup)
            n_importance = len(schedule.importance_only)
            steps += [("warmup", False)] * n_importance
            forced = len(schedule.intervened)  # prompt columns fed with a full DySCO step
            n_dysco = max(forced + max_new_tokens - 1, 0)  # the last forced step (or the prefill) gives the first token
            if self.dysco.selection == "static":
                first = "static_first" if n_importance else "static_probe_first"
                kinds = [first] + ["static"] * (n_dysco - 1) if n_dysco else []
            elif self.dysco.lagged:  # probe on the prompt's steps (and with no importance yet), lag after
                kinds = ["dysco" if i < forced or (i == 0 and not n_importance) else "lagged" for i in range(n_dysco)]
            else:
                kinds = ["dysco"] * n_dysco
            steps += [(kind, i >= forced - 1) for i, kind in enumerate(kinds)]

        # Eager steps (no graphs) run inside one activation instead of switching per step.
        eager = contextlib.nullcontext() if self.cuda_graphs else _activated(self.model, self.run)
        with eager:
            produced, logits_out = self._decode_loop(shape, steps, first_logits, prompt, max_new_tokens,
                                                     eos_token_id, return_logits, timer, diagnose)
        timer.mark("end")
        tokens = shape.tokens[:, prompt : prompt + produced].clone()
        eos = _eos_set(eos_token_id)
        if eos is not None:
            tokens = _pad_after_eos(tokens, eos, pad_token_id)
        timings = timer.read(produced)
        logits = torch.stack(logits_out, 1) if return_logits else None
        # Generated token j came from the step at column prompt - 1 + j (the last prompt column's gives the
        # first); columns no DySCO step ran at (the plain prefill's last) stayed NaN.
        selection = shape.selection[:, prompt - 1 : prompt - 1 + produced].clone() if diagnose else None
        return FastOutput(tokens=tokens, logits=logits, timings=timings, selection=selection)

    def _decode_loop(self, shape, steps, first_logits, prompt, max_new_tokens, eos_token_id, return_logits, timer,
                     diagnose=False):
        dev = self.device
        logits_out: list[torch.Tensor] = []
        if first_logits is not None:  # prefill produced the first token
            shape.logits.copy_(first_logits)
            shape.tokens[:, prompt] = first_logits.argmax(-1)
            if return_logits:
                logits_out.append(first_logits.clone())
            timer.mark("first")
        eos = _eos_set(eos_token_id)
        eos = eos.to(dev) if eos is not None else None
        produced = 1 if first_logits is not None else 0
        for kind, produces in steps:
            self._run_step(shape, kind, diagnose)
            if not produces:
                continue
            produced += 1
            if produced == 1:
                timer.mark("first")
            if return_logits:
                logits_out.append(shape.logits.clone())
            if eos is not None and produced % self.sync_every == 0:
                generated = shape.tokens[:, prompt : prompt + produced]
                if bool(torch.isin(generated, eos).any(-1).all()):
                    break
        return produced, logits_out

    def _load_prompt(self, shape: _Shape, ids, mask, pads, template, evidence=None, diagnose: bool = False) -> None:
        batch, prompt = ids.shape
        shape.tokens.zero_()
        shape.tokens[:, :prompt] = ids
        shape.prompt_len.fill_(prompt)
        shape.pad.copy_(pads[:, None])
        shape.real.zero_()
        shape.real[:, :prompt] = mask
        shape.real[:, prompt:] = True
        shape.pad_bias.zero_()
        shape.pad_bias[:, :prompt].masked_fill_(~mask, float("-inf"))
        shape.template.zero_()
        if template is not None:
            shape.template[:, :prompt] = template.to(self.device).bool()
        shape.importance.zero_()
        shape.static_selected.zero_()
        if diagnose:  # the diagnostics' buffers are touched only by generations that ask for them
            shape.selection.fill_(math.nan)
            shape.width.zero_()
            shape.evidence.zero_()
            if evidence is not None:
                shape.evidence[:, :prompt] = evidence

    def _prefill(self, shape: _Shape, ids: torch.Tensor, pads: torch.Tensor, n_prefill: int,
                 start: int = 0) -> torch.Tensor | None:
        """Prefill columns [start, n_prefill) of every row in one forward (buffers hold the columns before `start`).

        Each row's positions start at 0 at its first real token, as if it were prefilled alone; padding
        keys are masked. Returns the float32 logits [batch, vocab] of the last prefilled column when
        it is the last prompt column (the first generated token comes from them), else None.
        """
        prompt = ids.shape[1]
        if n_prefill <= start:
            return None
        run = self.run
        masked = start > 0 or bool((pads > 0).any())  # one host read per generation, not per step
        columns = torch.arange(start, n_prefill, device=self.device)
        positions = (columns[None, :] - pads[:, None]).clamp_min(0)  # [batch, n_prefill - start]
        with _activated(self.model, run):
            run.mode, run.offset = "prefill", start
            if masked:
                run.pads = {device: pads.to(device) for device in run.t}
            try:
                out = self.model(input_ids=ids[:, start:n_prefill], position_ids=positions, use_cache=False,
                                 logits_to_keep=1)
            finally:
                run.offset, run.pads = 0, None
                run.masks.clear()
        return out.logits[:, -1].float().to(self.device) if n_prefill == prompt else None


class _Timer:
    """CUDA events (or wall clock on CPU) at named points; read once at the end (one sync)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: dict[str, object] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def read(self, produced: int) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            since = lambda a, b: self.marks[a].elapsed_time(self.marks[b]) / 1000.0  # noqa: E731
        else:
            since = lambda a, b: self.marks[b] - self.marks[a]  # noqa: E731
        out = {"prepare_s": since("start", "prepared"), "prefill_s": since("prepared", "prefill")}
        if "first" in self.marks:
            out["ttft_s"] = since("prepared", "first")
            if produced > 1:
                out["decode_s_per_token"] = since("first", "end") / (produced - 1)
        return out


def _eos_set(eos_token_id) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long) if ids else None


def _pad_after_eos(tokens: torch.Tensor, eos: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Replace every token after a row's first EOS with `pad_token_id` (the EOS itself stays)."""
    is_eos = torch.isin(tokens, eos.to(tokens.device))
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return tokens.masked_fill(after, pad_token_id if pad_token_id is not None else int(eos[0]))
