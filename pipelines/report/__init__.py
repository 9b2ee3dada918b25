"""The A/B lift report: ranker variants side by side with 95% intervals, lifts of LUM features, slices, plots.

    report = build_report(scored, meta, Path("runs/demo/report"), ReportConfig(n_bootstrap=200))

`scored` is the test window with one score column per ranker variant, named `score__<model>__<variant>`
(model dlrm | lightgbm, variant base | lum | pooled-history | lum+pooled; any subset), or a list of such tables,
one per protocol (e.g. global split + snapshot features, per-user split + rolling features). Writes into out_dir:

    report.html   one self-contained page (CSS inline, plots embedded as data URIs, no scripts, no network)
    report.md     the same tables in Markdown, plots linked as the PNG files beside it
    report.json   every number shown (NaN written as null)
    *.png         ROC curves, calibration, lift by slice, simulated CTR@k, LM size vs lift

Every file is written to a temporary name and renamed, so a reader never sees half a report.

Statistics. Point values are ranker.metrics' (AUC, GAUC, logloss, NE, calibration, RelaImpr). Intervals come
from one bootstrap over USERS per table (impressions of one user are not independent): each resample draws users
with replacement, and every score column is evaluated on the same draw, so the delta of two variants has the
interval of ranker.metrics.paired_bootstrap for that pair (same draws for the same seed; a test checks they
agree) while the absolute intervals come from the same pass. Evaluating each metric on a resample uses sums
that do not change between resamples: see UserBootstrap.

Verdicts. A lift is "a clear gain" when its whole 95% interval is above 0, "a clear loss" when below, and "no
clear difference" when the interval includes 0.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure  # pyplot is not used: no global backend state, nothing to close
from sklearn.metrics import roc_curve

from pipelines.report.ab_sim import LOGGED, ORACLE, ABConfig, ABSimulation, simulate_ab
from ranker.metrics import EPS, auc, per_user_auc, ranking_metrics, rela_impr

SCORE_PREFIX = "score__"
MODEL_ORDER = ("dlrm", "lightgbm")
VARIANT_ORDER = ("base", "lum", "pooled-history", "lum+pooled")
MODEL_LABELS = {"dlrm": "DLRM", "lightgbm": "LightGBM"}
VARIANT_LABELS = {"base": "base", "lum": "+LUM", "pooled-history": "pooled-history", "lum+pooled": "LUM+pooled"}
METRICS = ("auc", "gauc", "logloss", "ne", "calibration")
METRIC_LABELS = {"auc": "AUC", "gauc": "GAUC", "logloss": "logloss", "ne": "NE", "calibration": "calibration", "ctr": "CTR"}


@dataclass(frozen=True)
class Comparison:
    """A variant against the baseline it adds LUM features to."""

    variant: str
    baseline: str
    title: str  # shown in tables
    subject: str  # the start of a verdict sentence


COMPARISONS = (
    Comparison("lum", "base", "+LUM vs base", "LUM features"),
    Comparison("lum+pooled", "pooled-history", "LUM+pooled vs pooled-history", "LUM features on top of pooled history"),
)
LIFT_METRICS = ("auc", "gauc")


@dataclass(frozen=True)
class Target:
    """A goal from meta["targets"]: {key: threshold}. Met when the estimate reaches the threshold AND the 95% interval
    is above 0 (rule "min"), or when the interval is not entirely below 0 (rule "no_loss", threshold ignored)."""

    kind: str  # offline | ab
    metric: str
    comparison: Comparison
    rule: str  # min | no_loss


TARGETS = {
    "gauc_lift_min": Target("offline", "gauc", COMPARISONS[0], "min"),
    "auc_lift_min": Target("offline", "auc", COMPARISONS[0], "min"),
    "pooled_gauc_lift_min": Target("offline", "gauc", COMPARISONS[1], "min"),
    "pooled_auc_lift_min": Target("offline", "auc", COMPARISONS[1], "min"),
    "pooled_gauc_no_loss": Target("offline", "gauc", COMPARISONS[1], "no_loss"),
    "ctr_lift_min": Target("ab", "ctr", COMPARISONS[0], "min"),
}


@dataclass(frozen=True)
class ReportConfig:
    n_bootstrap: int = 200  # user resamples for the offline intervals (AUC costs a few ms per resample per variant)
    ab_bootstrap: int = 1000  # user resamples for the simulated A/B (cheap: per-user sums)
    seed: int = 0
    ks: tuple[int, ...] = (1, 5, 10)  # CTR@k of the simulated A/B
    target_k: int = 10  # the k of the `ctr_lift_min` target (the largest k when not in ks)
    position_decay: float = 0.8  # examination = (1 + position) ** -decay; meta["position_decay"] wins
    slice_columns: tuple[str, ...] = ()  # condition columns to slice by; meta["slice_columns"] wins
    history_edges: tuple[int, ...] = (1, 10, 50)  # user_history_len buckets: 0, 1-9, 10-49, 50+
    head_share: float = 0.2  # head items: the most popular, making up the first 20% of test impressions
    tail_share: float = 0.5  # tail items: the least popular, making up the last 50%; torso in between
    max_slice_values: int = 12  # a condition column's largest values; the rest are pooled as "other"
    calibration_bins: int = 10  # equal-count bins of the predicted CTR in the reliability diagram
    title: str = "A/B lift report"

    def __post_init__(self) -> None:
        if self.n_bootstrap < 1 or self.ab_bootstrap < 1:
            raise ValueError("bootstrap sample counts must be >= 1")
        if not 0 < self.head_share < 1 or not 0 < self.tail_share < 1 or self.head_share + self.tail_share > 1:
            raise ValueError("head_share and tail_share must be in (0, 1) and sum to at most 1")
        if list(self.history_edges) != sorted(set(self.history_edges)) or (self.history_edges and self.history_edges[0] < 1):
            raise ValueError("history_edges must be increasing integers >= 1")


# ---------------------------------------------------------------------------------------------------- score columns


@dataclass(frozen=True)
class ScoreColumn:
    model: str
    variant: str
    column: str

    @property
    def label(self) -> str:
        return f"{MODEL_LABELS.get(self.model, self.model)} {VARIANT_LABELS.get(self.variant, self.variant)}"

    @property
    def policy(self) -> str:
        """The name of this ranker in the simulated A/B."""
        return f"{self.model}/{self.variant}"


def score_columns(frame: pd.DataFrame) -> list[ScoreColumn]:
    """The `score__<model>__<variant>` columns, models and variants in their usual order."""
    found = []
    for column in frame.columns:
        parts = str(column).split("__")
        if len(parts) == 3 and parts[0] + "__" == SCORE_PREFIX:
            found.append(ScoreColumn(parts[1], parts[2], str(column)))

    def order(s: ScoreColumn) -> tuple:
        model = MODEL_ORDER.index(s.model) if s.model in MODEL_ORDER else len(MODEL_ORDER)
        variant = VARIANT_ORDER.index(s.variant) if s.variant in VARIANT_ORDER else len(VARIANT_ORDER)
        return (model, s.model, variant, s.variant)

    return sorted(found, key=order)


def _find(columns: list[ScoreColumn], model: str, variant: str) -> ScoreColumn | None:
    return next((c for c in columns if c.model == model and c.variant == variant), None)


def _models(columns: list[ScoreColumn]) -> list[str]:
    return list(dict.fromkeys(c.model for c in columns))


def _comparisons(columns: list[ScoreColumn]) -> Iterator[tuple[str, Any, ScoreColumn, ScoreColumn]]:
    """(model, comparison, variant column, baseline column) for every comparison whose two columns exist."""
    for model in _models(columns):
        for comparison in COMPARISONS:
            a, b = _find(columns, model, comparison.variant), _find(columns, model, comparison.baseline)
            if a is not None and b is not None:
                yield model, comparison, a, b


# ---------------------------------------------------------------------------------------------------- bootstrap


class SortedAUC:
    """ranker.metrics.auc of one score column under many user weightings: sorted once, then O(rows) per weighting.

    sklearn's roc_auc_score sorts the scores on every call (about 70 ms on 400k rows); a bootstrap of 8 variants
    x 200 resamples would spend two minutes sorting the same numbers. With the order fixed, the weighted AUC is

        sum over positives i of  w_i * (weight of negatives scored below i + half the weight of negatives tied with i)
        / (total positive weight * total negative weight)

    which is the trapezoid rule sklearn uses (ties count half). Only the negatives need a cumulative sum per
    weighting; where each positive falls among them is found once. A test checks it against ranker.metrics.auc.
    """

    def __init__(self, labels: np.ndarray, scores: np.ndarray, user_codes: np.ndarray):
        positive = np.asarray(labels) > 0
        neg_order = np.argsort(scores[~positive], kind="stable")
        neg_scores = scores[~positive][neg_order]
        self.neg_users = user_codes[~positive][neg_order]
        self.pos_users = user_codes[positive]
        pos_scores = scores[positive]
        # negatives strictly below each positive, and below or tied with it
        self.below = np.searchsorted(neg_scores, pos_scores, side="left")
        self.below_or_tied = np.searchsorted(neg_scores, pos_scores, side="right")
        self._neg_weights = np.empty(len(self.neg_users))
        self._cumulative = np.zeros(len(self.neg_users) + 1)

    def __call__(self, user_weights: np.ndarray) -> float:
        # the report's hot spot: np.take and cumsum into buffers allocated once (a fresh multi-MB array per call
        # costs as much again in page faults)
        cumulative, neg_weights = self._cumulative, self._neg_weights
        np.take(user_weights, self.neg_users, out=neg_weights)
        np.cumsum(neg_weights, out=cumulative[1:])  # cumulative[j] = weight of the j lowest negatives
        pos_weights = np.take(user_weights, self.pos_users)
        total_pos, total_neg = pos_weights.sum(), cumulative[-1]
        if total_pos <= 0 or total_neg <= 0:
            return float("nan")
        credit = 0.5 * (cumulative[self.below] + cumulative[self.below_or_tied])
        return _weighted_sum(pos_weights, credit) / (total_pos * total_neg)


def _weighted_sum(weights: np.ndarray, values: np.ndarray) -> float:
    """sum(weights * values) without BLAS: np.dot's threads make it 100x slower on a 2-core machine."""
    return float((weights * values).sum())


