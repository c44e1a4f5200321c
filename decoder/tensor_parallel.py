"""DySCO on a model sharded with transformers' own tensor parallelism: which heads a rank holds, and the gather.

A model loaded with `from_pretrained(path, tp_plan="auto")` under `torchrun` (transformers 5.x) keeps
`config.num_attention_heads` global, but each attention layer's `q_proj` is a DTensor sharded
`Shard(0)` over the TP mesh ("colwise"): rank r's slice of the output rows is rank r's contiguous
run of query heads, and its `k_proj`/`v_proj` slice holds the key/value heads those query heads
read (GQA groups stay whole when both head counts divide by the TP size). In the attention call
the query is a plain local tensor of `count` heads; local head j is global head `first + j`.

DySCO's hook (`decoder.attention`) names heads globally. On a sharded layer it computes the
captured probabilities only for the heads of the request that this rank holds and leaves zeros in
the slots of the others; `use_plan` then sums the captures of every layer across the TP group in
one all_reduce (`gather_captured`, the one place the ranks exchange DySCO state), so every rank
ends the forward with the same complete [batch, heads, rows, positions] captures the unsharded
model would have produced. Importance, selection and the bias then run identically on every
rank; the bias is one value per position, added to every local head.

The fast path (`decoder.fast`) uses the same pieces: `head_shards` for which heads each layer's
attention call holds, and `gather_captured` on the raw logits its decode kernel records for the heads
of S (zero rows for heads held elsewhere) before each importance update.

    shard = head_shard(model.model.layers[0].self_attn, n_heads=32, head_dim=128)   # on rank 1 of 2
    shard.first, shard.count   # → (16, 16)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["HeadShard", "check_head_counts", "gather_captured", "head_shard", "head_shards", "is_sharded", "localize"]


@dataclass(frozen=True)
class HeadShard:
    """The contiguous run of query heads one rank holds in one attention layer."""

    first: int  # global index of the rank's first query head
    count: int  # query heads on this rank
    group: object  # torch.distributed ProcessGroup of the TP mesh dimension the heads are split over


def head_shard(module: torch.nn.Module, n_heads: int, head_dim: int) -> HeadShard | None:
    """This rank's query heads of attention `module` (None when its query projection is not sharded).

    Reads the sharding of `module.q_proj.weight`: a DTensor with one `Shard(0)` placement. Raises
    ValueError when the shard does not fall on head boundaries (heads split between ranks)."""
    weight = getattr(getattr(module, "q_proj", None), "weight", None)
    if weight is None or not _is_dtensor(weight):
        return None
    from torch.distributed.tensor import Shard

    dims = [i for i, p in enumerate(weight.placements) if p.is_shard()]
    if not dims:  # replicated: every rank holds every head
        return None
    if len(dims) > 1 or weight.placements[dims[0]] != Shard(0):
        raise ValueError(
            f"{type(module).__name__}.q_proj.weight is sharded as {weight.placements}; DySCO knows the colwise plan "
            "(one Shard(0) placement: contiguous query heads per rank)"
        )
    mesh, dim = weight.device_mesh, dims[0]
    size, rank = mesh.size(dim), mesh.get_local_rank(dim)
    rows = weight.shape[0]
    # DTensor's Shard follows torch.chunk: ceil(rows / size) rows per rank, the last ranks shorter.
    chunk = -(-rows // size)
    start, stop = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
    local_rows = weight.to_local().shape[0]
    if local_rows != stop - start:
        raise ValueError(
            f"{type(module).__name__}.q_proj.weight holds {local_rows} rows on rank {rank} of {size}, expected "
            f"{stop - start} (torch.chunk layout of {rows}); cannot tell which heads this rank holds"
        )
    if rows != n_heads * head_dim or start % head_dim or stop % head_dim:
        raise ValueError(
            f"tensor parallelism over {size} ranks splits {type(module).__name__}'s {n_heads} query heads of "
            f"{head_dim} between ranks (rank {rank} holds rows {start}..{stop - 1} of {rows}); DySCO needs whole "
            f"heads per rank: a TP size that divides the number of heads"
        )
    return HeadShard(first=start // head_dim, count=(stop - start) // head_dim, group=mesh.get_group(dim))


def head_shards(modules: Iterable[torch.nn.Module], config) -> tuple[dict[int, HeadShard], object]:
    """layer -> this rank's query heads, for every attention module (`layer_idx`) whose q_proj is sharded,
    and the one process group they are split over (None when no attention layer is sharded).

    `config` is the (text) model config. Raises ValueError when a shard splits a head or the layers'
    heads are split over different process groups."""
    n_heads = config.num_attention_heads
    shards = {}
    for module in modules:
        if not hasattr(module, "layer_idx"):
            continue
        head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // n_heads
        shard = head_shard(module, n_heads, head_dim)
        if shard is not None:
            shards[module.layer_idx] = shard
    groups = {id(shard.group): shard.group for shard in shards.values()}
    if len(groups) > 1:
        raise ValueError("its attention heads are split over several process groups")
    return shards, next(iter(groups.values()), None)


def check_head_counts(computed: dict[int, int], shards: dict[int, HeadShard], n_heads: int) -> None:
    """Refuse (ValueError) a layer whose attention call saw another number of query heads (`computed`,
    layer -> heads, from a real forward) than its q_proj sharding says this rank holds."""
    for layer, heads in sorted(computed.items()):
        shard = shards.get(layer)
        expected = shard.count if shard is not None else n_heads
        if heads != expected:
            raise ValueError(
                f"layer {layer} computes attention for {heads} query heads on this rank, but its q_proj sharding says "
                f"{expected}; DySCO reads heads by global index and supports the colwise tensor-parallel plan (a "
                "sharded q_proj) or replicated attention"
            )


def localize(heads: torch.Tensor, shard: HeadShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Global head indices [n] → (local index on this rank, clamped into range [n]; held by this rank, bool [n]).

    No host sync: a head this rank does not hold gets a valid local index and `held = False`, so its
    values can be computed and then zeroed."""
    local = heads - shard.first
    held = (local >= 0) & (local < shard.count)
    return local.clamp(0, shard.count - 1), held


def gather_captured(captured: dict[int, torch.Tensor], group) -> None:
    """Sum every rank's zero-filled captures [batch, heads, rows, positions] across `group`, in place, in one
    all_reduce: each head is held by exactly one rank, so the sum is that rank's values, bit for bit."""
    if not captured:
        return
    import torch.distributed as dist

    layers = sorted(captured)
    flat = torch.cat([captured[layer].reshape(-1) for layer in layers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for layer in layers:
        n = captured[layer].numel()
        captured[layer] = flat[offset : offset + n].view_as(captured[layer])
        offset += n


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of `model` is a DTensor (a model loaded with a tp_plan)."""
    return any(_is_dtensor(p) for p in model.parameters())


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(tensor, DTensor)
