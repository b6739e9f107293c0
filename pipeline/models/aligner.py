"""The aligner: an open_clip text tower tuned to meet a locked image tower (LiT), and its checkpoint.

The text tower is built alone, from the base CLIP model's config, and only the base checkpoint's
text weights are read: the image tower is neither built nor loaded (a base with random weights is
the exception: its seeded text weights only exist by building the whole model). The checkpoint is
one safetensors file holding the text weights under the CLIP model's own key names
(``token_embedding.weight``, ``transformer.resblocks.N...``, ``ln_final.*``, ``text_projection``)
plus ``logit_scale``, and metadata naming the base model it belongs to; ``model_card.json`` sits
beside it. Loading it into a CLIP model of that base gives the tuned text side, with the base
image side untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.model import _build_text_tower
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn import functional as F

from pipeline.core import storage
from pipeline.core.config import RANDOM
from pipeline.models.checkpoints import CheckpointError, file_digest, load_state_dict, safetensors_metadata
from pipeline.models.openclip import (
    initialise_random_weights,
    open_clip_model_id,
    register_model_config,
    weights_file,
)

logger = logging.getLogger(__name__)

FORMAT = "imagetune-aligner-v1"
LOGIT_SCALE = "logit_scale"
MAX_LOGIT_SCALE = 4.6052  # ln(100): CLIP's clamp on the learned temperature
TEXT_SEPARATOR = "+text:"  # clip_model = <base model id>+text:<aligner id>


@dataclass(frozen=True)
class BaseModel:
    """The CLIP model whose image tower is locked: architecture name, weights and provenance id."""

    name: str
    pretrained: str
    model_id: str

    @property
    def weights(self) -> str:
        """The weights part of the id: ``sha256:<16 hex>`` or ``RANDOM-WEIGHTS(seed=N)``."""
        return weights_token(self.model_id)


def weights_token(model_id: str) -> str:
    """What names the weights in an open_clip model id (its digest, or the random seed)."""
    base = embedding_model(model_id)
    return "sha256:" + base.rsplit("@sha256:", 1)[1] if "@sha256:" in base else base.rsplit("/", 1)[-1]


def architecture(model_id: str) -> str:
    """The open_clip architecture name in a model id such as ``open_clip:ViT-B-32/tag@sha256:…``."""
    return embedding_model(model_id).removeprefix("open_clip:").split("/", 1)[0]


def embedding_model(clip_model: str) -> str:
    """The image tower's model id in a ``clip_model`` value (an aligner's suffix removed)."""
    return clip_model.split(TEXT_SEPARATOR, 1)[0]


def same_weights(first: str, second: str) -> bool:
    """Whether two open_clip model ids name the same architecture and the same weights.

    The source part (tag, path or URI) may differ: a copy of the same file is the same model.
    """
    return architecture(first) == architecture(second) and weights_token(first) == weights_token(second)


def resolve_base(name: str, pretrained: str, cache_dir: str, allow_pickle: bool = False) -> BaseModel:
    """The base model's identity, fetching its weights file once per node (nothing is built)."""
    name = register_model_config(name)
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    if config.get("custom_text") or "hf_model_name" in config.get("text_cfg", {}):
        raise ValueError(
            f"{name} has a custom text tower; the aligner tunes open_clip's own text transformer "
            "(CLIP-class models such as ViT-B-32)"
        )
    weights = None if pretrained == RANDOM else weights_file(name, pretrained, cache_dir, allow_pickle)
    return BaseModel(name, pretrained, open_clip_model_id(name, pretrained, weights))


class TextTower(torch.nn.Module):
    """open_clip's text transformer plus the learnable temperature (``logit_scale``, a log)."""

    def __init__(self, text: torch.nn.Module, logit_scale: float) -> None:
        super().__init__()
        self.text = text
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(logit_scale)))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings, float32."""
        return F.normalize(self.text(tokens).float(), dim=-1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and the log temperature: both come out of ``forward``, as DDP wants every
        trained parameter used inside it."""
        return self.encode(tokens), self.logit_scale

    @property
    def blocks(self) -> int:
        return len(self.text.transformer.resblocks)

    def freeze(self, trainable_blocks: int | None) -> None:
        """Train everything (``None``) or only the last ``trainable_blocks`` transformer blocks, the
        final layer norm, the projection and the temperature."""
        if trainable_blocks is None:
            self.requires_grad_(True)
            return
        if not 0 <= trainable_blocks <= self.blocks:
            raise ValueError(f"tune.trainable_blocks={trainable_blocks} must be within 0..{self.blocks} (or null)")
        self.requires_grad_(False)
        trained = [*self.text.transformer.resblocks[self.blocks - trainable_blocks :], self.text.ln_final]
        for module in trained:
            module.requires_grad_(True)
        projection = self.text.text_projection
        if projection is not None:
            projection.requires_grad_(True)
        self.logit_scale.requires_grad_(True)

    def aligner_state(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors, under the CLIP model's key names (the tower's are the same)."""
        state = {key: value.detach().cpu().contiguous() for key, value in self.text.state_dict().items()}
        state[LOGIT_SCALE] = self.logit_scale.detach().cpu().reshape(())
        return state

    def load_aligner_state(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        with torch.no_grad():
            self.logit_scale.copy_(state.pop(LOGIT_SCALE).reshape(()))
        self.text.load_state_dict(state)


def build_text_tower(base: BaseModel, cache_dir: str, allow_pickle: bool = False, seed: int = 0) -> TextTower:
    """The base model's text tower with its weights; the image tower is never built or run."""
    config = open_clip.get_model_config(base.name)
    if base.pretrained == RANDOM:
        return _random_text_tower(base.name, seed)
    text = _build_text_tower(config["embed_dim"], config["text_cfg"], config.get("quick_gelu", False))
    state = _text_state(Path(weights_file(base.name, base.pretrained, cache_dir, allow_pickle)), allow_pickle)
    logit_scale = state.pop(LOGIT_SCALE, torch.tensor(config.get("init_logit_scale", 2.6592)))
    state.pop("logit_bias", None)
    try:
        text.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"the text weights of {base.model_id} do not fit {base.name}: {error}") from error
    return TextTower(text, float(logit_scale.reshape(())))


