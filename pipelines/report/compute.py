"""Every number of one protocol's section: metrics with intervals, lifts with verdicts, slices, the simulated A/B,
targets and calibration flags.

Point values are ranker.metrics' (ranking_metrics: AUC, GAUC, logloss, NE, calibration; rela_impr). Intervals come
from one ranker.metrics.UserBootstrap over USERS per table (impressions of one user are not independent): every
score column is evaluated on the same draws, so the delta of two variants has the interval paired_bootstrap gives
that pair, while the absolute intervals come from the same pass.

Verdicts. A lift is "a clear gain" when its whole 95% interval is above 0, "a clear loss" when below, and "no
clear difference" when the interval includes 0.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from pipelines.report.ab_sim import LOGGED, ORACLE, ABConfig, ABSimulation, simulate_ab
from pipelines.report.formatting import pct, signed
from pipelines.report.slices import COLD_FAMILIES, SliceFamily, distinct_slices, empty_slices, slice_families
from pipelines.report.spec import (
    LIFT_METRICS,
    METRIC_LABELS,
    METRICS,
    SCORE_PREFIX,
    TARGETS,
    ReportConfig,
    ScoreColumn,
    comparisons_of,
    find_column,
    score_columns,
)
from ranker.metrics import UserBootstrap, auc, interval95, ranking_metrics, rela_impr

Points = dict[str, dict[str, float]]  # {column: {metric: value on the data}}
Samples = dict[str, dict[str, np.ndarray]]  # {column: {metric: [n] values on the user resamples}}


def interval(samples: np.ndarray) -> dict[str, float]:
    """Mean and 2.5/97.5 percentiles of the defined samples (NaN resamples, e.g. one class only, are dropped)."""
    values = np.asarray(samples, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    low, high = interval95(values)
    return {"mean": float(values.mean()), "low": low, "high": high, "n": int(len(values))}


def verdict(delta: float, low: float, high: float, metric: str, subject: str = "LUM features", relative: bool = False) -> tuple[str, str]:
    """A plain-words sentence for a lift and its 95% interval, and the outcome: gain | loss | none | n/a."""
    if not all(np.isfinite([delta, low, high])):
        return f"{subject}: the {metric} lift cannot be measured here (too few users with both clicks and non-clicks)", "n/a"
    fmt = pct if relative else signed
    span = f"{fmt(delta)} (95% CI {fmt(low)} to {fmt(high)})"
    if low > 0:
        return f"{subject} improve {metric} by {span}: a clear gain", "gain"
    if high < 0:
        return f"{subject} change {metric} by {span}: a clear loss", "loss"
    return f"{subject} change {metric} by {span}: no clear difference (the interval includes 0)", "none"


def calibration_flag(value: float, band: tuple[float, float]) -> str | None:
    """'over' when predicted / observed clicks is above the band, 'under' when below, None inside (or undefined)."""
    if not np.isfinite(value):
        return None
    low, high = band
    return "over" if value > high else "under" if value < low else None


# ---------------------------------------------------------------------------------------------------- table facts


def cold_share(frame: pd.DataFrame, protocol: dict[str, Any]) -> float | None:
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


def data_summary(frame: pd.DataFrame, protocol: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "rows": int(len(frame)),
        "users": int(frame["user_id"].nunique()),
        "items": int(frame["item_id"].nunique()) if "item_id" in frame.columns else None,
        "ctr": float(frame["label"].mean()) if len(frame) else float("nan"),
        "cold_share": cold_share(frame, protocol),
    }
    if "request_id" in frame.columns:
        summary["requests"] = int(frame["request_id"].nunique())
    if "ts" in frame.columns and len(frame):
        summary["start"], summary["end"] = (_when(t) for t in (frame["ts"].min(), frame["ts"].max()))
    return summary


FRESHNESS_BUCKETS_H = (0, 6, 12, 24, 48, 24 * 7)  # lag buckets of the freshness table: [0, 6h), [6h, 12h), ..., >= 7 days


def freshness(frame: pd.DataFrame) -> dict[str, Any] | None:
    """How old the LUM user vector each test row joined was: request time minus the vector's as-of time (the
    scored table's `lum_as_of`), in hours; None when the table has no such column (no LUM features)."""
    if "lum_as_of" not in frame.columns or "ts" not in frame.columns:
        return None
    as_of = pd.to_datetime(frame["lum_as_of"], utc=True)
    hours = ((pd.to_datetime(frame["ts"], utc=True) - as_of).dt.total_seconds() / 3600.0)[as_of.notna()].to_numpy()
    out: dict[str, Any] = {"rows": int(len(frame)), "with_vector": int(len(hours)),
                           "without_vector_share": float(1 - len(hours) / len(frame)) if len(frame) else float("nan")}
    if len(hours):
        out["hours"] = {"mean": float(hours.mean()), **{f"p{q}": float(np.percentile(hours, q)) for q in (10, 50, 90, 99)}, "max": float(hours.max())}
        edges = [*FRESHNESS_BUCKETS_H, np.inf]
        counts, _ = np.histogram(hours, bins=edges)
        out["buckets"] = [{"from_h": float(a), "to_h": None if b == np.inf else float(b), "share": float(c / len(hours))}
                          for a, b, c in zip(edges[:-1], edges[1:], counts)]
    return out


