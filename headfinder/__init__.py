"""headfinder: score every attention head on synthetic probes, pick QR-head sets, check they matter.

    from headfinder import make_qr_probes, qr_scores, top_k_heads
    probes = make_qr_probes(tokenizer, n=16, context_tokens=1024, seed=0)
    heads = top_k_heads(qr_scores(model, probes).qr, k=16)

Modules: `probes` (QR and needle probes), `scores` (QR, NDCG and retrieval scores), `head_sets`
(top-k, stability), `validate` (ablation check), `plots` (heatmaps), `cli` (`headfinder`).
Names are imported on first use, so `import headfinder` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "QRProbe": "headfinder.probes",
    "NeedleProbe": "headfinder.probes",
    "make_qr_probes": "headfinder.probes",
    "make_needle_probes": "headfinder.probes",
    "QRResult": "headfinder.scores",
    "RetrievalResult": "headfinder.scores",
    "qr_scores": "headfinder.scores",
    "retrieval_scores": "headfinder.scores",
    "needle_accuracy": "headfinder.scores",
    "top_k_heads": "headfinder.head_sets",
    "stability_report": "headfinder.head_sets",
    "ValidationReport": "headfinder.validate",
    "validate_heads": "headfinder.validate",
    "heatmap": "headfinder.plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'headfinder' has no attribute {name!r}")
