"""Caption and score stages against open_clip's own forward and generate on the same inputs."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from pipeline.core.batch import object_column
from pipeline.core.config import CaptionConfig, ClipConfig
from pipeline.stages.caption import CaptionStage, decode_tokens
from pipeline.stages.decode import decode_image
from pipeline.stages.score import ClipScoreStage
from tests.conftest import TINY_CLIP, TINY_COCA, reference_threads, sharpened_checkpoint


def _reference(config: str, checkpoint):
    """The model as open_clip builds it, with open_clip's own preprocessing."""
    open_clip.add_model_config(config)
    name = config.rsplit("/", 1)[-1].removesuffix(".json")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(checkpoint))
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@pytest.fixture(scope="module")
def images(photos):
    return [decode_image(r.data, 96, 10**8).pixels for r in photos[:8]]


def _batch(images, captions, status):
    n = len(images)
    return {
        "id": object_column(map(str, range(n))),
        "image": object_column(images),
        "caption": object_column(captions),
        "status": object_column(status),
        "error_stage": object_column(["" if s == "ok" else "decode" for s in status]),
        "error_message": object_column(["" if s == "ok" else "bad" for s in status]),
    }


@pytest.mark.parametrize("generation_type", ["top_k", "beam_search"])
def test_captions_equal_open_clip_generate_per_image(tmp_path, images, generation_type):
    checkpoint = sharpened_checkpoint(TINY_COCA, tmp_path / "coca.safetensors", seed=1)
    config = CaptionConfig(
        model=TINY_COCA, pretrained=str(checkpoint), batch_size=3, seq_len=12, generation_type=generation_type
    )
    stage = CaptionStage(config)
    stage.setup()
    status = ["ok"] * len(images)
    status[2] = "error"
    model, preprocess, tokenizer = _reference(TINY_COCA, checkpoint)
    expected = []
    with reference_threads():
        out = stage.process(_batch(images, [None] * len(images), status))
        for image in images:
            tokens = model.generate(
                preprocess(Image.fromarray(image)).unsqueeze(0), seq_len=12, generation_type=generation_type
            )
            expected.append(decode_tokens(tokenizer, tokens)[0])
    assert out["generated_caption"][2] == "" and out["caption_model"][2] == ""
    for i in (0, 1, 3, 4, 5, 6, 7):
        assert out["generated_caption"][i] == expected[i]
    if generation_type == "top_k":
        assert len(set(expected)) == len(expected), "captions must differ per image to prove alignment"
    assert out["caption_model"][0].startswith("open_clip:tiny-coca/") and "@sha256:" in out["caption_model"][0]


def test_scores_equal_open_clip_cosine_and_are_null_without_text(tmp_path, images):
    checkpoint = sharpened_checkpoint(TINY_CLIP, tmp_path / "clip.safetensors", seed=2)
    stage = ClipScoreStage(ClipConfig(model=TINY_CLIP, pretrained=str(checkpoint), batch_size=3))
    stage.setup()
    captions = ["a cat", None, " \n ", "a rocket", "galaxies " * 100, "coins", "x", "a brick wall"]
    nan_caption = float("nan")  # an all-missing caption column comes back from Arrow as NaN
    generated = ["one", "two", "three", "four", "five", "six", "seven", ""]
    status = ["ok"] * 7 + ["error"]
    batch = _batch(images, [nan_caption if c is None else c for c in captions], status)
    batch["generated_caption"] = object_column(generated)
    out = stage.process(batch)
    model, preprocess, tokenizer = _reference(TINY_CLIP, checkpoint)
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.fromarray(image)) for image in images])
        image_features = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)

    def cosine(i: int, text: str) -> float:
        with torch.no_grad():
            text_features = torch.nn.functional.normalize(model.encode_text(tokenizer([text])), dim=-1)
        return float((image_features[i] * text_features[0]).sum())

    for i in range(7):
        for column, texts in (("clip_score", captions), ("generated_clip_score", generated)):
            if texts[i] and texts[i].strip():
                assert abs(out[column][i] - cosine(i, texts[i])) <= 1e-4
            else:
                assert np.isnan(out[column][i])
        assert np.allclose(out["image_embedding"][i], image_features[i].numpy(), atol=1e-5)
    assert np.isnan(out["clip_score"][7]) and len(out["image_embedding"][7]) == 0 and out["clip_model"][7] == ""
    scores = out["clip_score"][[0, 3, 4, 5, 6]]
    assert np.std(scores) > 1e-3, "scores must differ per row to prove alignment"
