"""Generate a caption for every image with open_clip CoCa (actor stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from pipeline.core.batch import Batch, fill, ok_mask, writable
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
    """``image`` → ``generated_caption`` with ``CoCa.generate`` and the configured settings."""

    model: str
    pretrained: str
    batch_size: int = 16
    seq_len: int = 30
    generation_type: str = "beam_search"
    num_beams: int = 6
    num_beam_groups: int = 3
    min_seq_len: int = 5
    repetition_penalty: float = 1.0
    cache_dir: str = "~/.cache/imagetune/checkpoints"
    allow_pickle: bool = False
    name: ClassVar[str] = "caption"

    def setup(self) -> None:
        self._coca: OpenClipModel = load_open_clip(
            self.model, self.pretrained, select_device(), self.cache_dir, self.allow_pickle
        )

    def generate(self, images: list[np.ndarray]) -> list[str]:
        """Captions for uint8 images, in order."""
        captions: list[str] = []
        coca = self._coca
        for start in range(0, len(images), self.batch_size):
            pixels = coca.pixels(images[start : start + self.batch_size])
            with torch.inference_mode(), coca.autocast():
                tokens = coca.model.generate(
                    pixels,
                    seq_len=self.seq_len,
                    generation_type=self.generation_type,
                    num_beams=self.num_beams,
                    num_beam_groups=self.num_beam_groups,
                    min_seq_len=self.min_seq_len,
                    repetition_penalty=self.repetition_penalty,
                )
            captions.extend(decode_tokens(coca.tokenizer, tokens))
        return captions

    def process(self, batch: Batch) -> Batch:
        batch = writable(batch)
        ok = ok_mask(batch)
        images = [batch["image"][i] for i in np.flatnonzero(ok)]
        fill(batch, "generated_caption", self.generate(images), ok, "")
        fill(batch, "caption_model", [self._coca.model_id] * len(images), ok, "")
        return batch
