"""The A/B lift report and the simulated online A/B: exact small cases, statistical properties on synthetic
scored tables with a known winner, and the page itself in a real headless Chromium."""

from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tabulate import tabulate

from pipelines.report import ReportConfig, build_report, verdict
from pipelines.report.ab_sim import LOGGED, ORACLE, ABConfig, examination, simulate_ab
from pipelines.report.compute import calibration_flag
from pipelines.report.document import Block, Cell, Table
from pipelines.report.environment import git_state
from pipelines.report.plots import UNKNOWN_PANEL, plot_slice_lifts, slice_lift_figure
from pipelines.report.render import render_html, render_markdown
from pipelines.report.slices import distinct_slices, empty_slices, slice_families
from ranker.metrics import SortedAUC, UserBootstrap, auc, paired_bootstrap, ranking_metrics, user_resamples

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DECAY = 0.8


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def make_scored(n_users: int = 300, requests_per_user: int = 8, slate: int = 10, seed: int = 0, identical: bool = False) -> pd.DataFrame:
    """A scored test table like the pipeline's, with simulator ground truth and a known winner.

    Every row's true relevance = sigmoid(user bias + item appeal). The `base` variants know the user bias and only
    a faint trace of the item appeal (they tell users apart but barely rank within a user); the `lum` variants see
    the item appeal clearly (they rank within users). With `identical`, every lum score equals its baseline's.
    """
    rng = np.random.default_rng(seed)
    n_requests = n_users * requests_per_user
    n = n_requests * slate
    request = np.repeat(np.arange(n_requests), slate)
    user = np.repeat(np.repeat(np.arange(n_users), requests_per_user), slate)
    user_bias = rng.normal(-1.0, 0.8, n_users)[user]
    appeal = rng.normal(0.0, 1.2, n)
    relevance = _sigmoid(user_bias + appeal)
    # the logging policy orders each slate by a noisy guess of the appeal
    noisy = appeal + rng.normal(0, 2.0, n)
    position = pd.Series(-noisy).groupby(request).rank(method="first").to_numpy().astype(int) - 1
    label = (rng.random(n) < relevance * examination(position, DECAY)).astype(np.int8)
    n_items = 400
    item = np.minimum(rng.zipf(1.6, n) - 1, n_items - 1)
    frame = pd.DataFrame(
        {
            "user_id": [f"u{u:04d}" for u in user],
            "item_id": [f"i{i:03d}" for i in item],
            "ts": pd.Timestamp("2025-01-01", tz="UTC") + pd.to_timedelta(request, unit="min"),
            "label": label,
            "surface": rng.choice(["home", "search", "cart"], n_requests)[request],
            "device": rng.choice(["mobile", "desktop"], n_requests)[request],
            "request_id": [f"r{r:05d}" for r in request],
            "position": position,
            "relevance": relevance,
        }
    )
    # a quarter of the users start in the test window with no history; the others have some before it
    prior = np.where(rng.random(n_users) < 0.25, 0, rng.integers(1, 80, n_users))[user]
    frame["user_history_len"] = prior + frame.groupby("user_id").cumcount().to_numpy() // slate * 2
    frame["user_no_history"] = frame["user_history_len"] == 0
    frame["item_popularity"] = (frame.groupby("item_id").cumcount() + rng.integers(0, 5, n)).astype(float)
    frame.loc[rng.random(n) < 0.02, "item_popularity"] = np.nan
    frame["item_is_new"] = item >= 300
    for model, noise in (("dlrm", 1.0), ("lightgbm", 1.2)):
        base = _sigmoid(user_bias + 0.15 * appeal + rng.normal(0, noise, n))
        lum = base if identical else _sigmoid(user_bias + 1.0 * appeal + rng.normal(0, noise, n))
        pooled = _sigmoid(user_bias + 0.3 * appeal + rng.normal(0, noise, n))
        lum_pooled = pooled if identical else _sigmoid(user_bias + 1.0 * appeal + rng.normal(0, noise, n))
        frame[f"score__{model}__base"] = base
        frame[f"score__{model}__lum"] = lum
        frame[f"score__{model}__pooled-history"] = pooled
        frame[f"score__{model}__lum+pooled"] = lum_pooled
    return frame


def _meta(**extra) -> dict:
    return {"run": "test", "slice_columns": ["surface", "device"], "position_decay": DECAY, **extra}


def _no_nan(text: str) -> dict:
    def reject(constant: str) -> None:
        raise ValueError(f"report.json holds {constant}: not valid JSON")

    return json.loads(text, parse_constant=reject)


# ---------------------------------------------------------------------------------------------------- A/B simulation


