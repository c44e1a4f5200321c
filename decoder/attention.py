"""The one place the toolkit touches attention.

`attach(model)` routes every attention layer of a transformers model through a function registered in
transformers' `AttentionInterface` (named `dysco_sdpa` or `dysco_eager`, after the implementation it
wraps). With no plan active the wrapped implementation runs untouched, so a plain forward gives the
same logits as before attaching. A plan changes one forward pass:

    attach(model)
    plan = AttentionPlan(
        logit_bias=bias,                                   # [batch, kv_len], added in every head
        capture_heads={20: torch.tensor([4, 7])},          # record layer 20, heads 4 and 7
        stop_after_layer=20,                               # probe: stop right after layer 20
    )
    with use_plan(model, plan, frozen_cache=cache):
        model(input_ids=ids, attention_mask=mask, cache=cache)
    plan.captured[20].shape                                # float32 [batch, 2, 1, kv_len]

Conventions a caller relies on:

- Positions are absolute. `logit_bias` and captured probabilities are indexed by position in the
  whole sequence (`kv_length` keys: the cache so far plus this forward's tokens). Layers that see
  fewer keys (sliding-window layers of a DynamicCache) see the *last* keys: bias and captures are
  right-aligned there, and captures are zero outside the window. Layers that see more keys (a
  StaticCache's preallocated buffers) are left-aligned; the extra slots are masked anyway.
  `kv_length` defaults to the width of `logit_bias`, then to the layer's own key count; set it when
  capturing without a bias through a cache with sliding layers.
- Captured probabilities are those of the attention actually used in this forward (bias and
  temperature included), in float32, computed explicitly only for the captured heads and rows; all
  other heads keep the fused kernel. `capture_plain=True` captures without `logit_bias` (the
  temperature and the model's mask stay): what a plain pass would have read.
- `stop_after_layer` ends the forward right after that layer's attention; `use_plan` swallows the
  stop. With `frozen_cache=cache`, every cache write of the forward is undone on exit (bit-identical
  tensors, same lengths) for DynamicCache and StaticCache, full and sliding layers: that is the
  DySCO probe. The undo saves only what the write overwrote: references for dynamic layers (their
  update concatenates into new tensors), the written slots for static full layers, the window for
  static sliding layers.
- Models on `flash_attention_*` or `flex_attention` are switched to SDPA by `attach`: a plan needs a
  dense additive mask. SDPA still takes its flash path for plain prefill.
- Heads are global indices, also on a model sharded with transformers' tensor parallelism (`tp_plan`):
  `attach` reads which heads each rank holds (`decoder.tensor_parallel`), a rank captures (and
  ablates) only the heads it holds, and `use_plan` gathers the captures across the ranks when the
  forward ends, so every rank sees the complete captures. Every rank must run the same plans.
- Bias, heads and captures move to each layer's device (a model spread over devices with a
  `device_map`); a capture stays on the device of its layer.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from decoder.loading import text_config
from decoder.tensor_parallel import HeadShard, check_head_counts, gather_captured, head_shards, is_sharded, localize

__all__ = [
    "AttentionPlan",
    "UnsupportedModelError",
    "attach",
    "attention_group",
    "attention_layers",
    "detach",
    "is_attached",
    "use_plan",
]

_WRAPPABLE = ("sdpa", "eager")
_ATTACHMENT_ATTR = "_dysco_attachment"


class UnsupportedModelError(TypeError):
    """The model's attention does not go through transformers' attention interface."""


@dataclass
class AttentionPlan:
    """What one forward pass does beyond plain attention (see the module docstring)."""

    logit_bias: torch.Tensor | None = None  # [batch, kv_length] added to every head's logits; -inf masks
    temperature: float = 1.0  # AttnTS: every attention logit divided by this
    capture_heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> query-head indices
    capture_rows: slice | torch.Tensor | None = None  # query rows of this forward to record; None = last
    capture_plain: bool = False  # captures leave `logit_bias` out: a plain softmax of q·k (lagged DySCO's "plain")
    ablate_heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> heads whose output is zeroed
    stop_after_layer: int | None = None  # probe pass: end the forward after this layer's attention
    kv_length: int | None = None  # absolute key count of this forward (cache + new tokens)
    captured: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [batch, heads, rows, kv_length]


@dataclass
class _Attachment:
    original: str  # the implementation wrapped: "sdpa" or "eager"
    previous: str  # what the config said before attaching (restored by `detach`)
    plan: AttentionPlan | None = None
    seen_layers: dict[int, int] | None = None  # layer -> query heads, filled while `attach` checks every layer
    layers: tuple[int, ...] = ()
    shards: dict[int, HeadShard] = field(default_factory=dict)  # layer -> this rank's heads (tensor parallelism)
    group: object = None  # the process group the heads are split over; None when every rank holds every head


class _StopForward(Exception):
    """Raised after `stop_after_layer`; swallowed by `use_plan`."""


# --------------------------------------------------------------------------------------------------
# attach / detach
# --------------------------------------------------------------------------------------------------


def attach(model: torch.nn.Module) -> None:
    """Route every attention layer of `model` through the DySCO attention function (idempotent)."""
    if is_attached(model):
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers PreTrainedModel; DySCO needs a model whose attention "
            "goes through transformers' AttentionInterface"
        )
    previous = config._attn_implementation
    original = previous if previous in _WRAPPABLE else "sdpa"
    name = f"dysco_{original}"
    AttentionInterface.register(name, _dysco_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])

    attachment = _Attachment(original=original, previous=previous or original)
    modules = [m for m in model.modules() if hasattr(m, "layer_idx")]
    for module in modules:
        setattr(module, _ATTACHMENT_ATTR, attachment)
    try:
        model.set_attn_implementation(name)
    except Exception as err:  # transformers refuses custom implementations for some models
        _strip(model, modules)
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot switch its attention implementation ({err}); DySCO needs a model whose "
            "attention goes through transformers' AttentionInterface"
        ) from err
    if config._attn_implementation != name:
        _strip(model, modules)
        raise UnsupportedModelError(
            f"{type(model).__name__} does not let transformers set its attention implementation; DySCO needs a "
            "model whose attention goes through transformers' AttentionInterface"
        )

    # Which heads this rank holds, when a tp_plan sharded the attention.
    try:
        attachment.shards, attachment.group = head_shards(modules, text_config(model.config))
    except ValueError as err:
        _strip(model, modules)
        model.set_attn_implementation(attachment.previous)
        raise UnsupportedModelError(f"{type(model).__name__}: {err}") from None

    # A two-token forward proves which layers really call the interface (and with how many heads).
    attachment.seen_layers = {}
    device = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        seen, attachment.seen_layers = attachment.seen_layers, None
    if not seen:
        model.set_attn_implementation(attachment.previous)
        _strip(model, modules)
        raise UnsupportedModelError(
            f"{type(model).__name__}: none of its attention layers calls transformers' AttentionInterface, so DySCO "
            "cannot reach its attention logits (a model with a hand-written attention needs porting to the "
            "interface first)"
        )
    if is_sharded(model):
        try:
            check_head_counts(seen, attachment.shards, text_config(model.config).num_attention_heads)
        except ValueError as err:
            model.set_attn_implementation(attachment.previous)
            _strip(model, modules)
            raise UnsupportedModelError(f"{type(model).__name__}: {err}") from None
    attachment.layers = tuple(sorted(seen))
    setattr(model, _ATTACHMENT_ATTR, attachment)


def detach(model: torch.nn.Module) -> None:
    """Undo `attach`: restore the model's previous attention implementation."""
    attachment = getattr(model, _ATTACHMENT_ATTR, None)
    if attachment is None:
        return
    model.set_attn_implementation(attachment.previous)
    _strip(model, [m for m in model.modules() if hasattr(m, "layer_idx")])
    delattr(model, _ATTACHMENT_ATTR)


