"""Heatmaps of per-head scores (layers down, heads across), with a head set outlined.

    heatmap(result.qr, "smollm2-135m: QR score", Path("qr.png"), heads=top_k_heads(result.qr, 16))
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def heatmap(
    scores, title: str, path: Path, heads: Sequence[tuple[int, int]] = (), label: str = "score"
) -> Path:
    """Write a [layers × heads] heatmap PNG to `path`, outlining `heads`; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    matrix = np.asarray(scores, dtype=np.float64)
    n_layers, n_heads = matrix.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * n_heads + 2.0), max(3.0, 0.22 * n_layers + 1.5)))
    # A diverging map centred on zero when scores take both signs (QR is a difference of attention).
    if matrix.min() < 0 < matrix.max():
        bound = float(np.abs(matrix).max())
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    else:
        image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    for layer, head in heads:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, n_heads, max(1, n_heads // 16)))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 16)))
    ax.set_title(title + (f" (outlined: top {len(heads)})" if heads else ""), fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
