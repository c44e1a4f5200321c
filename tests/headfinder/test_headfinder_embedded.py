"""Real checks on the embedded SmolLM2-135M-Instruct at short contexts."""

from __future__ import annotations

import pytest

from headfinder.head_sets import top_k_heads
from headfinder.probes import make_needle_probes, make_qr_probes
from headfinder.scores import needle_accuracy, qr_scores, retrieval_scores

pytestmark = pytest.mark.embedded


def test_smollm2_qr_heads_are_the_ones_needle_retrieval_needs(smollm2):
    model, tokenizer = smollm2
    qr = qr_scores(model, make_qr_probes(tokenizer, 4, 512, seed=0), progress=False)
    heads = top_k_heads(qr.qr, 16)
    needles = make_needle_probes(tokenizer, 3, 512, seed=1)
    retrieval = retrieval_scores(model, tokenizer, needles, progress=False)
    assert retrieval.accuracy == 1.0, retrieval.replies  # the model copies the needle
    # Two independent methods agree: the strongest copy head is among the QR heads ...
    assert top_k_heads(retrieval.retrieval, 1)[0] in heads
    # ... and zeroing the QR heads breaks the copying.
    assert needle_accuracy(model, tokenizer, needles, heads, progress=False) <= 1 / 3
