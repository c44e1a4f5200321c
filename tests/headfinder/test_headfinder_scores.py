"""Scoring math on hand-made attention, head sets, stability, and the model drivers on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from decoder.attention import AttentionPlan, attach, use_plan
from headfinder import scores as scores_module
from headfinder.head_sets import stability_report, top_k_heads, validate_head_set
from headfinder.probes import make_qr_probes
from headfinder.scores import (
    calibrated_token_scores,
    document_scores,
    gold_score,
    model_shape,
    ndcg_scores,
    qr_probe_doc_scores,
    retrieval_hits,
)
from headfinder.validate import ValidationReport, random_head_sets

# --------------------------------------------------------------------------------------------------
# QR math


def test_calibration_subtracts_the_null_query_row_mean():
    # Two query rows and one null row over 4 keys; the last key is a suffix position, not context.
    query = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2]])
    null = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    got = calibrated_token_scores(query, null, context_len=3)
    assert torch.allclose(got, torch.tensor([0.3 - 0.25, 0.4 - 0.25, 0.15 - 0.25]))


def test_document_scores_sum_tokens_after_zeroing_low_outliers():
    doc_a = [1.0] * 9 + [-10.0]  # one token far below mean − 2·std: dropped
    doc_b = [0.5, -0.5, 0.25]  # nothing below mean − 2·std: kept as is
    tokens = torch.tensor([0.0] + doc_a + doc_b)
    got = document_scores(tokens, [(1, 11), (11, 14)])
    assert torch.allclose(got, torch.tensor([9.0, 0.25]))


def test_document_scores_keep_high_outliers_and_work_per_head():
    tokens = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -9.0]])
    got = document_scores(tokens, [(0, 10)])
    assert torch.allclose(got, torch.tensor([[5.0], [9.0]]))


def test_document_span_outside_the_context_is_an_error():
    with pytest.raises(ValueError, match="outside the 5 context tokens"):
        document_scores(torch.zeros(5), [(3, 9)])


def test_gold_score_sums_every_gold_document():
    docs = torch.tensor([[0.1, 0.7, 0.2], [0.3, -0.1, 0.4]])
    assert torch.allclose(gold_score(docs, [1]), torch.tensor([0.7, -0.1]))
    assert torch.allclose(gold_score(docs, [0, 2]), torch.tensor([0.3, 0.7]))
    with pytest.raises(ValueError, match="at least one gold"):
        gold_score(docs, [])


def test_ndcg_is_one_when_gold_ranks_first_and_falls_as_it_sinks():
    docs = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.1, 0.9], [0.1, 0.9, 0.0]])
    got = ndcg_scores(docs, [0])
    # Gold at rank 1, 3, 2: DCG 1, 1/log2(4), 1/log2(3) over an ideal DCG of 1.
    assert torch.allclose(got, torch.tensor([1.0, 0.5, 1 / math.log2(3)]), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Retrieval math


def test_retrieval_hit_needs_argmax_inside_the_needle_on_the_generated_token():
    context = torch.tensor([7, 8, 9, 10, 11, 12])  # needle = positions 2..4 (tokens 9, 10, 11)
    attention = torch.zeros(4, 6)
    attention[0, 3] = 1.0  # on token 10, inside the needle: a hit when 10 is generated
    attention[1, 0] = 1.0  # outside the needle
    attention[2, 2] = 1.0  # inside the needle, but on token 9
    attention[3, 5] = 1.0  # token 12 is not inside the needle
    hits = retrieval_hits(attention, context, (2, 5), generated=10)
    assert hits.tolist() == [1.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------------
# Head sets and stability


def test_top_k_heads_are_best_first_with_index_order_for_ties():
    scores = torch.tensor([[0.1, 0.5, 0.2], [0.5, 0.0, 0.9]])
    assert top_k_heads(scores, 3) == [(1, 2), (0, 1), (1, 0)]


@pytest.mark.parametrize("k", [0, 7])
def test_top_k_outside_the_head_count_is_refused(k):
    with pytest.raises(ValueError, match=r"between 1 and the model's 6 heads \(2 layers × 3\)"):
        top_k_heads(torch.zeros(2, 3), k)


def test_validate_head_set_names_the_model_shape():
    assert validate_head_set([[1, 2]], 2, 3) == [(1, 2)]
    with pytest.raises(ValueError, match=r"\(2, 0\) is outside the model's 2 layers × 3 heads"):
        validate_head_set([(2, 0)], 2, 3)
    with pytest.raises(ValueError, match="repeats"):
        validate_head_set([(0, 0), (0, 0)], 2, 3)


def test_stability_report_counts_shared_top_heads_and_rank_correlation():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    same = stability_report(a, a.clone(), k=4)
    assert same["top_k_shared"] == 4 and same["spearman"] == pytest.approx(1.0)
    flipped = stability_report(a, -a, k=4)
    assert flipped["top_k_shared"] == 0 and flipped["spearman"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        stability_report(a, a[:2], k=4)


def test_random_head_sets_are_reproducible_and_avoid_the_chosen_heads():
    chosen = [(0, 0), (1, 1)]
    draws = random_head_sets(4, 4, 2, draws=5, seed=3, exclude=chosen)
    assert draws == random_head_sets(4, 4, 2, draws=5, seed=3, exclude=chosen)
    assert draws != random_head_sets(4, 4, 2, draws=5, seed=4, exclude=chosen)
    assert all(len(set(d)) == 2 and not set(d) & set(chosen) for d in draws)
    with pytest.raises(ValueError, match="cannot draw 15"):
        random_head_sets(4, 4, 15, draws=1, seed=0, exclude=chosen)


def test_validation_report_drop_ratio():
    report = ValidationReport(heads=[(0, 0)], n_probes=10, context_tokens=100, baseline_accuracy=1.0,
                              ablated_accuracy=0.4, random_heads=[[(1, 1)]] * 2, random_accuracies=[0.9, 0.7])
    assert report.drop == pytest.approx(0.6)
    assert report.random_drop == pytest.approx(0.2)
    assert report.ratio == pytest.approx(3.0)
    free = ValidationReport(heads=[(0, 0)], n_probes=10, context_tokens=100, baseline_accuracy=1.0,
                            ablated_accuracy=0.0, random_heads=[[(1, 1)]], random_accuracies=[1.0])
    assert math.isinf(free.ratio) and free.to_dict()["ratio"] == "inf"


# --------------------------------------------------------------------------------------------------
# Drivers on tiny random models


def _full_prompt_doc_scores(model, probe) -> torch.Tensor:
    """The slow reference: each whole prompt run on its own, no shared prefix, no cache."""
    attach(model)
    n_layers, n_heads = model_shape(model)
    heads = {layer: torch.arange(n_heads) for layer in range(n_layers)}
    rows = []
    for ids, (start, end) in ((probe.query_ids, probe.query_rows), (probe.null_ids, probe.null_rows)):
        plan = AttentionPlan(capture_heads=heads, capture_rows=slice(start, end))
        with torch.no_grad(), use_plan(model, plan):
            model(input_ids=torch.tensor([ids]), use_cache=False)
        rows.append(torch.stack([plan.captured[layer][0] for layer in range(n_layers)]))
    token_scores = calibrated_token_scores(rows[0], rows[1], probe.prefix_len)
    return document_scores(token_scores, probe.doc_spans)


def test_shared_prefix_scoring_equals_running_each_prompt_whole(tiny):
    model, tokenizer = tiny
    probe = make_qr_probes(tokenizer, 1, 640, seed=2)[0]
    fast = qr_probe_doc_scores(model, probe)
    slow = _full_prompt_doc_scores(model, probe)
    assert fast.shape == (*model_shape(model), probe.num_docs)
    assert torch.allclose(fast, slow, atol=1e-5), f"{model.arch}: max diff {(fast - slow).abs().max()}"


def test_qr_scoring_captures_only_the_query_rows_and_keeps_their_mean(monkeypatch):
    from decoder.tiny import tiny_model

    model, tokenizer = tiny_model("qwen3")
    probe = make_qr_probes(tokenizer, 1, 640, seed=0)[0]
    plans = []
    real_use_plan = scores_module.use_plan

    def spying_use_plan(model_, plan, **kwargs):
        plans.append(plan)
        return real_use_plan(model_, plan, **kwargs)

    monkeypatch.setattr(scores_module, "use_plan", spying_use_plan)
    stored = []
    real_setitem = scores_module._RowMeans.__setitem__

    def spying_setitem(self, layer, probs):
        real_setitem(self, layer, probs)
        stored.append((tuple(probs.shape), tuple(dict.__getitem__(self, layer).shape)))

    monkeypatch.setattr(scores_module._RowMeans, "__setitem__", spying_setitem)
    qr_probe_doc_scores(model, probe)
    layers, heads = model_shape(model)
    (q0, q1), (n0, n1) = probe.query_rows, probe.null_rows
    assert [(p.capture_rows.start, p.capture_rows.stop) for p in plans] == [
        (q0 - probe.prefix_len, q1 - probe.prefix_len), (n0 - probe.prefix_len, n1 - probe.prefix_len)]
    # Each layer computes probabilities for the query rows only and keeps just their mean.
    assert stored == [((1, heads, q1 - q0, q1), (1, heads, 1, q1))] * layers + [
        ((1, heads, n1 - n0, n1), (1, heads, 1, n1))] * layers


def test_greedy_reply_with_captures_matches_transformers_generate(tiny):
    from headfinder.probes import make_needle_probes
    from headfinder.scores import _all_heads, greedy_reply

    model, tokenizer = tiny
    probe = make_needle_probes(tokenizer, 1, 200, seed=0)[0]
    heads = _all_heads(model)
    seen_lengths = []
    reply = greedy_reply(model, probe.prompt_ids, 5, set(), make_plan=lambda: AttentionPlan(capture_heads=heads),
                         on_step=lambda plan, token: seen_lengths.append(plan.captured[0].shape[-1]))
    reference = model.generate(torch.tensor([probe.prompt_ids]), max_new_tokens=5, do_sample=False,
                               min_new_tokens=5, pad_token_id=tokenizer.pad_token_id)[0, len(probe.prompt_ids):]
    assert reply == reference.tolist(), model.arch
    # Captured rows cover every absolute position seen so far, sliding-window layers included.
    n = len(probe.prompt_ids)
    assert seen_lengths == [n, n + 1, n + 2, n + 3, n + 4]
