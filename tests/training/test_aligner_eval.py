from __future__ import annotations

import numpy as np
import pytest

from pipeline.training.aligner_config import load_align_config
from pipeline.training.aligner_eval import chance_recall, format_markdown, ranks, retrieval_metrics, summarise


def test_rank_is_that_of_the_best_hit_with_ties_counted_against_it():
    similarity = np.array([[0.9, 0.5, 0.9, 0.1], [0.2, 0.3, 0.4, 0.1]])
    hits = np.array([[False, True, False, False], [False, False, False, True]])
    assert ranks(similarity, hits).tolist() == [3, 4]


def test_identical_captions_count_as_hits_both_ways_and_a_perfect_aligner_scores_one():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 4)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    captions = ["a", "b", "c", "c", "d", "e"]
    text = image.copy()
    text[3] = text[2]  # the same caption gives the same text embedding
    metrics = retrieval_metrics(text, image, captions)
    assert metrics["rows"] == 6 and metrics["distinct_captions"] == 5
    assert metrics["image_to_text"]["R@1"] == 1.0 and metrics["text_to_image"]["R@1"] == 1.0
    reversed_metrics = retrieval_metrics(-text, image, captions)
    assert reversed_metrics["image_to_text"]["R@1"] < 0.5 and reversed_metrics["image_to_text"]["median_rank"] > 3


def test_chance_recall_matches_a_random_ranking():
    hit_counts = np.array([1, 1, 2, 3])
    rng = np.random.default_rng(0)
    simulated = []
    for hits in hit_counts:
        order = np.array([rng.permutation(20) for _ in range(20000)])
        simulated.append(np.mean((order[:, :hits] < 5).any(axis=1)))
    assert chance_recall(hit_counts, 20, 5) == pytest.approx(np.mean(simulated), abs=0.01)
    assert chance_recall(np.array([1]), 10, 1) == pytest.approx(0.1)
    assert chance_recall(np.array([1]), 3, 5) == 1.0


def test_summary_and_markdown_show_mean_spread_and_each_fold():
    def fold(index: int, tuned: float) -> dict:
        direction = {"R@1": tuned, "R@5": 0.8, "R@10": 0.9, "median_rank": 2.0}
        plain = {"R@1": 0.05, "R@5": 0.2, "R@10": 0.3, "median_rank": 20.0}
        chance = {"R@1": 0.02, "R@5": 0.1, "R@10": 0.2}
        return {
            "fold": index,
            "untuned": {"rows": 50, "image_to_text": plain, "text_to_image": plain, "chance": chance},
            "tuned": {"rows": 50, "image_to_text": direction, "text_to_image": direction, "chance": chance},
        }

    folds = [fold(0, 0.3), fold(1, 0.5)]
    summary = summarise(folds)
    stats = summary["tuned"]["image_to_text"]["R@1"]
    assert stats["mean"] == pytest.approx(0.4) and stats["worst"] == 0.3
    assert stats["std"] == pytest.approx(np.std([0.3, 0.5], ddof=1))
    markdown = format_markdown({"folds": folds, "summary": summary}, "title")
    assert "| image→text R@1 | 0.020 | 0.050 ± 0.000 | 0.400 ± 0.141 | 0.300 |" in markdown
    assert "| 1 | 50 | 0.050 → 0.500 | 0.050 → 0.500 |" in markdown


def test_the_shipped_aligner_config_loads_with_the_documented_defaults_and_names_bad_values():
    from importlib.resources import files

    example = files("pipeline") / "configs" / "align.yaml"
    config = load_align_config(str(example))
    assert config == load_align_config(None, [], input=config.input, output=config.output)
    assert config.model_name == "aligner" and config.optim.lr == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="folds=1"):
        load_align_config(None, ["folds=1"], input="a", output="b")
    with pytest.raises(ValueError, match="multiple of scaling.num_workers=3"):
        load_align_config(None, ["scaling.num_workers=3", "optim.batch_size=32"], input="a", output="b")
    with pytest.raises(ValueError, match="data.processed_after='yesterday'"):
        load_align_config(None, ["data.processed_after=yesterday"], input="a", output="b")
