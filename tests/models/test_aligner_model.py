"""The aligner's text tower: built and loaded without the image tower, saved, and put back into CLIP."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import VisionTransformer
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.core.config import load_config
from pipeline.models.aligner import (
    apply_aligner,
    build_text_tower,
    check_text_model,
    resolve_base,
    save_aligner,
)
from pipeline.runner.job import run_batch_job
from tests.conftest import TINY_CLIP, sharpened_checkpoint

CAPTIONS = ["two red circles on the left", "one blue square on the top", "a cat"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("aligner-model")
    return {
        "base": sharpened_checkpoint(TINY_CLIP, root / "base.safetensors", seed=2),
        "other": sharpened_checkpoint(TINY_CLIP, root / "other.safetensors", seed=3),
        "root": root,
    }


def _clip(path: Path) -> torch.nn.Module:
    open_clip.add_model_config(TINY_CLIP)
    return open_clip.create_model("tiny-clip", pretrained=str(path)).eval()


def test_text_tower_is_built_and_loaded_without_the_image_tower_and_encodes_as_clip_does(
    checkpoints, tmp_path, monkeypatch
):
    # A checkpoint without any image tensors: the text tower must not need them.
    with safe_open(str(checkpoints["base"]), framework="pt") as handle:
        text_only = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith("visual.")}  # noqa: SIM118
    save_file(text_only, str(tmp_path / "text-only.safetensors"))

    def refuse(*args, **kwargs):
        raise AssertionError("the image tower was built or run")

    monkeypatch.setattr(open_clip.model, "_build_vision_tower", refuse)
    monkeypatch.setattr(VisionTransformer, "forward", refuse)
    base = resolve_base(TINY_CLIP, str(tmp_path / "text-only.safetensors"), str(tmp_path / "cache"))
    tower = build_text_tower(base, str(tmp_path / "cache"))
    monkeypatch.undo()

    clip = _clip(checkpoints["base"])
    tokens = open_clip.get_tokenizer("tiny-clip")(CAPTIONS)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(clip.encode_text(tokens), dim=-1)
        torch.testing.assert_close(tower.encode(tokens), expected, atol=1e-5, rtol=0)
    assert float(tower.logit_scale.detach()) == pytest.approx(float(clip.logit_scale.detach()))
    assert base.model_id.startswith("open_clip:tiny-clip/") and base.weights.startswith("sha256:")


def test_partial_tuning_trains_only_the_last_blocks_projection_final_norm_and_temperature(checkpoints, tmp_path):
    base = resolve_base(TINY_CLIP, str(checkpoints["base"]), str(tmp_path / "cache"))
    tower = build_text_tower(base, str(tmp_path / "cache"))
    tower.freeze(1)
    trained = {name for name, p in tower.named_parameters() if p.requires_grad}
    assert "logit_scale" in trained and "text.text_projection" in trained and "text.ln_final.weight" in trained
    assert any(name.startswith("text.transformer.resblocks.1.") for name in trained)
    assert not any(name.startswith(("text.transformer.resblocks.0.", "text.token_embedding")) for name in trained)
    tower.freeze(None)
    assert all(p.requires_grad for p in tower.parameters())
    with pytest.raises(ValueError, match="trainable_blocks=3"):
        tower.freeze(3)


def test_an_aligner_goes_into_clip_of_its_base_and_is_refused_by_another(checkpoints, tmp_path):
    base = resolve_base(TINY_CLIP, str(checkpoints["base"]), str(tmp_path / "cache"))
    tower = build_text_tower(base, str(tmp_path / "cache"))
    with torch.no_grad():
        for parameter in tower.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = tmp_path / "aligner.safetensors"
    save_aligner(tower, str(path), "unit", base)
    with safe_open(str(path), framework="pt") as handle:
        assert not any(key.startswith("visual.") for key in handle.keys())  # noqa: SIM118

    clip = _clip(checkpoints["base"])
    image_before = {k: v.clone() for k, v in clip.state_dict().items() if k.startswith("visual.")}
    model_id = apply_aligner(clip, base.model_id, path)
    assert model_id.startswith(base.model_id + "+text:imagetune-aligner:unit@sha256:")
    tokens = open_clip.get_tokenizer("tiny-clip")(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(tokens, normalize=True), tower.encode(tokens), atol=1e-5, rtol=0)
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in image_before.items())

    other = resolve_base(TINY_CLIP, str(checkpoints["other"]), str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="was trained for"):
        apply_aligner(_clip(checkpoints["other"]), other.model_id, path)


def test_a_run_whose_clip_model_is_not_the_aligners_base_fails_before_reading_any_data(checkpoints, tmp_path):
    base = resolve_base(TINY_CLIP, str(checkpoints["base"]), str(tmp_path / "cache"))
    save_aligner(build_text_tower(base, str(tmp_path / "cache")), str(tmp_path / "aligner.safetensors"), "unit", base)
    text_model = str(tmp_path / "aligner.safetensors")
    check_text_model(TINY_CLIP, str(checkpoints["base"]), text_model, str(tmp_path / "cache"))
    copy = tmp_path / "copy-of-base.safetensors"
    copy.write_bytes(checkpoints["base"].read_bytes())
    check_text_model(TINY_CLIP, str(copy), text_model, str(tmp_path / "cache"))  # same weights, elsewhere

    # The input does not even exist: the refusal must come first, from the model check alone.
    config = load_config(
        None,
        [
            "tune.model=random",
            "caption.enabled=false",
            f"clip.model={TINY_CLIP}",
            f"clip.pretrained={checkpoints['other']}",
            f"clip.text_model={text_model}",
            f"runner.checkpoint_cache={tmp_path / 'cache'}",
        ],
        input=str(tmp_path / "no-such-input"),
        output=str(tmp_path / "output"),
    )
    with pytest.raises(ValueError, match="was trained for .*but clip.model/clip.pretrained is"):
        run_batch_job(config)
    assert not (tmp_path / "output").exists()
    with pytest.raises(ValueError, match="was trained for"):
        check_text_model(TINY_CLIP, "random", text_model, str(tmp_path / "cache"))
