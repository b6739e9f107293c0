"""Score plots as PNG data URIs: matplotlib's Agg canvas, no display and no global pyplot state."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.report.images import data_uri

SOURCE_COLOUR = "#3b6ea5"
GENERATED_COLOUR = "#d9822b"


def _png(figure: Figure) -> str:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return data_uri(buffer.getvalue(), "image/png")


def score_histograms(clip: np.ndarray, generated: np.ndarray) -> str:
    """Side-by-side histograms of ``clip_score`` and ``generated_clip_score`` (NaN = no text, left out)."""
    figure = Figure(figsize=(8, 3))
    axes = figure.subplots(1, 2, sharey=True)
    for ax, values, title, colour in (
        (axes[0], clip, "clip_score (source caption)", SOURCE_COLOUR),
        (axes[1], generated, "generated_clip_score (generated caption)", GENERATED_COLOUR),
    ):
        values = values[~np.isnan(values)]
        if values.size:
            ax.hist(values, bins=min(50, max(5, values.size // 4)), color=colour)
        else:
            ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{title}\n{values.size} rows", fontsize=9)
        ax.set_xlabel("cosine similarity", fontsize=8)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("rows", fontsize=8)
    return _png(figure)


def score_scatter(clip: np.ndarray, generated: np.ndarray) -> str:
    """``clip_score`` against ``generated_clip_score`` for rows with both, with the diagonal."""
    both = ~(np.isnan(clip) | np.isnan(generated))
    x, y = clip[both], generated[both]
    figure = Figure(figsize=(4, 4))
    ax = figure.subplots()
    if x.size:
        many = x.size > 1000
        ax.scatter(x, y, s=2 if many else 14, alpha=0.4 if many else 0.8, color=SOURCE_COLOUR, linewidths=0)
        low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([low, high], [low, high], color="#999999", linewidth=0.8, linestyle="--")
    else:
        ax.text(0.5, 0.5, "no rows with both scores", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("clip_score (source caption)", fontsize=8)
    ax.set_ylabel("generated_clip_score", fontsize=8)
    ax.set_title(f"{x.size} rows with both scores", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    return _png(figure)