def test_ab_hand_computed_two_requests():
    # decay 1: examination at slots 0, 1, 2 = 1, 1/2, 1/3
    frame = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "b", "b", "b"],
            "request_id": ["r1", "r1", "r1", "r2", "r2", "r2"],
            "relevance": [0.2, 0.8, 0.5, 0.6, 0.1, 0.3],
            "score": [0.1, 0.9, 0.3, 0.5, 0.5, 0.9],  # r2: the tie .5/.5 keeps row order (0.6 before 0.1)
            "position": [0, 1, 2, 2, 0, 1],
        }
    )
    sim = simulate_ab(frame, {"ranker": "score"}, ABConfig(ks=(1, 3), position_decay=1.0, n_bootstrap=10))
    assert sim.policies == ("ranker", LOGGED, ORACLE)
    assert sim.n_requests == 2 and list(sim.users) == ["a", "b"]
    # ranker: r1 shows .8, .5, .2; r2 shows .3, .6, .1
    assert sim.ctr("ranker", 1) == pytest.approx((0.8 + 0.3) / 2)
    assert sim.ctr("ranker", 3) == pytest.approx(((0.8 + 0.5 / 2 + 0.2 / 3) + (0.3 + 0.6 / 2 + 0.1 / 3)) / 2 / 3)
    # logged: r1 in row order .2, .8, .5; r2 by position: .1, .3, .6
    assert sim.ctr(LOGGED, 1) == pytest.approx((0.2 + 0.1) / 2)
    assert sim.ctr(LOGGED, 3) == pytest.approx(((0.2 + 0.8 / 2 + 0.5 / 3) + (0.1 + 0.3 / 2 + 0.6 / 3)) / 2 / 3)
    # oracle: r1 .8, .5, .2; r2 .6, .3, .1
    assert sim.ctr(ORACLE, 1) == pytest.approx((0.8 + 0.6) / 2)
    assert sim.ctr(ORACLE, 3) == pytest.approx(((0.8 + 0.5 / 2 + 0.2 / 3) + (0.6 + 0.3 / 2 + 0.1 / 3)) / 2 / 3)
    lift = sim.lift("ranker", LOGGED, 1)
    assert lift.lift == pytest.approx(0.55 / 0.15 - 1)
    table = sim.ctr_table()
    assert list(table.columns) == ["ctr@1", "ctr@3"] and table.loc[ORACLE, "ctr@1"] == pytest.approx(0.7)


def test_ab_oracle_is_the_best_and_a_relevance_score_matches_it():
    frame = make_scored(n_users=150)
    frame["score__truth"] = frame["relevance"]
    rankers = {c: c for c in frame.columns if c.startswith("score__")}
    sim = simulate_ab(frame, rankers, ABConfig(position_decay=DECAY))
    for k in (1, 5, 10):
        best = sim.ctr(ORACLE, k)
        assert all(best >= sim.ctr(p, k) - 1e-12 for p in sim.policies)
        assert sim.ctr("score__truth", k) == pytest.approx(best, abs=1e-12)
        # the within-user signal of the lum scores shows up as expected clicks
        assert sim.ctr("score__dlrm__lum", k) > sim.ctr("score__dlrm__base", k)


def test_ab_random_order_gets_mean_relevance_times_mean_examination():
    rng = np.random.default_rng(3)
    n_requests, slate = 20_000, 10
    frame = pd.DataFrame(
        {
            "user_id": np.repeat(rng.integers(0, 4000, n_requests), slate).astype(str),
            "request_id": np.repeat(np.arange(n_requests), slate),
            "relevance": rng.beta(2, 5, n_requests * slate),
            "random": rng.random(n_requests * slate),
        }
    )
    sim = simulate_ab(frame, {"random": "random"}, ABConfig(position_decay=DECAY))
    mean_relevance = frame["relevance"].mean()
    for k in (1, 5, 10):
        expected = mean_relevance * examination(np.arange(k), DECAY).mean()
        assert sim.ctr("random", k) == pytest.approx(expected, rel=0.02)


def test_ab_lift_intervals():
    frame = make_scored(n_users=300)
    sim = simulate_ab(frame, {"base": "score__dlrm__base", "same": "score__dlrm__base", "lum": "score__dlrm__lum"}, ABConfig(n_bootstrap=300))
    same = sim.lift("same", "base", 10)
    assert same.lift == 0.0 and same.low == 0.0 and same.high == 0.0 and same.n == 300
    better = sim.lift("lum", "base", 10)
    assert better.low > 0 and better.low <= better.lift <= better.high
    assert better.ctr_variant == pytest.approx(sim.ctr("lum", 10))
    with pytest.raises(KeyError):
        sim.lift("lum", "base", 7)


# ---------------------------------------------------------------------------------------------------- statistics


def test_sorted_auc_equals_weighted_sklearn_auc_with_ties():
    rng = np.random.default_rng(0)
    n, n_users = 3000, 60
    labels = (rng.random(n) < 0.2).astype(np.float64)
    scores = np.round(rng.random(n) + 0.3 * labels, 1)  # rounding makes many ties
    users = rng.integers(0, n_users, n)
    sorted_auc = SortedAUC(labels, scores, users)
    for _ in range(5):
        counts = np.bincount(rng.integers(0, n_users, n_users), minlength=n_users).astype(np.float64)
        weights = counts[users]
        keep = weights > 0
        assert sorted_auc(counts) == pytest.approx(auc(labels[keep], scores[keep], weights[keep]), abs=1e-12)
    assert math.isnan(SortedAUC(np.zeros(4), np.arange(4.0), np.zeros(4, dtype=int))(np.ones(1)))


def test_user_bootstrap_agrees_with_ranker_metrics():
    frame = make_scored(n_users=80, requests_per_user=4)
    a, b = "score__dlrm__base", "score__dlrm__lum"
    boot = UserBootstrap(frame, [a, b])
    point = boot.point()
    for column in (a, b):
        expected = ranking_metrics(frame, column)
        for metric in ("auc", "gauc", "logloss", "ne", "calibration"):
            assert point[column][metric] == pytest.approx(expected[metric], abs=1e-10), metric
    # each resample equals ranking_metrics on the rows of the drawn users, each user's rows repeated as often as drawn
    samples = boot.resample(6, seed=7)
    codes, _ = pd.factorize(frame["user_id"], sort=True)
    for r, counts in enumerate(user_resamples(boot.n_users, 6, seed=7)):
        drawn = frame.iloc[np.repeat(np.arange(len(frame)), counts[codes].astype(int))].copy()
        copy = np.concatenate([np.arange(c) for c in counts[codes].astype(int)])  # a user drawn twice is two users
        drawn["user_id"] = drawn["user_id"].astype(str) + "#" + copy.astype(str)
        for column in (a, b):
            expected = ranking_metrics(drawn, column)
            for metric in ("auc", "gauc", "logloss", "ne", "calibration"):
                assert samples[column][metric][r] == pytest.approx(expected[metric], abs=1e-10), (metric, r)
    # paired_bootstrap is the same bootstrap: the same draws, the same interval for the pair
    reference = paired_bootstrap(frame, a, b, metric="auc", n=6, seed=7)
    assert reference.low == pytest.approx(np.percentile(samples[b]["auc"] - samples[a]["auc"], 2.5), abs=1e-12)


