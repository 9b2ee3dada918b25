"""Offline CTR metrics: AUC, GAUC, logloss, normalized entropy, calibration, RelaImpr, slices, paired bootstrap.

  AUC          sklearn's roc_auc_score; NaN when only one class is present.
  GAUC         per-user AUC weighted by the user's impressions (DIN). A user whose impressions are all of one
               class has no AUC: skipped, and the number of such users and their impressions is reported.
  logloss      sklearn's log_loss on probabilities clipped to [1e-7, 1 - 1e-7].
  NE           logloss / the entropy of the base rate (a model predicting the average CTR scores 1.0).
  calibration  mean predicted CTR / observed CTR (1.0 is calibrated).
  RelaImpr     (AUC_model - 0.5) / (AUC_base - 0.5) - 1.
The bootstrap resamples users with replacement (impressions of one user are not independent) and evaluates both
scores on the same resample, so the interval is for the difference itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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

    A resample is expressed as a weight per row (how many times its user was drawn), which every metric takes as
    sample weights, so no rows are copied. `metric` is a name (auc, gauc, logloss, ne, calibration) or a function
    (labels, scores, weights) -> value. Cost per resample on 200k rows here: AUC about 70 ms (sklearn sorts each
    time), logloss about 50 ms, GAUC about 4 ms (per-user AUCs are computed once).
    """
    rng = np.random.default_rng(seed)
    codes, uniques = pd.factorize(frame[user], sort=True)
    labels = frame[label].to_numpy(dtype=np.float64)
    a, b = frame[score_a].to_numpy(dtype=np.float64), frame[score_b].to_numpy(dtype=np.float64)
    n_users = len(uniques)
    if metric == "gauc":
        # per-user AUCs do not change under resampling, only how often each user counts
        users_a, users_b = per_user_auc(labels, a, codes), per_user_auc(labels, b, codes)
        def value(counts: np.ndarray) -> float:
            return _gauc_from(users_b, counts).value - _gauc_from(users_a, counts).value
        full = value(np.ones(n_users))
    else:
        fn = METRICS[metric] if isinstance(metric, str) else metric
        def value(counts: np.ndarray) -> float:
            weights = counts[codes]
            keep = weights > 0
            return fn(labels[keep], b[keep], weights[keep]) - fn(labels[keep], a[keep], weights[keep])
        full = value(np.ones(n_users))
    deltas = np.array([value(np.bincount(rng.integers(0, n_users, n_users), minlength=n_users).astype(np.float64)) for _ in range(n)])
    deltas = deltas[~np.isnan(deltas)]
    return Bootstrap(float(full), float(deltas.mean()), float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5)), int(len(deltas)))
