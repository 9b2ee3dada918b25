"""Offline metrics against small examples computed by hand, and the paired bootstrap."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ranker.metrics import (
    auc,
    calibration,
    compare_variants,
    gauc,
    interval95,
    logloss,
    metrics_by,
    normalized_entropy,
    paired_bootstrap,
    per_user_auc,
    ranking_metrics,
    rela_impr,
)

# user a: positive ranked above both negatives -> AUC 1
# user b: positives .2, .6 against negatives .8, .4 -> only (.6 > .4) of 4 pairs -> AUC 0.25
# user c: two positives, no negative -> no AUC: skipped, 2 impressions
HAND = pd.DataFrame(
    {
        "user_id": ["a", "a", "a", "b", "b", "b", "b", "c", "c"],
        "label": [1, 0, 0, 1, 0, 1, 0, 1, 1],
        "score": [0.9, 0.5, 0.1, 0.2, 0.8, 0.6, 0.4, 0.3, 0.7],
        "surface": ["home", "home", "home", "search", "search", "home", "home", "search", "search"],
    }
)


def test_gauc_weights_users_by_impressions_and_counts_the_skipped():
    result = gauc(HAND.label.to_numpy(), HAND.score.to_numpy(), HAND.user_id.to_numpy())
    assert result.value == pytest.approx((3 * 1.0 + 4 * 0.25) / 7)
    assert (result.users, result.skipped_users, result.skipped_impressions) == (2, 1, 2)


def test_gauc_with_no_two_class_user_is_nan():
    result = gauc(np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3]), np.array(["a", "a", "b"]))
    assert math.isnan(result.value) and result.skipped_users == 2 and result.skipped_impressions == 3


def test_per_user_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, size=2000)
    labels = (rng.random(2000) < 0.3).astype(int)
    scores = np.round(rng.random(2000) + 0.3 * labels, 1)  # rounding makes ties
    table = per_user_auc(labels, scores, users)
    for user, value in zip(table.user, table.auc):
        mask = users == user
        if len(set(labels[mask])) == 2:
            assert value == pytest.approx(roc_auc_score(labels[mask], scores[mask]), abs=1e-12)
        else:
            assert math.isnan(value)


def test_logloss_ne_calibration_by_hand():
    labels = np.array([1, 0, 0, 0])
    base_rate = np.full(4, 0.25)
    entropy = -(math.log(0.25) + 3 * math.log(0.75)) / 4
    assert logloss(labels, base_rate) == pytest.approx(entropy)
    assert normalized_entropy(labels, base_rate) == pytest.approx(1.0)  # predicting the base rate: NE = 1
    assert calibration(labels, base_rate) == pytest.approx(1.0)
    assert calibration(labels, np.full(4, 0.5)) == pytest.approx(2.0)
    assert normalized_entropy(labels, np.array([0.9, 0.1, 0.1, 0.1])) < 1.0
    assert math.isnan(normalized_entropy(np.zeros(3), np.full(3, 0.1)))
    assert math.isnan(auc(np.ones(3), np.array([0.1, 0.2, 0.3])))


def test_rela_impr():
    assert rela_impr(0.75, 0.70) == pytest.approx(0.25)
    assert rela_impr(0.70, 0.70) == 0.0


def test_metrics_per_slice():
    table = metrics_by(HAND, "surface")
    assert table.surface.tolist() == ["all", "home", "search"]
    home = table.set_index("surface").loc["home"]
    # home: user a (1 vs .5, .1) AUC 1 over 3 impressions; user b (.6 vs .4) AUC 1 over 2
    assert home.rows == 5 and home.gauc == pytest.approx(1.0) and home.gauc_skipped_users == 0
    search = table.set_index("surface").loc["search"]
    # search: user b has .2 vs .8 (AUC 0), user c only positives (skipped)
    assert search.gauc == pytest.approx(0.0) and search.gauc_skipped_users == 1 and search.gauc_skipped_impressions == 2
    overall = ranking_metrics(HAND)
    assert overall["auc"] == pytest.approx(roc_auc_score(HAND.label, HAND.score))


def test_compare_variants_reports_rela_impr_against_base():
    frame = HAND.assign(weak=[0.6, 0.5, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    table = compare_variants(frame, {"base": "weak", "lum": "score"}, base="base", by="surface")
    row = table[(table.variant == "lum") & (table.surface == "all")].iloc[0]
    base_row = table[(table.variant == "base") & (table.surface == "all")].iloc[0]
    assert row.rela_impr == pytest.approx((row.auc - 0.5) / (base_row.auc - 0.5) - 1)
    assert base_row.rela_impr == pytest.approx(0.0)


@pytest.fixture(scope="module")
def clicks() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    n, users = 6000, 300
    p = rng.random(n) * 0.6
    return pd.DataFrame(
        {
            "user_id": rng.integers(0, users, n),
            "label": (rng.random(n) < p).astype(int),
            "good": p,  # the true probability
            "noisy": np.clip(p + rng.normal(0, 0.3, n), 0.01, 0.99),
        }
    )


def test_paired_bootstrap_finds_a_real_difference(clicks):
    for metric in ("auc", "gauc"):
        result = paired_bootstrap(clicks, "noisy", "good", metric, n=200, seed=0)
        assert 0 < result.low < result.delta < result.high, metric
        assert result.n == 200
    loss = paired_bootstrap(clicks, "noisy", "good", "logloss", n=100, seed=0)
    assert loss.high < 0  # the true probabilities have the lower logloss


def test_paired_bootstrap_same_scores_and_determinism(clicks):
    same = paired_bootstrap(clicks, "good", "good", "auc", n=50, seed=0)
    assert same.delta == same.low == same.high == 0.0
    a = paired_bootstrap(clicks, "noisy", "good", "auc", n=50, seed=7)
    b = paired_bootstrap(clicks, "noisy", "good", "auc", n=50, seed=7)
    assert a == b
    custom = paired_bootstrap(clicks, "noisy", "good", lambda y, s, w: float(np.average(s, weights=w)), n=20, seed=0)
    assert custom.delta == pytest.approx(clicks.good.mean() - clicks.noisy.mean())


def test_interval95_is_numpys_2_5_and_97_5_percentiles_and_the_only_one():
    """One definition of the 95% interval: its values by hand, and no other module computes the percentiles itself."""
    assert interval95(np.arange(41.0)) == (1.0, 39.0)  # linear interpolation: 40 * 0.025 = 1, 40 * 0.975 = 39
    low, high = interval95(np.array([0.0, 1.0]))
    assert (low, high) == (0.025, 0.975) and all(type(v) is float for v in (low, high))
    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"(percentile|quantile)\([^)]*\b(2\.5|97\.5|0\.025|0\.975)\b")
    elsewhere = [f"{path.relative_to(root)}:{n}" for folder in ("contracts", "lum", "feature_store", "ranker", "pipelines", "benchmarks")
                 for path in sorted((root / folder).rglob("*.py")) if path != root / "ranker" / "metrics.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not elsewhere, f"a 95% interval computed outside ranker.metrics.interval95: {elsewhere}"