def _random_text_tower(name: str, seed: int) -> TextTower:
    """The text side of ``load_open_clip``'s seeded random model: only building all of it gives those weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
        initialise_random_weights(model)
    config = open_clip.get_model_config(name)
    text = _build_text_tower(config["embed_dim"], config["text_cfg"], config.get("quick_gelu", False))
    text.load_state_dict({k: v for k, v in model.state_dict().items() if _is_text_key(k)})
    return TextTower(text, float(model.logit_scale.detach().reshape(())))


def _is_text_key(key: str) -> bool:
    return not key.startswith("visual.") and key not in (LOGIT_SCALE, "logit_bias")


def _text_state(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The non-image tensors of a CLIP checkpoint; from safetensors, the image tensors are never read."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = [k for k in handle.keys() if not k.removeprefix("module.").startswith("visual.")]  # noqa: SIM118
                state = {key: handle.get_tensor(key) for key in keys}
        except Exception as error:
            raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {error}") from error
    else:
        state = {k: v for k, v in load_state_dict(path, allow_pickle).items() if not k.startswith("visual.")}
    return {key.removeprefix("module."): value for key, value in state.items()}


def save_aligner(tower: TextTower, path: str, name: str, base: BaseModel) -> None:
    """Write the aligner checkpoint; its metadata names the base model it must be used with."""
    metadata = {"format": FORMAT, "name": name, "base_model_id": base.model_id, "base_architecture": base.name}
    save_file(tower.aligner_state(), path, metadata=metadata)


def read_aligner(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Tensors, metadata and provenance id (``imagetune-aligner:<name>@sha256:<16 hex>``) of a local checkpoint."""
    path = str(path)
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise CheckpointError(f"corrupt or unreadable aligner checkpoint {path}: {error}") from error
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an imagetune aligner checkpoint (format={metadata.get('format')!r})")
    aligner_id = f"imagetune-aligner:{metadata['name']}@sha256:{file_digest(path)[:16]}"
    return load_state_dict(Path(path)), metadata, aligner_id


def apply_aligner(model: torch.nn.Module, model_id: str, path: str | Path) -> str:
    """Put a tuned text tower into a CLIP model of its base; returns the new provenance id.

    Refuses a checkpoint made for another base model (architecture or weights differ), and one that
    does not cover the whole text side: the image side stays the base's, so its embeddings stay valid.
    """
    state, metadata, aligner_id = read_aligner(path)
    if not same_weights(metadata["base_model_id"], model_id):
        raise ValueError(
            f"aligner {aligner_id} was trained for {metadata['base_model_id']}, not {model_id}: "
            "set clip.model and clip.pretrained to its base model, or train an aligner for this one"
        )
    own = {key for key in model.state_dict() if _is_text_key(key)}
    if set(state) - {LOGIT_SCALE} != own:
        missing, extra = sorted(own - set(state)), sorted(set(state) - own - {LOGIT_SCALE})
        raise CheckpointError(f"aligner {aligner_id} does not fit the text tower: missing {missing}, extra {extra}")
    with torch.no_grad():
        scale = state.pop(LOGIT_SCALE)
        model.logit_scale.copy_(scale.reshape(model.logit_scale.shape))
    model.load_state_dict(state, strict=False)
    return f"{model_id}{TEXT_SEPARATOR}{aligner_id}"


def check_text_model(name: str, pretrained: str, text_model: str, cache_dir: str, allow_pickle: bool = False) -> None:
    """Refuse, before any data is read, an aligner whose base is not the configured CLIP model.

    Reads the checkpoint's header only. The weights are compared by source (the same tag, path or
    URI) and otherwise by digest, which fetches the configured weights once per node; the actors
    compare digests again when they load.
    """
    metadata = safetensors_metadata(text_model)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{storage.redact_uri(text_model)} is not an imagetune aligner (clip.text_model)")
    trained_for = metadata["base_model_id"]
    name = register_model_config(name)
    if pretrained == RANDOM:
        same_source = trained_for == open_clip_model_id(name, pretrained, None)
    else:
        same_source = trained_for.startswith(f"open_clip:{name}/{storage.redact_uri(pretrained)}@")
    if not same_source:
        configured = resolve_base(name, pretrained, cache_dir, allow_pickle).model_id
        if not same_weights(trained_for, configured):
            raise ValueError(
                f"clip.text_model={storage.redact_uri(text_model)} was trained for {trained_for}, "
                f"but clip.model/clip.pretrained is {configured}: configure its base model, "
                "or train an aligner for this one"
            )
