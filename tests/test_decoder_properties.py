"""Property tests of DySCO's pure steps: importance, selection, bias; and the knobs' validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoder.dysco import DyscoConfig, dysco_bias, select_positions, update_importance, upweighted_positions

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
def test_selection_is_the_nucleus_capped_at_top_k(importance, top_p, top_k):
    selected = select_positions(importance, top_p, top_k)
    assert selected.dtype == torch.bool and selected.shape == importance.shape
    for row, chosen in zip(importance.tolist(), selected.tolist()):
        picked = [p for p, c in zip(row, chosen) if c]
        others = [p for p, c in zip(row, chosen) if not c]
        # Brute-force nucleus size: walk down the sorted masses until they reach top_p.
        ordered = sorted(row, reverse=True)
        size, mass = 0, 0.0
        for p in ordered:
            if mass >= top_p or p == 0:
                break
            size, mass = size + 1, mass + p
        size = max(size, 1)
        assert len(picked) == min(size, top_k)
        assert 1 <= len(picked) <= top_k
        # The highest positions, whatever the ties.
        assert not others or min(picked) >= max(others)
        if len(picked) < top_k and size == len(picked):
            assert sum(picked) >= top_p - 1e-5 or all(p == 0 for p in others)
            assert sum(picked) - min(picked) < top_p + 1e-5  # smallest such set


@given(distributions(min_len=2), st.floats(0.01, 1.0), st.integers(1, 50), st.data())
def test_current_position_is_always_and_template_positions_never_upweighted(importance, top_p, top_k, data):
    batch, n = importance.shape
    template = torch.tensor([data.draw(st.lists(st.booleans(), min_size=n, max_size=n)) for _ in range(batch)])
    template[:, -1] = data.draw(st.booleans())  # even a current position marked as template is up-weighted
    real = torch.ones(batch, n, dtype=torch.bool)
    real[:, : data.draw(st.integers(0, n - 1))] = False  # left padding
    selected = select_positions(importance, top_p, top_k)
    up = upweighted_positions(selected, template, real)
    assert torch.all(up[:, -1])
    assert not torch.any(up[:, :-1] & template[:, :-1])
    assert not torch.any(up[:, :-1] & ~real[:, :-1])
    assert torch.equal(up[:, :-1], selected[:, :-1] & ~template[:, :-1] & real[:, :-1])
    for strength in (1.5, 2.0, 99.0):
        bias = dysco_bias(selected, strength, template=template, real=real)
        if strength >= 99:
            assert torch.all(bias[up] == 0) and torch.all(bias[~up] == float("-inf"))
        else:
            assert torch.allclose(bias[up], torch.tensor(math.log(strength))) and torch.all(bias[~up] == 0)


def test_selection_examples():
    importance = torch.tensor([[0.5, 0.3, 0.1, 0.1, 0.0]])
    assert select_positions(importance, 0.5, 10).tolist() == [[True, False, False, False, False]]
    assert select_positions(importance, 0.8, 10).tolist() == [[True, True, False, False, False]]
    assert select_positions(importance, 0.81, 10).tolist() == [[True, True, True, False, False]]  # tie: first wins
    assert select_positions(importance, 1.0, 10).tolist() == [[True, True, True, True, False]]  # zero never
    assert select_positions(importance, 1.0, 2).tolist() == [[True, True, False, False, False]]


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
        (dict(selection="sometimes"), "selection must be one of dynamic, static"),
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
