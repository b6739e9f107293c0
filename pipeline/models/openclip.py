"""Load open_clip models (CLIP and CoCa) from a pretrained tag, a local file or an object-storage URI.

Preprocessing is split the way a GPU pipeline wants it: open_clip's own geometric transforms
(resize, centre crop) run on the CPU on uint8 images, and the float conversion and normalisation run
on the device. The numbers equal open_clip's ``preprocess`` followed by the model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import open_clip
import torch
from open_clip.transformer import MultimodalTransformer
from PIL import Image
from torchvision import transforms

from pipeline.core import storage
from pipeline.core.config import RANDOM
from pipeline.models.checkpoints import PICKLE_SUFFIXES, fetch_checkpoint, file_digest
from pipeline.models.staging import HostStaging

logger = logging.getLogger(__name__)


@dataclass
class OpenClipModel:
    """A model ready for inference plus what the stages need around it."""

    model: torch.nn.Module
    model_id: str
    tokenizer: Callable
    geometry: transforms.Compose
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device
    staging: HostStaging = field(init=False)

    def __post_init__(self) -> None:
        self.staging = HostStaging(self.device)

    def pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 HxWx3 images → normalised N×3×S×S float tensor on the model's device."""
        crops = [np.asarray(self.geometry(Image.fromarray(image)), dtype=np.uint8) for image in images]
        batch = self.staging.to_device(crops).permute(0, 3, 1, 2).float().div_(255.0)
        return batch.sub_(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)

    def autocast(self) -> torch.autocast:
        """bf16 autocast on GPU, plain fp32 on CPU."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")


def register_model_config(name: str) -> str:
    """Accept a path to an open_clip model-config JSON (a custom architecture) as well as a name.

    The config is registered with open_clip in this process and its file stem becomes the name.
    """
    if not name.endswith(".json"):
        return name
    path = os.path.expanduser(name)
    if not os.path.isfile(path):
        raise ValueError(f"open_clip model config {name} does not exist")
    open_clip.add_model_config(path)
    return os.path.basename(path).removesuffix(".json")


def select_device() -> torch.device:
    """The GPU Ray assigned to this worker, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_open_clip(
    name: str,
    pretrained: str,
    device: torch.device,
    cache_dir: str,
    allow_pickle: bool = False,
    seed: int = 0,
) -> OpenClipModel:
    """Create ``name`` with weights from ``pretrained``: a tag, a path, a URI, or ``random``.

    ``random`` is deliberate (tests, air-gapped smoke runs): the weights are seeded so every actor
    holds the same model, and the model id says RANDOM-WEIGHTS so no output can pass for real.
    """
    name = register_model_config(name)
    if pretrained == RANDOM:
        logger.warning("open_clip %s runs with RANDOM WEIGHTS: its captions and scores mean nothing", name)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
            initialise_random_weights(model)
        model_id = open_clip_model_id(name, pretrained, None, seed)
    else:
        local = _local_checkpoint(pretrained, cache_dir, allow_pickle)
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=str(local) if local else pretrained, require_pretrained=True, weights_only=True
        )
        model_id = open_clip_model_id(name, pretrained, str(local) if local else _tag_file(name, pretrained))
    geometry, mean, std = _split_preprocess(preprocess)
    model = model.to(device).eval()
    return OpenClipModel(
        model=model,
        model_id=model_id,
        tokenizer=open_clip.get_tokenizer(name),
        geometry=geometry,
        mean=torch.tensor(mean, device=device).view(1, 3, 1, 1),
        std=torch.tensor(std, device=device).view(1, 3, 1, 1),
        device=device,
    )


def open_clip_model_id(name: str, pretrained: str, weights: str | None, seed: int = 0) -> str:
    """The provenance id in the ``*_model`` columns: architecture, source and the weights' sha256.

    ``weights`` is the local weights file (``None`` for ``random``, whose id names the seed instead).
    """
    if pretrained == RANDOM:
        return f"open_clip:{name}/RANDOM-WEIGHTS(seed={seed})"
    return f"open_clip:{name}/{storage.redact_uri(pretrained)}@sha256:{file_digest(str(weights))[:16]}"


def weights_file(name: str, pretrained: str, cache_dir: str, allow_pickle: bool = False) -> str:
    """The local file behind a checkpoint path or URI (fetched once per node) or a pretrained tag
    (downloaded into open_clip's cache)."""
    local = _local_checkpoint(pretrained, cache_dir, allow_pickle)
    return str(local) if local else _tag_file(name, pretrained)


def is_checkpoint_path(pretrained: str) -> bool:
    """Whether ``pretrained`` names a file or URI rather than an open_clip pretrained tag."""
    return "://" in pretrained or os.sep in pretrained or pretrained.endswith((".safetensors", *PICKLE_SUFFIXES))


def initialise_random_weights(model: torch.nn.Module) -> None:
    """Initialise what open_clip leaves uninitialised in a model built without weights.

    CoCa's text decoder (``MultimodalTransformer``) never runs its ``init_parameters()``, which
    would fail if it did (it refers to a ``self.transformer`` that does not exist), so its
    ``text_projection`` stays ``torch.empty``: zeros in a fresh process, garbage later. Its logits
    are then zero (greedy decoding becomes a random draw that differs between actors) or worse.
    This applies the initialisation that method intends to the projection, under the caller's seed.
    """
    for module in model.modules():
        if isinstance(module, MultimodalTransformer) and module.text_projection is not None:
            torch.nn.init.normal_(module.text_projection, std=module.width**-0.5)


def _local_checkpoint(pretrained: str, cache_dir: str, allow_pickle: bool):
    """A local file for paths and URIs; ``None`` for open_clip pretrained tags."""
    return fetch_checkpoint(pretrained, cache_dir, allow_pickle) if is_checkpoint_path(pretrained) else None


def _tag_file(name: str, tag: str) -> str:
    """The cached file behind an open_clip pretrained tag (already downloaded by create_model)."""
    config = open_clip.get_pretrained_cfg(name, tag)
    return open_clip.download_pretrained(config)


def _split_preprocess(preprocess: transforms.Compose) -> tuple[transforms.Compose, tuple, tuple]:
    """open_clip's eval transform = geometry (PIL) + ToTensor + Normalize; keep them apart."""
    steps = list(preprocess.transforms)
    normalize = steps[-1]
    if not isinstance(normalize, transforms.Normalize) or not isinstance(steps[-2], transforms.ToTensor):
        raise TypeError(f"unexpected open_clip preprocess ending: {steps[-2:]}")
    return transforms.Compose(steps[:-2]), tuple(normalize.mean), tuple(normalize.std)


def pretrained_unavailable(name: str, tag: str) -> str | None:
    """Why the weights of an open_clip tag cannot be had here (not cached, hub unreachable), else None."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    config = open_clip.get_pretrained_cfg(name, tag)
    repo = (config.get("hf_hub") or "").strip("/")
    if not repo:
        return f"{name}/{tag} has no Hugging Face hub location"
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo, filename), str):
            return None
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as error:
        return f"weights for {name}/{tag} are not cached and {host} is unreachable ({error})"
    return None
