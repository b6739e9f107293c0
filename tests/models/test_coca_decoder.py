"""The cached CoCa decoder against open_clip's own ``CoCa.generate``: the same tokens, every time.

Cached attention sums in another order than the full forward, so logits agree only to rounding and
exact token parity holds only where no two candidates tie within rounding. The sharpened random
models here separate logits widely; every seed tried must agree exactly, none is skipped.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from transformers.generation.beam_search import BeamHypotheses

from pipeline.core.config import CaptionConfig
from pipeline.models.coca_beam import FinishedHypotheses
from pipeline.models.coca_decoder import EOS_TOKEN, CocaCaptionDecoder
from pipeline.models.openclip import initialise_random_weights
from pipeline.stages.caption import CaptionStage
from pipeline.stages.decode import decode_image
from tests.conftest import TINY_CLIP, TINY_COCA, reference_threads, sharpened_checkpoint

SEQ_LEN = 16


def _tiny_coca(seed: int, eos_gain: float = 1.0, pad_gain: float = 1.0) -> torch.nn.Module:
    """A random tiny CoCa with weights doubled; the gains make EOS or the pad token ("!") likelier."""
    open_clip.add_model_config(TINY_COCA)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.create_model(Path(TINY_COCA).stem).eval()
        initialise_random_weights(model)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(2.0)
        model.text_decoder.text_projection[:, EOS_TOKEN] *= eos_gain
        model.text_decoder.text_projection[:, model.pad_id] *= pad_gain
    return model


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _generate_both(model: torch.nn.Module, images: torch.Tensor, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's tokens and the cached decoder's, each from the same random state (for sampling)."""
    with reference_threads():
        torch.manual_seed(0)
        expected = model.generate(images, seq_len=SEQ_LEN, **settings)
        torch.manual_seed(0)
        actual = CocaCaptionDecoder(model).generate(images, seq_len=SEQ_LEN, **settings)
    return expected, actual


def _captions(tokens: torch.Tensor) -> list[tuple[int, ...]]:
    """Each row up to (without) its first EOS."""
    rows = []
    for row in tokens.tolist():
        rows.append(tuple(row[: row.index(EOS_TOKEN)] if EOS_TOKEN in row else row))
    return rows


@pytest.mark.parametrize("generation_type", ["top_k", "beam_search"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 5])
def test_tokens_equal_open_clip_generate_for_seeds_and_batch_sizes(generation_type, seed, batch):
    expected, actual = _generate_both(_tiny_coca(seed), _images(batch, seed), generation_type=generation_type)
    assert torch.equal(actual, expected)
    assert len(set(_captions(expected))) == batch, "captions must differ per image to prove alignment"


@pytest.mark.parametrize("generation_type", ["top_k", "beam_search"])
def test_tokens_equal_open_clip_when_captions_end_early(generation_type):
    ended_early = ran_to_max = all_ended_early = False
    for seed in (1, 3):
        expected, actual = _generate_both(
            _tiny_coca(seed, eos_gain=10.0), _images(6, seed), generation_type=generation_type
        )
        assert torch.equal(actual, expected), f"seed {seed}"
        lengths = [len(caption) for caption in _captions(expected)]
        ended_early |= min(lengths) < SEQ_LEN - 1
        ran_to_max |= max(lengths) >= SEQ_LEN - 1
        all_ended_early |= expected.shape[1] < SEQ_LEN
    assert ended_early and ran_to_max and all_ended_early, "the seeds must cover early EOS, full length and both"


def _pads_inside(tokens: torch.Tensor) -> int:
    return sum(caption[1:].count(0) for caption in _captions(tokens))


def test_beam_search_equals_open_clip_with_pad_tokens_inside_beams():
    # Token 0 ("!") is CoCa's pad id: the text tower's CLS mask hides the key after it in every row.
    pads_inside = 0
    for seed in range(2):
        expected, actual = _generate_both(_tiny_coca(seed, pad_gain=4.0), _images(4, seed))
        assert torch.equal(actual, expected), f"seed {seed}"
        pads_inside += _pads_inside(expected)
    assert pads_inside > 0, "the pad token must occur inside captions for the mask to matter"


