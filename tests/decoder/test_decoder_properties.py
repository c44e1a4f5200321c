"""Property tests of DySCO's pure steps: importance, selection, bias; and the knobs' validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoder.dysco import (
    DyscoConfig, dysco_bias, feed_schedule, parse_intervention_warmup, select_positions, update_importance,
    upweighted_positions,
)

settings.register_profile("decoder", max_examples=60, deadline=None)
settings.load_profile("decoder")


@st.composite
def distributions(draw, min_len=1, max_len=40, batch=3):
    """A batch of probability rows with exact zeros and ties mixed in."""
    n = draw(st.integers(min_len, max_len))
    rows = []
    for _ in range(batch):
        values = draw(st.lists(st.sampled_from([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 3.0, 7.5]) | st.floats(0.0, 10.0, width=32),
                               min_size=n, max_size=n))
        values = [v if v == 0 or v > 1e-6 else 0.0 for v in values]  # no subnormals
        if sum(values) == 0:
            values[draw(st.integers(0, n - 1))] = 1.0
        rows.append(values)
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.sum(-1, keepdim=True)


@given(distributions(), st.floats(0.0, 0.99), st.integers(0, 5))
def test_importance_is_a_distribution_over_every_position(cur, decay, fewer):
    n = cur.shape[-1]
    past = cur[:, : max(n - fewer, 1)] if n > 1 else None
    importance = update_importance(past, cur, decay)
    assert importance.shape == cur.shape and importance.dtype == torch.float32
    torch.testing.assert_close(importance.sum(-1), torch.ones(cur.shape[0]))
    assert torch.all(importance >= 0)
    if past is not None:  # the blend before normalising: cur + decay * zero-extended past
        blended = cur + decay * torch.nn.functional.pad(past, (0, n - past.shape[-1]))
        torch.testing.assert_close(importance, blended / blended.sum(-1, keepdim=True))


@given(distributions(), st.floats(0.01, 1.0), st.integers(1, 50))
def test_selection_is_the_nucleus_within_top_p_capped_at_top_k(importance, top_p, top_k):
    selected = select_positions(importance, top_p, top_k)
    assert selected.dtype == torch.bool and selected.shape == importance.shape
    for row, chosen in zip(importance.tolist(), selected.tolist()):
        picked = [p for p, c in zip(row, chosen) if c]
        others = [p for p, c in zip(row, chosen) if not c]
        assert 1 <= len(picked) <= top_k
        assert not others or min(picked) >= max(others)  # the highest positions, whatever the ties
        # Kept mass stays within top_p (the top position is kept even when it alone exceeds it) ...
        assert len(picked) == 1 or sum(picked) <= top_p + 1e-5
        # ... and the next position would have pushed it over (unless top_k stopped the walk).
        if others and len(picked) < top_k:
            assert sum(picked) + max(others) > top_p - 1e-5


def test_selection_hand_worked_vectors():
    """The published rule: keep each position whose cumulative mass, itself included, is <= top_p."""
    importance = torch.tensor([[0.5, 0.25, 0.125, 0.125, 0.0]])  # exact binary fractions: no rounding
    rows = lambda p, k=10: select_positions(importance, p, k).tolist()[0]  # noqa: E731
    assert rows(0.4) == [True, False, False, False, False]  # the top one alone exceeds top_p: kept anyway
    assert rows(0.6) == [True, False, False, False, False]  # "reaching" 0.6 would have taken two
    assert rows(0.75) == [True, True, False, False, False]  # a mass landing exactly on top_p is kept
    assert rows(0.8) == [True, True, False, False, False]
    assert rows(0.875) == [True, True, True, False, False]  # tie at 0.125: the earlier position first
    assert rows(0.9) == [True, True, True, False, False]
    assert rows(1.0) == [True, True, True, True, True]  # top_p = 1 keeps everything, zero-importance too
    assert rows(1.0, 2) == [True, True, False, False, False]  # then the top_k highest
    ties = torch.tensor([[0.25, 0.5, 0.25]])
    assert select_positions(ties, 0.75, 10).tolist() == [[True, True, False]]
    # Unnormalised rows are renormalised first, as the published code does.
    assert select_positions(importance * 3, 0.75, 10).tolist() == select_positions(importance, 0.75, 10).tolist()


def test_invalid_positions_rank_last_and_are_never_selected():
    importance = torch.tensor([[0.0, 0.0, 0.5, 0.25, 0.25]])  # two padding columns of zero importance
    valid = torch.tensor([[False, False, True, True, True]])
    assert select_positions(importance, 1.0, 10, valid=valid).tolist() == [[False, False, True, True, True]]
    assert select_positions(importance, 1.0, 2, valid=valid).tolist() == [[False, False, True, True, False]]
    # The same row without its padding selects the same positions.
    assert select_positions(importance[:, 2:], 1.0, 2).tolist() == [[True, True, False]]


@given(distributions(min_len=2), st.floats(0.01, 1.0), st.integers(1, 50), st.data())
def test_current_position_is_always_and_template_positions_never_upweighted_soft(importance, top_p, top_k, data):
    batch, n = importance.shape
    template = torch.tensor([data.draw(st.lists(st.booleans(), min_size=n, max_size=n)) for _ in range(batch)])
    template[:, -1] = data.draw(st.booleans())  # even a current position marked as template is up-weighted
    real = torch.ones(batch, n, dtype=torch.bool)
    real[:, : data.draw(st.integers(0, n - 1))] = False  # left padding
    selected = select_positions(importance, top_p, top_k, valid=real)
    up = upweighted_positions(selected, template, real)
    assert torch.all(up[:, -1])
    assert not torch.any(up[:, :-1] & template[:, :-1])
    assert not torch.any(up[:, :-1] & ~real[:, :-1])
    assert torch.equal(up[:, :-1], selected[:, :-1] & ~template[:, :-1] & real[:, :-1])
    for strength in (1.5, 2.0):
        bias = dysco_bias(up, strength)
        assert torch.allclose(bias[up], torch.tensor(math.log(strength))) and torch.all(bias[~up] == 0)


@given(distributions(min_len=2), st.floats(0.01, 1.0), st.integers(1, 50), st.data())
def test_hard_variant_keeps_selected_template_positions_visible(importance, top_p, top_k, data):
    batch, n = importance.shape
    template = torch.tensor([data.draw(st.lists(st.booleans(), min_size=n, max_size=n)) for _ in range(batch)])
    real = torch.ones(batch, n, dtype=torch.bool)
    real[:, : data.draw(st.integers(0, n - 1))] = False
    selected = select_positions(importance, top_p, top_k, valid=real)
    up = upweighted_positions(selected, template, real, hard=True)
    assert torch.equal(up[:, :-1], selected[:, :-1] & real[:, :-1])  # template plays no part
    assert torch.all(up[:, -1])
    bias = dysco_bias(up, 99.0)
    assert torch.all(bias[up] == 0) and torch.all(bias[~up] == float("-inf"))


def test_hard_template_rule_by_hand():
    selected = torch.tensor([[True, True, False, False, False]])
    template = torch.tensor([[True, False, True, False, False]])
    assert upweighted_positions(selected, template, hard=True).tolist() == [[True, True, False, False, True]]
    assert upweighted_positions(selected, template).tolist() == [[False, True, False, False, True]]
    assert upweighted_positions(selected, template, current=False).tolist() == [[False, True, False, False, False]]


@pytest.mark.parametrize(
    ("prompt_len", "context_warmup", "intervention_warmup", "prefill_end", "intervene_from"),
    [
        (100, 8, 4, 88, 95),  # SmolLM2, published: 12 fed, 7 importance-only, the last 5 intervened
        (100, 8, 0, 92, 99),  # intervention from the last prompt token
        (100, 1, 0, 99, 99),
        (100, 0, 0, 100, 100),  # prefill everything: the first token from the prefill
        (100, 0, 3, 97, 97),  # no importance-only step: the fed tokens all intervene
        (10, 8, 4, 0, 5),  # a prompt shorter than the fed span is fed from its first token
        (3, 8, 4, 0, 0),
    ],
)
def test_feed_schedule(prompt_len, context_warmup, intervention_warmup, prefill_end, intervene_from):
    schedule = feed_schedule(prompt_len, context_warmup, intervention_warmup)
    assert (schedule.prefill_end, schedule.intervene_from) == (prefill_end, intervene_from)
    assert len(schedule.importance_only) + len(schedule.intervened) == prompt_len - prefill_end


def test_intervention_warmup_values():
    assert parse_intervention_warmup("auto") == "auto" and parse_intervention_warmup(" AUTO ") == "auto"
    assert parse_intervention_warmup(3) == 3 and parse_intervention_warmup("0") == 0
    for bad in (-1, "x", 1.5, True, None, "-2", "²"):
        with pytest.raises(ValueError, match="intervention_warmup must be 'auto'"):
            parse_intervention_warmup(bad)
    assert DyscoConfig(head_set=[(0, 0)]).intervention_warmup == "auto"
    assert DyscoConfig(head_set=[(0, 0)], intervention_warmup="2").intervention_warmup == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(strength=0.0), "strength must be > 0"),
        (dict(strength=-1.0), "strength must be > 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(top_k=2.5), "top_k must be an integer >= 1"),
        (dict(decay=1.0), r"decay must be in \[0, 1\)"),
        (dict(decay=-0.1), r"decay must be in \[0, 1\)"),
        (dict(context_warmup=-1), "context_warmup must be an integer >= 0"),
        (dict(selection="sometimes"), "selection must be one of dynamic, static, lagged"),
        (dict(selection="lagged", lagged_probs="softmax"), "lagged_probs must be one of plain, biased"),
        (dict(lagged_probs=None), "lagged_probs must be one of plain, biased"),
        (dict(head_set=[]), "head_set is empty"),
        (dict(head_set=[(1, 2), (1, 2)]), "more than once"),
        (dict(head_set=[(1, 2, 3)]), r"\(layer, head\) pairs"),
        (dict(head_set=[(1.5, 2)]), "pairs of integers"),
        (dict(strength=float("nan")), "finite number"),
    ],
)
def test_bad_knobs_are_refused_with_a_clear_error(changes, message):
    base = dict(head_set=[(1, 2)])
    base.update(changes)
    with pytest.raises(ValueError, match=message):
        DyscoConfig(**base)


def test_head_outside_the_model_names_its_shape():
    config = DyscoConfig(head_set=[(1, 2), (4, 0)])
    with pytest.raises(ValueError, match=r"4 layers × 4 heads"):
        config.check_model(4, 4)
    config.check_model(5, 4)
    assert config.heads_by_layer == {1: (2,), 4: (0,)} and config.deepest_layer == 4
    assert DyscoConfig(head_set=[(0, 0)], strength=99).hard
    lagged = DyscoConfig(head_set=[(0, 0)], selection="lagged")
    assert lagged.lagged and lagged.lagged_probs == "plain" and not config.lagged
    assert lagged.replace(lagged_probs="biased").lagged_probs == "biased"
