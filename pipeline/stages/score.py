"""CLIP image–text alignment of the tuned image with both captions (actor stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from pipeline.core.batch import Batch, fill, ok_mask, writable
from pipeline.core.config import CHECKPOINT_CACHE, ClipConfig
from pipeline.models.aligner import apply_aligner
from pipeline.models.checkpoints import fetch_checkpoint
from pipeline.models.openclip import OpenClipModel, load_open_clip, select_device
from pipeline.stages.base import Stage


@dataclass
class ClipScoreStage(Stage):
    """``image`` + captions → ``image_embedding``, ``clip_score``, ``generated_clip_score`` (cosine).

    A score is NaN (null in the output) where its text is missing or empty. With ``text_model`` the
    texts go through the aligner's tuned text tower; the image embedding is the base model's.
    """

    config: ClipConfig
    cache_dir: str = CHECKPOINT_CACHE
    name: ClassVar[str] = "score"

    def setup(self) -> None:
        config = self.config
        self._clip: OpenClipModel = load_open_clip(
            config.model, config.pretrained, select_device(), self.cache_dir, config.allow_pickle
        )
        if config.text_model:
            path = fetch_checkpoint(config.text_model, self.cache_dir)
            self._clip.model_id = apply_aligner(self._clip.model, self._clip.model_id, path)
        self._batch_size = config.batch_size

    @torch.inference_mode()
    def embed_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """L2-normalised image embeddings, float32, on the model's device."""
        clip = self._clip
        out = []
        for start in range(0, len(images), self._batch_size):
            with clip.autocast():
                features = clip.model.encode_image(clip.pixels(images[start : start + self._batch_size]))
            out.append(torch.nn.functional.normalize(features.float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, 0, device=clip.device)

    @torch.inference_mode()
    def similarity(self, image_embeddings: torch.Tensor, texts: list) -> np.ndarray:
        """Cosine similarity of each image with its text; NaN where the text is missing or blank."""
        clip = self._clip
        scores = np.full(len(texts), np.nan, dtype=np.float32)
        # A block whose captions are all missing comes back from Arrow as NaN floats, not None.
        present = [i for i, text in enumerate(texts) if isinstance(text, str) and text.strip()]
        for start in range(0, len(present), self._batch_size):
            rows = present[start : start + self._batch_size]
            tokens = clip.tokenizer([texts[i] for i in rows]).to(clip.device)
            with clip.autocast():
                features = clip.model.encode_text(tokens)
            features = torch.nn.functional.normalize(features.float(), dim=-1)
            scores[rows] = (features * image_embeddings[rows]).sum(-1).cpu().numpy()
        return scores

    def process(self, batch: Batch) -> Batch:
        batch = writable(batch)
        ok = ok_mask(batch)
        index = np.flatnonzero(ok)
        embeddings = self.embed_images([batch["image"][i] for i in index])
        captions = [batch["caption"][i] for i in index]
        fill(batch, "clip_score", self.similarity(embeddings, captions), ok, np.float32(np.nan))
        if "generated_caption" in batch:
            generated = [batch["generated_caption"][i] for i in index]
            fill(batch, "generated_clip_score", self.similarity(embeddings, generated), ok, np.float32(np.nan))
        empty = np.zeros(0, np.float32)
        vectors = list(embeddings.cpu().numpy()) if self.config.store_embedding else [empty] * len(index)
        fill(batch, "image_embedding", vectors, ok, empty)
        fill(batch, "clip_model", [self._clip.model_id] * len(index), ok, "")
        return batch
