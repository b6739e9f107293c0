"""The symmetric contrastive (InfoNCE) loss of tuned texts against locked image embeddings.

With several workers, each one contrasts its own texts and images with every worker's (open_clip's
``local_loss`` with ``gather_with_grad``): its logits are n × N for n local and N global pairs,
never N × N, and the gathered texts carry their gradients back to the worker that owns them, so
the gradient equals one worker's on the whole global batch. The image embeddings are fixed and
need no gradient; they are gathered too, because every text needs all of them as negatives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch.nn import functional as F


def gather_batch(text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every worker's texts (gradients flowing back to their owners) and images, and where this
    worker's rows start; without a process group, the local batch itself."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return text, image, 0
    texts = torch.cat(dist_fn.all_gather(text))
    images = [torch.empty_like(image) for _ in range(dist.get_world_size())]
    dist.all_gather(images, image.contiguous())
    return texts, torch.cat(images), dist.get_rank() * text.shape[0]


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor, gather: bool) -> torch.Tensor:
    """Mean of the text→image and image→text cross-entropies; ``text`` and ``image`` are L2-normalised.

    ``logit_scale`` is the log of the temperature's inverse, as in CLIP. With ``gather`` the
    negatives are the global batch; without, this worker's own rows.
    """
    all_text, all_image, offset = gather_batch(text, image) if gather else (text, image, 0)
    scale = logit_scale.exp()
    labels = torch.arange(text.shape[0], device=text.device) + offset
    text_to_image = scale * text @ all_image.T
    image_to_text = scale * image @ all_text.T
    return (F.cross_entropy(text_to_image, labels) + F.cross_entropy(image_to_text, labels)) / 2