def test_verdict_wording():
    text, outcome = verdict(0.012, 0.008, 0.016, "GAUC")
    assert outcome == "gain" and text == "LUM features improve GAUC by +0.0120 (95% CI +0.0080 to +0.0160): a clear gain"
    text, outcome = verdict(0.001, -0.002, 0.004, "AUC")
    assert outcome == "none" and text.endswith("no clear difference (the interval includes 0)")
    text, outcome = verdict(-0.01, -0.02, -0.005, "AUC")
    assert outcome == "loss" and text.endswith("a clear loss")
    text, outcome = verdict(0.041, 0.03, 0.052, "CTR@10", relative=True)
    assert outcome == "gain" and "+4.1% (95% CI +3.0% to +5.2%)" in text
    assert verdict(float("nan"), float("nan"), float("nan"), "GAUC")[1] == "n/a"


# ---------------------------------------------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def gain_report(tmp_path_factory) -> tuple[dict, Path, pd.DataFrame]:
    frame = make_scored(n_users=250)
    out = tmp_path_factory.mktemp("gain")
    targets = {"gauc_lift_min": 0.01, "ctr_lift_min": 0.03, "auc_lift_min": 0.5, "pooled_gauc_no_loss": True}
    report = build_report(frame, _meta(targets=targets), out, ReportConfig(n_bootstrap=60, ab_bootstrap=200))
    return report, out, frame


def test_report_shows_a_clear_gain_when_lum_ranks_better_within_users(gain_report):
    report, out, _ = gain_report
    (protocol,) = report["protocols"]
    lift = next(x for x in protocol["lifts"] if (x["model"], x["variant"], x["metric"]) == ("dlrm", "lum", "gauc"))
    assert lift["delta"] > 0.05 and lift["low"] > 0 and lift["outcome"] == "gain"
    assert lift["verdict"].startswith("LUM features improve GAUC by +") and lift["verdict"].endswith("a clear gain")
    assert {x["comparison"] for x in protocol["lifts"]} == {"+LUM vs base", "LUM+pooled vs pooled-history"}
    ab = next(x for x in protocol["ab"]["lifts"] if (x["model"], x["variant"], x["k"]) == ("lightgbm", "lum", 10))
    assert ab["low"] > 0 and ab["outcome"] == "gain"
    # every file written, none left under a temporary name, the JSON is the returned report and has no NaN
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "report.md", "report.json", "roc_default.png", "calibration_default.png", "slice_lift_default.png", "ab_ctr_default.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert _no_nan((out / "report.json").read_text()) == json.loads(json.dumps(report))
    html_text = (out / "report.html").read_text()
    assert "a clear gain" in html_text and "<script" not in html_text.lower()
    assert "http://" not in html_text and "https://" not in html_text  # nothing to fetch: it renders offline
    markdown = (out / "report.md").read_text()
    # tabulate pads the cells of a column to one width
    assert re.search(r"^\| model +\| variant +\| +AUC +\| +GAUC +\|", markdown, re.M) and "![ROC curves per variant](roc_default.png)" in markdown


def test_report_variants_table_and_intervals_match_paired_bootstrap(gain_report):
    report, _, frame = gain_report
    variants = {(v["model"], v["variant"]): v for v in report["protocols"][0]["variants"]}
    assert len(variants) == 8
    base, lum = variants["dlrm", "base"], variants["dlrm", "lum"]
    assert base["vs_base"] is None and lum["vs_base"] is not None
    expected = ranking_metrics(frame, "score__dlrm__lum")
    for metric in ("auc", "gauc", "logloss", "ne", "calibration"):
        assert lum[metric]["value"] == pytest.approx(expected[metric])
        assert lum[metric]["low"] <= lum[metric]["value"] <= lum[metric]["high"]
    assert lum["gauc"]["skipped_users"] == expected["gauc_skipped_users"]
    reference = paired_bootstrap(frame, "score__dlrm__base", "score__dlrm__lum", metric="auc", n=60, seed=0)
    assert lum["vs_base"]["auc"]["delta"] == pytest.approx(reference.delta)
    assert (lum["vs_base"]["auc"]["low"], lum["vs_base"]["auc"]["high"]) == pytest.approx((reference.low, reference.high), abs=1e-10)
    assert lum["rela_impr"]["value"] > 0


def test_report_targets_met_and_missed(gain_report):
    report, _, _ = gain_report
    status = {(t["target"], t["model"]): t["met"] for t in report["protocols"][0]["targets"]}
    assert status["gauc_lift_min", "dlrm"] is True and status["ctr_lift_min", "dlrm"] is True
    assert status["auc_lift_min", "lightgbm"] is False  # an AUC lift of +0.5 is out of reach
    assert status["pooled_gauc_no_loss", "dlrm"] is True


