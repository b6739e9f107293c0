"""The stage contract: cheap picklable construction, ``setup()`` once per worker, ``process(batch)``.

Stages never import Ray; ``pipeline.runner`` maps them onto Ray Data tasks and actor pools.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from pipeline.core.batch import Batch, mark_error, num_rows, ok_mask, writable

SECONDS_PREFIX = "_seconds_"

logger = logging.getLogger(__name__)


class Stage(ABC):
    """One step of the pipeline over a batch. Failures on a row mark that row, never the batch."""

    name: ClassVar[str]

    def setup(self) -> None:  # noqa: B027 - most CPU stages hold no state
        """Load heavy state (models, clients). Runs once per worker before the first batch."""

    @abstractmethod
    def process(self, batch: Batch) -> Batch:
        """Return the batch with this stage's columns added; same rows, same order."""

    def timed(self, batch: Batch) -> Batch:
        """``process`` plus this stage's wall time, spread evenly over the rows as a hidden column.

        Summing the column over the output gives the stage's total seconds, whether it ran alone or
        fused with other stages in one actor.
        """
        start = time.perf_counter()
        out = self.process(batch)
        rows = num_rows(out)
        out[SECONDS_PREFIX + self.name] = np.full(rows, (time.perf_counter() - start) / max(rows, 1))
        return out


def isolate_failures(stage: Stage, batch: Batch) -> Batch:
    """``stage.timed(batch)``; if it raises, retry halves, and mark a single failing row as an error.

    One bad row (or a batch too large for the device) never fails its batch, let alone the run; the
    failing row gets the stage's error and the stage still adds its columns to every row.
    """
    try:
        return stage.timed(batch)
    except Exception as error:
        rows = num_rows(batch)
        ok = np.flatnonzero(ok_mask(batch))
        if rows > 1 and len(ok) > 1:
            logger.warning("%s failed on a batch of %d rows (%s); retrying in halves", stage.name, rows, error)
            middle = rows // 2
            halves = [{k: v[:middle] for k, v in batch.items()}, {k: v[middle:] for k, v in batch.items()}]
            parts = [isolate_failures(stage, half) for half in halves]
            return {k: np.concatenate([parts[0][k], parts[1][k]]) for k in parts[0]}
        batch = writable(batch)
        for index in ok:
            logger.warning("%s failed on row %s: %s", stage.name, batch["id"][index], error)
            mark_error(batch, int(index), stage.name, error)
        return stage.timed(batch)


@dataclass
class ChainStage(Stage):
    """Several stages in one worker: how the model stages share one actor (and one GPU)."""

    stages: list[Stage] = field(default_factory=list)
    name: ClassVar[str] = "chain"

    def setup(self) -> None:
        for stage in self.stages:
            stage.setup()

    def process(self, batch: Batch) -> Batch:
        for stage in self.stages:
            batch = isolate_failures(stage, batch)
        return batch

    def timed(self, batch: Batch) -> Batch:
        return self.process(batch)