class UserBootstrap:
    """Metrics of several score columns on the same user resamples; a resample is a count per user.

    The draws copy ranker.metrics.paired_bootstrap's (users factorized in sorted order, one
    `rng.integers(0, U, U)` per resample from default_rng(seed)), so for the same seed both see the same resamples.
    Per metric, what does not change between resamples is computed once:
      auc                       SortedAUC (the order of the scores)
      gauc                      each user's AUC, from ranker.metrics.per_user_auc; a resample re-weights users
      logloss, ne, calibration  per-user sums of row logloss, predicted CTR, clicks and impressions; a resample
                                is a weighted sum over users
    """

    def __init__(self, frame: pd.DataFrame, columns: list[str], metrics: tuple[str, ...] = METRICS, label: str = "label", user: str = "user_id"):
        self.columns = list(columns)
        self.metrics = tuple(metrics)
        codes, uniques = pd.factorize(frame[user], sort=True)
        codes = codes.astype(np.int32)  # half the memory traffic of int64 in the per-resample gathers
        self.n_users = len(uniques)
        labels = frame[label].to_numpy(dtype=np.float64)
        self.impressions = np.bincount(codes, minlength=self.n_users).astype(np.float64)
        self.clicks = np.bincount(codes, weights=labels, minlength=self.n_users)
        self.sorted_auc: dict[str, SortedAUC] = {}
        self.user_auc: dict[str, np.ndarray] = {}
        self.predicted: dict[str, np.ndarray] = {}
        self.loss: dict[str, np.ndarray] = {}
        for column in self.columns:
            scores = frame[column].to_numpy(dtype=np.float64)
            if "auc" in self.metrics:
                self.sorted_auc[column] = SortedAUC(labels, scores, codes)
            if "gauc" in self.metrics:
                # per_user_auc returns users in sorted order, which is the order of `codes`
                self.user_auc[column] = per_user_auc(labels, scores, codes)["auc"].to_numpy()
            if {"logloss", "ne", "calibration"} & set(self.metrics):
                probs = np.clip(scores, EPS, 1 - EPS)  # the clipping ranker.metrics.logloss applies
                row_loss = -(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))
                self.loss[column] = np.bincount(codes, weights=row_loss, minlength=self.n_users)
                self.predicted[column] = np.bincount(codes, weights=scores, minlength=self.n_users)

    def evaluate(self, counts: np.ndarray) -> dict[str, dict[str, float]]:
        """{column: {metric: value}} when user u counts counts[u] times."""
        impressions = _weighted_sum(counts, self.impressions)
        clicks = _weighted_sum(counts, self.clicks)
        rate = clicks / impressions if impressions > 0 else float("nan")
        entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else float("nan")
        out: dict[str, dict[str, float]] = {}
        for column in self.columns:
            values: dict[str, float] = {}
            if "auc" in self.metrics:
                values["auc"] = self.sorted_auc[column](counts)
            if "gauc" in self.metrics:
                user_auc = self.user_auc[column]
                used = ~np.isnan(user_auc) & (counts > 0)
                weights = (counts * self.impressions)[used]
                values["gauc"] = _weighted_sum(weights, user_auc[used]) / weights.sum() if used.any() else float("nan")
            if column in self.loss:
                logloss = _weighted_sum(counts, self.loss[column]) / impressions if impressions > 0 else float("nan")
                predicted = _weighted_sum(counts, self.predicted[column])
                values["logloss"] = logloss
                values["ne"] = logloss / entropy  # NaN when the base rate is 0 or 1, as normalized_entropy
                values["calibration"] = predicted / clicks if clicks > 0 else float("nan")
            out[column] = {m: values[m] for m in self.metrics}
        return out

    def point(self) -> dict[str, dict[str, float]]:
        """Values on the data itself (every user once)."""
        return self.evaluate(np.ones(self.n_users))

    def resample(self, n: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
        """{column: {metric: [n] values}}, one per resample, the same resamples for every column."""
        rng = np.random.default_rng(seed)
        samples = {c: {m: np.empty(n) for m in self.metrics} for c in self.columns}
        for r in range(n):
            counts = np.bincount(rng.integers(0, self.n_users, self.n_users), minlength=self.n_users).astype(np.float64)
            for column, values in self.evaluate(counts).items():
                for metric, value in values.items():
                    samples[column][metric][r] = value
        return samples


def interval(samples: np.ndarray) -> dict[str, float]:
    """Mean and 2.5/97.5 percentiles of the defined samples (NaN resamples, e.g. one class only, are dropped)."""
    values = np.asarray(samples, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    return {"mean": float(values.mean()), "low": float(np.percentile(values, 2.5)), "high": float(np.percentile(values, 97.5)), "n": int(len(values))}


def verdict(delta: float, low: float, high: float, metric: str, subject: str = "LUM features", relative: bool = False) -> tuple[str, str]:
    """A plain-words sentence for a lift and its 95% interval, and the outcome: gain | loss | none | n/a."""
    if not all(np.isfinite([delta, low, high])):
        return f"{subject}: the {metric} lift cannot be measured here (too few users with both clicks and non-clicks)", "n/a"
    fmt = _pct if relative else _signed
    span = f"{fmt(delta)} (95% CI {fmt(low)} to {fmt(high)})"
    if low > 0:
        return f"{subject} improve {metric} by {span}: a clear gain", "gain"
    if high < 0:
        return f"{subject} change {metric} by {span}: a clear loss", "loss"
    return f"{subject} change {metric} by {span}: no clear difference (the interval includes 0)", "none"


# ---------------------------------------------------------------------------------------------------- slices


def _history_labels(edges: tuple[int, ...]) -> list[str]:
    bounds = [0, *edges]
    labels = []
    for low, high in zip(bounds[:-1], bounds[1:]):
        labels.append(str(low) if high - 1 == low else f"{low}-{high - 1}")
    labels.append(f"{bounds[-1]}+")
    return labels


def _popularity_buckets(popularity: pd.Series, config: ReportConfig) -> pd.Series:
    """head / torso / tail / unknown per row.

    Rows are ranked by their item's popularity (impressions before the row's day), most popular first; the
    popularity values that start within the first `head_share` of test impressions are head, those that start
    within the last `tail_share` are tail. Rows with equal popularity always share a bucket.
    """
    out = pd.Series("unknown", index=popularity.index, dtype=object)
    known = popularity.dropna()
    if known.empty:
        return out
    counts = known.value_counts().sort_index(ascending=False)  # most popular first
    share_before = (counts.cumsum() - counts) / counts.sum()
    bucket = pd.Series("torso", index=counts.index, dtype=object)
    bucket[share_before < config.head_share] = "head"
    bucket[share_before >= 1.0 - config.tail_share] = "tail"
    out.loc[known.index] = known.map(bucket).to_numpy()
    return out


def slice_families(frame: pd.DataFrame, columns: list[str], config: ReportConfig) -> list[tuple[str, pd.Series, list[str]]]:
    """(family name, a slice label per row, label order) for every slicing the table supports."""
    families: list[tuple[str, pd.Series, list[str]]] = []
    for column in columns:
        if column not in frame.columns:
            continue
        values = frame[column].astype(object).where(frame[column].notna(), "missing").astype(str)
        top = values.value_counts().index[: config.max_slice_values]
        values = values.where(values.isin(top), "other")
        families.append((column, values, sorted(values.unique())))
    if "user_history_len" in frame.columns:
        labels = _history_labels(config.history_edges)
        # edges (1, 10, 50) -> bins (-inf, 0.5], (0.5, 9.5], (9.5, 49.5], (49.5, inf): 0, 1-9, 10-49, 50+
        bins = [-np.inf, *[e - 0.5 for e in config.history_edges], np.inf]
        bucket = pd.cut(frame["user_history_len"].astype(float), bins=bins, labels=labels)
        families.append(("user history", bucket.astype(str), labels))
    no_history = None
    if "user_no_history" in frame.columns:
        no_history = frame["user_no_history"].astype(bool)
    elif "user_history_len" in frame.columns:
        no_history = frame["user_history_len"] == 0
    if no_history is not None:
        labels = ["none (cold user)", "some"]
        families.append(("earlier user history", pd.Series(np.where(no_history, labels[0], labels[1]), index=frame.index), labels))
    if "item_popularity" in frame.columns:
        labels = ["head", "torso", "tail", "unknown"]
        bucket = _popularity_buckets(frame["item_popularity"].astype(float), config)
        families.append(("item popularity", bucket, [label for label in labels if (bucket == label).any()]))
    if "item_is_new" in frame.columns:
        labels = ["new in test window", "seen before the test window"]
        families.append(("new item", pd.Series(np.where(frame["item_is_new"].astype(bool), labels[0], labels[1]), index=frame.index), labels))
    return families


# ---------------------------------------------------------------------------------------------------- one protocol


def _cold_share(frame: pd.DataFrame, protocol: dict[str, Any]) -> float | None:
    """Share of test rows whose user has no earlier event: from the table when it says, else from meta."""
    if "user_no_history" in frame.columns:
        return float(frame["user_no_history"].astype(bool).mean())
    if "user_history_len" in frame.columns:
        return float((frame["user_history_len"] == 0).mean())
    return protocol.get("cold_share")


def _when(value: Any) -> str:
    """A timestamp to the minute; anything else as text."""
    try:
        return pd.Timestamp(value).strftime("%Y-%m-%d %H:%M")
    except (ValueError, TypeError):
        return str(value)


def _data_summary(frame: pd.DataFrame, protocol: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "rows": int(len(frame)),
        "users": int(frame["user_id"].nunique()),
        "items": int(frame["item_id"].nunique()) if "item_id" in frame.columns else None,
        "ctr": float(frame["label"].mean()) if len(frame) else float("nan"),
        "cold_share": _cold_share(frame, protocol),
    }
    if "request_id" in frame.columns:
        summary["requests"] = int(frame["request_id"].nunique())
    if "ts" in frame.columns and len(frame):
        summary["start"], summary["end"] = (_when(t) for t in (frame["ts"].min(), frame["ts"].max()))
    return summary


Points = dict[str, dict[str, float]]  # {column: {metric: value on the data}}
Samples = dict[str, dict[str, np.ndarray]]  # {column: {metric: [n] values on the user resamples}}


def _variants(columns: list[ScoreColumn], points: dict[str, dict[str, Any]], samples: Samples) -> list[dict[str, Any]]:
    """Every variant's metrics with intervals, its change vs the same model's base, and RelaImpr.

    points: ranker.metrics.ranking_metrics per column; samples: one UserBootstrap over all columns.
    """
    rows = []
    for c in columns:
        point = points[c.column]
        row: dict[str, Any] = {"model": c.model, "variant": c.variant, "label": c.label, "column": c.column, "rows": point["rows"]}
        for metric in METRICS:
            row[metric] = {"value": point[metric], **interval(samples[c.column][metric])}
        row["gauc"].update(users=point["gauc_users"], skipped_users=point["gauc_skipped_users"], skipped_impressions=point["gauc_skipped_impressions"])
        base = _find(columns, c.model, "base")
        row["vs_base"] = None
        row["rela_impr"] = None
        if base is not None and base.column != c.column:
            row["vs_base"] = {
                metric: {"delta": point[metric] - points[base.column][metric], **interval(samples[c.column][metric] - samples[base.column][metric])}
                for metric in METRICS
            }
            resampled = [rela_impr(a, b) for a, b in zip(samples[c.column]["auc"], samples[base.column]["auc"])]
            row["rela_impr"] = {"value": rela_impr(point["auc"], points[base.column]["auc"]), **interval(np.array(resampled))}
        rows.append(row)
    return rows


def _pair_deltas(columns: list[ScoreColumn], points: Points, samples: Samples, metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """For each model and each comparison whose two columns exist: the paired delta, its interval and a verdict."""
    out = []
    for model, comparison, a, b in _comparisons(columns):
        for metric in metrics:
            delta = points[a.column][metric] - points[b.column][metric]
            stats = interval(samples[a.column][metric] - samples[b.column][metric])
            sentence, outcome = verdict(delta, stats["low"], stats["high"], METRIC_LABELS[metric], comparison.subject)
            out.append(
                {
                    "model": model,
                    "variant": comparison.variant,
                    "baseline": comparison.baseline,
                    "comparison": comparison.title,
                    "metric": metric,
                    "delta": delta,
                    **stats,
                    "variant_value": points[a.column][metric],
                    "baseline_value": points[b.column][metric],
                    "verdict": sentence,
                    "outcome": outcome,
                }
            )
    return out


def _slices(frame: pd.DataFrame, columns: list[ScoreColumn], slice_columns: list[str], config: ReportConfig) -> list[dict[str, Any]]:
    """Per slice: rows, users, CTR, every variant's AUC and GAUC, and the GAUC lift of each comparison.

    A slice is bootstrapped on its own users (as paired_bootstrap on the slice's rows would), GAUC only: its
    resamples are cheap, and AUC intervals for every slice would cost more than the rest of the report.
    """
    out = []
    for family, labels, order in slice_families(frame, slice_columns, config):
        for value in order:
            mask = (labels == value).to_numpy()
            if not mask.any():
                continue
            part = frame.loc[mask]
            label_values = part["label"].to_numpy(dtype=np.float64)
            boot = UserBootstrap(part, [c.column for c in columns], metrics=("gauc",))
            points = boot.point()
            samples = boot.resample(config.n_bootstrap, config.seed)
            variants = {c.column: {"auc": auc(label_values, part[c.column].to_numpy(dtype=np.float64)), "gauc": points[c.column]["gauc"]} for c in columns}
            out.append(
                {
                    "family": family,
                    "value": value,
                    "rows": int(mask.sum()),
                    "users": int(boot.n_users),
                    "ctr": float(label_values.mean()),
                    "variants": variants,
                    "lifts": _pair_deltas(columns, points, samples, ("gauc",)),
                }
            )
    return out


def _ab(frame: pd.DataFrame, columns: list[ScoreColumn], position_decay: float, config: ReportConfig) -> dict[str, Any] | None:
    """CTR@k of every ranker, `logged` and `oracle`, and each comparison's CTR lift; None without ground truth."""
    if not {"relevance", "request_id"} <= set(frame.columns) or not columns:
        return None
    ab_config = ABConfig(ks=tuple(config.ks), position_decay=position_decay, n_bootstrap=config.ab_bootstrap, seed=config.seed)
    sim: ABSimulation = simulate_ab(frame, {c.policy: c.column for c in columns}, ab_config)
    ctr = []
    for policy in sim.policies:
        column = next((c for c in columns if c.policy == policy), None)
        label = column.label if column else {LOGGED: "logged policy", ORACLE: "oracle (true relevance)"}[policy]
        ctr.append({"policy": policy, "label": label, **{f"ctr@{k}": sim.ctr(policy, k) for k in ab_config.ks}})
    lifts = []
    for model, comparison, a, b in _comparisons(columns):
        for lift in sim.lifts([(a.policy, b.policy)]):
            sentence, outcome = verdict(lift.lift, lift.low, lift.high, f"CTR@{lift.k}", comparison.subject, relative=True)
            numbers = {k: v for k, v in asdict(lift).items() if k not in ("variant", "baseline")}  # policy names
            lifts.append(
                {
                    "model": model,
                    "variant": comparison.variant,
                    "baseline": comparison.baseline,
                    "comparison": comparison.title,
                    **numbers,
                    "verdict": sentence,
                    "outcome": outcome,
                }
            )
    return {"ks": list(ab_config.ks), "position_decay": position_decay, "requests": sim.n_requests, "users": len(sim.users), "ctr": ctr, "lifts": lifts}


def _targets(targets: dict[str, Any], lifts: list[dict[str, Any]], ab: dict[str, Any] | None, config: ReportConfig) -> list[dict[str, Any]]:
    """Each target of meta["targets"], per model: the estimate, its interval and met / missed."""
    out = []
    for key, threshold in targets.items():
        target = TARGETS.get(key)
        if target is None:
            out.append({"target": key, "threshold": threshold, "model": None, "description": "unknown target: not evaluated", "met": None})
            continue
        if target.kind == "ab":
            if ab is None:
                continue
            k = config.target_k if config.target_k in ab["ks"] else max(ab["ks"])
            found = [x for x in ab["lifts"] if x["k"] == k and x["variant"] == target.comparison.variant]
            estimates = [(x["model"], x["lift"], x["low"], x["high"]) for x in found]
            what = f"{target.comparison.title} CTR@{k} relative lift"
            shown = _pct(threshold) if target.rule == "min" else ""
        else:
            found = [x for x in lifts if x["metric"] == target.metric and x["variant"] == target.comparison.variant]
            estimates = [(x["model"], x["delta"], x["low"], x["high"]) for x in found]
            what = f"{target.comparison.title} {METRIC_LABELS[target.metric]} lift"
            shown = _signed(threshold) if target.rule == "min" else ""
        if target.rule == "min":
            description = f"{what} >= {shown} with the 95% interval above 0"
        else:
            description = f"{what}: no clear loss (the 95% interval is not entirely below 0)"
        for model, value, low, high in estimates:
            if not all(np.isfinite([value, low, high])):
                met = None
            elif target.rule == "min":
                met = bool(value >= float(threshold) and low > 0)
            else:
                met = bool(high >= 0)
            out.append({"target": key, "threshold": threshold, "model": model, "description": description, "value": value, "low": low, "high": high, "met": met})
    return out


def evaluate_protocol(frame: pd.DataFrame, protocol: dict[str, Any], meta: dict[str, Any], config: ReportConfig) -> dict[str, Any]:
    """Every number of one protocol's section of the report (plots are added by build_report)."""
    columns = score_columns(frame)
    if not columns:
        raise ValueError(f"protocol '{protocol.get('name')}': no score columns named {SCORE_PREFIX}<model>__<variant>")
    missing = [c for c in ("user_id", "label") if c not in frame.columns]
    if missing:
        raise ValueError(f"protocol '{protocol.get('name')}': scored table lacks {missing}")
    unscored = [c.column for c in columns if frame[c.column].isna().any()]
    if unscored:
        raise ValueError(f"protocol '{protocol.get('name')}': missing scores in {unscored}; every test row needs every score")
    slice_columns = list(meta.get("slice_columns") or config.slice_columns)
    position_decay = float(meta.get("position_decay", config.position_decay))
    # one bootstrap for the whole table: every interval of the variants and lifts tables comes from the same draws
    samples = UserBootstrap(frame, [c.column for c in columns]).resample(config.n_bootstrap, config.seed)
    points = {c.column: ranking_metrics(frame, c.column) for c in columns}
    variants = _variants(columns, points, samples)
    lifts = _pair_deltas(columns, points, samples, LIFT_METRICS)
    ab = _ab(frame, columns, position_decay, config)
    return {
        "name": protocol.get("name", "default"),
        "split": protocol.get("split"),
        "feature_mode": protocol.get("feature_mode"),
        "data": _data_summary(frame, protocol),
        "columns": [asdict(c) | {"label": c.label} for c in columns],
        "variants": variants,
        "lifts": lifts,
        "ab": ab,
        "slices": _slices(frame, columns, slice_columns, config),
        "targets": _targets(dict(meta.get("targets") or {}), lifts, ab, config),
    }


# ---------------------------------------------------------------------------------------------------- plots

PLOT_DPI = 100


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    return buffer.getvalue()


def plot_roc(frame: pd.DataFrame, columns: list[ScoreColumn], variants: list[dict[str, Any]]) -> bytes:
    """One panel per model, one ROC curve per variant."""
    models = _models(columns)
    fig = Figure(figsize=(5.2 * len(models), 4.6))
    axes = np.atleast_1d(fig.subplots(1, len(models), squeeze=False)[0])
    labels = frame["label"].to_numpy()
    aucs = {v["column"]: v["auc"]["value"] for v in variants}
    for ax, model in zip(axes, models):
        for c in (c for c in columns if c.model == model):
            if len(np.unique(labels)) == 2:
                fpr, tpr, _ = roc_curve(labels, frame[c.column].to_numpy(dtype=np.float64))
                ax.plot(fpr, tpr, lw=1.6, label=f"{VARIANT_LABELS.get(c.variant, c.variant)} (AUC {_fixed(aucs[c.column])})")
        ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="chance")
        ax.set(title=f"ROC: {MODEL_LABELS.get(model, model)}", xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    return _png(fig)


def plot_calibration(frame: pd.DataFrame, columns: list[ScoreColumn], bins: int) -> bytes:
    """Reliability diagram: mean predicted vs observed CTR in equal-count bins of the prediction."""
    models = _models(columns)
    fig = Figure(figsize=(5.2 * len(models), 4.6))
    axes = np.atleast_1d(fig.subplots(1, len(models), squeeze=False)[0])
    labels = frame["label"].to_numpy(dtype=np.float64)
    top = 0.0
    for ax, model in zip(axes, models):
        for c in (c for c in columns if c.model == model):
            probs = frame[c.column].to_numpy(dtype=np.float64)
            edges = np.unique(np.quantile(probs, np.linspace(0, 1, bins + 1)))
            which = np.clip(np.searchsorted(edges, probs, side="right") - 1, 0, max(len(edges) - 2, 0))
            count = np.bincount(which)
            keep = count > 0
            predicted = np.bincount(which, weights=probs)[keep] / count[keep]
            observed = np.bincount(which, weights=labels)[keep] / count[keep]
            ax.plot(predicted, observed, marker="o", ms=3.5, lw=1.4, label=VARIANT_LABELS.get(c.variant, c.variant))
            top = max(top, predicted.max(initial=0), observed.max(initial=0))
        ax.set(title=f"Calibration: {MODEL_LABELS.get(model, model)}", xlabel="mean predicted CTR (bin)", ylabel="observed CTR (bin)")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    limit = top * 1.05 if top > 0 else 1.0
    for ax in axes:
        ax.plot([0, limit], [0, limit], ls="--", color="#999999", lw=1)
        ax.set(xlim=(0, limit), ylim=(0, limit))
    return _png(fig)


def plot_slice_lifts(slices: list[dict[str, Any]]) -> bytes | None:
    """Horizontal bars: GAUC lift of each comparison per slice, with its 95% interval."""
    series = list(dict.fromkeys((x["model"], x["comparison"]) for s in slices for x in s["lifts"]))
    if not series:
        return None
    names = [f"{s['family']}: {s['value']}" for s in slices]
    height = 0.8 / len(series)
    fig = Figure(figsize=(10, 1.6 + (0.12 * len(series) + 0.12) * len(slices)))
    ax = fig.subplots()
    y = np.arange(len(slices))
    for i, (model, comparison) in enumerate(series):
        delta, low_err, high_err = [], [], []
        for s in slices:
            lift = next((x for x in s["lifts"] if x["model"] == model and x["comparison"] == comparison), None)
            d = lift["delta"] if lift else float("nan")
            delta.append(d)
            low_err.append(max(d - lift["low"], 0) if lift and np.isfinite(lift["low"]) else 0.0)
            high_err.append(max(lift["high"] - d, 0) if lift and np.isfinite(lift["high"]) else 0.0)
        offset = (i - (len(series) - 1) / 2) * height
        ax.barh(y + offset, delta, height=height, xerr=[low_err, high_err], capsize=2, error_kw={"lw": 0.8}, label=f"{MODEL_LABELS.get(model, model)}: {comparison}")
    ax.axvline(0, color="#333333", lw=0.8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="GAUC lift (95% CI)")
    ax.set_title("GAUC lift by slice", pad=12 + 11 * math.ceil(len(series) / 2))
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def plot_ab(ab: dict[str, Any]) -> bytes:
    """Grouped bars: CTR@k of every policy, one group per k."""
    fig = Figure(figsize=(10, 4.2))
    ax = fig.subplots()
    ks = ab["ks"]
    width = 0.8 / len(ab["ctr"])
    for i, row in enumerate(ab["ctr"]):
        offset = (i - (len(ab["ctr"]) - 1) / 2) * width
        ax.bar(np.arange(len(ks)) + offset, [row[f"ctr@{k}"] for k in ks], width=width, label=row["label"])
    ax.set_xticks(np.arange(len(ks)), [f"CTR@{k}" for k in ks])
    ax.set(ylabel="expected CTR", title="Simulated online A/B: expected CTR@k")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_lm_scaling(scaling: list[dict[str, Any]]) -> bytes:
    """GAUC lift against the behaviour LM's parameter count, one point per preset."""
    points = sorted(scaling, key=lambda p: float(p["params"]))
    params = np.array([float(p["params"]) for p in points])
    lift = np.array([float(p["gauc_lift"]) for p in points])
    low = np.array([float(p.get("low", p["gauc_lift"])) for p in points])
    high = np.array([float(p.get("high", p["gauc_lift"])) for p in points])
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    ax.errorbar(params, lift, yerr=[np.clip(lift - low, 0, None), np.clip(high - lift, 0, None)], marker="o", capsize=3, lw=1.4)
    for p, x, y in zip(points, params, lift):
        ax.annotate(str(p["preset"]), (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.axhline(0, color="#333333", lw=0.8)
    ax.set_xscale("log")
    ax.set(xlabel="LM parameters", ylabel="GAUC lift of +LUM vs base (95% CI)", title="LM size vs lift")
    ax.grid(alpha=0.3)
    return _png(fig)


# ---------------------------------------------------------------------------------------------------- rendering


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(float(x))


def _fixed(x: Any, digits: int = 4) -> str:
    return f"{float(x):.{digits}f}" if _finite(x) else "–"


def _signed(x: Any, digits: int = 4) -> str:
    return f"{float(x):+.{digits}f}" if _finite(x) else "–"


def _pct(x: Any, digits: int = 1) -> str:
    return f"{100 * float(x):+.{digits}f}%" if _finite(x) else "–"


def _ci(d: dict[str, Any] | None, fmt=_fixed) -> str:
    return f"{fmt(d['low'])} to {fmt(d['high'])}" if d and _finite(d.get("low")) and _finite(d.get("high")) else ""


def _seconds(s: Any) -> str:
    if not _finite(s):
        return str(s)
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(round(s % 60)):02d} s"
    return f"{int(s // 3600)} h {int(round(s % 3600 / 60)):02d} min"


def _plain(value: Any) -> str:
    """A meta value as text: scalars as they are, containers as compact JSON."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(_jsonable(value), default=str)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass
class Cell:
    text: str
    sub: str = ""  # a second, smaller line: the 95% interval
    cls: str = ""  # num | gain | loss | none | met | missed


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]
    groups: list[tuple[str, int]] | None = None  # an upper header row: (title, columns spanned)


@dataclass
class Block:
    kind: str  # h1 | h2 | h3 | p | note | bullets | table | image | pre
    text: str = ""
    items: list[tuple[str, str]] = field(default_factory=list)  # bullets: (text, css class)
    table: Table | None = None
    image: str = ""  # file name beside the report
    data: bytes = b""  # the PNG, embedded in the HTML


def _cell(x: Any) -> Cell:
    return x if isinstance(x, Cell) else Cell(str(x))


def _num(value: Any, stats: dict[str, Any] | None = None, fmt=_fixed) -> Cell:
    return Cell(fmt(value), _ci(stats, fmt), "num")


def _lift_cell(lift: dict[str, Any] | None, fmt=_signed, key: str = "delta") -> Cell:
    if not lift:
        return Cell("–", "", "num")
    return Cell(fmt(lift[key]), _ci(lift, fmt), f"num {lift.get('outcome', '')}".strip())


def _kv_table(values: dict[str, Any], key: str = "key", value: str = "value") -> Table:
    return Table([key, value], [[Cell(str(k)), Cell(_plain(v))] for k, v in values.items()])


def _protocol_title(p: dict[str, Any]) -> str:
    parts = [f"split {p['split']}" if p.get("split") else "", f"LUM features {p['feature_mode']}" if p.get("feature_mode") else ""]
    detail = ", ".join(x for x in parts if x)
    return f"{p['name']} ({detail})" if detail else str(p["name"])


def _glance(report: dict[str, Any]) -> list[Block]:
    """One row per protocol, model and comparison: the AUC, GAUC and simulated CTR lifts; then the targets."""
    protocols = report["protocols"]
    multi = len(protocols) > 1
    ab_k = {p["name"]: max(p["ab"]["ks"]) for p in protocols if p["ab"]}
    ks = sorted(set(ab_k.values()))
    rows = []
    for p in protocols:
        keys = list(dict.fromkeys((x["model"], x["comparison"]) for x in p["lifts"]))
        for model, comparison in keys:
            row = [Cell(p["name"])] if multi else []
            row += [Cell(MODEL_LABELS.get(model, model)), Cell(comparison)]
            for metric in LIFT_METRICS:
                row.append(_lift_cell(next((x for x in p["lifts"] if (x["model"], x["comparison"], x["metric"]) == (model, comparison, metric)), None)))
            for k in ks:
                found = [x for x in (p["ab"] or {}).get("lifts", []) if (x["model"], x["comparison"], x["k"]) == (model, comparison, k)]
                row.append(_lift_cell(found[0] if found else None, fmt=_pct, key="lift"))
            rows.append(row)
    blocks: list[Block] = []
    if rows:
        headers = (["protocol"] if multi else []) + ["model", "comparison", "ΔAUC", "ΔGAUC", *[f"simulated CTR@{k} lift" for k in ks]]
        blocks += [
            Block("note", "Lift of the variant with LUM features over its baseline, with its 95% interval. Green (gain): a clear gain, the interval is above 0; red (loss): a clear loss; otherwise no clear difference."),
            Block("table", table=Table(headers, rows)),
        ]
    targets = []
    for p in protocols:
        prefix = f"[{p['name']}] " if multi else ""
        for t in p["targets"]:
            status = {True: "met", False: "missed", None: "not evaluated"}[t["met"]]
            model = f"{MODEL_LABELS.get(t['model'], t['model'])}: " if t["model"] else ""
            targets.append((f"{prefix}Target {model}{t['description']}: {status}.", {True: "met", False: "missed"}.get(t["met"], "")))
    if targets:
        blocks.append(Block("bullets", items=targets))
    return blocks


def _protocol_blocks(p: dict[str, Any]) -> list[Block]:
    blocks = [Block("h2", f"Protocol {_protocol_title(p)}")]
    d = p["data"]
    cold = f"{100 * d['cold_share']:.1f}%" if _finite(d.get("cold_share")) else "unknown"
    blocks.append(
        Block(
            "p",
            f"{d['rows']:,} test impressions from {d['users']:,} users"
            + (f" on {d['items']:,} items" if d.get("items") is not None else "")
            + (f" in {d['requests']:,} requests" if d.get("requests") is not None else "")
            + f"; CTR {_fixed(d['ctr'])}; rows whose user has no earlier history: {cold}.",
        )
    )
    # variants side by side
    headers = ["model", "variant", "AUC", "GAUC", "GAUC skipped users", "logloss", "NE", "calibration"]
    rows = []
    for v in p["variants"]:
        rows.append(
            [
                Cell(MODEL_LABELS.get(v["model"], v["model"])),
                Cell(VARIANT_LABELS.get(v["variant"], v["variant"])),
                _num(v["auc"]["value"], v["auc"]),
                _num(v["gauc"]["value"], v["gauc"]),
                Cell(f"{v['gauc']['skipped_users']:,}", f"of {v['gauc']['users'] + v['gauc']['skipped_users']:,}", "num"),
                _num(v["logloss"]["value"], v["logloss"]),
                _num(v["ne"]["value"], v["ne"]),
                _num(v["calibration"]["value"], v["calibration"]),
            ]
        )
    blocks += [Block("h3", "Ranker variants"), Block("note", "Value, and below it the 95% interval from a bootstrap over users. GAUC skips users whose test impressions are all of one class."), Block("table", table=Table(headers, rows))]
    # deltas vs base
    rows = []
    for v in p["variants"]:
        if v["vs_base"] is None:
            continue
        vs = v["vs_base"]
        rows.append(
            [
                Cell(MODEL_LABELS.get(v["model"], v["model"])),
                Cell(VARIANT_LABELS.get(v["variant"], v["variant"])),
                _lift_cell(_with_outcome(vs["auc"], higher_is_better=True)),
                _lift_cell(_with_outcome(vs["gauc"], higher_is_better=True)),
                _lift_cell(_with_outcome(v["rela_impr"] | {"delta": v["rela_impr"]["value"]}, higher_is_better=True), fmt=_pct),
                _lift_cell(_with_outcome(vs["logloss"], higher_is_better=False)),
                _lift_cell(_with_outcome(vs["ne"], higher_is_better=False)),
                _lift_cell(vs["calibration"]),
            ]
        )
    if rows:
        blocks += [
            Block("h3", "Change vs the same model's base"),
            Block("note", "Paired bootstrap over users: both variants scored on the same resamples. Green: a clear improvement; red: a clear loss (lower logloss and NE are better)."),
            Block("table", table=Table(["model", "variant", "ΔAUC", "ΔGAUC", "RelaImpr", "Δlogloss", "ΔNE", "Δcalibration"], rows)),
        ]
    if p["lifts"]:
        rows = [
            [Cell(MODEL_LABELS.get(x["model"], x["model"])), Cell(x["comparison"]), Cell(METRIC_LABELS[x["metric"]]), _lift_cell(x), Cell(x["verdict"], cls=x["outcome"])]
            for x in p["lifts"]
        ]
        blocks += [Block("h3", "Lift of LUM features"), Block("table", table=Table(["model", "comparison", "metric", "lift", "verdict"], rows))]
    if p["targets"]:
        rows = []
        for t in p["targets"]:
            status = {True: "met", False: "missed", None: "not evaluated"}[t["met"]]
            relative = TARGETS.get(t["target"]) is not None and TARGETS[t["target"]].kind == "ab"
            fmt = _pct if relative else _signed
            rows.append(
                [
                    Cell(t["target"]),
                    Cell(MODEL_LABELS.get(t["model"], t["model"]) if t["model"] else "–"),
                    Cell(t["description"]),
                    Cell(fmt(t.get("value")), _ci(t, fmt), "num"),
                    Cell(status, cls={True: "met", False: "missed"}.get(t["met"], "")),
                ]
            )
        blocks += [Block("h3", "Targets"), Block("table", table=Table(["target", "model", "goal", "estimate", "status"], rows))]
    if p["ab"]:
        ab = p["ab"]
        blocks += [
            Block("h3", "Simulated online A/B"),
            Block(
                "note",
                f"Each ranker re-orders the candidates of {ab['requests']:,} held-out requests ({ab['users']:,} users); expected clicks "
                f"= true relevance x examination(position), examination = (1 + position)^-{ab['position_decay']:g}. CTR@k = expected "
                "clicks in the top k / k. Lifts are relative, with a 95% interval from a paired bootstrap over users.",
            ),
            Block("table", table=Table(["ranker", *[f"CTR@{k}" for k in ab["ks"]]], [[Cell(r["label"]), *[_num(r[f"ctr@{k}"]) for k in ab["ks"]]] for r in ab["ctr"]])),
        ]
        if ab["lifts"]:
            top_k = max(ab["ks"])
            rows = []
            for model, comparison in dict.fromkeys((x["model"], x["comparison"]) for x in ab["lifts"]):
                mine = {x["k"]: x for x in ab["lifts"] if (x["model"], x["comparison"]) == (model, comparison)}
                row = [Cell(MODEL_LABELS.get(model, model)), Cell(comparison)]
                row += [_lift_cell(mine.get(k), fmt=_pct, key="lift") for k in ab["ks"]]
                row.append(Cell(mine[top_k]["verdict"], cls=mine[top_k]["outcome"]) if top_k in mine else Cell("–"))
                rows.append(row)
            headers = ["model", "comparison", *[f"CTR@{k} lift" for k in ab["ks"]], f"verdict (CTR@{top_k})"]
            blocks.append(Block("table", table=Table(headers, rows)))
        if p["plots"].get("ab"):
            blocks.append(Block("image", text="Simulated CTR@k per ranker", image=p["plots"]["ab"]))
    if p["slices"]:
        blocks += [
            Block("h3", "Slices"),
            Block(
                "note",
                "Per slice: each variant's AUC / GAUC, and the GAUC lift of LUM features with its 95% interval (green: a clear gain, red: a clear loss). "
                "User history: the user's events before the row. Item popularity: the item's impressions before the row's day; head = the most popular items "
                "making up the first share of test impressions, tail = the least popular making up the last share (see the report config).",
            ),
        ]
        for model in dict.fromkeys(c["model"] for c in p["columns"]):
            columns = [c for c in p["columns"] if c["model"] == model]
            comparisons = list(dict.fromkeys(x["comparison"] for s in p["slices"] for x in s["lifts"] if x["model"] == model))
            headers = ["slice", "value", "rows", "users", "CTR", *[f"{VARIANT_LABELS.get(c['variant'], c['variant'])} AUC / GAUC" for c in columns], *[f"ΔGAUC {t}" for t in comparisons]]
            rows = []
            for s in p["slices"]:
                row = [Cell(s["family"]), Cell(str(s["value"])), Cell(f"{s['rows']:,}", cls="num"), Cell(f"{s['users']:,}", cls="num"), Cell(_fixed(s["ctr"]), cls="num")]
                row += [Cell(f"{_fixed(s['variants'][c['column']]['auc'])} / {_fixed(s['variants'][c['column']]['gauc'])}", cls="num") for c in columns]
                row += [_lift_cell(next((x for x in s["lifts"] if x["model"] == model and x["comparison"] == title), None)) for title in comparisons]
                rows.append(row)
            blocks += [Block("p", f"{MODEL_LABELS.get(model, model)}:"), Block("table", table=Table(headers, rows))]
        if p["plots"].get("slice_lift"):
            blocks.append(Block("image", text="GAUC lift by slice", image=p["plots"]["slice_lift"]))
    blocks.append(Block("h3", "Plots"))
    for key, alt in (("roc", "ROC curves per variant"), ("calibration", "Calibration (reliability diagram)")):
        if p["plots"].get(key):
            blocks.append(Block("image", text=alt, image=p["plots"][key]))
    return blocks


def _with_outcome(d: dict[str, Any] | None, higher_is_better: bool) -> dict[str, Any] | None:
    """A delta with its outcome (for the cell's colour): gain when clearly better, loss when clearly worse."""
    if d is None:
        return None
    low, high = d.get("low"), d.get("high")
    outcome = ""
    if _finite(low) and _finite(high):
        better_low, better_high = (low, high) if higher_is_better else (-high, -low)
        outcome = "gain" if better_low > 0 else "loss" if better_high < 0 else "none"
    return d | {"outcome": outcome}


def _side_by_side_blocks(protocols: list[dict[str, Any]]) -> list[Block]:
    blocks = [Block("h2", "Protocols side by side")]
    names = [p["name"] for p in protocols]
    keys = list(dict.fromkeys((v["model"], v["variant"]) for p in protocols for v in p["variants"]))
    rows = []
    for model, variant in keys:
        row = [Cell(MODEL_LABELS.get(model, model)), Cell(VARIANT_LABELS.get(variant, variant))]
        for p in protocols:
            v = next((v for v in p["variants"] if (v["model"], v["variant"]) == (model, variant)), None)
            row += [_num(v["auc"]["value"], v["auc"]), _num(v["gauc"]["value"], v["gauc"])] if v else [Cell("–", cls="num"), Cell("–", cls="num")]
        rows.append(row)
    headers = ["model", "variant", *[h for _ in names for h in ("AUC", "GAUC")]]
    blocks.append(Block("table", table=Table(headers, rows, groups=[("", 2), *[(n, 2) for n in names]])))
    keys = list(dict.fromkeys((x["model"], x["comparison"], x["metric"]) for p in protocols for x in p["lifts"]))
    if keys:
        rows = []
        for model, comparison, metric in keys:
            row = [Cell(MODEL_LABELS.get(model, model)), Cell(comparison), Cell(METRIC_LABELS[metric])]
            for p in protocols:
                row.append(_lift_cell(next((x for x in p["lifts"] if (x["model"], x["comparison"], x["metric"]) == (model, comparison, metric)), None)))
            rows.append(row)
        blocks.append(Block("table", table=Table(["model", "comparison", "metric", *[f"lift: {n}" for n in names]], rows)))
    return blocks


def report_blocks(report: dict[str, Any], plots: dict[str, bytes]) -> list[Block]:
    """The report as a list of blocks, rendered to both HTML and Markdown."""
    meta = report["meta"]
    blocks = [Block("h1", f"{report['title']}: {report['run']}"), Block("note", f"Generated {report['generated_at']}.")]
    glance = _glance(report)
    if glance:
        blocks += [Block("h2", "At a glance"), *glance]
    rows = []
    for p in report["protocols"]:
        d = p["data"]
        rows.append(
            [
                Cell(p["name"]),
                Cell(str(p.get("split") or "–")),
                Cell(str(p.get("feature_mode") or "–")),
                Cell(f"{d['rows']:,}", cls="num"),
                Cell(f"{d['users']:,}", cls="num"),
                Cell(f"{100 * d['cold_share']:.1f}%" if _finite(d.get("cold_share")) else "–", cls="num"),
                Cell(f"{d.get('start', '–')} to {d.get('end', '–')}"),
            ]
        )
    blocks += [Block("h2", "Run"), Block("table", table=Table(["protocol", "split", "LUM features", "test rows", "users", "rows without earlier user history", "test window"], rows))]
    if meta.get("data"):
        blocks += [Block("h3", "Data"), Block("table", table=_kv_table(meta["data"]))]
    if meta.get("model_versions"):
        blocks += [Block("h3", "Model versions"), Block("table", table=_kv_table(meta["model_versions"], "component", "version"))]
    if meta.get("durations"):
        durations = dict(meta["durations"])
        rows = [[Cell(str(k)), Cell(_seconds(v), cls="num")] for k, v in durations.items()]
        total = sum(float(v) for v in durations.values() if _finite(v))
        rows.append([Cell("total"), Cell(_seconds(total), cls="num")])
        blocks += [Block("h3", "Step durations"), Block("table", table=Table(["step", "duration"], rows))]
    if len(report["protocols"]) > 1:
        blocks += _side_by_side_blocks(report["protocols"])
    for p in report["protocols"]:
        blocks += _protocol_blocks(p)
    scaling = report.get("lm_scaling") or []
    if scaling:
        rows = [[Cell(str(s.get("preset"))), Cell(f"{float(s['params']):,.0f}" if _finite(s.get("params")) else "–", cls="num"), _lift_cell(_with_outcome({"delta": s.get("gauc_lift"), "low": s.get("low"), "high": s.get("high")}, True))] for s in scaling]
        blocks += [Block("h2", "LM size vs lift"), Block("table", table=Table(["preset", "LM parameters", "GAUC lift (+LUM vs base)"], rows))]
        if report.get("plots", {}).get("lm_scaling"):
            blocks.append(Block("image", text="LM size vs GAUC lift", image=report["plots"]["lm_scaling"]))
    config_text = yaml.safe_dump(_jsonable({"run config": meta.get("config") or {}, "report config": report["report_config"]}), sort_keys=False, default_flow_style=None, width=110)
    blocks += [Block("h2", "Configuration"), Block("pre", text=config_text)]
    blocks += [
        Block("h2", "How to read this report"),
        Block(
            "bullets",
            items=[
                ("AUC: probability that a random click is scored above a random non-click. GAUC: AUC within each user, averaged with the user's impressions as weights (users with a single class are skipped): it measures ranking for the same user, which is what a feed does.", ""),
                ("logloss and NE (logloss / entropy of the base CTR; below 1 beats predicting the average) measure the probabilities; calibration = mean predicted / observed CTR (1 is calibrated). RelaImpr = (AUC - 0.5) / (AUC_base - 0.5) - 1.", ""),
                ("Intervals: 95%, from resampling users with replacement; deltas are paired (both variants on the same resamples). A lift is a clear gain when its whole interval is above 0.", ""),
            ],
        ),
    ]
    for block in blocks:
        if block.kind == "image":
            block.data = plots[block.image]
    return blocks


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1f2328;
       max-width: 1240px; margin: 0 auto; padding: 20px 28px 60px; line-height: 1.45; background: #ffffff; }
h1 { font-size: 1.6em; border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
h3 { font-size: 1.05em; margin-top: 1.5em; }
p.note { color: #57606a; font-size: .9em; margin: .3em 0; }
.scroll { overflow-x: auto; margin: .4em 0 1.2em; }
table { border-collapse: collapse; font-size: .85em; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; vertical-align: top; }
th { background: #f6f8fa; text-align: left; font-weight: 600; }
th.group { text-align: center; }
tr:nth-child(even) td { background-color: #fbfcfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td .ci { display: block; color: #57606a; font-size: .82em; }
td.gain, li.gain { background-color: #dafbe1 !important; }
td.loss, li.loss { background-color: #ffebe9 !important; }
li.gain, li.loss, li.none, li.met, li.missed { padding: 1px 6px; border-radius: 4px; margin: 2px 0; }
.met { color: #1a7f37; font-weight: 600; }
.missed { color: #cf222e; font-weight: 600; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: .85em; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: 10px; overflow-x: auto; font-size: .8em; }
"""


def render_html(blocks: list[Block], title: str) -> str:
    """One standalone page: inline CSS, plots as data URIs, no scripts, no external resources."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request (it would fail from disk)
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
    ]
    for block in blocks:
        if block.kind in ("h1", "h2", "h3"):
            out.append(f"<{block.kind}>{e(block.text)}</{block.kind}>")
        elif block.kind in ("p", "note"):
            out.append(f'<p class="{block.kind}">{e(block.text)}</p>')
        elif block.kind == "bullets":
            out.append("<ul>" + "".join(f'<li class="{e(cls)}">{e(text)}</li>' for text, cls in block.items) + "</ul>")
        elif block.kind == "pre":
            out.append(f"<pre>{e(block.text)}</pre>")
        elif block.kind == "image":
            uri = "data:image/png;base64," + base64.b64encode(block.data).decode("ascii")
            out.append(f'<figure><img src="{uri}" alt="{e(block.text)}"><figcaption>{e(block.text)} ({e(block.image)})</figcaption></figure>')
        elif block.kind == "table" and block.table is not None:
            out.append(_html_table(block.table))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_table(table: Table) -> str:
    e = html.escape
    parts = ['<div class="scroll"><table><thead>']
    if table.groups:
        parts.append("<tr>" + "".join(f'<th class="group" colspan="{span}">{e(title)}</th>' for title, span in table.groups) + "</tr>")
    parts.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in table.headers) + "</tr></thead><tbody>")
    for row in table.rows:
        cells = []
        for cell in map(_cell, row):
            sub = f'<span class="ci">{e(cell.sub)}</span>' if cell.sub else ""
            cls = f' class="{e(cell.cls)}"' if cell.cls else ""
            cells.append(f"<td{cls}>{e(cell.text)}{sub}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def render_markdown(blocks: list[Block]) -> str:
    """The same blocks as Markdown: tables as pipe tables (interval in parentheses), plots as relative links."""
    out: list[str] = []
    for block in blocks:
        if block.kind in ("h1", "h2", "h3"):
            out += ["#" * int(block.kind[1]) + " " + block.text, ""]
        elif block.kind == "p":
            out += [block.text, ""]
        elif block.kind == "note":
            out += [f"*{block.text}*", ""]
        elif block.kind == "bullets":
            out += [f"- {text}" for text, _ in block.items] + [""]
        elif block.kind == "pre":
            out += ["```yaml", block.text.rstrip("\n"), "```", ""]
        elif block.kind == "image":
            out += [f"![{block.text}]({block.image})", ""]
        elif block.kind == "table" and block.table is not None:
            out += [_md_table(block.table), ""]
    return "\n".join(out)


def _md_table(table: Table) -> str:
    headers = list(table.headers)
    if table.groups:  # Markdown has no spanning headers: prefix each column with its group
        named = [title for title, span in table.groups for _ in range(span)]
        headers = [f"{g} {h}".strip() for g, h in zip(named, headers)]

    def text(cell: Cell) -> str:
        value = f"{cell.text} ({cell.sub})" if cell.sub else cell.text
        if cell.cls.endswith(("gain", "loss")) and cell.cls.startswith("num"):
            value += " **gain**" if cell.cls.endswith("gain") else " **loss**"
        return value.replace("|", "\\|").replace("\n", " ")

    # right-align the columns that hold numbers in every row
    numeric = [bool(table.rows) and all("num" in _cell(row[i]).cls for row in table.rows) for i in range(len(headers))]
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(text(_cell(c)) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- writing


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NaN and infinities become null, numpy scalars Python numbers, paths and times strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write beside the target, then rename: a reader sees the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").lower() or "protocol"


Scored = Union[pd.DataFrame, list[pd.DataFrame]]


def build_report(scored: Scored, meta: dict[str, Any], out_dir: Path | str, config: ReportConfig = ReportConfig()) -> dict[str, Any]:
    """Evaluate every protocol's scored table, draw the plots, write report.{html,md,json} + PNGs; return the JSON.

    `meta` (all optional but `run`): run, protocols (one {name, split, feature_mode, cold_share} per table), data,
    model_versions, config, durations ({step: seconds}), slice_columns, targets ({key: threshold}, see TARGETS),
    lm_scaling ([{preset, params, gauc_lift, low, high}]), position_decay.
    """
    frames = [scored] if isinstance(scored, pd.DataFrame) else list(scored)
    if not frames:
        raise ValueError("build_report needs at least one scored table")
    protocols_meta = list(meta.get("protocols") or [])
    if protocols_meta and len(protocols_meta) != len(frames):
        raise ValueError(f"meta['protocols'] describes {len(protocols_meta)} protocols but {len(frames)} scored tables were given")
    if not protocols_meta:
        protocols_meta = [{"name": "default"} if len(frames) == 1 else {"name": f"protocol {i + 1}"} for i in range(len(frames))]
    names = [str(p.get("name", f"protocol {i + 1}")) for i, p in enumerate(protocols_meta)]
    if len(set(names)) != len(names):
        raise ValueError(f"protocol names must be unique, got {names}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    plots: dict[str, bytes] = {}
    protocols = []
    for frame, protocol in zip(frames, protocols_meta):
        result = evaluate_protocol(frame, protocol | {"name": str(protocol.get("name", "default"))}, meta, config)
        columns = score_columns(frame)
        slug = _slug(result["name"])
        drawn = {
            "roc": (f"roc_{slug}.png", plot_roc(frame, columns, result["variants"])),
            "calibration": (f"calibration_{slug}.png", plot_calibration(frame, columns, config.calibration_bins)),
            "slice_lift": (f"slice_lift_{slug}.png", plot_slice_lifts(result["slices"])),
            "ab": (f"ab_ctr_{slug}.png", plot_ab(result["ab"]) if result["ab"] else None),
        }
        result["plots"] = {}
        for key, (name, png) in drawn.items():
            if png is not None:
                plots[name] = png
                result["plots"][key] = name
        protocols.append(result)

    report: dict[str, Any] = {
        "title": config.title,
        "run": str(meta.get("run", "run")),
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "meta": {k: meta.get(k) for k in ("protocols", "data", "model_versions", "config", "durations", "slice_columns", "targets", "position_decay") if k in meta},
        "report_config": asdict(config),
        "protocols": protocols,
        "lm_scaling": list(meta.get("lm_scaling") or []),
        "plots": {},
    }
    if len(report["lm_scaling"]) >= 2:
        plots["lm_scaling.png"] = plot_lm_scaling(report["lm_scaling"])
        report["plots"]["lm_scaling"] = "lm_scaling.png"
    report["files"] = ["report.html", "report.md", "report.json", *plots]
    report = _jsonable(report)

    blocks = report_blocks(report, plots)
    for name, png in plots.items():
        _write_atomic(out_dir / name, png)
    _write_atomic(out_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    _write_atomic(out_dir / "report.md", render_markdown(blocks).encode("utf-8"))
    _write_atomic(out_dir / "report.html", render_html(blocks, f"{report['title']}: {report['run']}").encode("utf-8"))
    return report
