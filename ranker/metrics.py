"""Offline CTR metrics: AUC, GAUC, logloss, normalized entropy, calibration, RelaImpr, slices, paired bootstrap.

  AUC          sklearn's roc_auc_score; NaN when only one class is present.
  GAUC         per-user AUC weighted by the user's impressions (DIN). A user whose impressions are all of one
               class has no AUC: skipped, and the number of such users and their impressions is reported.
  logloss      sklearn's log_loss on probabilities clipped to [1e-7, 1 - 1e-7].
  NE           logloss / the entropy of the base rate (a model predicting the average CTR scores 1.0).
  calibration  mean predicted CTR / observed CTR (1.0 is calibrated).
  RelaImpr     (AUC_model - 0.5) / (AUC_base - 0.5) - 1.
The bootstrap resamples users with replacement (impressions of one user are not independent) and evaluates every
score on the same resample, so the interval of a difference is for the difference itself. There is one: the draws
of `user_resamples`, evaluated by `UserBootstrap` (several columns at once, for the report) or `paired_bootstrap`
(one pair, or any row-weighted metric function).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score

EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores, sample_weight=weights))


def logloss(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> float:
    return float(log_loss(labels, np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS), sample_weight=weights, labels=[0, 1]))


def normalized_entropy(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> float:
    """logloss / entropy of the base rate; NaN when the base rate is 0 or 1."""
    rate = float(np.average(labels, weights=weights))
    if rate <= 0.0 or rate >= 1.0:
        return float("nan")
    entropy = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    return logloss(labels, probs, weights) / entropy


def calibration(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean predicted CTR / observed CTR; NaN when nothing was clicked."""
    observed = float(np.average(labels, weights=weights))
    return float(np.average(probs, weights=weights)) / observed if observed > 0 else float("nan")


def rela_impr(auc_model: float, auc_base: float) -> float:
    """NaN when the base is no better than chance (AUC 0.5) or undefined."""
    if not np.isfinite(auc_base) or auc_base == 0.5:
        return float("nan")
    return (auc_model - 0.5) / (auc_base - 0.5) - 1.0


@dataclass(frozen=True)
class GAUC:
    value: float  # NaN when no user has both classes
    users: int  # users that count
    skipped_users: int  # users with a single class
    skipped_impressions: int


def per_user_auc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> pd.DataFrame:
    """One row per user (sorted): impressions and AUC (NaN for single-class users).

    Computed for all users at once as the Mann-Whitney statistic on within-user ranks (ties averaged, as
    roc_auc_score treats them); a test checks it against roc_auc_score user by user. A loop of roc_auc_score
    calls costs about a millisecond per user, which a bootstrap over 100k users cannot afford.
    """
    frame = pd.DataFrame({"user": users, "label": np.asarray(labels, dtype=np.float64), "score": np.asarray(scores, dtype=np.float64)})
    frame["rank"] = frame.groupby("user", sort=False)["score"].rank(method="average")
    frame["pos_rank"] = frame["rank"] * frame["label"]
    per_user = frame.groupby("user", sort=True).agg(impressions=("label", "size"), pos=("label", "sum"), pos_rank=("pos_rank", "sum"))
    neg = per_user["impressions"] - per_user["pos"]
    with np.errstate(invalid="ignore", divide="ignore"):
        value = (per_user["pos_rank"] - per_user["pos"] * (per_user["pos"] + 1) / 2) / (per_user["pos"] * neg)
    value[(per_user["pos"] == 0) | (neg == 0)] = np.nan
    return pd.DataFrame({"user": per_user.index.to_numpy(), "impressions": per_user["impressions"].to_numpy(), "auc": value.to_numpy()})


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> GAUC:
    per_user = per_user_auc(labels, scores, users)
    return _gauc_from(per_user, np.ones(len(per_user)))


def _gauc_from(per_user: pd.DataFrame, multiplicity: np.ndarray) -> GAUC:
    ok = per_user["auc"].notna().to_numpy()
    weights = per_user["impressions"].to_numpy() * multiplicity
    used = ok & (multiplicity > 0)
    value = float(np.average(per_user["auc"].to_numpy()[used], weights=weights[used])) if used.any() else float("nan")
    skipped = ~ok & (multiplicity > 0)
    return GAUC(value, int(used.sum()), int(skipped.sum()), int(weights[skipped].sum()))