def test_beam_search_equals_open_clip_with_the_corrected_cls_mask():
    pads_inside = 0
    for seed in range(2):
        model = _tiny_coca(seed, pad_gain=4.0)
        model.text.correct_cls_mask = True  # hides the pad token's own key, not the one after it
        expected, actual = _generate_both(model, _images(4, seed))
        assert torch.equal(actual, expected), f"seed {seed}"
        pads_inside += _pads_inside(expected)
    assert pads_inside > 0, "the pad token must occur inside captions for the mask to matter"


@pytest.mark.parametrize(
    "settings",
    [
        {"generation_type": "beam_search", "num_beam_groups": 1},
        {"generation_type": "beam_search", "num_beams": 4, "num_beam_groups": 2, "repetition_penalty": 1.3},
        {"generation_type": "beam_search", "min_seq_len": 3},
        {"generation_type": "top_k", "top_k": 3, "repetition_penalty": 1.2},
        {"generation_type": "top_p", "top_p": 0.5},
    ],
)
def test_tokens_equal_open_clip_for_other_settings(settings):
    for seed in range(2):
        expected, actual = _generate_both(_tiny_coca(seed, eos_gain=3.0), _images(4, seed), **settings)
        assert torch.equal(actual, expected), f"seed {seed}"


def test_finished_hypotheses_keep_and_pick_like_hf_on_ties():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        reference = BeamHypotheses(num_beams=3, length_penalty=1.0, early_stopping=False)
        kept = FinishedHypotheses.empty(batch=1, size=3, seq_len=1, device=torch.device("cpu"))
        for serial in range(8):
            score = float(torch.randint(-3, 0, (), generator=generator))
            reference.add(torch.tensor([serial]), score, generated_len=1)
            kept.add(torch.tensor([True]), torch.tensor([score], dtype=torch.float64), torch.tensor([[serial]]), serial)
        expected = sorted((int(hyp), score) for score, hyp, _ in reference.beams)
        count = int(kept.count)
        assert sorted(zip(kept.tokens[0, :count, 0].tolist(), kept.scores[0, :count].tolist(), strict=True)) == expected
        assert kept.best()[0][0, 0] == sorted(reference.beams, key=lambda beam: beam[0]).pop()[1]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"seq_len": 78}, "seq_len"),
        ({"seq_len": 5, "min_seq_len": 5}, "seq_len"),
        ({"num_beams": 6, "num_beam_groups": 4}, "num_beams"),
        ({"generation_type": "greedy"}, "generation_type"),
    ],
)
def test_invalid_settings_raise_value_error(settings, message):
    with pytest.raises(ValueError, match=message):
        CocaCaptionDecoder(_tiny_coca(0)).generate(_images(1, 0), **settings)


def test_models_other_than_coca_are_refused():
    open_clip.add_model_config(TINY_CLIP)
    with pytest.raises(ValueError, match="decoder=open_clip"):
        CocaCaptionDecoder(open_clip.create_model(Path(TINY_CLIP).stem))


@pytest.mark.parametrize("generation_type", ["top_k", "beam_search"])
def test_caption_stage_cached_and_open_clip_decoders_write_the_same_captions(tmp_path, photos, generation_type):
    checkpoint = sharpened_checkpoint(TINY_COCA, tmp_path / "coca.safetensors", seed=3)
    originals = [record for record in photos if not record.key.endswith(("-noisy", "-jpeg10", "-truncated"))]
    images = [decode_image(record.data, 96, 10**8).pixels for record in originals[:6]]
    captions = {}
    for decoder in ("cached", "open_clip"):
        config = CaptionConfig(
            model=TINY_COCA,
            pretrained=str(checkpoint),
            batch_size=4,
            seq_len=12,
            generation_type=generation_type,
            decoder=decoder,
        )
        stage = CaptionStage(config)
        stage.setup()
        with reference_threads():
            captions[decoder] = stage.generate(images)
    assert captions["cached"] == captions["open_clip"]
    assert len(set(captions["cached"])) == len(images), "captions must differ per image to prove alignment"
