"""open_clip CoCa's group beam search bookkeeping (HF ``BeamSearchScorer``) as batched tensor operations.

``CoCa.generate(generation_type="beam_search")`` runs HF group beam search with only a min-length
and a repetition-penalty processor: no ``HammingDiversityLogitsProcessor`` and no log-softmax (beam
scores are sums of raw logits). Its groups therefore start equal and never interact, so every group
holds the same beams and finished hypotheses, and the best of all groups is the best of one group.
``GroupBeamSearch`` keeps one group of ``num_beams // num_beam_groups`` beams per image and reproduces
``BeamSearchScorer.process``/``finalize`` and ``BeamHypotheses`` (length penalty 1.0, early stopping
off) exactly, including the order in which ties are broken, with one Python step per rank instead of
per beam.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LENGTH_PENALTY = 1.0  # BeamSearchScorer's default; open_clip passes none (nor early stopping)
_NOT_FIRST_BEAM_SCORE = -1e9  # HF's start score for every beam of a group but its first


@dataclass
class FinishedHypotheses:
    """Per image, the ``size`` best finished sequences, kept as HF ``BeamHypotheses`` keeps them.

    ``order`` is the insertion serial: ``BeamHypotheses`` evicts the earliest of equally worst
    hypotheses, and ``finalize`` picks the latest of equally best ones (stable sort, then ``pop``).
    """

    scores: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    order: torch.Tensor
    count: torch.Tensor

    @classmethod
    def empty(cls, batch: int, size: int, seq_len: int, device: torch.device) -> FinishedHypotheses:
        """No hypotheses yet, with room for ``size`` sequences of up to ``seq_len`` tokens per image."""
        long = {"dtype": torch.long, "device": device}
        return cls(
            scores=torch.zeros(batch, size, dtype=torch.float64, device=device),
            tokens=torch.zeros(batch, size, seq_len, **long),
            lengths=torch.zeros(batch, size, **long),
            order=torch.zeros(batch, size, **long),
            count=torch.zeros(batch, **long),
        )

    def worst(self) -> torch.Tensor:
        """The lowest kept score per image (``BeamHypotheses.worst_score`` once full)."""
        used = torch.arange(self.scores.shape[1], device=self.scores.device) < self.count[:, None]
        return torch.where(used, self.scores, torch.inf).min(dim=1).values

    def is_full(self) -> torch.Tensor:
        return self.count == self.scores.shape[1]

    def add(self, rows: torch.Tensor, scores: torch.Tensor, tokens: torch.Tensor, serial: int) -> None:
        """``BeamHypotheses.add`` for the images in ``rows``: one sequence each, at most."""
        full, worst = self.is_full(), self.worst()
        accept = rows & (~full | (scores > worst))
        worst_slots = self.scores == worst[:, None]
        evict = torch.where(worst_slots, self.order, torch.iinfo(torch.long).max).argmin(dim=1)
        slot = torch.where(full, evict, self.count.clamp(max=self.scores.shape[1] - 1))
        images = accept.nonzero().squeeze(1)
        slots = slot[images]
        self.scores[images, slots] = scores[images]
        self.tokens[images, slots, : tokens.shape[1]] = tokens[images]
        self.lengths[images, slots] = tokens.shape[1]
        self.order[images, slots] = serial
        self.count += accept & ~full

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and length of the highest-scoring hypothesis per image, the latest on ties."""
        best_slots = self.scores == self.scores.max(dim=1, keepdim=True).values
        slot = torch.where(best_slots, self.order, -1).argmax(dim=1)
        images = torch.arange(slot.shape[0], device=slot.device)
        return self.tokens[images, slot], self.lengths[images, slot]


class GroupBeamSearch:
    """Beam selection for ``batch`` images × ``group_size`` beams, rows ordered image-major."""

    def __init__(self, batch: int, group_size: int, seq_len: int, eos: int, pad: int, device: torch.device):
        self.batch, self.group_size, self.seq_len = batch, group_size, seq_len
        self.eos, self.pad = eos, pad
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.finished = FinishedHypotheses.empty(batch, group_size, seq_len, device)
        self._serial = 0

    def initial_scores(self) -> torch.Tensor:
        """0 for the first beam of each image, -1e9 for the others, so the beams start apart."""
        scores = torch.full((self.batch, self.group_size), _NOT_FIRST_BEAM_SCORE, device=self.done.device)
        scores[:, 0] = 0
        return scores.view(-1)

    def select(
        self, tokens: torch.Tensor, values: torch.Tensor, candidates: torch.Tensor, vocab_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``BeamSearchScorer.process`` for one step of every image.

        Args:
            tokens: every beam's tokens so far, ``(batch * group_size, length)``.
            values: the top ``2 * group_size`` beam scores per image, sorted, as ``torch.topk`` gives them.
            candidates: their indices into the image's flattened ``group_size × vocab_size`` scores.
            vocab_size: the number of token ids.

        Returns:
            Per new beam: the row it continues, its next token and its score. Images already done
            continue themselves with the pad token (their rows are never read again).
        """
        size, cur_len = self.group_size, tokens.shape[1] + 1
        images = torch.arange(self.batch, device=tokens.device)
        sources = images[:, None] * size + torch.div(candidates, vocab_size, rounding_mode="floor")
        next_tokens = candidates % vocab_size
        is_eos = next_tokens == self.eos
        searching = ~self.done
        for rank in range(size):
            ended = searching & is_eos[:, rank]
            self._add(ended, values[:, rank].double() / cur_len**LENGTH_PENALTY, tokens[sources[:, rank]])
        best_possible = values[:, 0].double() / cur_len**LENGTH_PENALTY
        self.done |= searching & self.finished.is_full() & (self.finished.worst() >= best_possible)
        keep = torch.sort(is_eos.to(torch.uint8), dim=1, stable=True).indices[:, :size]
        rows = torch.where(
            searching[:, None],
            sources.gather(1, keep),
            images[:, None] * size + torch.arange(size, device=tokens.device),
        )
        next_tokens = torch.where(searching[:, None], next_tokens.gather(1, keep), self.pad)
        scores = torch.where(searching[:, None], values.gather(1, keep), 0.0)
        return rows.view(-1), next_tokens.view(-1), scores.view(-1)

    def finalize(self, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``BeamSearchScorer.finalize``: the best sequence per image, closed with EOS where it fits."""
        searching = ~self.done
        beams = tokens.view(self.batch, self.group_size, -1)
        beam_scores = scores.view(self.batch, self.group_size).double() / tokens.shape[1] ** LENGTH_PENALTY
        for beam in range(self.group_size):
            self._add(searching, beam_scores[:, beam], beams[:, beam])
        best, lengths = self.finished.best()
        width = min(int(lengths.max()) + 1, self.seq_len)
        positions = torch.arange(width, device=tokens.device)
        output = torch.where(positions < lengths[:, None], best[:, :width], self.pad)
        return torch.where(positions == lengths[:, None], self.eos, output)

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())

    def _add(self, rows: torch.Tensor, scores: torch.Tensor, tokens: torch.Tensor) -> None:
        self.finished.add(rows, scores, tokens, self._serial)
        self._serial += 1