def test_report_slices(gain_report):
    report, _, frame = gain_report
    slices = report["protocols"][0]["slices"]
    families = {}
    for s in slices:
        families.setdefault(s["family"], {})[s["value"]] = s
    # user_no_history is user_history_len == 0 here, as in the pipeline: "earlier user history" would repeat
    # "user history: 0" and its complement, so it is not a family of its own
    assert set(families) == {"surface", "device", "user history", "item interactions", "item popularity", "new item"}
    assert list(families["user history"]) == ["0", "1-5", "6-20", "21+"]
    interactions = families["item interactions"]
    assert interactions["0"]["rows"] == (frame["item_popularity"] == 0).sum()
    assert interactions["1-5"]["rows"] == frame["item_popularity"].between(1, 5).sum()
    # the cold-start slices carry the AUC lift as well, with a paired interval; the other slices GAUC only
    few = next(x for x in interactions["1-5"]["lifts"] if (x["model"], x["variant"], x["metric"]) == ("dlrm", "lum", "auc"))
    assert few["low"] <= few["delta"] <= few["high"] and few["delta"] == pytest.approx(
        few["variant_value"] - few["baseline_value"])
    assert {x["metric"] for x in families["surface"]["home"]["lifts"]} == {"gauc"}
    # rows without a count are one slice, shown once under the first family that has it
    unknown = interactions["unknown"]
    assert unknown["rows"] == frame["item_popularity"].isna().sum() and unknown["same_as"] == ["item popularity: unknown"]
    for name, values in families.items():
        assert sum(s["rows"] for s in values.values()) + (unknown["rows"] if name == "item popularity" else 0) == len(frame), name
    popularity = families["item popularity"]
    known = len(frame) - unknown["rows"]
    assert 0.1 < popularity["head"]["rows"] / known <= 0.2 + 0.1  # ties keep a popularity value in one bucket
    assert popularity["tail"]["rows"] / known <= 0.5
    cold = families["user history"]["0"]
    assert cold["rows"] == frame["user_no_history"].sum() and cold["same_as"] == ["earlier user history: none (cold user)"]
    assert report["protocols"][0]["data"]["cold_share"] == pytest.approx(frame["user_no_history"].mean())
    home = families["surface"]["home"]
    lift = next(x for x in home["lifts"] if (x["model"], x["variant"]) == ("dlrm", "lum"))
    assert lift["metric"] == "gauc" and lift["low"] > 0


def test_report_with_identical_scores_says_no_clear_difference(tmp_path):
    frame = make_scored(n_users=120, identical=True)
    report = build_report(frame, _meta(), tmp_path, ReportConfig(n_bootstrap=40, ab_bootstrap=100))
    protocol = report["protocols"][0]
    for lift in [*protocol["lifts"], *protocol["ab"]["lifts"]]:
        value = lift.get("delta", lift.get("lift"))
        assert value == 0.0 and lift["low"] <= 0 <= lift["high"] and lift["outcome"] == "none"
        assert lift["verdict"].endswith("no clear difference (the interval includes 0)")


def test_report_protocols_side_by_side_and_partial_score_columns(tmp_path):
    first = make_scored(n_users=100, seed=1).drop(columns=["score__lightgbm__lum", "relevance"])
    second = make_scored(n_users=100, seed=2)[["user_id", "item_id", "label", "score__dlrm__base", "score__dlrm__lum"]]
    protocols = [
        {"name": "global+snapshot", "split": "global", "feature_mode": "snapshot"},
        {"name": "per-user+rolling", "split": "per-user", "feature_mode": "rolling", "cold_share": 0.0},
    ]
    meta = _meta(
        protocols=protocols,
        durations={"data": 1.5, "pretrain": 75.0},
        lm_scaling=[
            {"preset": "tiny", "params": 3e5, "gauc_lift": 0.01, "low": 0.0, "high": 0.02},
            {"preset": "small", "params": 3e6, "gauc_lift": 0.02, "low": 0.01, "high": 0.03},
        ],
    )
    report = build_report([first, second], meta, tmp_path, ReportConfig(n_bootstrap=20, ab_bootstrap=50))
    a, b = report["protocols"]
    assert (a["name"], a["split"], a["feature_mode"], b["name"]) == ("global+snapshot", "global", "snapshot", "per-user+rolling")
    assert a["ab"] is None and b["ab"] is None  # no ground truth in either
    assert b["data"]["cold_share"] == 0.0 and b["slices"] == []  # nothing to slice by in the second table
    assert [x["comparison"] for x in a["lifts"] if x["model"] == "lightgbm"] == ["LUM+pooled vs pooled-history"] * 2
    html_text = (tmp_path / "report.html").read_text()
    assert "Protocols side by side" in html_text and "lm_scaling.png" in html_text and "1 min 15 s" in html_text
    # a per-user split's figures are labelled as the papers' protocol, with the future leak through the LM's weights
    assert "per-user split: the LUM and HSTU papers&#39; public-data protocol" in html_text
    assert "future reaches them through the LM" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "lm_scaling.png").stat().st_size > 0
    with pytest.raises(ValueError, match="describes 2 protocols"):
        build_report([first], meta, tmp_path / "bad", ReportConfig(n_bootstrap=5))