# ---------------------------------------------------------------------------------------------------- variants and lifts


def variants(columns: list[ScoreColumn], points: dict[str, dict[str, Any]], samples: Samples, config: ReportConfig) -> list[dict[str, Any]]:
    """Every variant's metrics with intervals, its change vs the same model's base, RelaImpr and calibration flag.

    points: ranker.metrics.ranking_metrics per column; samples: one UserBootstrap over all columns.
    """
    rows = []
    for c in columns:
        point = points[c.column]
        row: dict[str, Any] = {"model": c.model, "variant": c.variant, "label": c.label, "column": c.column, "rows": point["rows"]}
        for metric in METRICS:
            row[metric] = {"value": point[metric], **interval(samples[c.column][metric])}
        row["gauc"].update(users=point["gauc_users"], skipped_users=point["gauc_skipped_users"], skipped_impressions=point["gauc_skipped_impressions"])
        row["calibration"]["flag"] = calibration_flag(point["calibration"], config.calibration_band)
        base = find_column(columns, c.model, "base")
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


def pair_deltas(columns: list[ScoreColumn], points: Points, samples: Samples, metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """For each model and each comparison whose two columns exist: the paired delta, its interval and a verdict."""
    out = []
    for model, comparison, a, b in comparisons_of(columns):
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
                    "kind": comparison.kind,
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


def slices(frame: pd.DataFrame, columns: list[ScoreColumn], families: list[SliceFamily], config: ReportConfig) -> list[dict[str, Any]]:
    """Per distinct slice: rows, users, CTR, every variant's AUC and GAUC, and the GAUC lift of each comparison; the
    cold-start slices (slices.COLD_FAMILIES) the AUC lift too.

    A slice is bootstrapped on its own users (as paired_bootstrap on the slice's rows would). GAUC for every slice:
    its resamples are cheap. AUC only for the cold slices, where GAUC skips most users (a new item's rows are few
    per user) and the AUC lift is the number to read; AUC intervals for every slice would cost more than the rest
    of the report.
    """
    out = []
    for s in distinct_slices(families):
        part = frame.loc[s.mask]
        label_values = part["label"].to_numpy(dtype=np.float64)
        metrics = ("gauc", "auc") if s.family in COLD_FAMILIES else ("gauc",)
        boot = UserBootstrap(part, [c.column for c in columns], metrics=metrics)
        points = boot.point()
        samples = boot.resample(config.n_bootstrap, config.seed)
        per_variant = {c.column: {"auc": auc(label_values, part[c.column].to_numpy(dtype=np.float64)), "gauc": points[c.column]["gauc"]} for c in columns}
        out.append(
            {
                "family": s.family,
                "value": s.value,
                "same_as": s.same_as,
                "rows": int(s.mask.sum()),
                "users": int(boot.n_users),
                "ctr": float(label_values.mean()),
                "variants": per_variant,
                "lifts": pair_deltas(columns, points, samples, metrics),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------- simulated A/B and targets


def ab_test(frame: pd.DataFrame, columns: list[ScoreColumn], config: ReportConfig, decay_origin: str, simulated_decay: float | None) -> dict[str, Any] | None:
    """CTR@k of every ranker, `logged` and `oracle`, and each comparison's CTR lift; None without ground truth.

    config.position_decay is the resolved one (spec.resolve_config); simulated_decay is the decay the simulator
    generated the data with, when known, so that a mismatch can be shown.
    """
    if not {"relevance", "request_id"} <= set(frame.columns) or not columns:
        return None
    decay = float(config.position_decay)
    ab_config = ABConfig(ks=tuple(config.ks), position_decay=decay, n_bootstrap=config.ab_bootstrap, seed=config.seed)
    sim: ABSimulation = simulate_ab(frame, {c.policy: c.column for c in columns}, ab_config)
    ctr = []
    for policy in sim.policies:
        column = next((c for c in columns if c.policy == policy), None)
        label = column.label if column else {LOGGED: "logged policy", ORACLE: "oracle (true relevance)"}[policy]
        ctr.append({"policy": policy, "label": label, **{f"ctr@{k}": sim.ctr(policy, k) for k in ab_config.ks}})
    lifts = []
    for model, comparison, a, b in comparisons_of(columns):
        for lift in sim.lifts([(a.policy, b.policy)]):
            sentence, outcome = verdict(lift.lift, lift.low, lift.high, f"CTR@{lift.k}", comparison.subject, relative=True)
            numbers = {k: v for k, v in asdict(lift).items() if k not in ("variant", "baseline")}  # policy names
            lifts.append(
                {
                    "model": model,
                    "variant": comparison.variant,
                    "baseline": comparison.baseline,
                    "comparison": comparison.title,
                    "kind": comparison.kind,
                    **numbers,
                    "verdict": sentence,
                    "outcome": outcome,
                }
            )
    return {
        "ks": list(ab_config.ks),
        "position_decay": decay,
        "position_decay_from": decay_origin,
        "simulator_position_decay": simulated_decay,
        "requests": sim.n_requests,
        "users": len(sim.users),
        "ctr": ctr,
        "lifts": lifts,
    }


def targets(goals: dict[str, Any], lifts: list[dict[str, Any]], ab: dict[str, Any] | None, config: ReportConfig) -> list[dict[str, Any]]:
    """Each target of meta["targets"], per model: the estimate, its interval and met / missed."""
    out = []
    for key, threshold in goals.items():
        target = TARGETS.get(key)
        if target is None:
            out.append({"target": key, "threshold": threshold, "model": None, "description": "unknown target: not evaluated", "met": None})
            continue
        if target.kind == "ab":
            if ab is None:
                continue
            k = config.target_k if config.target_k in ab["ks"] else max(ab["ks"])
            found = [x for x in ab["lifts"] if x["k"] == k and x["comparison"] == target.comparison.title]
            estimates = [(x["model"], x["lift"], x["low"], x["high"]) for x in found]
            what = f"{target.comparison.title} CTR@{k} relative lift"
            shown = pct(threshold) if target.rule == "min" else ""
        else:
            found = [x for x in lifts if x["metric"] == target.metric and x["comparison"] == target.comparison.title]
            estimates = [(x["model"], x["delta"], x["low"], x["high"]) for x in found]
            what = f"{target.comparison.title} {METRIC_LABELS[target.metric]} lift"
            shown = signed(threshold) if target.rule == "min" else ""
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
            out.append({"target": key, "threshold": threshold, "model": model, "description": description,
                        "value": value, "low": low, "high": high, "met": met})
    return out


def evaluate_protocol(
    frame: pd.DataFrame,
    protocol: dict[str, Any],
    meta: dict[str, Any],
    config: ReportConfig,
    decay_origin: str = "the report config",
    simulated_decay: float | None = None,
) -> dict[str, Any]:
    """Every number of one protocol's section of the report (plots are added by build_report).

    `config` is resolved (spec.resolve_config): its position_decay and slice_columns are the ones used.
    """
    columns = score_columns(frame)
    if not columns:
        raise ValueError(f"protocol '{protocol.get('name')}': no score columns named {SCORE_PREFIX}<model>__<variant>")
    missing = [c for c in ("user_id", "label") if c not in frame.columns]
    if missing:
        raise ValueError(f"protocol '{protocol.get('name')}': scored table lacks {missing}")
    unscored = [c.column for c in columns if frame[c.column].isna().any()]
    if unscored:
        raise ValueError(f"protocol '{protocol.get('name')}': missing scores in {unscored}; every test row needs every score")
    if config.position_decay is None:
        raise ValueError("evaluate_protocol needs a resolved config (spec.resolve_config): position_decay is None")
    # one bootstrap for the whole table: every interval of the variants and lifts tables comes from the same draws
    samples = UserBootstrap(frame, [c.column for c in columns], metrics=METRICS).resample(config.n_bootstrap, config.seed)
    points = {c.column: ranking_metrics(frame, c.column) for c in columns}
    lifts = pair_deltas(columns, points, samples, LIFT_METRICS)
    ab = ab_test(frame, columns, config, decay_origin, simulated_decay)
    families = slice_families(frame, list(config.slice_columns), config)  # once: the slices and the empty buckets
    return {
        "name": protocol.get("name", "default"),
        "split": protocol.get("split"),
        "feature_mode": protocol.get("feature_mode"),
        "data": data_summary(frame, protocol),
        "freshness": freshness(frame),
        "columns": [asdict(c) | {"label": c.label} for c in columns],
        "variants": variants(columns, points, samples, config),
        "lifts": lifts,
        "ab": ab,
        "slices": slices(frame, columns, families, config),
        "empty_slices": empty_slices(families),
        "targets": targets(dict(meta.get("targets") or {}), lifts, ab, config),
    }
