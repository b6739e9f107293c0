from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pipeline.core.batch import Batch, fill, object_column, ok_mask, writable
from pipeline.stages.base import ChainStage, Stage, isolate_failures


@dataclass
class Fragile(Stage):
    """Fails on any batch holding row 'poison' among its ok rows, or on more than ``capacity`` ok rows."""

    capacity: int = 100
    name: ClassVar[str] = "fragile"

    def process(self, batch: Batch) -> Batch:
        batch = writable(batch)
        ok = ok_mask(batch)
        if "poison" in set(batch["id"][ok]):
            raise RuntimeError("cannot handle poison")
        if ok.sum() > self.capacity:
            raise MemoryError("out of memory")
        fill(batch, "done", [f"done-{i}" for i in batch["id"][ok]], ok, "")
        return batch


def _batch(ids):
    return {
        "id": object_column(ids),
        "status": object_column(["ok"] * len(ids)),
        "error_stage": object_column([""] * len(ids)),
        "error_message": object_column([""] * len(ids)),
    }


def test_one_failing_row_becomes_an_error_and_the_rest_are_processed():
    out = isolate_failures(Fragile(), _batch(["a", "b", "poison", "c", "d"]))
    assert list(out["id"]) == ["a", "b", "poison", "c", "d"]
    assert list(out["status"]) == ["ok", "ok", "error", "ok", "ok"]
    assert out["error_stage"][2] == "fragile" and "cannot handle poison" in out["error_message"][2]
    assert list(out["done"]) == ["done-a", "done-b", "", "done-c", "done-d"]
    assert np.all(out["_seconds_fragile"] >= 0)


def test_a_batch_too_large_for_the_device_is_split_until_it_fits():
    ids = [f"r{i}" for i in range(9)]
    out = ChainStage(stages=[Fragile(capacity=2)]).process(_batch(ids))
    assert list(out["status"]) == ["ok"] * 9
    assert list(out["done"]) == [f"done-{i}" for i in ids]