def test_at_a_glance_compares_lum_with_the_strongest_baseline_of_each_model(tmp_path):
    """With target-attention rankers in the run, "at a glance" and the targets read DIN+LUM vs DIN (and DIN vs the
    pooled history beside it); the weaker comparisons stay in the tables below."""
    frame = make_scored(n_users=80, requests_per_user=4)
    rng = np.random.default_rng(7)
    for model in ("dlrm", "lightgbm"):
        frame[f"score__{model}__din"] = frame[f"score__{model}__pooled-history"]
        frame[f"score__{model}__din+lum"] = np.clip(frame[f"score__{model}__lum+pooled"] + rng.normal(0, 0.01, len(frame)), 0, 1)
    meta = _meta(targets={"din_gauc_lift_min": 0.0, "din_vs_pooled_gauc_no_loss": True, "gauc_lift_min": 0.0})
    report = build_report(frame, meta, tmp_path, ReportConfig(n_bootstrap=20, ab_bootstrap=50))
    protocol = report["protocols"][0]
    titles = {x["comparison"] for x in protocol["lifts"]}
    assert {"DIN+LUM vs DIN", "DIN vs pooled-history", "DIN vs base", "+LUM vs base", "LUM+pooled vs pooled-history"} <= titles
    from pipelines.report.document import glance_comparisons

    assert glance_comparisons(protocol["lifts"]) == [("dlrm", "DIN+LUM vs DIN"), ("dlrm", "DIN vs pooled-history"),
                                                     ("lightgbm", "DIN+LUM vs DIN"), ("lightgbm", "DIN vs pooled-history")]
    by_key = {(t["target"], t["model"]): t for t in protocol["targets"]}
    din = next(x for x in protocol["lifts"] if (x["model"], x["comparison"], x["metric"]) == ("dlrm", "DIN+LUM vs DIN", "gauc"))
    assert by_key[("din_gauc_lift_min", "dlrm")]["value"] == din["delta"] and by_key[("din_gauc_lift_min", "dlrm")]["met"] is True
    same = by_key[("din_vs_pooled_gauc_no_loss", "lightgbm")]  # DIN scored as the pooled history: no loss
    assert same["value"] == 0.0 and same["met"] is True
    markdown = (tmp_path / "report.md").read_text()
    glance = markdown.split("## At a glance")[1].split("\n## ")[0]
    assert "DIN+LUM vs DIN" in glance and "+LUM vs base |" not in glance


# ---------------------------------------------------------------------------------------------------- the reader's fixes


def _two_variant_frame(calibrations: dict[str, float], n_users: int = 60) -> pd.DataFrame:
    """A small scored table with DLRM base and +LUM only, each rescaled to the given predicted / observed clicks."""
    frame = make_scored(n_users=n_users, requests_per_user=4)
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("score__") and c not in ("score__dlrm__base", "score__dlrm__lum")])
    for variant, target in calibrations.items():
        column = f"score__dlrm__{variant}"
        frame[column] = frame[column] * target * frame["label"].mean() / frame[column].mean()
        assert frame[column].max() < 1
    return frame


def test_calibration_outside_the_band_is_flagged_in_html_and_markdown(tmp_path):
    assert calibration_flag(1.08, (0.95, 1.05)) == "over" and calibration_flag(0.94, (0.95, 1.05)) == "under"
    assert calibration_flag(1.01, (0.95, 1.05)) is None and calibration_flag(float("nan"), (0.95, 1.05)) is None
    frame = _two_variant_frame({"base": 1.01, "lum": 1.08})
    report = build_report(frame, _meta(), tmp_path, ReportConfig(n_bootstrap=5, ab_bootstrap=10))
    variants = {v["variant"]: v["calibration"] for v in report["protocols"][0]["variants"]}
    assert variants["lum"]["value"] == pytest.approx(1.08) and variants["lum"]["flag"] == "over"
    assert variants["base"]["value"] == pytest.approx(1.01) and variants["base"]["flag"] is None
    markdown = (tmp_path / "report.md").read_text()
    flagged = [line for line in markdown.splitlines() if "**⚠ off**" in line]
    assert len(flagged) == 1 and "+LUM" in flagged[0] and "1.0800" in flagged[0]  # the variants table's +LUM row only
    warning = "Calibration flag: DLRM +LUM predicts 8.0% more clicks than observed (predicted / observed 1.0800, outside [0.95, 1.05])"
    assert markdown.count(f"- **⚠ {warning}") == 2  # at a glance and below the variants table
    assert "Calibration flag: DLRM base" not in markdown
    html_text = (tmp_path / "report.html").read_text()
    rows = re.findall(r"<tr><td>DLRM</td><td>(base|\+LUM)</td>(.*?)</tr>", html_text)
    cells = {variant: re.findall(r"<td[^>]*>.*?</td>", rest)[-1] for variant, rest in rows[:2]}  # the calibration column
    assert cells["+LUM"].startswith('<td class="num warn">1.0800<span class="mark">⚠ off</span>')
    assert "warn" not in cells["base"] and "mark" not in cells["base"]
    assert html_text.count(f'<li class="warn">{warning}') == 2


def test_the_ab_position_decay_is_the_simulators_and_the_report_shows_it(tmp_path):
    frame = _two_variant_frame({}, n_users=60)
    data = {"source": {"name": "simulator", "config": {"n_users": 60, "position_decay": 0.6, "retrieval_sharpness": 8.0}}, "n_events": 100}
    meta = {"run": "decay", "slice_columns": ["surface"], "data": data}  # no position_decay: the data's must be used
    report = build_report(frame, meta, tmp_path / "same", ReportConfig(n_bootstrap=5, ab_bootstrap=10))
    ab = report["protocols"][0]["ab"]
    assert ab["position_decay"] == 0.6 and report["report_config"]["position_decay"] == 0.6
    expected = simulate_ab(frame, {"dlrm/base": "score__dlrm__base"}, ABConfig(position_decay=0.6, n_bootstrap=10))
    assert ab["ctr"][0]["ctr@10"] == pytest.approx(expected.ctr("dlrm/base", 10))
    markdown = (tmp_path / "same" / "report.md").read_text()
    assert re.search(r"^\| source\.config\.position_decay +\| 0\.6 +\|$", markdown, re.M)
    assert re.search(r"^\| source\.config\.retrieval_sharpness +\| 8\.0 +\|$", markdown, re.M)  # settings as written
    assert re.search(r"^\| simulated A/B position_decay +\| 0\.6 \(from the simulator config of the data step\) +\|$", markdown, re.M)
    assert "  position_decay: 0.6\n" in markdown and "position_decay: 0.8" not in markdown  # the report config block
    assert "examination = (1 + position)^-0.6" in markdown and "generated the data with" not in markdown
    # a decay given with the run wins, and a mismatch with the simulator's is said
    report = build_report(frame, meta | {"position_decay": 0.8}, tmp_path / "other", ReportConfig(n_bootstrap=5, ab_bootstrap=10))
    assert report["protocols"][0]["ab"]["position_decay"] == 0.8 == report["report_config"]["position_decay"]
    markdown = (tmp_path / "other" / "report.md").read_text()
    assert "uses position_decay 0.8, but the simulator generated the data with 0.6" in markdown


