"""Per-head scores, each a [layers × heads] float32 tensor.

- QR score (Zhang et al., EMNLP 2025): how much more attention a head sends from the question to the
  gold documents than from the null query "N/A" does, with per-document outlier filtering, averaged
  over probes; plus the ranking variant (NDCG of each head's ranking of the documents).
- Retrieval score (Wu et al. 2024): how often a head's strongest attention lands on the needle token
  that the model is copying at that moment, averaged over the tests the model got right.

The pure math takes attention tensors and is tested on hand-made ones; the drivers run a model with
`decoder.attention` plans, capturing only the rows they need:

    result = qr_scores(model, make_qr_probes(tokenizer, 16, 1024))
    result.qr.shape                     # [layers, heads]
    retrieval = retrieval_scores(model, tokenizer, make_needle_probes(tokenizer, 8, 1024))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from decoder.attention import AttentionPlan, attach, attention_layers, use_plan
from decoder.loading import cache_kwarg, eos_token_ids, model_shape
from headfinder.probes import NeedleProbe, QRProbe

# --------------------------------------------------------------------------------------------------
# QR score: the math


def calibrated_token_scores(query_probs: torch.Tensor, null_probs: torch.Tensor, context_len: int) -> torch.Tensor:
    """Per context token: mean attention from the question rows minus mean from the null-query rows.

    `query_probs` / `null_probs`: [..., rows, kv_len] probabilities (each row sums to 1 over its keys);
    returns [..., context_len] for the first `context_len` key positions, the shared prefix.
    """
    query = query_probs[..., :context_len].float().mean(dim=-2)
    null = null_probs[..., :context_len].float().mean(dim=-2)
    return query - null


def document_scores(token_scores: torch.Tensor, doc_spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Per document: sum of its tokens' scores after zeroing those below (mean − 2·std) of that document.

    `token_scores`: [..., context_len]; returns [..., n_docs]. The std is the population std (so a
    one-token document keeps its single score).
    """
    per_doc = []
    for start, end in doc_spans:
        if not 0 <= start < end <= token_scores.shape[-1]:
            raise ValueError(f"document span {(start, end)} lies outside the {token_scores.shape[-1]} context tokens")
        doc = token_scores[..., start:end]
        floor = doc.mean(dim=-1, keepdim=True) - 2 * doc.std(dim=-1, correction=0, keepdim=True)
        per_doc.append(torch.where(doc < floor, torch.zeros_like(doc), doc).sum(dim=-1))
    return torch.stack(per_doc, dim=-1)


def gold_score(doc_scores: torch.Tensor, gold: Sequence[int]) -> torch.Tensor:
    """A probe's QR score per head: the summed score of its gold documents ([..., n_docs] → [...])."""
    if not gold:
        raise ValueError("a probe needs at least one gold document")
    return doc_scores[..., list(gold)].sum(dim=-1)


def ndcg_scores(doc_scores: torch.Tensor, gold: Sequence[int]) -> torch.Tensor:
    """Per head, the NDCG of its document ranking with the gold documents relevant ([..., n_docs] → [...])."""
    from sklearn.metrics import ndcg_score

    flat = doc_scores.reshape(-1, doc_scores.shape[-1]).double().numpy()
    relevance = np.zeros((1, flat.shape[1]))
    relevance[0, list(gold)] = 1.0
    values = [ndcg_score(relevance, row[None, :]) for row in flat]
    return torch.tensor(values, dtype=torch.float32).reshape(doc_scores.shape[:-1])


# --------------------------------------------------------------------------------------------------
# Retrieval score: the math


def retrieval_hits(
    attention_row: torch.Tensor, context_ids: torch.Tensor, needle_span: tuple[int, int], generated: int
) -> torch.Tensor:
    """Heads whose strongest attention points into the needle at a token equal to the one just generated.

    `attention_row`: [..., kv_len] probabilities of the current query row; `context_ids`: the token ids
    at those positions (at least the prompt). Returns a [...] float tensor of 0/1.
    """
    position = attention_row.argmax(dim=-1)
    start, end = needle_span
    in_needle = (position >= start) & (position < end)
    token_at = context_ids.to(position.device)[position.clamp(max=context_ids.shape[0] - 1)]
    return (in_needle & (token_at == generated)).float()


