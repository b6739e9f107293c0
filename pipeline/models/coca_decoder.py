"""CoCa captioning with a key/value cache: the tokens of ``CoCa.generate``, one new token per step.

open_clip's ``CoCa.generate`` reruns the text tower and the multimodal decoder over the whole prefix
at every step, and re-projects the image tokens for cross attention in every layer, for every beam.
``CocaCaptionDecoder`` encodes each image once, projects its cross-attention keys and values once
per layer (shared by the image's beams), and caches the self-attention keys and values of both
causal towers, so a step runs only the newest token. The search itself (logits processors, sampling,
beam bookkeeping) follows ``CoCa.generate`` exactly, so the tokens are the same up to floating-point
ties: a cached step sums in another order than the full forward, equal only to within rounding.
"""

from __future__ import annotations

import time
from typing import Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, TextTransformer
from transformers import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pipeline.models.coca_beam import GroupBeamSearch

SOT_TOKEN, EOS_TOKEN = 49406, 49407  # CoCa.generate's defaults
GenerationType = Literal["beam_search", "top_k", "top_p"]


class KeyValueCache:
    """Self-attention keys and values of every layer of one causal tower, per row and position."""

    def __init__(self, layers: int, length: int):
        self.layers, self.length = layers, length
        self.cache: torch.Tensor | None = None

    def append(
        self, layer: int, position: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new position's ``(rows, heads, 1, head_dim)`` keys and values; return all so far."""
        if self.cache is None:
            rows, heads, _, dim = keys.shape
            self.cache = keys.new_empty(self.layers, 2, rows, heads, self.length, dim)
        self.cache[layer, 0, :, :, position] = keys[:, :, 0]
        self.cache[layer, 1, :, :, position] = values[:, :, 0]
        return self.cache[layer, 0, :, :, : position + 1], self.cache[layer, 1, :, :, : position + 1]

    def reorder(self, rows: torch.Tensor, length: int) -> None:
        """Row ``i`` continues row ``rows[i]``: the beams chosen at this step take their parents' caches."""
        moved = (rows != torch.arange(rows.shape[0], device=rows.device)).nonzero().squeeze(1)
        prefix = self.cache[:, :, :, :, :length]
        prefix[:, :, moved] = prefix[:, :, rows[moved]]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)


