"""Selection maths on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pytest

from selection.ranking import (
    domain_budgets,
    longattn_score,
    normalize,
    rank_order,
    select_per_domain,
    training_mixture,
)


def test_min_max_and_zscore():
    assert normalize(np.array([2.0, 4.0, 3.0]), "min_max").tolist() == [0.0, 1.0, 0.5]
    assert normalize(np.array([7.0, 7.0]), "min_max").tolist() == [0.5, 0.5]  # the authors' constant case
    z = normalize(np.array([1.0, 2.0, 3.0]), "zscore")  # mean 2, sample std 1
    assert z.tolist() == [-1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="selection.normalization=l2"):
        normalize(np.array([1.0]), "l2")


def test_longattn_score_by_hand():
    ds = np.array([0.1, 0.3, 0.2])  # min-max -> 0, 1, 0.5
    var = np.array([4e-7, 2e-7, 3e-7])  # min-max -> 1, 0, 0.5
    assert longattn_score(ds, var, 0.5).tolist() == pytest.approx([-0.5, 1.0, 0.25], abs=1e-12)
    assert longattn_score(ds, var, 1.0).tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-12)
    assert longattn_score(ds, var, 0.5, use_uniformity=False).tolist() == pytest.approx(
        [0.0, 1.0, 0.5], abs=1e-12
    )
    # z-scores: ds -> -1, 1, 0 ; var -> 1, -1, 0 ; paper Eq. 8 with DU = -variance
    assert longattn_score(ds, var, 0.5, "zscore").tolist() == pytest.approx([-1.5, 1.5, 0.0])


def test_normalisation_is_global_not_per_shard():
    """The same window gets a different score if normalised within half the data: we never do that."""
    ds = np.array([0.1, 0.2, 0.3, 0.4])
    var = np.array([1.0, 1.0, 2.0, 2.0])
    whole = longattn_score(ds, var)
    half = longattn_score(ds[:2], var[:2])
    assert whole[:2].tolist() != half.tolist()


def test_ties_break_by_id():
    assert rank_order(["b", "a", "c"], np.array([1.0, 1.0, 2.0])) == [2, 1, 0]


def test_fraction_per_domain_is_floor_like_the_authors():
    ids = ["a1", "a2", "a3", "b1", "b2"]
    doms = ["a", "a", "a", "b", "b"]
    chosen = select_per_domain(ids, doms, [10] * 5, np.array([0.3, 0.9, 0.5, 0.1, 0.2]), fraction=0.5)
    assert chosen == {"a": [1], "b": [4]}  # 3 // 2 = 1 and 2 // 2 = 1


def test_budget_split_by_domain_ratios():
    assert domain_budgets(100, ["x", "y", "x"], None) == {"x": 50, "y": 50}
    assert domain_budgets(100, ["x", "y"], {"x": 3, "y": 1}) == {"x": 75, "y": 25}
    with pytest.raises(ValueError, match="no weight"):
        domain_budgets(100, ["x"], {"z": 1})


def test_budget_fill_skips_windows_that_overflow():
    ids = ["a", "b", "c", "d"]
    doms = ["x"] * 4
    tokens = [40, 70, 30, 10]
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    chosen = select_per_domain(ids, doms, tokens, scores, budget_tokens=80)
    assert chosen == {"x": [0, 2, 3]}  # 40 + (70 skipped) + 30 + 10 = 80


def test_exactly_one_rule():
    with pytest.raises(ValueError, match="exactly one"):
        select_per_domain(["a"], ["x"], [1], np.array([1.0]), fraction=0.5, budget_tokens=10)


def test_paper_mixture():
    mix = training_mixture(["arxiv", "book", "code"], 0.9, {"wiki": 0.03, "github": 0.03, "web": 0.04})
    assert mix["long"] == pytest.approx({"arxiv": 0.3, "book": 0.3, "code": 0.3})
    with pytest.raises(ValueError, match="must sum to 1"):
        training_mixture(["a"], 0.5, {"w": 0.1})
