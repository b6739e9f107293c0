"""Held-out retrieval metrics of an aligner and the cross-validation table built from them.

Each held-out fold is a retrieval problem over its own pairs: every image ranks all the fold's
captions (image→text) and every caption ranks all its images (text→image). A candidate whose
caption is the same string as the query pair's counts as a hit, since no text model can tell
identical strings apart; the rank is that of the best hit, with ties counted against it. Recall@K
is the share of queries whose rank is at most K; chance is what a random ranking would score.
"""

from __future__ import annotations

import math

import numpy as np

KS = (1, 5, 10)
DIRECTIONS = ("image_to_text", "text_to_image")
ARROWS = {"image_to_text": "image→text", "text_to_image": "text→image"}


def ranks(similarity: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """Per query row: 1 + the number of non-hit candidates scoring at least as high as the best hit."""
    best = np.where(hits, similarity, -np.inf).max(axis=1, keepdims=True)
    return 1 + ((similarity >= best) & ~hits).sum(axis=1)


def chance_recall(hit_counts: np.ndarray, candidates: int, k: int) -> float:
    """Expected recall@k of a uniformly random ranking, with ``hit_counts`` hits per query."""
    if k >= candidates:
        return 1.0
    total = math.lgamma(candidates + 1) - math.lgamma(candidates - k + 1)

    def miss(hits: int) -> float:  # P(no hit among the first k) = C(n - h, k) / C(n, k)
        if candidates - hits < k:
            return 0.0
        return math.exp(math.lgamma(candidates - hits + 1) - math.lgamma(candidates - hits - k + 1) - total)

    return float(np.mean([1.0 - miss(int(h)) for h in hit_counts]))


def retrieval_metrics(text: np.ndarray, image: np.ndarray, captions: list[str]) -> dict:
    """Recall@1/5/10 and median rank both ways for one fold's pairs (row i of each is one pair)."""
    _, caption_ids = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    hits = caption_ids[:, None] == caption_ids[None, :]
    similarity = image.astype(np.float32) @ text.astype(np.float32).T
    result: dict = {"rows": len(captions), "distinct_captions": int(caption_ids.max() + 1) if len(captions) else 0}
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        rank = ranks(scores, hits)
        result[direction] = {**{f"R@{k}": float(np.mean(rank <= k)) for k in KS}, "median_rank": float(np.median(rank))}
    hit_counts = hits.sum(axis=1)
    result["chance"] = {f"R@{k}": chance_recall(hit_counts, len(captions), k) for k in KS}
    return result


def summarise(folds: list[dict]) -> dict:
    """Mean, standard deviation (across folds) and worst fold of every metric, tuned and untuned."""
    summary: dict = {}
    for model in ("untuned", "tuned"):
        summary[model] = {}
        for direction in DIRECTIONS:
            summary[model][direction] = {}
            for metric in [*(f"R@{k}" for k in KS), "median_rank"]:
                values = np.array([fold[model][direction][metric] for fold in folds])
                worst = values.max() if metric == "median_rank" else values.min()
                spread = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                summary[model][direction][metric] = {"mean": float(values.mean()), "std": spread, "worst": float(worst)}
    summary["chance"] = {f"R@{k}": float(np.mean([fold["untuned"]["chance"][f"R@{k}"] for fold in folds])) for k in KS}
    return summary


def format_markdown(table: dict, title: str = "") -> str:
    """The cross-validation as Markdown: mean ± sd across folds, then each fold's recall@1."""
    summary, folds = table["summary"], table["folds"]
    lines = [f"{title}\n" if title else ""]
    lines.append("| metric | chance | untuned | tuned | tuned, worst fold |")
    lines.append("| --- | --- | --- | --- | --- |")
    for direction in DIRECTIONS:
        for metric in [*(f"R@{k}" for k in KS), "median_rank"]:
            chance = f"{summary['chance'][metric]:.3f}" if metric in summary["chance"] else ""
            cells = [_mean_sd(summary[model][direction][metric], metric) for model in ("untuned", "tuned")]
            worst = _number(summary["tuned"][direction][metric]["worst"], metric)
            label = metric.replace("median_rank", "median rank")
            lines.append(f"| {ARROWS[direction]} {label} | {chance} | {cells[0]} | {cells[1]} | {worst} |")
    lines.append("")
    lines.append("| fold | pairs | image→text R@1 untuned → tuned | text→image R@1 untuned → tuned |")
    lines.append("| --- | --- | --- | --- |")
    for fold in folds:
        cells = [f"{fold['untuned'][d]['R@1']:.3f} → {fold['tuned'][d]['R@1']:.3f}" for d in DIRECTIONS]
        lines.append(f"| {fold['fold']} | {fold['tuned']['rows']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines).strip() + "\n"


def _number(value: float, metric: str) -> str:
    return f"{value:.1f}" if metric == "median_rank" else f"{value:.3f}"


def _mean_sd(stats: dict, metric: str) -> str:
    return f"{_number(stats['mean'], metric)} ± {_number(stats['std'], metric)}"
