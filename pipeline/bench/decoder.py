"""Caption decoding alone: the pipeline's cached CoCa decoder against open_clip's ``CoCa.generate``.

One batch of real photographs, the same CoCa and settings for both, greedy and beam search; the
tokens must be identical, the speed is the point.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.bench.report import Timing
from pipeline.core.config import CaptionConfig
from pipeline.models.coca_decoder import EOS_TOKEN, CocaCaptionDecoder
from pipeline.models.openclip import load_open_clip, select_device

logger = logging.getLogger(__name__)

# CoCa.generate's own settings: top_k sampling keeps only the best token (top_k=1), i.e. greedy;
# beam search with its defaults, 6 beams in 3 groups.
SEARCHES = {
    "greedy": {"generation_type": "top_k"},
    "beam": {"generation_type": "beam_search", "num_beams": 6, "num_beam_groups": 3},
}
WARMUP_SEQ_LEN = 8  # above CoCa.generate's default min_seq_len (5)


@dataclass
class DecoderComparison:
    """Both decoders on the same batch with one search; ``identical_rows`` is the fraction of equal captions."""

    search: str
    open_clip: Timing
    cached: Timing
    identical_rows: float


def compare_caption_decoders(
    config: CaptionConfig, cache_dir: str, images: list[np.ndarray], seq_len: int = 30
) -> list[DecoderComparison]:
    """Time ``CoCa.generate`` and the cached decoder on ``images`` (one batch), greedy and beam.

    The model is ``config.model`` with ``config.pretrained`` weights; both decoders are warmed up
    on one image first, so neither pays the first call's one-off costs.
    """
    coca = load_open_clip(config.model, config.pretrained, select_device(), cache_dir, config.allow_pickle)
    pixels = coca.pixels(images)
    decoders = {"open_clip generate": coca.model.generate, "cached decoder": CocaCaptionDecoder(coca.model).generate}
    note = (
        f"{config.model}/{config.pretrained}, batch {len(images)}, seq_len {seq_len}, {torch.get_num_threads()} threads"
    )
    comparisons = []
    for search, settings in SEARCHES.items():
        seconds, tokens = {}, {}
        for name, generate in decoders.items():
            _generate(generate, pixels[:1], seq_len=min(seq_len, WARMUP_SEQ_LEN), **settings)
            start = time.perf_counter()
            tokens[name] = _generate(generate, pixels, seq_len=seq_len, **settings)
            seconds[name] = time.perf_counter() - start
        same = [a == b for a, b in zip(*(captions(t) for t in tokens.values()), strict=True)]
        comparisons.append(
            DecoderComparison(
                search=search,
                open_clip=Timing(
                    f"captions {search}: open_clip generate", len(images), seconds["open_clip generate"], note=note
                ),
                cached=Timing(f"captions {search}: cached decoder", len(images), seconds["cached decoder"], note=note),
                identical_rows=sum(same) / len(same),
            )
        )
        speedup = seconds["open_clip generate"] / seconds["cached decoder"]
        logger.info(
            "caption decoders, %s: %.1fx faster, %d of %d rows identical", search, speedup, sum(same), len(same)
        )
    return comparisons


def captions(tokens: torch.Tensor) -> list[tuple[int, ...]]:
    """Each row's tokens up to and including its first end-of-text; what follows is padding."""
    rows = []
    for row in tokens.tolist():
        rows.append(tuple(row[: row.index(EOS_TOKEN) + 1] if EOS_TOKEN in row else row))
    return rows


def _generate(generate: Callable[..., torch.Tensor], pixels: torch.Tensor, **settings) -> torch.Tensor:
    with torch.inference_mode():
        return generate(pixels, **settings).cpu()