# --------------------------------------------------------------------------------------------------
# Drivers


def _all_heads(model) -> dict[int, torch.Tensor]:
    attach(model)
    _, n_heads = model_shape(model)
    return {layer: torch.arange(n_heads) for layer in attention_layers(model)}


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _forward(model, ids: torch.Tensor, cache):
    """One forward that reads and extends `cache`."""
    return model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _progress(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="probe", disable=not enabled, leave=False)


@dataclass
class QRResult:
    """QR and NDCG scores [layers, heads], plus each probe's own QR score [probes, layers, heads]."""

    qr: torch.Tensor
    ndcg: torch.Tensor
    per_probe_qr: torch.Tensor
    per_probe_ndcg: torch.Tensor


class _RowMeans(dict):
    """A `captured` dict that keeps, per layer, only the mean over the captured query rows.

    The QR score needs nothing else, and reducing as each layer stores its probabilities keeps one
    [heads, kv_len] slice per layer instead of [heads, rows, kv_len] for every layer at once.
    """

    def __setitem__(self, layer: int, probs: torch.Tensor) -> None:
        super().__setitem__(layer, probs.mean(dim=2, keepdim=True))


def _rewinder(cache, length: int):
    """A function that cuts every layer of `cache` back to `length` tokens, or None if a layer cannot be cut.

    Cutting (a view of the first `length` positions) frees the suffix's copy as soon as the next
    forward concatenates, so the KV cache is never held twice; sliding-window layers, which drop old
    positions, are not cut this way.
    """
    from transformers.cache_utils import DynamicLayer

    if not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
        return None

    def rewind() -> None:
        for layer in cache.layers:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]

    return rewind


def qr_probe_doc_scores(model, probe: QRProbe) -> torch.Tensor:
    """Document scores [layers, heads, n_docs] of one probe: one prefill of the shared prefix, two short suffixes."""
    heads = _all_heads(model)
    n_layers, n_heads = model_shape(model)
    device = _device(model)
    cache = _new_cache(model)
    with torch.no_grad():
        prefix = torch.tensor([probe.query_ids[: probe.prefix_len]], device=device)
        _forward(model, prefix, cache)
        rewind = _rewinder(cache, probe.prefix_len)
        mean_rows = []
        for ids, (row_start, row_end) in ((probe.query_ids, probe.query_rows), (probe.null_ids, probe.null_rows)):
            # Rows after the query span cannot change its attention (causal), so the suffix stops there.
            suffix = torch.tensor([ids[probe.prefix_len : row_end]], device=device)
            plan = AttentionPlan(
                capture_heads=heads,
                capture_rows=slice(row_start - probe.prefix_len, row_end - probe.prefix_len),
                stop_after_layer=max(heads),
                kv_length=row_end,
                captured=_RowMeans(),
            )
            # Each suffix must see the prefix alone: cut the cache back after it, or let the
            # attention plan undo its writes where cutting is not possible.
            with use_plan(model, plan, frozen_cache=None if rewind else cache):
                _forward(model, suffix, cache)
            if rewind is not None:
                rewind()
            per_layer = torch.zeros(n_layers, n_heads, probe.prefix_len, dtype=torch.float32)
            for layer, probs in plan.captured.items():
                per_layer[layer] = probs[0, :, 0, : probe.prefix_len].float().cpu()
            plan.captured.clear()
            mean_rows.append(per_layer)
    token_scores = mean_rows[0] - mean_rows[1]
    return document_scores(token_scores, probe.doc_spans)


def qr_scores(model, probes: Sequence[QRProbe], *, progress: bool = True) -> QRResult:
    """QR score and NDCG ranking score of every head, averaged over `probes`."""
    if not probes:
        raise ValueError("QR scoring needs at least one probe")
    per_qr, per_ndcg = [], []
    for probe in _progress(probes, "QR probes", progress):
        docs = qr_probe_doc_scores(model, probe)
        per_qr.append(gold_score(docs, probe.gold))
        per_ndcg.append(ndcg_scores(docs, probe.gold))
    per_qr_t, per_ndcg_t = torch.stack(per_qr), torch.stack(per_ndcg)
    return QRResult(qr=per_qr_t.mean(0), ndcg=per_ndcg_t.mean(0), per_probe_qr=per_qr_t, per_probe_ndcg=per_ndcg_t)