def ranking_metrics(frame: pd.DataFrame, score: str = "score", label: str = "label", user: str = "user_id") -> dict[str, float]:
    """Every metric for one score column: auc, gauc (+ users/skipped), logloss, ne, calibration, rows, ctr."""
    labels, probs = frame[label].to_numpy(dtype=np.float64), frame[score].to_numpy(dtype=np.float64)
    g = gauc(labels, probs, frame[user].to_numpy())
    return {
        "rows": int(len(frame)),
        "ctr": float(labels.mean()) if len(labels) else float("nan"),
        "auc": auc(labels, probs),
        "gauc": g.value,
        "gauc_users": g.users,
        "gauc_skipped_users": g.skipped_users,
        "gauc_skipped_impressions": g.skipped_impressions,
        "logloss": logloss(labels, probs) if len(labels) else float("nan"),
        "ne": normalized_entropy(labels, probs) if len(labels) else float("nan"),
        "calibration": calibration(labels, probs) if len(labels) else float("nan"),
    }


def metrics_by(frame: pd.DataFrame, by: str | None, score: str = "score", label: str = "label", user: str = "user_id") -> pd.DataFrame:
    """ranking_metrics per value of column `by` (e.g. `surface`), with an `all` row first."""
    rows = [{by or "slice": "all", **ranking_metrics(frame, score, label, user)}]
    if by is not None:
        for value, part in frame.groupby(by, sort=True, dropna=False):
            rows.append({by: value, **ranking_metrics(part, score, label, user)})
    return pd.DataFrame(rows)


def compare_variants(
    frame: pd.DataFrame, scores: dict[str, str], base: str = "base", by: str | None = None, label: str = "label", user: str = "user_id"
) -> pd.DataFrame:
    """Metrics of several score columns ({variant: column}) side by side, with RelaImpr against `base`, per slice."""
    tables = []
    for variant, column in scores.items():
        table = metrics_by(frame, by, column, label, user)
        table.insert(0, "variant", variant)
        tables.append(table)
    out = pd.concat(tables, ignore_index=True)
    key = by or "slice"
    if base in scores:
        base_auc = out[out["variant"] == base].set_index(key)["auc"]
        out["rela_impr"] = [rela_impr(a, base_auc.get(k, np.nan)) for a, k in zip(out["auc"], out[key])]
    return out


# ---------------------------------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Bootstrap:
    delta: float  # metric(b) - metric(a) on the full data
    mean: float  # mean of the resampled deltas
    low: float  # 2.5th percentile
    high: float  # 97.5th percentile
    n: int


Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]  # (labels, scores, row weights) -> value
METRICS: dict[str, Metric] = {
    "auc": auc,
    "logloss": logloss,
    "ne": normalized_entropy,
    "calibration": calibration,
}
BOOTSTRAP_METRICS = ("auc", "gauc", "logloss", "ne", "calibration")  # the metrics UserBootstrap evaluates


def user_resamples(n_users: int, n: int, seed: int) -> Iterator[np.ndarray]:
    """The user bootstrap's draws: n times, how often each of n_users users is drawn (U draws with replacement).

    Every bootstrap over users in this project (paired_bootstrap, the report's intervals, the simulated A/B) takes
    its draws from here, so for the same seed and users they all see the same resamples.
    """
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield np.bincount(rng.integers(0, n_users, n_users), minlength=n_users).astype(np.float64)


def interval95(samples: np.ndarray) -> tuple[float, float]:
    """The 95% interval of bootstrap samples: their 2.5th and 97.5th percentiles (numpy's linear interpolation).

    The one definition every interval of the project uses (paired_bootstrap, the report, the simulated A/B, the
    retrieval A/B). The caller drops the undefined samples first (each says which: NaN, or any non-finite value).
    """
    return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


def _weighted_sum(weights: np.ndarray, values: np.ndarray) -> float:
    """sum(weights * values) without BLAS: np.dot's threads make it 100x slower on a 2-core machine."""
    return float((weights * values).sum())


