"""The stage contract: cheap picklable construction, ``setup()`` once per worker, ``process(batch)``.

Stages never import Ray; ``pipeline.runner`` maps them onto Ray Data tasks and actor pools.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from pipeline.core.batch import Batch, num_rows

SECONDS_PREFIX = "_seconds_"


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
            batch = stage.timed(batch)
        return batch

    def timed(self, batch: Batch) -> Batch:
        return self.process(batch)