def greedy_reply(
    model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: set[int],
    make_plan: Callable[[], AttentionPlan] | None = None,
    on_step: Callable[[AttentionPlan, int], None] | None = None,
) -> list[int]:
    """Greedy continuation of `prompt_ids`, each forward (prefill included) under a fresh plan from `make_plan`.

    `on_step(plan, token)` sees the plan of the forward that produced `token` (its captures included).
    """
    device = _device(model)
    cache = _new_cache(model)
    ids = torch.tensor([list(prompt_ids)], device=device)
    out_tokens: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            plan = make_plan() if make_plan is not None else AttentionPlan()
            plan.kv_length = cache.get_seq_length() + ids.shape[1]
            with use_plan(model, plan):
                logits = _forward(model, ids, cache).logits
            token = int(logits[0, -1].argmax())
            if on_step is not None:
                on_step(plan, token)
            if token in eos_ids:
                break
            out_tokens.append(token)
            ids = torch.tensor([[token]], device=device)
    return out_tokens


def needle_found(tokenizer, probe: NeedleProbe, reply_ids: Sequence[int]) -> bool:
    """Whether the reply retrieves the needle: its key appears in the decoded text."""
    return probe.key in tokenizer.decode(list(reply_ids), skip_special_tokens=True)


@dataclass
class RetrievalResult:
    """Retrieval score [layers, heads] over the successful tests, and what each test did."""

    retrieval: torch.Tensor
    per_probe: torch.Tensor  # [probes, layers, heads]; rows of failed tests are zero
    succeeded: list[bool]
    replies: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Fraction of tests in which the model retrieved the needle."""
        return sum(self.succeeded) / len(self.succeeded)


def retrieval_scores(model, tokenizer, probes: Sequence[NeedleProbe], *, progress: bool = True) -> RetrievalResult:
    """Copy-paste retrieval score of every head (Wu et al.): argmax-attention hits while copying the needle."""
    if not probes:
        raise ValueError("retrieval scoring needs at least one probe")
    heads = _all_heads(model)
    n_layers, n_heads = model_shape(model)
    eos = eos_token_ids(model, tokenizer)
    per_probe, succeeded, replies = [], [], []
    for probe in _progress(probes, "needle probes", progress):
        context = torch.tensor(probe.prompt_ids)
        hits = torch.zeros(n_layers, n_heads)

        def count(plan: AttentionPlan, token: int) -> None:
            for layer, probs in plan.captured.items():
                hits[layer] += retrieval_hits(probs[0, :, -1].cpu(), context, probe.needle_span, token)

        reply = greedy_reply(model, probe.prompt_ids, probe.max_new_tokens, eos,
                             make_plan=lambda: AttentionPlan(capture_heads=heads), on_step=count)
        ok = needle_found(tokenizer, probe, reply)
        succeeded.append(ok)
        replies.append(tokenizer.decode(reply, skip_special_tokens=True))
        per_probe.append(hits / probe.needle_len if ok else torch.zeros_like(hits))
    per_probe_t = torch.stack(per_probe)
    n_ok = sum(succeeded)
    score = per_probe_t.sum(0) / n_ok if n_ok else torch.zeros(n_layers, n_heads)
    return RetrievalResult(retrieval=score, per_probe=per_probe_t, succeeded=succeeded, replies=replies)


def needle_accuracy(
    model,
    tokenizer,
    probes: Sequence[NeedleProbe],
    ablate: Sequence[tuple[int, int]] = (),
    *,
    progress: bool = True,
    desc: str = "needle",
) -> float:
    """Fraction of needle probes answered correctly (greedy) with the outputs of the `ablate` heads zeroed."""
    if not probes:
        raise ValueError("needle accuracy needs at least one probe")
    attach(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in ablate:
        by_layer.setdefault(int(layer), []).append(int(head))
    ablate_heads = {layer: torch.tensor(sorted(hs)) for layer, hs in by_layer.items()}
    eos = eos_token_ids(model, tokenizer)
    found = 0
    for probe in _progress(probes, desc, progress):
        reply = greedy_reply(model, probe.prompt_ids, probe.max_new_tokens, eos,
                             make_plan=lambda: AttentionPlan(ablate_heads=ablate_heads))
        found += needle_found(tokenizer, probe, reply)
    return found / len(probes)
