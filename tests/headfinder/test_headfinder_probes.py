"""Probe generators: deterministic, sized in tokens, with token spans that point at the right text."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decoder.tiny import tiny_tokenizer
from headfinder.probes import NULL_QUERY, make_kv_probes, make_needle_probes, make_qr_probes


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tokenizer():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = None
    return tok


def _text(tokenizer, ids, span):
    return tokenizer.decode(ids[span[0]: span[1]])


def test_qr_probes_are_deterministic_and_seeds_give_disjoint_worlds(tokenizer):
    a = make_qr_probes(tokenizer, 4, 700, seed=0)
    assert a == make_qr_probes(tokenizer, 4, 700, seed=0)
    assert make_qr_probes(tokenizer, 2, 700, seed=0) == a[:2]  # a smaller set is a prefix of a larger one
    b = make_qr_probes(tokenizer, 4, 700, seed=1)
    assert {p.question for p in a}.isdisjoint({p.question for p in b})


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), context=st.integers(500, 1400))
def test_qr_probe_spans_point_at_documents_question_and_null_query(seed, context):
    tokenizer = tiny_tokenizer()
    for probe in make_qr_probes(tokenizer, 4, context, seed=seed):  # the 4th is two-hop
        assert len(probe.query_ids) <= context and len(probe.null_ids) <= context
        assert probe.query_ids[: probe.prefix_len] == probe.null_ids[: probe.prefix_len]
        # Documents are ordered, disjoint and all inside the shared prefix.
        ends = [0] + [e for _, e in probe.doc_spans]
        assert all(ends[i] <= s < e for i, (s, e) in enumerate(probe.doc_spans))
        assert probe.doc_spans[-1][1] <= probe.prefix_len <= probe.query_rows[0]
        assert _text(tokenizer, probe.query_ids, probe.query_rows).strip() == probe.question
        assert _text(tokenizer, probe.null_ids, probe.null_rows).strip() == NULL_QUERY
        for k, (s, e) in enumerate(probe.doc_spans):
            assert _text(tokenizer, probe.query_ids, (s, e)).strip().startswith(f"Document {k + 1}:")
        gold_text = " ".join(_text(tokenizer, probe.query_ids, probe.doc_spans[g]) for g in probe.gold)
        assert probe.answer in gold_text
        if probe.hops == 2:
            assert len(probe.gold) == 2


def test_single_gold_document_is_the_only_one_about_the_asked_entity(tokenizer):
    for probe in make_qr_probes(tokenizer, 6, 900, seed=5, multi_hop_every=0):
        assert probe.hops == 1 and len(probe.gold) == 1
        docs = [_text(tokenizer, probe.query_ids, span) for span in probe.doc_spans]
        assert probe.entity in probe.question
        mentioning = [k for k, d in enumerate(docs) if probe.entity in d]
        assert mentioning == probe.gold, probe.question


def test_two_hop_probe_links_person_to_organisation(tokenizer):
    probe = make_qr_probes(tokenizer, 4, 1200, seed=7)[3]
    assert probe.hops == 2
    person_doc, org_doc = sorted((_text(tokenizer, probe.query_ids, probe.doc_spans[g]) for g in probe.gold),
                                 key=lambda d: "works for" not in d)
    organisation = person_doc.split("works for the ")[1].split(".")[0]
    assert f"The {organisation} is a" in org_doc and probe.answer in org_doc


def test_probes_fill_the_requested_context(tokenizer):
    small = make_qr_probes(tokenizer, 2, 700, seed=0)
    large = make_qr_probes(tokenizer, 2, 1800, seed=0)
    assert all(p.num_docs > q.num_docs for p, q in zip(large, small))
    assert all(len(p.query_ids) > 0.75 * 1800 for p in large)


def test_plain_text_rendering_without_a_chat_template(plain_tokenizer):
    probe = make_qr_probes(plain_tokenizer, 1, 700, seed=0)[0]
    text = plain_tokenizer.decode(probe.query_ids)
    assert "<|im_start|>" not in text and text.endswith("Answer:")
    needle = make_needle_probes(plain_tokenizer, 1, 300, seed=0)[0]
    assert plain_tokenizer.decode(needle.prompt_ids).endswith("Answer:")


def test_kv_probes_are_seeded_sized_and_point_at_the_asked_pair(tokenizer):
    probes = make_kv_probes(tokenizer, 4, 900, seed=3)
    assert probes == make_kv_probes(tokenizer, 4, 900, seed=3)
    assert make_kv_probes(tokenizer, 2, 900, seed=3) == probes[:2]
    assert {p.entity for p in probes}.isdisjoint({p.entity for p in make_kv_probes(tokenizer, 4, 900, seed=4)})
    for probe in probes:
        assert 0.75 * 900 < len(probe.query_ids) <= 900 and len(probe.null_ids) <= 900
        assert probe.query_ids[: probe.prefix_len] == probe.null_ids[: probe.prefix_len]
        assert probe.doc_spans[-1][1] <= probe.prefix_len <= probe.query_rows[0]
        assert probe.hops == 1 and len(probe.gold) == 1 and probe.num_docs >= 5
        question = _text(tokenizer, probe.query_ids, probe.query_rows).strip()
        assert question == probe.question and f'"{probe.entity}"' in question
        assert _text(tokenizer, probe.null_ids, probe.null_rows).strip() == NULL_QUERY
        # Every document is one line of the JSON object; only the gold one holds the asked key, and its value.
        lines = [_text(tokenizer, probe.query_ids, span).strip().rstrip(",") for span in probe.doc_spans]
        assert all(line.count('"') == 4 and '": "' in line for line in lines)
        assert [k for k, line in enumerate(lines) if probe.entity in line] == probe.gold
        assert lines[probe.gold[0]] == f'"{probe.entity}": "{probe.answer}"'
    with pytest.raises(ValueError, match="too short for these probes.*use at least"):
        make_kv_probes(tokenizer, 1, 60, seed=0)


def test_kv_probes_read_like_the_kv_dev_task(tokenizer):
    # headfinder may not import calibration (one-way flow), so the layout is written twice: keep them equal.
    from calibration.tasks.kv import KVTask
    from headfinder.probes import KV_INSTRUCTION

    example = KVTask().generate(tokenizer, n=1, context_tokens=600, seed=0)[0]
    content = example.messages[0]["content"]
    probe = make_kv_probes(tokenizer, 1, 600, seed=0)[0]
    assert content.startswith(KV_INSTRUCTION + "\n\n{\n")
    assert content.endswith("\n}\n\n" + probe.question.replace(probe.entity, example.meta["key"]))
    pair_line = f'"{example.meta["key"]}": "{example.answer}"'
    probe_text = tokenizer.decode(probe.query_ids)
    assert pair_line in content and f'"{probe.entity}": "{probe.answer}"' in probe_text
    assert KV_INSTRUCTION + "\n\n{\n" in probe_text and "\n}\n\n" + probe.question in probe_text
    assert content.count('",\n"') == example.meta["n_pairs"] - 1 and probe_text.count('",\n"') == probe.num_docs - 1


def test_needle_sits_at_the_requested_depth(tokenizer):
    probes = make_needle_probes(tokenizer, 3, 600, seed=0, depths=[0.1, 0.5, 0.9])
    starts = [p.needle_span[0] for p in probes]
    assert starts == sorted(starts) and starts[2] - starts[0] > 250
    for p in probes:
        assert len(p.prompt_ids) <= 600
        assert _text(tokenizer, p.prompt_ids, p.needle_span).strip() == p.needle
        assert p.key in p.needle and p.max_new_tokens > p.needle_len


def test_custom_needle_and_answer_prefix(tokenizer):
    probe = make_needle_probes(tokenizer, 1, 200, needle="=QXJ", key="QXJ", question="what is the code?",
                               filler=["the lazy dog."], answer_prefix=" =")[0]
    assert tokenizer.decode(probe.prompt_ids).endswith("assistant\n =")
    assert _text(tokenizer, probe.prompt_ids, probe.needle_span).strip() == "=QXJ"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: make_qr_probes(t, 0, 1000), "positive integer, got 0"),
        (lambda t: make_qr_probes(t, 2, 100), "too short"),
        (lambda t: make_qr_probes(t, 2, 300), "cannot hold even two documents"),
        (lambda t: make_needle_probes(t, 0, 1000), "positive integer, got 0"),
        (lambda t: make_needle_probes(t, 2, 500, depths=[0.5]), "one depth per probe"),
        (lambda t: make_needle_probes(t, 1, 500, depths=[1.5]), r"lie in \[0, 1\]"),
        (lambda t: make_needle_probes(t, 1, 500, needle="abc"), "together"),
        (lambda t: make_needle_probes(t, 1, 500, needle="abc", key="z", question="q?"), "must occur in the needle"),
    ],
)
def test_bad_probe_requests_are_refused_clearly(tokenizer, call, message):
    with pytest.raises(ValueError, match=message):
        call(tokenizer)


@pytest.mark.parametrize("make", [make_qr_probes, make_needle_probes])
def test_the_minimum_context_a_refusal_names_is_enough(tokenizer, make):
    """`--context 128` said "use at least 160", and 160 then failed (issue 15): the minimum given must work."""
    import re

    with pytest.raises(ValueError, match="too short") as refused:
        make(tokenizer, 8, 40)
    minimum = int(re.search(r"use at least (\d+) tokens", str(refused.value)).group(1))
    assert len(make(tokenizer, 8, minimum)) == 8
    with pytest.raises(ValueError, match=f"use at least {minimum} tokens"):
        make(tokenizer, 8, minimum - 1)