def test_report_run_leaves_out_the_running_report_step_and_reads_the_run_folder(tmp_path):
    from pipelines.paths import RunPaths
    from pipelines.run.config import ProtocolConfig, RunConfig
    from pipelines.run.report import report_run, run_inputs

    paths = RunPaths(tmp_path / "run")
    config = RunConfig(run_dir=str(paths.root), report=ReportConfig(n_bootstrap=5), targets={"gauc_lift_min": 0.01})
    protocol = ProtocolConfig()
    paths.data_dir.mkdir(parents=True)
    paths.dataset_info.write_text(json.dumps({"source": {"name": "simulator", "config": {"position_decay": 0.6}}, "contract": {"big": 1}, "n_events": 9}))
    paths.split_dir(protocol.split).mkdir(parents=True)
    paths.split_summary(protocol.split).write_text(json.dumps({"windows": {"test": {"rows": 1}}}))
    model_dir = paths.model_dir(protocol.split, config.lm.pretrain.preset)
    model_dir.mkdir(parents=True)
    (model_dir / "lum_manifest.json").write_text(json.dumps({"model_version": "lum-tiny-test"}))
    scored_path = tmp_path / "scored.parquet"
    _two_variant_frame({}, n_users=40).to_parquet(scored_path)
    durations = {"data": 4.2, "global+rolling: pretrain": 123.6, "report": 0.0}  # as RunState.durations() while the report runs
    _, meta, report_config = run_inputs(config, paths, [(protocol, scored_path)], durations)
    assert meta["durations"] == {"data": 4.2, "global+rolling: pretrain": 123.6}
    assert "contract" not in meta["data"] and meta["model_versions"] == {protocol.name: "lum-tiny-test"}
    assert report_config.n_bootstrap == 5 and report_config.position_decay is None  # resolved from meta["data"]
    report = report_run(config, paths, [(protocol, scored_path)], durations, out_dir=tmp_path / "out")
    assert report["protocols"][0]["ab"]["position_decay"] == 0.6 and not (paths.root / "report").exists()
    markdown = (tmp_path / "out" / "report.md").read_text()
    durations_table = markdown.split("### Step durations")[1].split("###")[0]
    assert "| report" not in durations_table and "0.0 s" not in durations_table
    assert re.search(r"^\| total +\| +2 min 08 s \|$", durations_table, re.M)


def test_no_slice_is_shown_twice(tmp_path):
    frame = make_scored(n_users=80, requests_per_user=4)
    frame["surface_copy"] = frame["surface"]  # the same rows under another name
    slices = distinct_slices(slice_families(frame, ["surface", "surface", "surface_copy"], ReportConfig()))
    masks = {s.mask.tobytes() for s in slices}
    assert len(masks) == len(slices)  # every slice holds its own set of rows
    names = [s.name for s in slices]
    assert len(names) == len(set(names)) and not [n for n in names if n.startswith(("surface_copy", "earlier user history"))]
    home = next(s for s in slices if s.name == "surface: home")
    assert home.same_as == ["surface_copy: home"]
    assert next(s for s in slices if s.name == "user history: 0").same_as == ["earlier user history: none (cold user)"]
    # when "no earlier history" is not history length 0 (e.g. the length counts only recent events), it is a slicing
    frame.loc[frame.index[:40], "user_no_history"] = ~frame.loc[frame.index[:40], "user_no_history"]
    families = {s.family for s in distinct_slices(slice_families(frame, [], ReportConfig()))}
    assert "earlier user history" in families
    # the report shows the table's distinct slices once each
    report = build_report(
        frame.drop(columns=["surface_copy"]), _meta(slice_columns=["surface", "surface", "device"]), tmp_path, ReportConfig(n_bootstrap=3, ab_bootstrap=5)
    )
    shown = [(s["family"], s["value"]) for s in report["protocols"][0]["slices"]]
    assert len(shown) == len(set(shown)) and report["report_config"]["slice_columns"] == ["surface", "device"]


def test_an_empty_cold_start_bucket_is_named_not_silently_missing(tmp_path):
    frame = make_scored(n_users=80, requests_per_user=4)
    assert empty_slices(slice_families(frame, [], ReportConfig())) == []  # every history and item-count bucket has rows here
    # as on the simulator, where each request adds a 10-item slate: no user has 1-5 earlier events
    frame["user_history_len"] = np.where(frame["user_history_len"].between(1, 5), 6, frame["user_history_len"])
    frame["item_popularity"] = np.where(frame["item_popularity"] >= 6, 3.0, frame["item_popularity"])  # no item has 6+
    assert empty_slices(slice_families(frame, [], ReportConfig())) == ["user history: 1-5", "item interactions: 6+"]
    report = build_report(frame, _meta(), tmp_path, ReportConfig(n_bootstrap=3, ab_bootstrap=5))
    protocol = report["protocols"][0]
    shown = {(s["family"], s["value"]) for s in protocol["slices"]}
    assert ("user history", "1-5") not in shown and ("user history", "6-20") in shown and ("item interactions", "1-5") in shown
    assert protocol["empty_slices"] == ["user history: 1-5", "item interactions: 6+"]
    slices_section = (tmp_path / "report.md").read_text().split("### Slices")[1].split("\n### ")[0]
    assert "No test rows in: user history: 1-5, item interactions: 6+." in slices_section


