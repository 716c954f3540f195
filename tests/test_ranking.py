"""Selection maths on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pytest

from selection.ranking import (
    domain_budgets,
    longattn_score,
    normalize,
    normalize_within,
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


def test_per_domain_min_max_then_top_fraction_by_hand():
    """The authors normalise each domain's file on its own. Domain a: ds .40-.50, variance 1e-6..5e-6;
    domain b: ds .20-.30, variance 1e-7..5e-7."""
    ids = ["a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4"]
    doms = ["a"] * 4 + ["b"] * 4
    ds = np.array([0.40, 0.45, 0.50, 0.42, 0.20, 0.22, 0.30, 0.26])
    var = np.array([1e-6, 3e-6, 5e-6, 2e-6, 1e-7, 3e-7, 2e-7, 5e-7])
    # a: norm ds 0, .5, 1, .2 ; norm var 0, .5, 1, .25   b: norm ds 0, .2, 1, .6 ; norm var 0, .5, .25, 1
    per_domain = longattn_score(ds, var, 0.5, groups=doms)
    assert per_domain.tolist() == pytest.approx([0, 0.25, 0.5, 0.075, 0, -0.05, 0.875, 0.1], abs=1e-12)
    chosen = select_per_domain(ids, doms, [10] * 8, per_domain, fraction=0.5)
    assert chosen == {"a": [2, 1], "b": [6, 7]}
    # over all windows (ds .20-.50, variance 1e-7..5e-6) domain a's order changes: a1 .5748, a4 .5394
    whole = longattn_score(ds, var, 0.5)
    assert whole[0] == pytest.approx(2 / 3 - 0.5 * 9 / 49) and whole[3] == pytest.approx(
        11 / 15 - 0.5 * 19 / 49
    )
    assert select_per_domain(ids, doms, [10] * 8, whole, fraction=0.5) == {"a": [0, 3], "b": [6, 7]}
    z = normalize_within(ds, doms, "zscore")
    assert z[:4].tolist() == pytest.approx(normalize(ds[:4], "zscore").tolist())
    with pytest.raises(ValueError, match="3 group labels for 8 values"):
        normalize_within(ds, doms[:3], "min_max")


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