class SortedAUC:
    """`auc` of one score column under many user weightings: sorted once, then O(rows) per weighting.

    roc_auc_score sorts the scores on every call; a bootstrap of several columns x hundreds of resamples would
    spend most of its time sorting the same numbers. With the order fixed, the weighted AUC is

        sum over positives i of  w_i * (weight of negatives scored below i + half the weight of negatives tied with i)
        / (total positive weight * total negative weight)

    which is the trapezoid rule roc_auc_score uses (ties count half). Only the negatives need a cumulative sum per
    weighting; where each positive falls among them is found once. A test checks it against `auc`.
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
        # the bootstrap's hot spot: take and cumsum into buffers allocated once (a fresh array per call costs as
        # much again in page faults)
        cumulative, neg_weights = self._cumulative, self._neg_weights
        np.take(user_weights, self.neg_users, out=neg_weights)
        np.cumsum(neg_weights, out=cumulative[1:])  # cumulative[j] = weight of the j lowest negatives
        pos_weights = np.take(user_weights, self.pos_users)
        total_pos, total_neg = pos_weights.sum(), cumulative[-1]
        if total_pos <= 0 or total_neg <= 0:
            return float("nan")
        credit = 0.5 * (cumulative[self.below] + cumulative[self.below_or_tied])
        return _weighted_sum(pos_weights, credit) / (total_pos * total_neg)


class UserBootstrap:
    """Metrics of several score columns on the same user resamples (`user_resamples`); a resample is a count per user.

    Users are factorized in sorted order. Per metric, what does not change between resamples is computed once:
      auc                       SortedAUC (the order of the scores)
      gauc                      each user's AUC, from per_user_auc; a resample re-weights users
      logloss, ne, calibration  per-user sums of row logloss (clipped as `logloss` clips), predicted CTR, clicks
                                and impressions; a resample is a weighted sum over users
    so a resample costs O(rows) for AUC and O(users) for the rest. Values equal the row-weighted functions above
    (a test checks each against them).
    """

    def __init__(self, frame: pd.DataFrame, columns: list[str], metrics: tuple[str, ...] = BOOTSTRAP_METRICS, label: str = "label", user: str = "user_id"):
        unknown = [m for m in metrics if m not in BOOTSTRAP_METRICS]
        if unknown:
            raise KeyError(f"UserBootstrap evaluates {list(BOOTSTRAP_METRICS)}, not {unknown}")
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
                probs = np.clip(scores, EPS, 1 - EPS)  # the clipping `logloss` applies
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
        """{column: {metric: [n] values}}, one per resample of `user_resamples`, the same resamples for every column."""
        samples = {c: {m: np.empty(n) for m in self.metrics} for c in self.columns}
        for r, counts in enumerate(user_resamples(self.n_users, n, seed)):
            for column, values in self.evaluate(counts).items():
                for metric, value in values.items():
                    samples[column][metric][r] = value
        return samples


def paired_bootstrap(
    frame: pd.DataFrame,
    score_a: str,
    score_b: str,
    metric: str | Metric = "auc",
    n: int = 1000,
    seed: int = 0,
    label: str = "label",
    user: str = "user_id",
) -> Bootstrap:
    """Delta metric(score_b) - metric(score_a) with a 95% interval from resampling users with replacement.

    `metric` is a name of BOOTSTRAP_METRICS (auc, gauc, logloss, ne, calibration), evaluated by UserBootstrap, or a
    function (labels, scores, row weights) -> value, evaluated with each row weighted by how often its user was
    drawn. Both take their draws from `user_resamples`.
    """
    if isinstance(metric, str):
        boot = UserBootstrap(frame, [score_a, score_b], metrics=(metric,), label=label, user=user)
        point = boot.point()
        full = point[score_b][metric] - point[score_a][metric]
        samples = boot.resample(n, seed)
        deltas = samples[score_b][metric] - samples[score_a][metric]
    else:
        codes, uniques = pd.factorize(frame[user], sort=True)
        labels = frame[label].to_numpy(dtype=np.float64)
        a, b = frame[score_a].to_numpy(dtype=np.float64), frame[score_b].to_numpy(dtype=np.float64)

        def value(counts: np.ndarray) -> float:
            weights = counts[codes]
            keep = weights > 0
            return metric(labels[keep], b[keep], weights[keep]) - metric(labels[keep], a[keep], weights[keep])

        full = value(np.ones(len(uniques)))
        deltas = np.array([value(counts) for counts in user_resamples(len(uniques), n, seed)])
    deltas = deltas[~np.isnan(deltas)]
    return Bootstrap(float(full), float(deltas.mean()), *interval95(deltas), int(len(deltas)))