def is_attached(model: torch.nn.Module) -> bool:
    """Whether `attach(model)` has run (and `detach` has not)."""
    return getattr(model, _ATTACHMENT_ATTR, None) is not None


def attention_layers(model: torch.nn.Module) -> tuple[int, ...]:
    """Indices of the layers whose attention goes through the interface (the model must be attached)."""
    return _attachment(model).layers


def attention_group(model: torch.nn.Module):
    """The process group the model's attention heads are split over (tensor parallelism), or None."""
    return _attachment(model).group


def _strip(model: torch.nn.Module, modules: list[torch.nn.Module]) -> None:
    for module in modules:
        if hasattr(module, _ATTACHMENT_ATTR):
            delattr(module, _ATTACHMENT_ATTR)


def _attachment(model: torch.nn.Module) -> _Attachment:
    attachment = getattr(model, _ATTACHMENT_ATTR, None)
    if attachment is None:
        raise RuntimeError(f"{type(model).__name__} is not attached; call decoder.attention.attach(model) first")
    return attachment


# --------------------------------------------------------------------------------------------------
# use_plan and the frozen cache
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def use_plan(model: torch.nn.Module, plan: AttentionPlan, *, frozen_cache=None) -> Iterator[AttentionPlan]:
    """Apply `plan` to the forwards run inside the block; with `frozen_cache`, undo that cache's writes on exit."""
    attachment = _attachment(model)
    if attachment.plan is not None:
        raise RuntimeError("an AttentionPlan is already active on this model; plans do not nest")
    if plan.temperature <= 0:
        raise ValueError(f"attention temperature must be > 0, got {plan.temperature}")
    plan.captured.clear()
    undo = _freeze(frozen_cache) if frozen_cache is not None else None
    attachment.plan = plan
    try:
        try:
            yield plan
        except _StopForward:
            pass
    finally:
        attachment.plan = None
        if undo is not None:
            undo()
    # Reached only when the forward ended normally (or at its stop), which it does on every rank.
    if attachment.group is not None:
        gather_captured(plan.captured, attachment.group)