def _feed_forward(block: ResidualAttentionBlock, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of ``ResidualAttentionBlock.forward`` after attention: output projection, residual, MLP."""
    x = x + block.ls_1(block.attn.out_proj(attended))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _cached_self_attention(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    cache: KeyValueCache,
    layer: int,
    position: int,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """A causal ``ResidualAttentionBlock`` on the newest position only, attending to the cache."""
    attn = block.attn
    projected = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    query, key, value = (_split_heads(part, attn.num_heads) for part in projected.chunk(3, dim=-1))
    keys, values = cache.append(layer, position, key, value)
    attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
    return _feed_forward(block, x, _merge_heads(attended))


def _projection(block: ResidualAttentionBlock, part: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of the query (0), key (1) or value (2) slice of the packed in-projection."""
    attn = block.attn
    width = attn.embed_dim
    bias = attn.in_proj_bias
    rows = slice(part * width, (part + 1) * width)
    return attn.in_proj_weight[rows], None if bias is None else bias[rows]


def _image_keys_values(block: ResidualAttentionBlock, image_embs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention keys and values of one decoder layer, ``(images, heads, tokens, head_dim)``."""
    normalised = block.ln_1_kv(image_embs)
    heads = block.attn.num_heads
    keys, values = (_split_heads(F.linear(normalised, *_projection(block, part)), heads) for part in (1, 2))
    return keys, values


def _cross_attention(
    block: ResidualAttentionBlock, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Cross attention of every beam to its image; an image's beams are queries of one attention call."""
    images, heads = keys.shape[0], block.attn.num_heads
    query = F.linear(block.ln_1(x), *_projection(block, 0))
    query = _split_heads(query.view(images, -1, query.shape[-1]), heads)
    attended = _merge_heads(F.scaled_dot_product_attention(query, keys, values))
    return _feed_forward(block, x, attended.reshape(x.shape))


def check_supported(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is an open_clip CoCa whose towers this decoder can cache."""
    if not isinstance(model, open_clip.CoCa) or not isinstance(model.text, TextTransformer):
        raise ValueError(
            f"{type(model).__name__} is not an open_clip CoCa with its own text tower; use decoder=open_clip"
        )
    text, decoder = model.text, model.text_decoder
    blocks = [*text.transformer.resblocks, *decoder.resblocks, *decoder.cross_attn]
    plain = all(type(block) is ResidualAttentionBlock and block.attn.batch_first for block in blocks)
    causal = text.attn_mask is not None and text.cls_emb is not None  # open_clip's CoCa needs its CLS token
    if not causal or not plain or not text.transformer.batch_first or not decoder.batch_first:
        raise ValueError("CoCa with a bidirectional or custom text tower cannot be cached; use decoder=open_clip")


class CachedCocaSteps:
    """CoCa's next-token logits for every row, one position at a time, with the image and prefix cached."""

    def __init__(self, model: torch.nn.Module, image_embs: torch.Tensor, seq_len: int):
        self.text, self.decoder = model.text, model.text_decoder
        self.image_keys_values = [_image_keys_values(block, image_embs) for block in self.decoder.cross_attn]
        self.text_cache = KeyValueCache(len(self.text.transformer.resblocks), seq_len)
        self.decoder_cache = KeyValueCache(len(self.decoder.resblocks), seq_len)

    def logits(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Logits after ``tokens[:, : position + 1]``; positions before ``position`` must be cached."""
        x = self._embed(tokens[:, position], position)
        mask = self._text_key_mask(tokens[:, : position + 1])
        for layer, block in enumerate(self.text.transformer.resblocks):
            x = _cached_self_attention(block, x, self.text_cache, layer, position, mask)
        for layer, (block, cross) in enumerate(zip(self.decoder.resblocks, self.decoder.cross_attn, strict=True)):
            x = _cached_self_attention(block, x, self.decoder_cache, layer, position, None)
            x = _cross_attention(cross, x, *self.image_keys_values[layer])
        return (self.decoder.ln_final(x) @ self.decoder.text_projection)[:, 0]

    def reorder(self, rows: torch.Tensor, length: int) -> None:
        """Row ``i`` continues row ``rows[i]`` (beam search), for the ``length`` cached positions."""
        self.text_cache.reorder(rows, length)
        self.decoder_cache.reorder(rows, length)

    def _embed(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        cast_dtype = self.text.transformer.get_cast_dtype()
        x = self.text.token_embedding(ids[:, None]).to(cast_dtype)
        return x + self.text.positional_embedding[position].to(cast_dtype)

    def _text_key_mask(self, ids: torch.Tensor) -> torch.Tensor | None:
        """open_clip's CLS padding mask as seen by the tokens; ``None`` while it hides no key.

        The text tower masks keys of pad tokens for every query, not only the CLS one. open_clip's
        legacy mask (``correct_cls_mask=False``, all released CoCa weights) is shifted one position
        right: it hides the key after each pad token and never the first.
        """
        valid = ids != self.text.pad_id
        if not self.text.correct_cls_mask:
            valid = torch.cat([torch.ones_like(valid[:, :1]), valid[:, :-1]], dim=1)
        return None if bool(valid.all()) else valid[:, None, None, :]


class CocaCaptionDecoder:
    """``CoCa.generate`` for image captioning (no text prompt), decoding incrementally with caches."""

    def __init__(self, model: torch.nn.Module):
        check_supported(model)
        self.model = model

    @torch.inference_mode()
    def generate(
        self,
        image: torch.Tensor,
        seq_len: int = 30,
        generation_type: GenerationType = "beam_search",
        num_beams: int = 6,
        num_beam_groups: int = 3,
        min_seq_len: int = 5,
        repetition_penalty: float = 1.0,
        top_k: int = 1,
        top_p: float = 0.1,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """The tokens ``model.generate(image, ...)`` returns for the same arguments (open_clip's defaults)."""
        self._validate(seq_len, min_seq_len, generation_type, num_beams, num_beam_groups)
        eos = torch.tensor([EOS_TOKEN], device=image.device)
        processors = [MinLengthLogitsProcessor(min_seq_len, eos), RepetitionPenaltyLogitsProcessor(repetition_penalty)]
        _, image_embs = self.model._encode_image(image)
        if generation_type == "beam_search":
            return self._beam_search(image_embs, LogitsProcessorList(processors), seq_len, num_beams // num_beam_groups)
        warper = TopKLogitsWarper(top_k) if generation_type == "top_k" else TopPLogitsWarper(top_p)
        return self._sample(image_embs, LogitsProcessorList([*processors, warper]), seq_len, temperature)

    def _validate(self, seq_len: int, min_seq_len: int, generation_type: str, num_beams: int, groups: int) -> None:
        longest = min(self.model.text.context_length, self.model.text_decoder.context_length) + 1
        if not min_seq_len < seq_len <= longest:
            raise ValueError(f"seq_len={seq_len} must exceed min_seq_len={min_seq_len} and be at most {longest}")
        if generation_type not in ("beam_search", "top_k", "top_p"):
            raise ValueError(f"generation_type={generation_type!r}: use beam_search, top_k or top_p")
        if generation_type == "beam_search" and (num_beams < 2 or groups < 1 or num_beams % groups):
            raise ValueError(f"num_beams={num_beams} must be at least 2 and a multiple of num_beam_groups={groups}")

    def _sample(
        self, image_embs: torch.Tensor, processors: LogitsProcessorList, seq_len: int, temperature: float
    ) -> torch.Tensor:
        """``CoCa.generate``'s top-k/top-p loop: a row ends at EOS or pad; the last token is forced to EOS."""
        pad = self.model.pad_id
        steps = CachedCocaSteps(self.model, image_embs, seq_len)
        tokens = torch.full((image_embs.shape[0], seq_len), pad, dtype=torch.long, device=image_embs.device)
        tokens[:, 0] = SOT_TOKEN
        for position in range(seq_len - 1):
            active = (tokens[:, position] != EOS_TOKEN) & (tokens[:, position] != pad)
            if not bool(active.any()):
                return tokens[:, : position + 1]
            if position + 2 == seq_len:
                tokens[active, position + 1] = EOS_TOKEN
                break
            logits = steps.logits(tokens, position)[active]
            scores = processors(tokens[active, : position + 1], logits)
            probs = F.softmax(scores / temperature, dim=-1)
            tokens[active, position + 1] = torch.multinomial(probs, 1)[:, 0]
        return tokens

    def _beam_search(
        self, image_embs: torch.Tensor, processors: LogitsProcessorList, seq_len: int, group_size: int
    ) -> torch.Tensor:
        """``CoCa._generate_beamsearch`` on one beam group per image (all groups are equal there)."""
        batch, device = image_embs.shape[0], image_embs.device
        search = GroupBeamSearch(batch, group_size, seq_len, EOS_TOKEN, self.model.pad_id, device)
        steps = CachedCocaSteps(self.model, image_embs, seq_len)
        tokens = torch.full((batch * group_size, seq_len), SOT_TOKEN, dtype=torch.long, device=device)
        scores = search.initial_scores()
        for position in range(seq_len - 1):
            logits = steps.logits(tokens, position)
            prefix = tokens[:, : position + 1]
            candidates = (processors(prefix, logits) + scores[:, None]).view(batch, -1)
            values, indices = torch.topk(candidates, 2 * group_size, dim=1, largest=True, sorted=True)
            parents, next_tokens, scores = search.select(prefix, values, indices, logits.shape[-1])
            tokens[:, : position + 1] = prefix[parents]
            tokens[:, position + 1] = next_tokens
            steps.reorder(parents, position + 1)
            if search.all_done:
                return search.finalize(tokens[:, : position + 2], scores)
        return search.finalize(tokens, scores)


def benchmark_caption_decoders(
    model: torch.nn.Module, images: torch.Tensor, seq_len: int = 30, generation_type: GenerationType = "beam_search"
) -> dict[str, float | bool]:
    """Seconds for ``model.generate`` and for ``CocaCaptionDecoder`` on one batch, and whether tokens agree."""
    generators = {"open_clip": model.generate, "cached": CocaCaptionDecoder(model).generate}
    seconds, tokens = {}, {}
    for name, generate in generators.items():
        start = time.perf_counter()
        with torch.inference_mode():
            tokens[name] = generate(images, seq_len=seq_len, generation_type=generation_type).cpu()
        seconds[name] = time.perf_counter() - start
    return {
        "open_clip_seconds": seconds["open_clip"],
        "cached_seconds": seconds["cached"],
        "speedup": seconds["open_clip"] / seconds["cached"],
        "tokens_equal": torch.equal(tokens["open_clip"], tokens["cached"]),
    }