def test_environment_block_holds_the_commit_versions_and_hardware(gain_report, tmp_path):
    report, out, _ = gain_report
    environment = report["environment"]
    here = Path(__file__).parent
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True).returncode == 0:
        # the tests run in a checkout: the report names its commit (HEAD then, or an ancestor if a commit came since)
        commit = environment["git"]["commit"]
        assert re.fullmatch(r"[0-9a-f]{40}", commit) and isinstance(environment["git"]["dirty"], bool)
        assert subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=here).returncode == 0
    assert environment["libraries"]["pandas"] == pd.__version__ and environment["libraries"]["numpy"] == np.__version__
    assert {"torch", "vllm", "feast", "torchrec", "lightgbm", "transformers", "pyarrow"} <= set(environment["libraries"])
    assert environment["hardware"]["cpu_count"] == os.cpu_count() and environment["hardware"]["platform"]
    markdown = (out / "report.md").read_text()
    block = markdown.split("### Environment")[1].split("\n## ")[0]
    assert re.search(rf"^\| pandas +\| {re.escape(pd.__version__)} +\|$", block, re.M) and re.search(r"^\| CPUs +\| \d+", block, re.M)
    if environment["git"]["commit"]:
        assert environment["git"]["commit"] in block
    # outside a checkout, and with uncommitted changes
    assert git_state(tmp_path)["commit"] is None
    if shutil.which("git"):
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
        (tmp_path / "a.txt").write_text("1")
        for args in (["init", "-q"], ["add", "a.txt"], ["commit", "-q", "-m", "one"]):
            subprocess.run([*git, *args], cwd=tmp_path, check=True)
        clean = git_state(tmp_path)
        (tmp_path / "a.txt").write_text("2")
        dirty = git_state(tmp_path)
        assert len(clean["commit"]) == 40 and clean["dirty"] is False and dirty["dirty"] is True and dirty["changed_files"] == 1


def _lift(model: str, comparison: str, delta: float, low: float, high: float) -> dict:
    return {"model": model, "comparison": comparison, "delta": delta, "low": low, "high": high}


def test_slice_plot_scale_is_not_set_by_the_wide_unknown_slice():
    def slice_(family, value, delta, low, high):
        return {
            "family": family,
            "value": value,
            "lifts": [_lift("dlrm", "+LUM vs base", delta, low, high), _lift("lightgbm", "+LUM vs base", delta / 2, low / 2, high / 2)],
        }

    slices = [
        slice_("surface", "home", 0.010, 0.008, 0.012),
        slice_("surface", "cart", 0.030, 0.025, 0.035),
        slice_("item popularity", "head", 0.020, 0.015, 0.025),
        slice_("item popularity", "unknown", -0.100, -0.300, 0.150),  # few rows: an interval ten times wider
        slice_("item popularity", "tail", 0.015, 0.010, 0.020),
    ]
    fig = slice_lift_figure(slices)
    panels = {ax.get_title(loc="left"): ax for ax in fig.axes}
    assert list(panels) == ["surface", "item popularity", UNKNOWN_PANEL]
    assert [t.get_text() for t in panels["item popularity"].get_yticklabels()] == ["head", "tail"]
    assert [t.get_text() for t in panels[UNKNOWN_PANEL].get_yticklabels()] == ["item popularity: unknown"]
    for family in ("surface", "item popularity"):
        low, high = panels[family].get_xlim()
        assert -0.01 < low <= 0 and 0.035 <= high < 0.05, (family, low, high)  # the known slices fill their panel
    low, high = panels[UNKNOWN_PANEL].get_xlim()
    assert low <= -0.3 and high >= 0.15
    assert plot_slice_lifts(slices)[:8] == b"\x89PNG\r\n\x1a\n"


def test_templates_render_blocks_and_tabulate_markdown_tables():
    table = Table(["name", "value"], [[Cell("a|b"), Cell("0.7000", "0.6000 to 0.8000", "num gain")],
                                      [Cell("<b>x</b>"), Cell("1.0800", "", "num warn", mark="⚠ off")]])
    blocks = [Block("h2", "Section"), Block("note", "a note"), Block("table", table=table), Block("bullets", items=[("careful", "warn"), ("fine", "")])]
    expected_table = tabulate(
        [["a\\|b", "0.7000 (0.6000 to 0.8000) **gain**"], ["<b>x</b>", "1.0800 **⚠ off**"]],
        headers=["name", "value"], tablefmt="pipe", colalign=["left", "right"], disable_numparse=True,
    )
    assert render_markdown(blocks) == f"## Section\n\n*a note*\n\n{expected_table}\n\n- **⚠ careful**\n- fine\n"
    assert "|:-----" in expected_table and "---:|" in expected_table  # text left, numbers right
    html_text = render_html(blocks, "title <1>")
    assert "<title>title &lt;1&gt;</title>" in html_text and "&lt;b&gt;x&lt;/b&gt;" in html_text and "<b>x" not in html_text
    assert '<td class="num gain">0.7000<span class="ci">0.6000 to 0.8000</span></td>' in html_text
    assert '<td class="num warn">1.0800<span class="mark">⚠ off</span></td>' in html_text
    assert '<li class="warn">careful</li>' in html_text and "td.warn" in html_text  # the stylesheet is inlined


# ---------------------------------------------------------------------------------------------------- in a real browser

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium_binary() -> str | None:
    """$CHROMIUM, or the first Chromium/Chrome on PATH (Debian: apt-get install chromium)."""
    names = (os.environ["CHROMIUM"],) if os.environ.get("CHROMIUM") else CHROMIUM_NAMES
    return next((path for path in map(shutil.which, names) if path), None)