def _freeze(cache) -> Callable[[], None]:
    """Intercept `cache.update` so that every write can be undone; returns the undo function."""
    n_layers = len(cache.layers)
    undos: list[Callable[[], None]] = []
    real_update = cache.update

    def update(key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx < len(cache.layers):
            undos.append(_layer_undo(cache.layers[layer_idx], key_states.shape[-2]))
        return real_update(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = update

    def undo() -> None:
        del cache.update  # the instance attribute; the class method shows through again
        for step in reversed(undos):
            step()
        del cache.layers[n_layers:]  # layers a lazily-built cache appended during the forward

    return undo


def _layer_undo(layer, n_new: int) -> Callable[[], None]:
    """Save what one `layer.update` with `n_new` tokens is about to overwrite; return its restorer."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

    kind = type(layer)
    if kind in (DynamicLayer, DynamicSlidingWindowLayer) or (kind in (StaticLayer, StaticSlidingWindowLayer) and not layer.is_initialized):
        # Dynamic updates rebind `keys`/`values` to new tensors; the old ones are never written.
        state = dict(vars(layer))

        def restore_attributes() -> None:
            vars(layer).clear()
            vars(layer).update(state)

        return restore_attributes
    if kind is StaticSlidingWindowLayer:
        # It may roll its whole window in place; the window is small, so keep a copy of it.
        keys, values = layer.keys.clone(), layer.values.clone()
        length, length_int = layer.cumulative_length.clone(), layer.cumulative_length_int

        def restore_window() -> None:
            layer.keys.copy_(keys)
            layer.values.copy_(values)
            layer.cumulative_length.copy_(length)
            layer.cumulative_length_int = length_int

        return restore_window
    if kind is StaticLayer:
        slots = torch.arange(n_new, device=layer.keys.device) + layer.cumulative_length  # no host sync
        old_keys, old_values = layer.keys.index_select(2, slots), layer.values.index_select(2, slots)
        length = layer.cumulative_length.clone()

        def restore_slots() -> None:
            layer.keys.index_copy_(2, slots, old_keys)
            layer.values.index_copy_(2, slots, old_values)
            layer.cumulative_length.copy_(length)

        return restore_slots
    raise TypeError(
        f"cannot undo writes to a {kind.__name__} cache layer; a probe forward supports DynamicCache and "
        "StaticCache (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer)"
    )


# --------------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------------


def _dysco_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, heads, q_len, head_dim]
    key: torch.Tensor,  # [batch, kv_heads, kv_len, head_dim]
    value: torch.Tensor,  # [batch, kv_heads, kv_len, head_dim]
    attention_mask: torch.Tensor | None,  # None, bool or additive float [batch|1, 1, q_len, kv_len]
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    attachment: _Attachment | None = getattr(module, _ATTACHMENT_ATTR, None)
    if attachment is None:
        raise RuntimeError(
            f"{type(module).__name__} runs the dysco attention implementation but was never attached; call "
            "decoder.attention.attach(model) on the model that owns it"
        )
    inner = _inner_function(module, attachment.original)
    layer = module.layer_idx
    if attachment.seen_layers is not None:
        attachment.seen_layers[layer] = query.shape[1]
    plan = attachment.plan
    if plan is None:
        return inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    q_len, kv_len = query.shape[-2], key.shape[-2]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scaling = scaling / plan.temperature
    total = plan.kv_length or (plan.logit_bias.shape[-1] if plan.logit_bias is not None else kv_len)
    bias = None
    if plan.logit_bias is not None:
        bias = _keys_of_layer(plan.logit_bias.to(query.device), kv_len, total)  # [batch, kv_len]
        mask = _mask_rows(attention_mask, None, q_len, kv_len, query.dtype, query.device)  # [batch|1, 1, q_len, kv_len]
        mask = mask + bias[:, None, None, :].to(query.dtype)
    else:
        mask = attention_mask
    output, weights = inner(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    # output: [batch, q_len, heads, head_dim]

    shard = attachment.shards.get(layer)  # None: this rank holds every head of the layer
    heads = plan.capture_heads.get(layer)
    if heads is not None:
        captured_bias = None if plan.capture_plain else bias
        heads = heads.to(query.device)
        if shard is None:
            plan.captured[layer] = _capture(query, key, attention_mask, captured_bias, heads, plan.capture_rows, scaling,
                                            total, kwargs)
        else:  # the heads other ranks hold stay zero here; `use_plan` sums the ranks' captures
            local, held = localize(heads, shard)
            probs = _capture(query, key, attention_mask, captured_bias, local, plan.capture_rows, scaling, total, kwargs)
            plan.captured[layer] = torch.where(held[None, :, None, None], probs, 0.0)
    ablate = plan.ablate_heads.get(layer)
    if ablate is not None:
        ablate = ablate.to(output.device)
        if shard is None:
            output = output.index_fill(2, ablate, 0.0)
        else:
            local, held = localize(ablate, shard)
            slots = torch.where(held, local, shard.count)  # a head held elsewhere goes to a spare slot
            zeroed = torch.zeros(shard.count + 1, dtype=torch.bool, device=output.device).scatter(0, slots, True)
            output = output.masked_fill(zeroed[None, None, : shard.count, None], 0.0)
    if plan.stop_after_layer is not None and layer >= plan.stop_after_layer:
        raise _StopForward(layer)
    return output, weights


def _capture(query, key, attention_mask, bias, heads, rows, scaling, total, kwargs) -> torch.Tensor:
    """Attention probabilities of `heads` for query `rows`: float32 [batch, n_heads, n_rows, total]."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    heads = heads.to(query.device)
    rows = torch.tensor([q_len - 1], device=query.device) if rows is None else rows
    row_index = torch.arange(q_len, device=query.device)[rows] if isinstance(rows, slice) else rows.to(query.device)
    n_rep = query.shape[1] // key.shape[1]
    q_sel = query.index_select(1, heads).index_select(2, row_index).float()  # [batch, n_heads, n_rows, head_dim]
    k_sel = key.index_select(1, heads // n_rep).float()  # [batch, n_heads, kv_len, head_dim]
    logits = torch.matmul(q_sel, k_sel.transpose(-1, -2)) * scaling  # [batch, n_heads, n_rows, kv_len]
    softcap = kwargs.get("softcap")
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits + _mask_rows(attention_mask, row_index, q_len, kv_len, torch.float32)
    if bias is not None:
        logits = logits + bias[:, None, None, :].float()
    probs = torch.softmax(logits, dim=-1)
    if kv_len < total:  # sliding layer: its keys are the last kv_len positions
        probs = torch.nn.functional.pad(probs, (total - kv_len, 0))
    elif kv_len > total:  # preallocated static buffers: positions past `total` are empty slots
        probs = probs[..., :total]
    return probs


def _keys_of_layer(values: torch.Tensor, kv_len: int, total: int) -> torch.Tensor:
    """Map a per-position tensor [batch, total] onto this layer's keys [batch, kv_len]."""
    if kv_len <= total:
        return values[..., total - kv_len :]
    return torch.nn.functional.pad(values, (0, kv_len - total))


def _mask_rows(attention_mask, row_index, q_len: int, kv_len: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The additive mask of the given query rows (all rows when None): [batch|1, 1, n_rows, kv_len]."""
    minimum = torch.finfo(dtype).min
    if attention_mask is None:
        device = row_index.device if row_index is not None else device
        if q_len == 1:
            n_rows = 1 if row_index is None else row_index.numel()
            return torch.zeros(1, 1, n_rows, kv_len, dtype=dtype, device=device)
        # SDPA's is_causal convention (upper-left), which transformers only skips to when it is right.
        rows = torch.arange(q_len, device=device) if row_index is None else row_index
        visible = torch.arange(kv_len, device=rows.device)[None, :] <= rows[:, None]
        return torch.where(visible, 0.0, minimum).to(dtype)[None, None]
    if row_index is not None:
        attention_mask = attention_mask.index_select(2, row_index.to(attention_mask.device))
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, 0.0, minimum).to(dtype)
    return attention_mask.to(dtype)


def _inner_function(module: torch.nn.Module, original: str) -> Callable:
    """The implementation the model would have used: SDPA, or its own modelling file's eager attention."""
    if original == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return eager if eager is not None else _eager_attention


def _eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain attention for a module whose modelling file has no `eager_attention_forward`."""
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    logits = torch.matmul(query, key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if kwargs.get("softcap") is not None:
        logits = torch.tanh(logits / kwargs["softcap"]) * kwargs["softcap"]
    if attention_mask is not None:
        logits = logits + _mask_rows(attention_mask, None, query.shape[-2], key.shape[-2], logits.dtype)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights
