"""Generate a caption for every image with open_clip CoCa (actor stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from pipeline.core.batch import Batch, fill, ok_mask, writable
from pipeline.core.config import CHECKPOINT_CACHE, CaptionConfig
from pipeline.models.coca_decoder import CocaCaptionDecoder
from pipeline.models.openclip import OpenClipModel, load_open_clip, select_device
from pipeline.stages.base import Stage


def decode_tokens(tokenizer, tokens: torch.Tensor) -> list[str]:
    """Token ids from ``CoCa.generate`` → text, cut at end-of-text, special tokens removed."""
    texts = []
    for row in tokens.tolist():
        text = tokenizer.decode(row) if hasattr(tokenizer, "decode") else ""
        text = text.split("<end_of_text>")[0].replace("<start_of_text>", "")
        texts.append(text.strip())
    return texts


@dataclass
class CaptionStage(Stage):
    """``image`` → ``generated_caption``: the tokens of ``CoCa.generate`` with the configured settings.

    ``config.decoder`` picks the cached decoder (default) or ``CoCa.generate`` itself.
    """

    config: CaptionConfig
    cache_dir: str = CHECKPOINT_CACHE
    name: ClassVar[str] = "caption"

    def setup(self) -> None:
        config = self.config
        self._coca: OpenClipModel = load_open_clip(
            config.model, config.pretrained, select_device(), self.cache_dir, config.allow_pickle
        )
        model = self._coca.model
        self._generate = CocaCaptionDecoder(model).generate if config.decoder == "cached" else model.generate

    def generate(self, images: list[np.ndarray]) -> list[str]:
        """Captions for uint8 images, in order."""
        captions: list[str] = []
        coca, config = self._coca, self.config
        for start in range(0, len(images), config.batch_size):
            pixels = coca.pixels(images[start : start + config.batch_size])
            with torch.inference_mode(), coca.autocast():
                tokens = self._generate(pixels, **config.generate_kwargs())
            captions.extend(decode_tokens(coca.tokenizer, tokens))
        return captions

    def process(self, batch: Batch) -> Batch:
        batch = writable(batch)
        ok = ok_mask(batch)
        images = [batch["image"][i] for i in np.flatnonzero(ok)]
        fill(batch, "generated_caption", self.generate(images), ok, "")
        fill(batch, "caption_model", [self._coca.model_id] * len(images), ok, "")
        return batch