def _fd_above_9(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class DevToolsPipe:
    """Headless Chromium driven over the Chrome DevTools protocol on a pipe (--remote-debugging-pipe).

    Chromium reads NUL-terminated JSON commands on its fd 3 and writes replies and events on fd 4; nothing else is
    needed (no driver, no websocket library, nothing downloaded at run time). Events that arrive while waiting for
    a reply are kept in `events`.
    """

    def __init__(self, binary: str, profile_dir: Path, timeout: float = 20.0):
        self.timeout = timeout
        self.log = profile_dir / "chromium.log"
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # move Chromium's ends above 9 so that placing them on fds 3 and 4 cannot overwrite one another
        to_browser_read, from_browser_write = (_fd_above_9(fd) for fd in (to_browser_read, from_browser_write))
        flags = [
            "--headless",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile_dir}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
            "about:blank",
        ]
        # bash puts the pipe ends on the fds 3 and 4 that Chromium expects, then becomes Chromium
        script = f'exec "$0" "$@" 3<&{to_browser_read} 4>&{from_browser_write} {to_browser_read}<&- {from_browser_write}>&-'
        with open(self.log, "wb") as log:  # a file, not a pipe that nobody drains
            self.process = subprocess.Popen(
                ["bash", "-c", script, binary, *flags], pass_fds=(to_browser_read, from_browser_write), stdout=subprocess.DEVNULL, stderr=log
            )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = bytearray()
        self._next_id = 0
        self.events: list[dict] = []

    def __enter__(self) -> "DevToolsPipe":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.send("Browser.close")
        except Exception:  # already gone: fall through to the kill
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)

    def _read_message(self, deadline: float) -> dict:
        while (end := self._buffer.find(b"\0")) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer from Chromium")
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe (exit code {self.process.poll()}); see {self.log}")
                self._buffer += chunk
        message = json.loads(bytes(self._buffer[:end]))
        del self._buffer[: end + 1]
        return message

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send a command and wait for its reply (its `result`)."""
        self._next_id += 1
        command = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            command["sessionId"] = session
        os.write(self._to_browser, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._read_message(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, event: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            found = next((e for e in self.events if e.get("method") == event), None)
            if found:
                return found
            self.events.append(self._read_message(deadline))

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (e.g. a resource that failed to load)."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                errors.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
        return errors


def open_in_chromium(page: Path, screenshot: Path, width: int = 1280) -> dict:
    """Load `page` in headless Chromium; return its console errors and images, and save a full-page screenshot."""
    binary = _chromium_binary()
    with tempfile.TemporaryDirectory() as profile, DevToolsPipe(binary, Path(profile)) as browser:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session)
        browser.wait_for("Page.loadEventFired")
        script = "JSON.stringify(Array.from(document.images, i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})))"
        images = json.loads(browser.send("Runtime.evaluate", {"expression": script, "returnByValue": True}, session)["result"]["value"])
        size = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        height = int(math.ceil(size["height"]))
        scale = min(1.0, 16_000 / height)  # a long page is shrunk to stay under Chromium's 16k-pixel texture limit
        shot = browser.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": scale}},
            session,
        )
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return {"errors": browser.console_errors(), "images": images, "height": size["height"]}


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    if _chromium_binary() is None:
        pytest.skip("no Chromium binary found (Debian: apt-get install chromium; or set $CHROMIUM); .ci/run installs it")
    protocols = [
        {"name": "global+snapshot", "split": "global", "feature_mode": "snapshot"},
        {"name": "per-user+rolling", "split": "per-user", "feature_mode": "rolling"},
    ]
    meta = _meta(
        run="browser-test",
        protocols=protocols,
        data={"source": "synthetic", "users": 200, "events": 16000},
        model_versions={"lm": "tiny-0123abcd", "dlrm": "v1", "lightgbm": "v1"},
        config={"seed": 0, "lm": {"preset": "tiny"}},
        durations={"data": 2.1, "pretrain": 95.0, "embed": 31.4, "rankers": 140.2, "report": 8.0},
        targets={"gauc_lift_min": 0.01, "ctr_lift_min": 0.03},
        lm_scaling=[
            {"preset": "tiny", "params": 3e5, "gauc_lift": 0.011, "low": 0.006, "high": 0.016},
            {"preset": "small", "params": 3.2e6, "gauc_lift": 0.018, "low": 0.012, "high": 0.024},
        ],
    )
    frames = [make_scored(n_users=200, seed=1), make_scored(n_users=200, seed=2)]
    report = build_report(frames, meta, tmp_path, ReportConfig(n_bootstrap=30, ab_bootstrap=100))
    screenshot = ARTIFACTS / "report.png"
    seen = open_in_chromium(tmp_path / "report.html", screenshot)
    assert seen["errors"] == []
    pngs = [name for name in report["files"] if name.endswith(".png")]
    assert len(seen["images"]) == len(pngs) == 9  # 4 plots per protocol + LM size vs lift
    assert all(image["complete"] and image["width"] > 0 and image["height"] > 0 for image in seen["images"]), seen["images"]
    assert screenshot.stat().st_size > 50_000


def test_durations_are_rounded_before_they_are_split_into_units():
    from pipelines.report.formatting import seconds

    assert [seconds(x) for x in (4.24, 59.94, 59.96, 119.5, 125.0, 3599.6, 7199.0, 5400.0)] == [
        "4.2 s", "59.9 s", "1 min 00 s", "2 min 00 s", "2 min 05 s", "1 h 00 min", "2 h 00 min", "1 h 30 min"]
